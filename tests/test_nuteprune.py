"""Invariants of the pure parts of nuteprune.py: gates, expected sparsity, Lagrangian, teachers, losses."""
import math

import pytest
import torch

import llama
import nuteprune as npr
import rounding
from conftest import GQA, MHA, tiny_llama
from llama import Masks


def tiny(seed=0, lora=True, **kw):
    model = tiny_llama(seed, **kw)
    for p in model.parameters():
        p.requires_grad_(False)
    if lora:
        llama.add_lora(model)
        for p in llama.lora_state(model).values():  # a trained-looking adapter
            torch.nn.init.normal_(p, std=0.1)
    return model


def random_binary_masks(cfg, seed) -> Masks:
    g = torch.Generator().manual_seed(seed)
    head = (torch.rand(cfg.n_layers, cfg.n_heads, generator=g) > 0.5).float()
    head[0, :cfg.n_heads // cfg.n_kv_heads] = 0  # a whole K/V group of layer 0
    head[0, -1] = 1
    inter = (torch.rand(cfg.n_layers, cfg.ffn_dim, generator=g) > 0.5).float()
    hidden = (torch.rand(cfg.dim, generator=g) > 0.3).float()
    hidden[0] = 1
    return Masks(head, inter, hidden)

# -- hard-concrete gates (METHOD.md §2) ------------------------------------------------------------------------------------


def test_sampled_gates_match_analytic_expectation():
    torch.manual_seed(0)
    log_alpha = torch.linspace(-3, 3, 7)
    gate = npr.HardConcrete((40000, 7), 0.0)
    gate.log_alpha.data[:] = log_alpha
    z = gate.sample()  # (40000, 7): 40000 draws of each of 7 gates
    assert z.min() >= 0 and z.max() <= 1 and (z == 0).any() and (z == 1).any()
    torch.testing.assert_close((z != 0).float().mean(0), gate.prob_nonzero()[0], atol=0.01, rtol=0)
    # E[z] by quadrature: z is a function of u ~ U(0, 1) (Eq. 4); midpoint rule on a fine grid
    u = (torch.arange(100000, dtype=torch.float64) + 0.5) / 100000
    s = torch.sigmoid((u.log() - (1 - u).log() + log_alpha.double()[:, None]) / npr.BETA)
    expected_z = (s * (npr.STRETCH[1] - npr.STRETCH[0]) + npr.STRETCH[0]).clamp(0, 1).mean(1).float()
    torch.testing.assert_close(z.mean(0), expected_z, atol=0.01, rtol=0)


@pytest.mark.parametrize("shape", [(3, 50), (40,)], ids=["per-layer", "hidden"])
def test_deterministic_masks_keep_the_intended_count(shape):
    torch.manual_seed(1)
    gate = npr.HardConcrete(shape, 0.0)
    gate.log_alpha.data = torch.randn(shape) * 3
    m = gate.deterministic()
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(m.sum(-1), gate.prob_nonzero().sum(-1).round(), atol=0, rtol=0)  # round(sum P) per row
    for la, row in zip(gate.log_alpha.detach().view(-1, shape[-1]), m.view(-1, shape[-1])):
        assert la[row == 1].min() > la[row == 0].max()  # the most confident units are the kept ones


def test_gates_init_and_clamp():
    gates = npr.Gates(llama.LlamaConfig(**GQA))
    assert npr.expected_sparsity(gates.prob_nonzero(), llama.LlamaConfig(**GQA)).item() < 0.01  # starts dense
    gates.clamp_()
    for g in (gates.head, gates.intermediate, gates.hidden):
        assert g.log_alpha.max() <= npr.LOG_ALPHA_MAX + 1e-6

# -- expected sparsity (METHOD.md §3) ------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [MHA, GQA], ids=["mha", "gqa"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expected_sparsity_equals_what_export_removes(cfg, seed):
    model = tiny(**cfg)
    masks = random_binary_masks(model.config, seed)
    pruned = llama.prune_model(model, masks)
    removed = 1 - llama.prunable_tensors(pruned) / llama.prunable_tensors(model)
    assert abs(float(npr.expected_sparsity(masks, model.config)) - removed) < 1e-6
    if cfg is GQA:
        assert pruned.config.kv_heads[0] < model.config.n_kv_heads  # the group removed on export is counted


def test_expected_sparsity_is_the_mean_over_sampled_binary_masks():
    # independent Bernoulli(P) units: the mean exact sparsity of samples converges to Eq. 3 with the GQA K/V term
    cfg = llama.LlamaConfig(**GQA)
    g = torch.Generator().manual_seed(0)
    p = Masks(torch.rand(cfg.n_layers, cfg.n_heads, generator=g), torch.rand(cfg.n_layers, cfg.ffn_dim, generator=g),
              torch.rand(cfg.dim, generator=g))
    draws = [float(npr.expected_sparsity(Masks(*(torch.bernoulli(t, generator=g) for t in npr.mask_tensors(p))), cfg))
             for _ in range(4000)]
    mean, se = sum(draws) / len(draws), torch.tensor(draws).std().item() / math.sqrt(len(draws))
    assert abs(mean - float(npr.expected_sparsity(p, cfg))) < 4 * se


def random_gates(cfg) -> npr.Gates:
    gates = npr.Gates(cfg)
    torch.manual_seed(3)
    for g in (gates.head, gates.intermediate, gates.hidden):
        g.log_alpha.data = torch.randn_like(g.log_alpha) * 2 + 1.0
    return gates


@pytest.mark.parametrize("cfg", [MHA, GQA], ids=["mha", "gqa"])
@pytest.mark.parametrize("target", [0.2, 0.5, 0.7])
def test_final_masks_land_within_tolerance_of_any_target(cfg, target):
    model = tiny(**cfg)
    masks = npr.final_masks(random_gates(model.config), model.config, target, tol=0.005)
    exported = 1 - llama.prunable_tensors(llama.prune_model(model, masks)) / llama.prunable_tensors(model)
    assert abs(exported - target) <= 0.005


@pytest.mark.parametrize("cfg", [MHA, GQA], ids=["mha", "gqa"])
@pytest.mark.parametrize("offset", [-0.03, 0.03])
def test_final_masks_near_target_change_only_ffn_counts(cfg, offset):
    c = llama.LlamaConfig(**cfg)
    gates = random_gates(c)
    reference = gates.deterministic()
    target = float(npr.expected_sparsity(reference, c)) + offset  # the reference rule lands 3 points off
    masks = npr.final_masks(gates, c, target, tol=0.005)
    assert abs(float(npr.expected_sparsity(masks, c)) - target) <= 0.005
    assert torch.equal(masks.head, reference.head) and torch.equal(masks.hidden, reference.hidden)
    changed = masks.intermediate != reference.intermediate
    la = gates.intermediate.log_alpha.detach()
    if offset > 0:  # channels dropped: the least confident of those kept
        assert la[changed].max() <= la[(reference.intermediate == 1) & ~changed].min()
    else:  # channels added: the most confident of those pruned
        assert la[changed].min() >= la[(reference.intermediate == 0) & ~changed].max()


def test_final_masks_keep_the_reference_rule_when_it_is_on_target():
    cfg = llama.LlamaConfig(**GQA)
    gates = npr.Gates(cfg)
    reference = gates.deterministic()
    s = float(npr.expected_sparsity(reference, cfg))
    masks = npr.final_masks(gates, cfg, s + 0.004)
    assert all(torch.equal(a, b) for a, b in zip(npr.mask_tensors(masks), npr.mask_tensors(reference)))

# -- Lagrangian and schedules (METHOD.md §4) -------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [-0.1, 0.1])
def test_one_ascent_step_moves_lambda_1_with_the_sign_of_expected_minus_target(offset):
    cfg = llama.LlamaConfig(**GQA)
    gates = npr.Gates(cfg)
    [optimizer] = npr.prune_optimizer(gates, [])
    expected = npr.expected_sparsity(gates.prob_nonzero(), cfg)
    target = expected.item() - offset  # expected - target = offset
    npr.lagrangian(expected, target, gates.lambda_1, gates.lambda_2).backward()
    optimizer.step()
    assert math.copysign(1, gates.lambda_1.item()) == math.copysign(1, offset)
    assert gates.lambda_2.item() > 0  # its gradient (expected - target)^2 is never negative


def test_target_schedule_is_linear_over_the_warmup():
    assert npr.target_at(0, 0.5, 100) == 0
    assert npr.target_at(50, 0.5, 100) == pytest.approx(0.25)
    assert npr.target_at(100, 0.5, 100) == npr.target_at(1000, 0.5, 100) == 0.5
    assert npr.target_at(0, 0.5, 0) == 0.5
    assert npr.linear_decay(0, 1e-3, 10) == 1e-3 and npr.linear_decay(10, 1e-3, 10) == 0


def test_batch_order_is_a_pure_function_of_step():
    n, bs = 10, 3  # 3 steps per epoch, one block dropped
    epoch0 = torch.cat([npr.batch_indices(s, n, bs, seed=7) for s in range(3)])
    assert len(set(epoch0.tolist())) == 9
    assert torch.equal(npr.batch_indices(1, n, bs, seed=7), npr.batch_indices(1, n, bs, seed=7))
    assert not torch.equal(epoch0, torch.cat([npr.batch_indices(s, n, bs, seed=7) for s in range(3, 6)]))

# -- teachers (METHOD.md §6) -----------------------------------------------------------------------------------------------


def levels(teacher):
    return 0 if teacher is None else teacher.level  # 0: the intact model


@pytest.mark.parametrize("target, interval, gap", [(0.5, 0.01, 0.10), (0.2, 0.01, 0.10), (0.5, 0.10, 0.10),
                                                  (0.5, 0.01, 0.05), (0.5, 0.01, 0.20)])
def test_teacher_choice_follows_eq_10_11(target, interval, gap):
    c = npr.RunConfig(ckpt="x", data="x", target=target, interval=interval, gap=gap)
    sched = npr.Schedule.of(c, n_blocks=10_000 * c.batch_size, n_examples=0)
    G, top, n = sched.gap, sched.stage2_top, sched.n_levels
    snaps = [npr.Snapshot(k, k * interval, None, {}) for k in range(1, n + 1)]  # every level below the target
    # stage 1: a student that has crossed level k has sparsity s in [k i, (k + 1) i); its teacher is between g and
    # g + i sparser (Eq. 10), the intact model while s < g + i (Eq. 11)
    for k in range(n + 1):
        teacher = npr.pick_teacher(0, snaps[:k], None, 10_000, G, top)
        for s in (k * interval, (k + 0.99) * interval):
            if s < gap + interval - 1e-9:
                assert teacher is None
            else:
                assert gap - 1e-9 <= s - teacher.level * interval < gap + interval - 1e-9
    # stage 2 (the student at the target): the snapshots from target - g down to i, then the intact model, each an
    # equal share of the remaining steps
    assert gap - 1e-9 <= target - top * interval < gap + interval - 1e-9
    part, start = 7, 1000
    total = start + part * (top + 1)
    seq = [levels(npr.pick_teacher(s, snaps, start, total, G, top)) for s in range(start, total)]
    assert seq == [k for k in range(top, -1, -1) for _ in range(part)]  # ..., 1, then 0: the intact model
    assert seq.count(0) / len(seq) == pytest.approx(1 / (top + 1))  # the intact model's final share


def test_snapshots_one_per_step_at_the_highest_level_crossed():
    cfg = llama.LlamaConfig(**GQA)
    model, gates, snaps = tiny(**GQA), npr.Gates(cfg), []
    for now in (0.005, 0.012, 0.013, 0.047, 0.051, 0.3):
        npr.take_snapshots(snaps, gates, model, cfg, now, 0.01, n_levels=5)
    assert [s.level for s in snaps] == [1, 4, 5]  # 0.047 jumps from 1 to 4: one snapshot; capped at n_levels
    teacher = npr.pick_teacher(0, snaps, None, 100, gap=2, top=3)  # student at level 5: wants <= 3, gets 1
    assert teacher.level == 1


def test_teacher_adapter_is_the_teacher_and_the_student_returns_even_when_the_forward_raises():
    model = tiny(**GQA)
    student = {k: v.clone() for k, v in llama.lora_state(model).items()}
    teacher = {k: torch.randn_like(v) for k, v in student.items()}
    as_teacher = tiny(**GQA)
    llama.load_lora_state(as_teacher, teacher)
    idx = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        with npr.teacher_lora(model, teacher):  # the forward adds the teacher's adapter, from its frozen slot
            torch.testing.assert_close(model(idx), as_teacher(idx), atol=0, rtol=0)
        with pytest.raises(IndexError):
            with npr.teacher_lora(model, teacher):
                model(torch.full((1, 4), 10_000))  # token ids beyond the vocabulary: the forward raises
        assert all(m.adapter == "student" for m in llama.lora_modules(model).values())
        assert all(torch.equal(v, student[k]) for k, v in llama.lora_state(model).items())  # never touched
        with npr.teacher_lora(model, None):  # the intact model: no LoRA at all
            intact = model(idx)
        torch.testing.assert_close(intact, tiny(lora=False, **GQA)(idx), atol=0, rtol=0)
        plain_student = tiny(**GQA)
        llama.load_lora_state(plain_student, student)
        torch.testing.assert_close(model(idx), plain_student(idx), atol=0, rtol=0)


# -- losses (METHOD.md §5) -------------------------------------------------------------------------------------------------


def test_kd_loss_is_batchmean_kl_times_t_squared():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    T = 2 / 3
    p_t = torch.softmax(t / T, -1)
    manual = (p_t * (p_t.log() - torch.log_softmax(s / T, -1))).sum() / 2 * T ** 2
    torch.testing.assert_close(npr.kd_loss(s, t, T), manual)
    assert npr.kd_loss(t, t, T).abs() < 1e-6


def test_layer_loss_ignores_pruned_hidden_dims():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    student[..., :3] = 0  # pruned hidden dims: whatever the teacher has there carries no loss
    expected = ((student - teacher)[..., 3:] ** 2).mean()
    torch.testing.assert_close(npr.layer_loss([student, student], [teacher, teacher]), 2 * expected)


# -- post fine-tuning loss (METHOD.md §7) ---------------------------------------------------------------------------


def test_finetune_loss_is_the_mean_over_the_batchs_labelled_tokens_whatever_the_micro_batch():
    gen = torch.Generator().manual_seed(0)
    batch = []
    for n, prompt in ((9, 3), (14, 6), (5, 2), (11, 8)):  # uneven lengths and prompts: micro-batch means would differ
        ids = torch.randint(3, 64, (n,), generator=gen).tolist()
        batch.append((ids, [-100] * prompt + ids[prompt:]))
    results = []
    for micro in (1, 2, 4):
        model = llama.add_lora(tiny_llama(0, **GQA), ("q_proj", "v_proj", "down_proj"))
        gates = npr.Gates(model.config)
        c = npr.RunConfig(ckpt="x", data="x", target=0.5, micro_batch_size=micro)
        parts = npr.Parts(model, gates, npr.finetune_optimizer(list(llama.lora_state(model).values())),
                          torch.amp.GradScaler("cpu", enabled=False), c)
        with torch.no_grad():
            for p in llama.lora_state(model).values():
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))  # B != 0: LoRA in the graph
        loss = npr.finetune_backward(parts, batch, Masks(), pad_id=0)
        results.append((loss, [p.grad.clone() for p in llama.lora_state(model).values()]))
    ids, labels = npr.data.pad_batch(batch, 0)
    with torch.no_grad():
        expected = npr.lm_loss(model(ids), labels).item()  # one mean over every labelled token of the batch
    for loss, grads in results:
        assert loss == pytest.approx(expected, rel=1e-6, abs=0)
        for g, g1 in zip(grads, results[0][1]):
            torch.testing.assert_close(g, g1, atol=1e-6, rtol=1e-5)

