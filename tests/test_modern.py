"""The options for models with massive activations (issue 28; METHOD.md §2, §4, §5): the layer-loss variants and
their balance to the KL term, protected hidden dims, the plain-ascent controller, the start-up note, --recipe."""
import math

import pytest
import torch

import flags
import llama
import nuteprune as npr
import runner
from conftest import GQA, tiny_llama
from test_cli import args
from test_runs import killed_at


def states(seed, shape=(2, 5, 8), massive=None):
    g = torch.Generator().manual_seed(seed)
    s = [torch.randn(shape, generator=g) for _ in range(3)]
    if massive is not None:
        for x in s:
            x[..., massive] *= 1000.0
    return s


def test_paper_layer_loss_drops_pruned_dims_and_all_keeps_them():
    teacher = states(0)
    student = [t.clone() for t in teacher]
    for s in student:
        s[..., 3] = 0.0  # dim 3 pruned: the student's state is exactly 0 there
    assert npr.layer_loss(student, teacher, "paper") == 0  # Eq. 8 as published: no error where the student is 0
    lost = sum(t[..., 3].pow(2).sum() / t.numel() for t in teacher)
    torch.testing.assert_close(npr.layer_loss(student, teacher, "all"), lost)


@pytest.mark.parametrize("kind", ["scaled", "cosine"])
def test_scale_free_layer_losses_ignore_the_size_of_a_massive_dim(kind):
    teacher = states(0)
    student = [t + 0.1 * n for t, n in zip(teacher, states(1))]
    if kind == "scaled":  # one dim 1000x larger in teacher and student alike: the same loss
        big = [[x.clone() for x in xs] for xs in (student, teacher)]
        for x in big[0] + big[1]:
            x[..., 5] *= 1000.0
        torch.testing.assert_close(npr.layer_loss(*big, kind), npr.layer_loss(student, teacher, kind), rtol=1e-5,
                                   atol=0)
    else:  # scaling every token's state leaves it unchanged
        torch.testing.assert_close(npr.layer_loss([3 * s for s in student], teacher, kind),
                                   npr.layer_loss(student, teacher, kind), rtol=1e-5, atol=1e-6)
    # pruning the massive dim costs what pruning any dim costs (scaled), or most of the state (cosine)
    teacher_massive = states(0, massive=5)
    pruned = [t.clone() for t in teacher_massive]
    for p in pruned:
        p[..., 5] = 0.0
    loss = float(npr.layer_loss(pruned, teacher_massive, kind))
    assert loss == pytest.approx(3 / 8, rel=1e-5) if kind == "scaled" else loss > 2.5  # 3 layers, 1 of 8 dims


def test_layer_balance_makes_the_layer_term_a_fixed_multiple_of_the_kd_term():
    model = tiny_llama(0, **GQA)
    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    z = npr.Gates(model.config).sample(torch.Generator().manual_seed(1))
    for weight in (0.5, 3.0):
        c = npr.RunConfig(ckpt="x", target=0.5, layer_loss="scaled", layer_balance=True, layer_weight=weight)
        loss = npr.student_loss(model, idx, z, None, c)
        torch.testing.assert_close(loss["layer"], weight * loss["kd"])
    c = npr.RunConfig(ckpt="x", target=0.5, layer_loss="scaled", layer_weight=0.5)  # unbalanced: the plain weight
    loss = npr.student_loss(model, idx, z, None, c)
    with torch.no_grad():
        _, hidden = model(idx, z, output_hidden=True)
        _, t_hidden = model(idx, None, output_hidden=True)
    torch.testing.assert_close(loss["layer"], 0.5 * npr.layer_loss(hidden, t_hidden, "scaled"))


def protected_gates(cfg, dims):
    gates = npr.Gates(cfg)
    torch.manual_seed(3)
    for g in (gates.head, gates.intermediate, gates.hidden):
        g.log_alpha.data = torch.randn_like(g.log_alpha) * 2 + 1.0
    gates.hidden.log_alpha.data[dims] = -4.0  # the least confident of all: the first to go without protection
    p = torch.zeros(cfg.dim, dtype=torch.bool)
    p[dims] = True
    gates.hidden.protect(p)
    return gates


