"""The GPU precision path, proven on the CPU: bf16 end to end, gradient checkpointing, the fp16 scaler, and steps whose
loss or gradients are not finite."""
import json

import pytest
import torch

import llama
import nuteprune as npr
import runfolder
from conftest import GQA, args, tiny_llama


def trainer(dtype=torch.float32, scaler=False, **flags):
    model = tiny_llama(0, **GQA).to(dtype)
    llama.add_lora(model)
    model.train()
    gates = npr.Gates(model.config)
    c = npr.RunConfig(ckpt="x", data="x", target=0.5, micro_batch_size=2, **flags)
    autocast = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype != torch.float32 else npr.nullcontext
    return npr.Parts(model, gates, npr.prune_optimizer(gates, list(llama.lora_state(model).values())),
                       torch.amp.GradScaler("cpu", enabled=scaler), c, autocast)


def params(t):
    return {k: v.detach().clone() for k, v in [*t.gates.state_dict().items(), *llama.lora_state(t.model).items()]}


def test_bf16_on_the_cpu_runs_end_to_end_close_to_fp32(files, tmp_path):
    reports = {}
    for dtype in ("fp32", "bf16"):
        npr.main(args(files, tmp_path / dtype, "--dtype", dtype, "--max-steps", "16"))
        reports[dtype] = json.loads((tmp_path / dtype / "report.json").read_text())
    a, b = reports["fp32"], reports["bf16"]
    assert abs(b["sparsity"] - 0.5) <= 0.005
    assert b["ppl_before"] == pytest.approx(a["ppl_before"], rel=0.01)
    assert b["ppl_after"] == pytest.approx(a["ppl_after"], rel=0.05)
    state = torch.load(tmp_path / "bf16" / "state.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in state["lora"].values())  # LoRA and gates stay fp32
    assert all(v.dtype == torch.float32 for v in state["gates"].values())


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        t = trainer()
        t.model.gradient_checkpointing = ckpt
        torch.manual_seed(1)
        z = t.gates.sample()
        z_leaf = llama.Masks(*(m.detach().requires_grad_() for m in npr.mask_tensors(z)))
        idx = torch.randint(0, 64, (2, 16))
        sum(npr.student_loss(t.model, idx, z_leaf, None, t.c).values()).backward()
        grads.append([z_leaf.head.grad, z_leaf.intermediate.grad, z_leaf.hidden.grad]
                     + [p.grad for p in t.lora_weights])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, atol=1e-7, rtol=1e-6)


def test_fp16_scaler_skips_a_step_with_an_inf_and_lowers_its_scale(monkeypatch):
    t = trainer(scaler=True)
    batch = torch.randint(0, 64, (4, 16))
    assert npr.prune_step(t, batch, None, 0.1)["stepped"]  # a normal step moves everything
    before, scale = params(t), t.scaler.get_scale()
    opt_state = {k: v.clone() for k, v in t.optimizers[0].state[t.gates.lambda_1].items()}
    kd = npr.kd_loss
    monkeypatch.setattr(npr, "kd_loss", lambda s, tt, temp: kd(s, tt, temp) * float("inf"))
    out = npr.prune_step(t, batch, None, 0.1)
    assert not out["stepped"]
    assert all(torch.equal(v, before[k]) for k, v in params(t).items())  # no parameter or lambda changed
    assert all(torch.equal(v, opt_state[k]) for k, v in t.optimizers[0].state[t.gates.lambda_1].items())
    assert t.scaler.get_scale() == scale / 2  # GradScaler's backoff
    monkeypatch.undo()
    assert npr.prune_step(t, batch, None, 0.1)["stepped"]


def test_nonfinite_steps_are_counted_then_stop_the_run_keeping_its_checkpoint(files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    kd, calls = npr.kd_loss, []

    def sometimes_nan(*a):  # step 3 (micro-batches 5, 6) is not finite; from step 7 on, none is
        calls.append(1)
        loss = kd(*a)
        return loss * float("nan") if len(calls) in (5, 6) or len(calls) > 12 else loss
    monkeypatch.setattr(npr, "kd_loss", sometimes_nan)
    with pytest.raises(SystemExit) as e:
        npr.main(args(files, out, "--max-steps", "40", "--save-every", "4", "--log-every", "1"))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and f"{runfolder.MAX_NONFINITE} steps in a row up to step 16" in err
    lines = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines() if '"prune"' in ln]
    assert [ln["skipped_steps"] for ln in lines[:4]] == [0, 0, 1, 1]  # step 3 skipped, counted
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["step"] == 12 and state["skipped"][0] == 1 + 6  # the last checkpoint (steps 3 and 7-12 skipped)