# -- --round-to N: hardware-friendly widths in the final masks ------------------------------------------------------

ROUNDABLE = dict(dim=64, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=256, vocab_size=64, max_seq_len=64)


def query_groups(cfg: llama.LlamaConfig) -> list[list[int]]:
    """Per layer of an exported model: the number of query heads on each of its K/V heads."""
    return [[m.count(k) for k in range(kv)] for m, kv in zip(cfg.kv_map, cfg.kv_heads)]


@pytest.mark.parametrize("target", [0.2, 0.5, 0.7])
def test_round_to_32_keeps_ffn_widths_in_multiples_of_32_on_target(target):
    model = tiny(lora=False, **ROUNDABLE)
    gates = random_gates(model.config)  # log_alpha ~ N(1, 2): the reference rule keeps ragged widths
    assert any(f % 32 for f in gates.deterministic().intermediate.sum(-1).tolist())
    masks = npr.final_masks(gates, model.config, target, tol=0.005, round_to=32)
    pruned = llama.prune_model(model, masks).config
    assert all(f % 32 == 0 for f in pruned.ffn), pruned.ffn
    assert pruned.dim % 32 == 0
    assert all(len(set(g)) == 1 for g in query_groups(pruned) if g), query_groups(pruned)  # no padding in llama.cpp
    exported = 1 - llama.prunable_tensors(llama.prune_model(model, masks)) / llama.prunable_tensors(model)
    assert abs(exported - target) <= 0.005
    assert rounding.unmet(masks, model.config, 32) == []