@pytest.mark.parametrize("round_to", [1, 8])
def test_protected_hidden_dims_are_never_pruned(round_to):
    cfg = llama.LlamaConfig(dim=64, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=256, vocab_size=64, max_seq_len=64)
    dims = [2, 40]
    gates = protected_gates(cfg, dims)
    assert gates.sample(torch.Generator().manual_seed(0)).hidden[dims].eq(1).all()
    assert gates.prob_nonzero().hidden[dims].eq(1).all() and gates.deterministic().hidden[dims].eq(1).all()
    for target in (0.3, 0.6, 0.9):
        masks = npr.final_masks(gates, cfg, target, round_to=round_to)
        assert masks.hidden[dims].eq(1).all()
        assert abs(float(npr.expected_sparsity(masks, cfg)) - target) <= 0.005
    # no gradient reaches a protected gate through the sample
    z = gates.sample(torch.Generator().manual_seed(0))
    z.hidden.sum().backward()
    assert gates.hidden.log_alpha.grad[dims].eq(0).all() and gates.hidden.log_alpha.grad.ne(0).any()


def test_protected_dims_travel_with_the_gates_state():
    cfg = llama.LlamaConfig(**GQA)
    saved = protected_gates(cfg, [1, 7]).state_dict()
    assert "hidden.protected" in saved and "head.protected" not in saved
    fresh = npr.Gates(cfg)
    fresh.load_state(saved)
    assert fresh.hidden.protected.nonzero().flatten().tolist() == [1, 7]
    plain = npr.Gates(cfg)
    plain.load_state(npr.Gates(cfg).state_dict())  # a checkpoint without protection loads as before
    assert plain.hidden.protected is None


@pytest.mark.parametrize("offset", [-0.1, -0.02, 0.05])
def test_sgd_controller_moves_lambda_1_by_lr_times_the_gap(offset):
    cfg = llama.LlamaConfig(**GQA)
    gates = npr.Gates(cfg)
    optimizers = npr.prune_optimizer(gates, [], "sgd")
    npr.set_learning_rates(optimizers, {"log_alpha": 0.1, "lambda": 10.0})
    expected = npr.expected_sparsity(gates.prob_nonzero(), cfg)
    npr.lagrangian(expected, expected.item() - offset, gates.lambda_1, gates.lambda_2).backward()
    for opt in optimizers:
        opt.step()
    assert gates.lambda_1.item() == pytest.approx(10.0 * offset, rel=1e-4)  # ascent, in proportion to the gap
    assert gates.lambda_2.item() == pytest.approx(10.0 * offset ** 2, rel=1e-4)
    adam = npr.Gates(cfg)
    [opt] = npr.prune_optimizer(adam, [])
    npr.set_learning_rates([opt], {"log_alpha": 0.1, "lambda": 10.0})
    npr.lagrangian(npr.expected_sparsity(adam.prob_nonzero(), cfg), expected.item() - offset, adam.lambda_1,
                   adam.lambda_2).backward()
    opt.step()
    assert adam.lambda_1.item() == pytest.approx(math.copysign(10.0, offset), rel=1e-3)  # Adam: lr, whatever the gap


def test_lambda_2_held_fixed_is_a_proportional_gain_and_never_trained():
    cfg = llama.LlamaConfig(**GQA)
    gates = npr.Gates(cfg, lambda_2=250.0)
    optimizers = npr.prune_optimizer(gates, [], "sgd")
    assert all(p is not gates.lambda_2 for o in optimizers for g in o.param_groups for p in g["params"])
    npr.set_learning_rates(optimizers, {"log_alpha": 0.1, "lambda": 10.0})
    expected = npr.expected_sparsity(gates.prob_nonzero(), cfg)
    gap = 0.03
    l0 = npr.lagrangian(expected, expected.item() - gap, gates.lambda_1, gates.lambda_2)
    (push,) = torch.autograd.grad(l0, expected, retain_graph=True)
    assert push.item() == pytest.approx(2 * 250.0 * gap, rel=1e-4)  # lambda_1 = 0: the proportional term alone
    l0.backward()
    for opt in optimizers:
        opt.step()
    assert gates.lambda_2.item() == 250.0 and gates.lambda_1.item() == pytest.approx(10.0 * gap, rel=1e-4)


def test_gate_init_orders_log_alpha_by_activation_importance_and_keeps_every_unit():
    model = massive_model()
    blocks = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    scores = npr.activation_importance(model, blocks, 2)
    assert scores.hidden.argmax() == 5  # the massive dim ranks first
    gates = npr.Gates(model.config)
    npr.init_from_importance(gates, scores)
    for g in ("head", "intermediate", "hidden"):
        la, sc = getattr(gates, g).log_alpha.detach(), getattr(scores, g)
        for row_la, row_sc in zip(la.view(-1, la.shape[-1]), sc.view(-1, sc.shape[-1])):
            assert torch.equal(row_la.argsort(stable=True), row_sc.argsort(stable=True))  # the same order
            assert row_la.max() == pytest.approx(npr.LOG_ALPHA_MAX)
            assert row_la.min() == pytest.approx(npr.LOG_ALPHA_MAX - npr.GATE_INIT_SPREAD)
    assert gates.prob_nonzero().hidden.min() > 0.95
    assert npr.expected_sparsity(gates.prob_nonzero(), model.config).item() < 0.05


