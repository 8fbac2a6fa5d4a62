"""The benchmarks measure the code users run: bench/train_cost.py steps with nuteprune.prune_step itself."""
import sys

import torch

import llama
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import train_cost  # noqa: E402


def test_train_cost_times_every_phase_of_prune_step(monkeypatch):
    cfg = llama.LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, vocab_size=64, max_seq_len=64)
    s = train_cost.build(cfg, "cpu", torch.float32, n_snapshots=12, grad_ckpt=False)
    calls = []
    step = train_cost.npr.prune_step
    monkeypatch.setattr(train_cost.npr, "prune_step", lambda *a, **kw: calls.append(a[0].c.distill) or step(*a, **kw))
    idx = torch.randint(0, 64, (1, 16))
    phases = {}
    for mode in train_cost.MODES:
        marks = []
        train_cost.train_step(s, idx, mode, marks)
        phases[mode] = [p for p, _ in marks]
    assert calls == ["none", "kd", "pkd", "pkd"]  # floor is a bare forward
    assert phases["plain"] == ["start", "student", "loss", "backward", "optimizer"]
    assert phases["pkd_layer"] == ["start", "teacher", "student", "loss", "backward", "optimizer"]