def test_round_to_keeps_the_trained_ranking():
    cfg = llama.LlamaConfig(**ROUNDABLE)
    gates = random_gates(cfg)
    for target in (0.2, 0.5, 0.7):
        masks = npr.final_masks(gates, cfg, target, round_to=32)
        for group in ("intermediate", "hidden"):  # per row, the kept units are the row's most confident
            la, kept = getattr(gates, group).log_alpha.detach(), getattr(masks, group)
            for row, k in zip(la.view(-1, la.shape[-1]), kept.view(-1, la.shape[-1])):
                if 0 < k.sum() < len(k):
                    assert row[k == 1].min() >= row[k == 0].max()


def test_round_to_evens_query_groups_moving_fewest_heads():
    la = torch.tensor([3.0, 2.0, 1.0, 0.0, 5.0, -1.0, -2.0, -3.0])  # two K/V heads with 4 query heads each
    kept = torch.tensor([1, 1, 1, 0, 1, 0, 0, 0.])  # groups of 3 and 1
    even = rounding._equal_groups(la, kept, 4)
    assert even.tolist() == [1, 1, 1, 0, 0, 0, 0, 0]  # one group of 3: one head moved (2 groups of 2 would move 2)
    mha = torch.tensor([1, 0, 1, 1, 0, 1, 0, 1.])
    assert torch.equal(rounding._equal_groups(la, mha, 1), mha)  # one head per group: nothing to even out


