"""A random LLaMA of a real model's shape, and copies of it cut to the per-layer widths of finished NutePrune runs:
checkpoints for bench/llama_cpp_speed.py, to ask how a pruning's speed-up in llama.cpp changes with the model's size.

    python bench/random_pruned.py --shape tinyllama-1.1b --run kh50=runs/smollm2/runs/pkd-kh-50-s0 --out /tmp/scale
    python bench/llama_cpp_speed.py --dense /tmp/scale/dense --pruned /tmp/scale/kh50 --types q8_0 --ppl-windows 0

Why random weights: a decode's speed depends on the shapes it multiplies, never on the values, so a 1.1B-shaped model
needs no 1.1B checkpoint (none is here). Each pruned copy takes, for each of its layers, the keep fractions of the run
layer at the same relative depth (query heads, K/V heads, FFN channels; report.json) and the run's kept hidden
fraction, rounded as `--round-to N` rounds (FFN channels and the hidden width to multiples of N, the same number of
query heads on every kept K/V head): the best case a user with `--round-to` gets. The weights are bf16 (half the
memory of fp32; llama.cpp converts them like any other checkpoint).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import checkpoint  # noqa: E402
import llama  # noqa: E402
from train_cost import random_llama  # noqa: E402

SHARED = ROOT.parent / "shared"
LLAMA_TOKENIZER = SHARED / "data" / "llama_tokenizer" / "tokenizer.model"
SMOLLM2 = SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SHAPES = {  # the published configs' shapes; the tokenizer gives the GGUF a vocabulary of the right size
    "smollm2-135m": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536, vocab_size=49152,
                         tie_embeddings=True),
    "tinyllama-1.1b": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632, vocab_size=32000),
    "llama-7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008, vocab_size=32000),
}


def run_fractions(run: Path) -> tuple[list[dict], float]:
    """Per layer: the kept fraction of query heads, K/V heads and FFN channels of a finished run; and its kept hidden
    fraction. The dense sizes come from the run's own checkpoint (report.json records kept sizes only): its config,
    read without the weights where the format has one (HF, GGUF)."""
    report = json.loads((run / "report.json").read_text())
    ckpt = report["args"]["ckpt"]
    dense = checkpoint.check_checkpoint(ckpt) or checkpoint.read_checkpoint(ckpt)[0]
    layers = [{"heads": x["heads"] / dense.n_heads, "kv_heads": x["kv_heads"] / dense.n_kv_heads,
               "ffn": x["ffn"] / dense.ffn_dim} for x in report["layers"]]
    return layers, report["hidden"] / dense.dim


def profile_masks(cfg: llama.LlamaConfig, layers: list[dict], hidden: float, n: int) -> llama.Masks:
    """Binary masks giving layer i of cfg the fractions of run layer i * L_run // L, rounded to multiples of n."""
    group = cfg.n_heads // cfg.n_kv_heads
    head = torch.zeros(cfg.n_layers, cfg.n_heads)
    inter = torch.zeros(cfg.n_layers, cfg.ffn_dim)
    for i in range(cfg.n_layers):
        f = layers[i * len(layers) // cfg.n_layers]
        kv = min(cfg.n_kv_heads, max(1, round(f["kv_heads"] * cfg.n_kv_heads))) if f["heads"] else 0
        per_kv = min(group, max(1, round(f["heads"] * cfg.n_heads / kv))) if kv else 0
        for g in range(kv):  # the first per_kv query heads of each of the first kv groups
            head[i, g * group:g * group + per_kv] = 1
        inter[i, :min(cfg.ffn_dim, n * round(f["ffn"] * cfg.ffn_dim / n))] = 1
    keep_d = min(cfg.dim, max(n, n * round(hidden * cfg.dim / n)))
    hid = torch.zeros(cfg.dim)
    hid[:keep_d] = 1
    return llama.Masks(head, inter, None if keep_d == cfg.dim else hid)


def tokenizer_for(shape: str):
    path = SMOLLM2 if shape == "smollm2-135m" else LLAMA_TOKENIZER
    if not path.exists():
        raise SystemExit(f"error: {path} is missing (the tokenizer for the {shape} shape; it lives in ../shared)")
    return checkpoint.find_tokenizer(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tinyllama-1.1b", choices=sorted(SHAPES))
    ap.add_argument("--run", nargs="+", required=True, metavar="LABEL=RUN",
                    help="finished nuteprune run folders (report.json) whose per-layer widths to copy")
    ap.add_argument("--round-to", type=int, default=32, help="FFN and hidden widths in multiples of N")
    ap.add_argument("--out", required=True, help="folder for dense/ and one folder per LABEL")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    runs = [(s.partition("=")[0], Path(s.partition("=")[2])) if "=" in s else (Path(s).name, Path(s)) for s in a.run]
    for label, run in runs:
        if not (run / "report.json").is_file():
            raise SystemExit(f"error: {run} has no report.json (--run: a finished nuteprune run folder)")
    cfg = llama.LlamaConfig(**SHAPES[a.shape])
    tok = tokenizer_for(a.shape)
    out = Path(a.out)
    dense = random_llama(cfg, "cpu", torch.bfloat16, a.seed)
    print(f"{a.shape}: {llama.count_params(cfg) / 1e6:.1f}M parameters, random bf16 -> {out / 'dense'}", flush=True)
    checkpoint.save_model(dense, out / "dense", tok)
    for label, run in runs:
        layers, hidden = run_fractions(run)
        new = checkpoint.export_pruned(dense, profile_masks(cfg, layers, hidden, a.round_to), out / label, tok)
        kept = llama.count_params(new) / llama.count_params(cfg)
        sparsity = 1 - llama.prunable_params(new) / llama.prunable_params(cfg)
        print(f"{label}: widths of {run}, prunable sparsity {sparsity:.3f}, kept {kept:.3f} of all parameters, hidden "
              f"{new.dim}/{cfg.dim}, FFN {min(new.ffn)}-{max(new.ffn)}, heads {min(new.heads)}-{max(new.heads)} "
              f"-> {out / label}", flush=True)


if __name__ == "__main__":
    main()