def massive_model():
    """A tiny model whose hidden dim 5 carries a massive activation through the residual stream."""
    model = tiny_llama(0, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, vocab_size=64, max_seq_len=256)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 5] = 300.0
    return model


def test_hidden_energy_finds_the_massive_dim():
    model = massive_model()
    blocks = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    energy = npr.hidden_energy(model, blocks, 2)
    assert energy.argmax() == 5 and energy.sum().item() == pytest.approx(1.0)
    k, share = npr.massive_activations(energy)
    assert k == 1 and share > npr.MASSIVE_SHARE
    k, share = npr.massive_activations(npr.hidden_energy(tiny_llama(0, **GQA), blocks, 2))
    assert share < npr.MASSIVE_SHARE  # a random model has none


def test_a_run_on_a_model_with_massive_activations_says_so_once_and_protects_with_keep_outliers(files, tmp_path,
                                                                                               capsys):
    import checkpoint
    checkpoint.save_model(massive_model(), tmp_path / "massive", tokenizer=files / "tok.model")
    base = [a if a != str(files / "model") else str(tmp_path / "massive") for a in args(files, tmp_path / "a")]
    runner.run(npr, *flags.parse_args(base + ["--max-steps", "2"], npr.RunConfig))
    out = capsys.readouterr().out
    assert out.count("massive activations") == 1 and "--recipe modern" in out
    runner.run(npr, *flags.parse_args(base[:base.index("--out")] + ["--out", str(tmp_path / "b")]
                                      + base[base.index("--out") + 2:] + ["--max-steps", "2", "--keep-outliers", "1",
                                                                          "--layer-loss", "scaled"], npr.RunConfig))
    assert "massive activations" not in capsys.readouterr().out  # the paper's layer loss is off
    saved = torch.load(tmp_path / "b" / "state.pt", weights_only=True)
    assert saved["gates"]["hidden.protected"].nonzero().flatten().tolist() == [5]


def test_recipe_sets_its_defaults_and_explicit_flags_win(files, tmp_path):
    c, _ = flags.parse_args(args(files, tmp_path / "m") + ["--recipe", "modern"], npr.RunConfig)
    for k, v in flags.RECIPES["modern"].items():
        if k not in ("lr_mask", "lr_lambda"):  # args() sets these two explicitly
            assert getattr(c, k) == v, k
    assert c.recipe == "modern"
    c, _ = flags.parse_args(args(files, tmp_path / "m") + ["--recipe", "modern", "--layer-loss", "cosine"],
                            npr.RunConfig)
    assert c.layer_loss == "cosine"
    c, _ = flags.parse_args(args(files, tmp_path / "p"), npr.RunConfig)
    assert (c.recipe, c.layer_loss, c.layer_balance, c.keep_outliers, c.lambda_optim, c.lambda_2) == (
        "paper", "paper", False, 0, "adam", None)
    for bad in (dict(layer_loss="l1"), dict(lambda_optim="rmsprop"), dict(keep_outliers=-1), dict(recipe="x"),
                dict(lambda_2=-1.0), dict(gate_init="magnitude")):
        with pytest.raises(ValueError):
            npr.RunConfig(ckpt="x", target=0.5, **bad)


def test_settle_fixes_the_final_masks_trains_lora_under_them_and_resumes_exactly(files, tmp_path):
    import json
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    flags_ = ["--max-steps", "12", "--settle", "0.25", "--save-every", "1", "--distill", "kd"]
    npr.main(args(files, whole, *flags_))
    log = [json.loads(x) for x in (whole / "log.jsonl").read_text().splitlines()]
    prune = [r for r in log if r["phase"] == "prune"]
    settled = [r for r in prune if r.get("settled")]
    assert [r["step"] for r in settled] == [10, 12]  # the last 3 of 12 steps (logged every 2)
    assert all(r["l0"] == 0 and r["lambda_1"] == settled[0]["lambda_1"] for r in settled)  # gates and lambdas fixed
    state = torch.load(whole / "state.pt", weights_only=True)
    report = json.loads((whole / "report.json").read_text())
    assert abs(report["sparsity"] - 0.5) <= 0.005
    killed_at(11, args(files, cut, *flags_))  # in the middle of the settle steps
    npr.main(["--resume", str(cut)])
    resumed = torch.load(cut / "state.pt", weights_only=True)
    for k in state["lora"]:
        assert torch.equal(state["lora"][k], resumed["lora"][k]), k
    for g in ("head", "intermediate", "hidden"):
        assert torch.equal(state["final_masks"][g], resumed["final_masks"][g])
