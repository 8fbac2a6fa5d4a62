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
import llama  # noqa: E402

GB = 1e9
LLAMA_7B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008, vocab_size=32000)
PAPER_GB = (27.7, 38.0)  # Table 5, one A100, LLaMA-7B
REFERENCE_MICRO_BATCH = 16  # the reference scripts' per_device_train_batch_size (scripts/cotrain.sh), fp16, ckpt on


def _linear_io(cfg: llama.LlamaConfig) -> dict[str, tuple[int, int]]:
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return {"q_proj": (cfg.dim, q), "k_proj": (cfg.dim, kv), "v_proj": (cfg.dim, kv), "o_proj": (q, cfg.dim),
            "gate_proj": (cfg.dim, cfg.ffn_dim), "up_proj": (cfg.dim, cfg.ffn_dim), "down_proj": (cfg.ffn_dim, cfg.dim)}


def lora_params(cfg: llama.LlamaConfig, targets=("q_proj", "v_proj"), rank: int = 8) -> int:
    io = _linear_io(cfg)
    return cfg.n_layers * sum(rank * (io[t][0] + io[t][1]) for t in targets)  # A (r, in) + B (out, r)


def gate_params(cfg: llama.LlamaConfig) -> int:
    return cfg.n_layers * cfg.n_heads + cfg.n_layers * cfg.ffn_dim + cfg.dim  # log_alpha of head, intermediate, hidden


def snapshot_bytes(cfg: llama.LlamaConfig, targets=("q_proj", "v_proj"), rank: int = 8) -> int:
    """One teacher: fp32 deterministic masks [L, H], [L, I], [D] and fp32 copies of the LoRA tensors."""
    return 4 * (gate_params(cfg) + lora_params(cfg, targets, rank))


def estimate(cfg: llama.LlamaConfig, dtype_bytes: int = 2, lora_targets=("q_proj", "v_proj"), rank: int = 8,
             n_snapshots: int = 40, micro_batch: int = 4, seq_len: int = 512, grad_ckpt: bool = True,
             layer_loss: bool = True, distill: str = "pkd") -> dict[str, float]:
    """Peak memory of one training step by component, in GB (1e9 bytes). distill: none (plain cross-entropy), kd, pkd.

    'device total' sums everything on the accelerator at the peak; 'snapshots (CPU)' is apart from it.
    """
    if distill not in ("none", "kd", "pkd"):
        raise ValueError(f"distill must be none, kd or pkd, got {distill!r}")
    b, L = dtype_bytes, cfg.n_layers
    N = micro_batch * seq_len
    ND, NI, NV = N * cfg.dim, N * cfg.ffn_dim, N * cfg.vocab_size
    layer_loss = layer_loss and distill != "none"
    n_lora, n_gate = lora_params(cfg, lora_targets, rank), gate_params(cfg)

    static = {
        "base weights": llama.count_params(cfg) * b,
        "LoRA (+grad, AdamW)": 16 * n_lora,  # fp32 param, grad, exp_avg, exp_avg_sq
        # fp32 log_alpha, grad, 2 moments; the step's z sample, its leaf copy and that copy's grad
        "log_alpha (+grad, AdamW, z)": 28 * n_gate,
    }
    # pkd: teacher_lora's copy of the student's LoRA and the teacher's masks moved to the device
    static["teacher swap"] = 4 * n_lora + 4 * n_gate if distill == "pkd" else 0

    per_layer = (8 + 7 * b) * ND + 4 * b * NI  # saved for backward without checkpointing (module docstring)
    extra = (b + 4) * ND  # the gated embeddings; the final norm's fp32 input
    saved = L * (b * ND if grad_ckpt else per_layer) + extra
    if distill == "none":
        # logits (b), [:, :-1] copy when B > 1, fp32 copy when b < 4, log_softmax (4); backward: 3 fp32 buffers
        head_fwd = (b + (b if micro_batch > 1 else 0) + (4 if b < 4 else 0) + 4) * NV
        head_after, head_bwd = 4 * NV, (12 + (b if b < 4 else 0)) * NV
        head_held = 0  # nothing holds the logits after lm_loss
    else:
        head_fwd = (2 * b + 20) * NV
        head_after = (2 * b + 8) * NV  # the logits, the student's log_softmax, exp(teacher's)
        head_bwd = head_after + 8 * NV  # + the gradients of the KL and of log_softmax
        head_held = 2 * b * NV  # the loop's t_logits and logits live until the step ends
    teacher_hidden = L * b * ND if layer_loss else 0
    student_hidden = L * b * ND if layer_loss and not grad_ckpt and b < 4 else 0  # else they are saved anyway
    hidden = teacher_hidden + student_hidden
    mse = 8 * L * ND if layer_loss else 0
    pending = L * b * ND if layer_loss else 0  # gradients w.r.t. the hidden states wait for their layer's backward
    recompute = (per_layer + 2 * b * ND + 2 * b * NI) if grad_ckpt else 0  # one layer + its backward buffers

    def moment(head, layer, recomputed=0):
        return {"activations: layers": saved, "activations: logits and loss": head,
                "activations: layer loss": layer, "activations: recompute (1 layer)": recomputed}

    moments = {  # backward runs the layer loss's nodes first (created last), then the KL's, then the layers'
        "inside the loss (end of forward)": moment(head_fwd, hidden),
        "after the losses (start of backward)": moment(head_after, hidden + mse),
        "logit-loss backward": moment(head_bwd, hidden + pending),
    }
    if grad_ckpt:
        moments["layer recompute (inside backward)"] = moment(head_held, hidden + pending, recompute)
    peak_name = max(moments, key=lambda k: sum(moments[k].values()))
    out = {k: v / GB for k, v in {**static, **moments[peak_name]}.items()}
    out["device total"] = sum(out.values())
    out["snapshots (CPU)"] = n_snapshots * snapshot_bytes(cfg, lora_targets, rank) / GB if distill == "pkd" else 0.0
    out["peak moment"] = peak_name
    return out


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
    out["validation"] = {p: validate(Path(p)) for p in args.train_cost}
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