def test_round_to_1_is_the_paper_rule():
    cfg = llama.LlamaConfig(**ROUNDABLE)
    gates = random_gates(cfg)
    for target in (0.2, 0.5):
        a, b = npr.final_masks(gates, cfg, target), npr.final_masks(gates, cfg, target, round_to=1)
        assert all(torch.equal(x, y) for x, y in zip(npr.mask_tensors(a), npr.mask_tensors(b)))


def test_round_to_wider_than_the_model_is_reported_unmet():
    cfg = llama.LlamaConfig(**ROUNDABLE)
    masks = npr.final_masks(random_gates(cfg), cfg, 0.5, round_to=512)  # FFN 256 and hidden 64 are narrower
    assert abs(float(npr.expected_sparsity(masks, cfg)) - 0.5) <= 0.005  # the target still holds
    unmet = rounding.unmet(masks, cfg, 512)
    assert unmet and unmet[0].startswith("FFN widths not multiples of 512")


@pytest.mark.parametrize("round_to", [1, 32])
def test_keep_hidden_prunes_heads_and_ffn_only_on_target(round_to):
    cfg = llama.LlamaConfig(**ROUNDABLE)
    gates = random_gates(cfg)  # hidden log_alpha ~ N(1, 2): the reference rule would drop some hidden dims
    frozen = npr.Gates(cfg, keep_hidden=True)
    frozen.load_state_dict(gates.state_dict())
    assert gates.deterministic().hidden.sum() < cfg.dim
    assert frozen.sample().hidden.eq(1).all() and frozen.prob_nonzero().hidden.eq(1).all()
    assert not frozen.hidden.log_alpha.requires_grad
    for target in (0.2, 0.5, 0.8):
        masks = npr.final_masks(frozen, cfg, target, round_to=round_to)
        assert masks.hidden.eq(1).all()
        assert abs(float(npr.expected_sparsity(masks, cfg)) - target) <= 0.005
        assert round_to == 1 or rounding.unmet(masks, cfg, round_to) == []
