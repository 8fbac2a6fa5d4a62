"""docs/scaling.md's multi-GPU memory table: nuteprune's memory plan (`nuteprune.py --plan`) for LLaMA-7B, Llama-2-13B,
Llama-2-70B (GQA) and Llama-3-8B (GQA, 128k vocabulary) at the paper's recipe, per GPU for 1/2/4/8 GPUs.

    python bench/plan_table.py [--micro-batch 4] [--configs DIR]    # DIR/<name>/config.json: write them there too

The sizes are those of each model's public config.json (written into --configs, so that
`python nuteprune.py --ckpt DIR/<name> --target 0.5 --plan` shows the full breakdown of any column).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import llama  # noqa: E402
import memory_plan  # noqa: E402
import nuteprune as npr  # noqa: E402

BASE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5}
MODELS = {
    "LLaMA-7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6),
    "Llama-2-13B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096),
    "Llama-2-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096),
    "Llama-3-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
}
WORLDS, CARDS = (1, 2, 4, 8), (80, 40, 24)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--micro-batch", type=int, default=4, help="blocks per forward (nuteprune.py's default)")
    ap.add_argument("--configs", default=None, help="also write each config.json under this folder")
    args = ap.parse_args(argv)
    c = npr.RunConfig(ckpt="-", data="-", target=0.5)  # the paper's recipe: pkd, layer loss, q/v LoRA rank 8
    sched = npr.Schedule.of(c, memory_plan.PLAN_BLOCKS - c.heldout_blocks, 0)
    print(f"GB per GPU, pkd + layer loss (the paper's recipe), bf16 base, gradient checkpointing, micro-batch "
          f"{args.micro_batch} x {c.block_size} (fewer per GPU when the batch of {c.batch_size} is split further), "
          f"{sched.n_levels} snapshots on each rank's CPU; a GPU fits when the total is <= 95% of it\n")
    print("| model | params | " + " | ".join(f"{w} GPU{'s' if w > 1 else ''}" for w in WORLDS) + " | snapshots (CPU) |")
    print("|---|---|" + "---|" * len(WORLDS) + "---|")
    for name, hf in MODELS.items():
        if args.configs:
            d = Path(args.configs) / name
            d.mkdir(parents=True, exist_ok=True)
            (d / "config.json").write_text(json.dumps({**BASE, **hf}, indent=2))
        cfg = llama.LlamaConfig.from_hf({**BASE, **hf})
        rows = [memory_plan.memory_plan(cfg, 2, ("q_proj", "v_proj"), 8, sched.n_levels,
                                        min(args.micro_batch, c.batch_size // w), c.block_size, True, True, "pkd", w)
                for w in WORLDS]
        cells = []
        for r in rows:
            fits = [f"{card}" for card in CARDS if r["device total"] <= 0.95 * card]
            cells.append(f"{r['device total']:.1f} ({', '.join(fits) or 'none'})")
        print(f"| {name} | {llama.count_params(cfg) / 1e9:.1f}B | " + " | ".join(cells)
              + f" | {rows[0]['snapshots (CPU)']:.1f} |")
    print("\n(cards of 80 / 40 / 24 GB that the total fits)")


if __name__ == "__main__":
    main()
