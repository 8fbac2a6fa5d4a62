"""Memory of a NutePrune training step, computed from the model config (paper Table 5: 27.7-38.0 GB for LLaMA-7B),
and checked against the peak measured by bench/train_cost.py on its bench model.

What is counted is what this project's code keeps alive (llama.py, nuteprune.py), tensor by tensor:
  - the frozen base weights (bf16 on GPU); LoRA and log_alpha in fp32 with their gradients and two AdamW moments;
  - activations saved for backward. Per layer without checkpointing (N = micro_batch * seq_len tokens, b bytes per
    activation element, fp32 = 4): both RMSNorm inputs in fp32 (8 N D), the normed input that LoRA A saves, q and k
    after RoPE, v (index_select copies), the attention output, o_proj's output (saved by the hidden gate): 7 b N D;
    FFN: gate, silu(gate), up, their product (saved by the intermediate gate): 4 b N I; down_proj's output is the
    seventh b N D. Frozen linears save no inputs. With per-layer checkpointing only each layer's input (b N D) stays,
    and one layer is recomputed at a time during backward;
  - the loss head, in elements of N V: plain cross-entropy keeps log_softmax in fp32 and needs two more fp32
    buffers in backward (12 bytes); the KL of Eq. 7 peaks inside kd_loss with the teacher's and the student's logits
    (b each, both held by the training loop), log_softmax of each (fp32), exp(teacher), the difference and the
    product (fp32): 2 b + 20 bytes; after it, 2 b + 8 stay (the logits, the student's log_softmax, exp(teacher));
  - the layer loss of Eq. 8: the teacher's L hidden states (b N D each, no grad) and, per layer, the fp32
    difference and non-zero mask saved by the MSE (8 N D);
  - snapshots (fp32 deterministic masks + LoRA copies) live on the CPU: reported separately.
The peak is the largest of three moments: inside kd_loss (end of forward), after the layer loss (start of backward)
and, with checkpointing, a layer's recompute during backward.

    python bench/memory_model.py [--train-cost bench/train_cost.json bench/train_cost_ckpt.json]
                                 [--json bench/memory_model.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import cli  # noqa: E402
import llama  # noqa: E402
import memory_plan  # noqa: E402

GB = 1e9
LLAMA_7B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008, vocab_size=32000)
PAPER_GB = (27.7, 38.0)  # Table 5, one A100, LLaMA-7B
REFERENCE_MICRO_BATCH = 16  # the reference scripts' per_device_train_batch_size (scripts/cotrain.sh), fp16, ckpt on


# The plan itself lives in memory_plan.py (`python nuteprune.py --ckpt DIR --target T --plan` prints it for a run);
# this script tabulates it for LLaMA-7B and checks it against what bench/train_cost.py measured.
snapshot_bytes = memory_plan.snapshot_bytes


def estimate(cfg: llama.LlamaConfig, dtype_bytes: int = 2, lora_targets=("q_proj", "v_proj"), rank: int = 8,
             n_snapshots: int = 40, micro_batch: int = 4, seq_len: int = 512, grad_ckpt: bool = True,
             layer_loss: bool = True, distill: str = "pkd", world: int = 1) -> dict:
    return memory_plan.memory_plan(cfg, dtype_bytes, lora_targets, rank, n_snapshots, micro_batch, seq_len,
                                   grad_ckpt, layer_loss, distill, world)


MODES = {"plain": ("none", False), "kd": ("kd", False), "pkd": ("pkd", False), "pkd_layer": ("pkd", True)}


def table_7b(micro_batch: int, n_snapshots: int = 40) -> dict:
    cfg = llama.LlamaConfig(**LLAMA_7B)
    return {m: estimate(cfg, 2, ("q_proj", "v_proj"), 8, n_snapshots, micro_batch, 512, True, layer, distill)
            for m, (distill, layer) in MODES.items()}


def print_table(title: str, rows: dict):
    comps = [k for k in dict.fromkeys(k for r in rows.values() for k in r) if k not in ("peak moment",)]
    print(title)
    print(f"  {'component (GB)':<38}" + "".join(f"{m:>11}" for m in rows))
    for c in comps:
        print(f"  {c:<38}" + "".join(f"{r.get(c, 0.0):11.2f}" for r in rows.values()))


def validate(path: Path) -> dict | None:
    """The same estimate for train_cost's bench model against the peak it measured, per mode."""
    if not path.is_file():
        print(f"\n(no {path}: run bench/train_cost.py first to validate against measured memory)")
        return None
    tc = json.loads(path.read_text())
    if not tc.get("memory"):
        print(f"\n({path} has no memory measurement)")
        return None
    cfg = llama.LlamaConfig(**tc["config"], max_seq_len=tc["seq_len"])
    cuda = tc["device"].startswith("cuda")
    b = 4 if tc["dtype"] == "float32" else 2
    rows = {}
    print(f"\nvalidation on the {tc['device']} bench model ({tc['params'] / 1e6:.0f}M, {tc['dtype']}, "
          f"batch {tc['micro_batch']} x {tc['seq_len']}, grad ckpt {tc['grad_ckpt']}, {tc['snapshots_held']} "
          f"snapshots in the pkd modes; MiB):")
    print(f"  {'mode':<10} {'est. static':>11} {'measured':>9} {'est. step':>10} {'measured':>9} {'est. total':>11} "
          f"{'measured':>9} {'ratio':>6}")
    for m, (distill, layer) in MODES.items():
        e = estimate(cfg, b, tuple(tc["lora"]["targets"]), tc["lora"]["rank"], tc["snapshots_held"], tc["micro_batch"],
                     tc["seq_len"], tc["grad_ckpt"], layer, distill)
        act = sum(v for k, v in e.items() if k.startswith("activations")) * GB
        static = (e["device total"] * GB - act) + (0 if cuda else e["snapshots (CPU)"] * GB)
        meas = tc["memory"][m]
        rows[m] = {"est_static": static, "est_step": act, "est_total": static + act, "measured_static":
                   meas["static_bytes"], "measured_step": meas["step_bytes"], "measured_total": meas["total_bytes"],
                   "ratio_total": (static + act) / meas["total_bytes"], "ratio_step": act / meas["step_bytes"]}
        r, mib = rows[m], 2 ** 20
        print(f"  {m:<10} {static / mib:11.0f} {meas['static_bytes'] / mib:9.0f} {act / mib:10.0f} "
              f"{meas['step_bytes'] / mib:9.0f} {(static + act) / mib:11.0f} {meas['total_bytes'] / mib:9.0f} "
              f"{r['ratio_total']:6.3f}")
    print("  ratio = estimated / measured total; the step columns are the activations alone (measured: peak RSS "
          "of the step above the RSS before it)")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-cost", nargs="+", default=[str(ROOT / "bench" / f) for f in
                                                         ("train_cost.json", "train_cost_ckpt.json")],
                    help="train_cost.py JSON files whose measured peaks the estimate is checked against")
    ap.add_argument("--json", default=str(ROOT / "bench" / "memory_model.json"))
    args = ap.parse_args(argv)
    cfg = llama.LlamaConfig(**LLAMA_7B)
    print(f"LLaMA-7B ({llama.count_params(cfg) / 1e9:.2f}B parameters), seq 512, bf16 base, fp32 LoRA q,v rank 8 and "
          f"log_alpha, AdamW, per-layer gradient checkpointing, 40 snapshots; GB = 1e9 bytes")
    out = {"gb": 1e9, "paper_gb": PAPER_GB, "llama_7b": {}}
    for mb, note in ((REFERENCE_MICRO_BATCH, "the reference scripts' micro-batch"), (4, "nuteprune.py's default")):
        rows = table_7b(mb)
        out["llama_7b"][f"micro_batch_{mb}"] = rows
        print_table(f"\nmicro-batch {mb} x 512 ({note}):", rows)
        print("  peak moment: " + "; ".join(f"{m}: {r['peak moment']}" for m, r in rows.items()))
    r16 = out["llama_7b"][f"micro_batch_{REFERENCE_MICRO_BATCH}"]
    totals = [r["device total"] for r in r16.values()]
    print(f"\npaper (Table 5, A100): {PAPER_GB[0]}-{PAPER_GB[1]} GB; this model at micro-batch "
          f"{REFERENCE_MICRO_BATCH}: {min(totals):.1f}-{max(totals):.1f} GB; pkd_layer / pkd = "
          f"{r16['pkd_layer']['device total'] / r16['pkd']['device total']:.2f} (paper: layer loss +32% memory)")
    out["validation"] = {cli.recorded_path(p): validate(Path(p)) for p in args.train_cost}
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
