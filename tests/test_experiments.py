"""experiments/: the baselines hit the target on a tiny model, LoRA recovery is seeded locally, plots draw."""
import json
import sys

import pytest
import torch

import llama
from conftest import ROOT

sys.path.insert(0, str(ROOT / "experiments"))
import baselines  # noqa: E402


def tiny(seed=0):
    torch.manual_seed(seed)
    model = llama.Llama(llama.LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, vocab_size=64,
                                          max_seq_len=64))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


@pytest.mark.parametrize("method", ["magnitude", "taylor"])
@pytest.mark.parametrize("target", [0.2, 0.5])
def test_baseline_masks_hit_target_and_equal_masked_model(method, target):
    model = tiny()
    blocks = torch.randint(0, 64, (8, 17), generator=torch.Generator().manual_seed(1))
    masks = baselines.prune_masks(model, method, target, blocks)
    pruned = llama.prune_model(model, masks)
    sparsity = 1 - llama.prunable_params(pruned.config) / llama.prunable_params(model.config)
    assert abs(sparsity - target) < 0.03  # 4 heads and 32 dims per layer: coarse steps on a model this small
    assert len(set(pruned.config.heads)) == 1 and len(set(pruned.config.ffn)) == 1  # uniform per layer
    idx = blocks[:2]
    torch.testing.assert_close(pruned(idx), model(idx, masks), rtol=1e-4, atol=1e-4)


def test_finetune_is_seeded_by_its_own_generator_and_lowers_the_loss():
    blocks = torch.randint(0, 8, (16, 9), generator=torch.Generator().manual_seed(0))  # a small vocabulary: learnable

    def loss(m):
        return torch.nn.functional.cross_entropy(m(blocks[:, :-1]).flatten(0, 1), blocks[:, 1:].flatten()).item()

    before = loss(tiny())
    torch.manual_seed(123)
    a = baselines.finetune(tiny(), blocks, steps=15, batch_size=4, lr=1e-2, seed=7)
    torch.manual_seed(456)  # the global generator must not matter
    b = baselines.finetune(tiny(), blocks, steps=15, batch_size=4, lr=1e-2, seed=7)
    assert not llama.lora_modules(a)  # merged
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, msg=n)
    assert loss(a) < before


def test_plots_draw_a_fake_run(tmp_path):
    pytest.importorskip("matplotlib")
    import plots
    log = [{"phase": "prune", "step": s, "loss": 1.0 + s, "kd": 0.5, "layer": 0.4, "lm": 0.0, "l0": 0.1 * s - 1,
            "expected_sparsity": min(0.5, s / 20), "target": min(0.5, s / 10), "lambda_1": -s, "lambda_2": s,
            "teacher_sparsity": max(0.0, s / 20 - 0.1)} for s in range(1, 21)]
    log.append({"phase": "finetune", "step": 1, "loss": 2.0, "lr_lora": 1e-4})
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    report = {"target": 0.5, "sparsity": 0.5, "hidden": 30, "stage2_start": 12,
              "layers": [{"heads": 3, "kv_heads": 2, "ffn": 20}, {"heads": 2, "kv_heads": 1, "ffn": 31}]}
    (tmp_path / "report.json").write_text(json.dumps(report))
    (tmp_path / "pruned").mkdir()
    (tmp_path / "pruned" / "config.json").write_text(json.dumps({"num_attention_heads": 4, "intermediate_size": 48}))
    paths = plots.plot_run(tmp_path, tmp_path / "figs", "fake")
    assert [p.name for p in paths] == ["sparsity.png", "layers.png", "losses.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_plots_reject_an_unfinished_run(tmp_path):
    import plots
    (tmp_path / "log.jsonl").write_text("")
    with pytest.raises(ValueError, match="report.json does not exist"):
        plots.read_run(tmp_path)
