"""The benchmarks measure the code users run: bench/train_cost.py steps with nuteprune.prune_step itself, and
bench/llama_cpp_speed.py runs end to end."""
import json
import sys

import pytest
import torch

import checkpoint
import llama
import tokenization
from conftest import ROOT, need
from test_recorded_paths import absolute_paths

sys.path.insert(0, str(ROOT / "bench"))
import llama_cpp_speed  # noqa: E402
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


def stories_dense_and_pruned(tmp_path):
    """stories260K saved as a dense checkpoint and as a run folder pruned to half its heads and 128 FFN channels."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    tok = tokenization.SentencePieceTokenizer(need("stories260K", "tok512.model"))
    model = checkpoint.load_model(need("stories260K", "stories260K.bin"))
    checkpoint.save_model(model, tmp_path / "dense", tok)
    head, inter = torch.ones(5, 8), torch.ones(5, 172)
    head[:, ::2], inter[:, 128:] = 0, 0
    checkpoint.export_pruned(model, llama.Masks(head, inter, None), tmp_path / "run" / "pruned", tok)
    return model


def speed_rows(tmp_path, *flags: str) -> list[dict]:
    llama_cpp_speed.main(["--dense", str(tmp_path / "dense"), "--pruned", f"p={tmp_path / 'run'}", "--threads", "1",
                          "--reps", "1", "--ppl-windows", "1", "--wikitext", str(need("wikitext2", "wiki.test.raw")),
                          "--work", str(tmp_path / "work"), "--json", str(tmp_path / "out.json"), *flags])
    return json.loads((tmp_path / "out.json").read_text())["models"]


def test_llama_cpp_speed_runs_end_to_end(tmp_path):
    """bench/llama_cpp_speed.py on stories260K, dense and pruned, one round: every row, ratio and perplexity."""
    model = stories_dense_and_pruned(tmp_path)
    rows = speed_rows(tmp_path, "--types", "f16,q8_0")
    assert [(r["label"], r["type"]) for r in rows] == [("dense", "f16"), ("dense", "q8_0"), ("p", "f16"), ("p", "q8_0")]
    assert all(r["pp_tok_s"] > 0 and r["tg_tok_s"] > 0 and r["ppl"] > 1 for r in rows)
    kept = llama.count_params(checkpoint.load_model(tmp_path / "run" / "pruned")) / llama.count_params(model)
    assert rows[2]["kept"] == rows[3]["kept"] == pytest.approx(kept) and rows[0]["pp_ratio"] == 1.0
    assert rows[1]["fallbacks"] and not rows[3]["fallbacks"]  # FFN 172 is no multiple of 32; 128 is
    # what it records names no folder of this machine: the GGUFs in --work by name, the data relative to the repository
    assert not absolute_paths((tmp_path / "out.json").read_text()) and rows[0]["path"] == "dense-f16.gguf"


def test_llama_cpp_flash_attention_runs_the_same_pruned_model(tmp_path):
    """--flash-attn on: llama.cpp's fused attention over per-layer head counts (the pruned model keeps 4 of 8 heads)
    gives the perplexity of the unfused graph, to float rounding; the setting is recorded with the timings."""
    stories_dense_and_pruned(tmp_path)
    off = speed_rows(tmp_path, "--types", "f16")
    on = speed_rows(tmp_path, "--types", "f16", "--flash-attn", "on")
    assert json.loads((tmp_path / "out.json").read_text())["environment"]["flash_attn"] is True
    assert [r["ppl"] for r in on] == pytest.approx([r["ppl"] for r in off], rel=1e-3)
    assert on[1]["ppl"] != pytest.approx(on[0]["ppl"], rel=1e-3)  # the pruned model is another model


def test_prune_flops_counts_and_classifies_a_tiny_step():
    import prune_flops
    r = prune_flops.main(["--preset", "tiny", "--batch", "2", "--seq", "12", "--micro-batch", "2", "--repeats", "1"])
    assert r["step_flops"] > 0 and r["achieved_flops_s"] > 0 and set(r["classes"]) == set(prune_flops.CLASSES)
    assert r["classes"]["projection GEMMs"]["flops"] > 0 and r["classes"]["LM head (vocabulary matmuls)"]["flops"] > 0
    cfg = llama.LlamaConfig(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536, vocab_size=49152)
    c = prune_flops.classify
    assert c("aten::mm", [[512, 576], [576, 49152]], cfg, 8) == "LM head (vocabulary matmuls)"
    assert c("aten::mm", [[512, 576], [576, 8]], cfg, 8) == "LoRA thin matmuls"
    assert c("aten::mm", [[512, 576], [576, 1536]], cfg, 8) == "projection GEMMs"
    assert c("aten::_log_softmax", [[4, 128, 49152]], cfg, 8) == "softmax / KL over the vocabulary"
    assert c("aten::mul", [[4, 128, 1536], [1536]], cfg, 8) == "mask multiplies"
    assert c("aten::mul", [[4, 9, 128, 64], [1, 9, 1, 1]], cfg, 8) == "mask multiplies"
    assert c("aten::mul", [[576], [4, 128, 576]], cfg, 8).startswith("other")  # RMSNorm's weight, not a gate


def test_llama_cpp_shapes_variants_prune_what_they_say_and_count_every_matrix_row():
    import llama_cpp_shapes as shapes
    cfg = llama.LlamaConfig(dim=128, n_layers=2, n_heads=6, n_kv_heads=3, head_dim=16, ffn_dim=256, vocab_size=64,
                            tie_embeddings=True)
    model = llama.Llama(cfg)
    for name, kw in shapes.variants(cfg).items():
        pruned = llama.prune_model(model, shapes.masks(cfg, **kw))
        c = pruned.config
        assert c.dim == kw.get("hidden", 128) and c.ffn == [kw.get("ffn", 256)] * 2, name
        assert c.kv_heads == [kw.get("groups", 3)] * 2 and c.heads == [kw.get("groups", 3) * kw.get("heads", 2)] * 2
        linears = [m for m in pruned.modules() if isinstance(m, torch.nn.Linear)]  # every projection and the head
        assert linears[-1].weight.shape == (c.vocab_size, c.dim)
        s = shapes.shape(c)
        assert s["weights"] == sum(m.weight.numel() for m in linears)
        assert s["rows"] == sum(m.weight.shape[0] for m in linears)


def test_random_pruned_copies_a_runs_widths_rounded():
    """bench/random_pruned.py: layer i takes run layer i * L_run // L's fractions, FFN and hidden in multiples of N,
    the same number of query heads on every kept K/V head."""
    import random_pruned
    cfg = llama.LlamaConfig(dim=64, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=128, vocab_size=32)
    run = [{"heads": 0.5, "kv_heads": 1.0, "ffn": 0.5}, {"heads": 0.25, "kv_heads": 0.5, "ffn": 0.75}]
    new = llama.pruned_config(cfg, random_pruned.profile_masks(cfg, run, 0.75, 16))
    assert (new.heads, new.kv_heads, new.ffn, new.dim) == ([4, 4, 2, 2], [2, 2, 1, 1], [64, 64, 96, 96], 48)
    assert new.kv_map == [[0, 0, 1, 1]] * 2 + [[0, 0]] * 2


def test_inference_bench_keeps_the_hidden_width_a_run_kept(monkeypatch):
    """bench/inference.py --report: a run that kept every hidden dim gives bench models that keep them too."""
    import inference
    cfg = llama.LlamaConfig(**train_cost.PRESETS["bench"])
    monkeypatch.setattr(inference, "run_profile", lambda report: ([0.5] * 30, [0.4] * 30, 1.0))
    masks = inference.profile_masks(cfg, 0.5, {"layers": []})
    assert int(masks.hidden.sum()) == cfg.dim
    assert 1 - llama.prunable_params(llama.pruned_config(cfg, masks)) / llama.prunable_params(cfg) == \
        pytest.approx(0.5, abs=0.005)
    builtin = inference.profile_masks(cfg, 0.5, None)  # the built-in profile prunes hidden dims too
    assert int(builtin.hidden.sum()) == 636  # as in bench/inference.json
