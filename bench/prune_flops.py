"""Achieved FLOP/s of `nuteprune.prune_step` on SmolLM2-135M shapes against a plain GEMM of the same size, and where
the step's time goes: the 49k-token LM head, the softmax / KL over the vocabulary, the mask multiplies, LoRA's thin
matmuls, the projection GEMMs, attention and the rest (torch.profiler, self CPU time per operator class).

    python bench/prune_flops.py [--ckpt SmolLM2-135M-Instruct.Q4_1.gguf | --preset smollm2|tiny] [--batch 4]
                                [--seq 128] [--micro-batch 4] [--distill pkd|kd|none] [--layer-weight 0.9]
                                [--dtype fp32|bf16|fp32,bf16] [--threads N] [--repeats 3] [--json FILE]

The step is nuteprune.prune_step itself with the command's defaults (LoRA rank 8 on q, v; layer loss on; one
micro-batch per step unless --micro-batch is smaller), a snapshot teacher (deterministic masks and a LoRA copy, as
a PKD run holds) for --distill pkd, the intact model for kd. FLOPs are counted by torch.utils.flop_counter on one
step (matmuls and attention, forward and backward). The plain GEMMs are matmuls (in --dtype) of the step's own shapes:
(B*T x D) @ (D x I), the FFN projection, the largest share of the FLOPs, and (B*T x D) @ (D x V), the LM head.
Threads: --threads, else torch's setting (OMP_NUM_THREADS=1 gives one). Run it on an otherwise idle machine: on a
busy one every time is inflated, the ratios less so. With --ckpt the weights are the real model's; with --preset
they are random (the FLOPs and shapes are the same; the time of exp/log on random logits is too).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import checkpoint  # noqa: E402
import cli  # noqa: E402
import distributed  # noqa: E402
import llama  # noqa: E402
import nuteprune as npr  # noqa: E402
import train_cost  # noqa: E402  (random_llama)

SMOLLM2 = ROOT.parent / "shared" / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PRESETS = {"smollm2": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536, vocab_size=49152,
                           max_seq_len=8192, tie_embeddings=True, rope_theta=100000.0),
           "tiny": dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, vocab_size=256, max_seq_len=64)}
CLASSES = ("projection GEMMs", "LM head (vocabulary matmuls)", "softmax / KL over the vocabulary", "attention",
           "mask multiplies", "LoRA thin matmuls", "other (norms, RoPE, SiLU, copies, optimizer)")
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"}


def load_model(a: argparse.Namespace) -> llama.Llama:
    dtype = llama.parse_dtype(a.dtype, "cpu")
    if a.ckpt:
        return checkpoint.load_model(a.ckpt, dtype=dtype)
    cfg = llama.LlamaConfig(**PRESETS[a.preset])
    model = train_cost.random_llama(cfg, "cpu", dtype)
    if cfg.tie_embeddings:  # to_empty may untie them; the real model's LM head is its embedding
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def build(model: llama.Llama, a: argparse.Namespace) -> tuple[npr.Parts, npr.Snapshot | None]:
    """The Parts a run's prune_step touches, its learning rates set, and the step's teacher."""
    llama.add_lora(model, ("q_proj", "v_proj"), 8, 8.0)
    with torch.no_grad():  # a student some steps in: B != 0
        for name, w in llama.lora_state(model).items():
            if name.endswith("lora_b"):
                w.normal_(0.0, 1e-3)
    model.train()
    gates = npr.Gates(model.config)
    c = npr.RunConfig(ckpt="bench", data="bench", target=0.5, micro_batch_size=a.micro_batch, distill=a.distill,
                      layer_weight=a.layer_weight)
    optimizer = npr.prune_optimizer(gates, list(llama.lora_state(model).values()))
    npr.set_learning_rates(optimizer, {"log_alpha": 1.0, "lambda": 1.0, "lora": 1e-3})
    dtype = llama.parse_dtype(a.dtype, "cpu")  # as runner.setup: the base in dtype, autocast, gates and LoRA fp32
    autocast = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype != torch.float32 else nullcontext
    parts = npr.Parts(model, gates, optimizer, torch.amp.GradScaler("cpu", enabled=False), c, autocast)
    teacher = None
    if a.distill == "pkd":
        masks = gates.deterministic()
        teacher = npr.Snapshot(1, float(npr.expected_sparsity(masks, model.config)), masks,
                               distributed.cpu_lora(model))
    return parts, teacher


def step_flops(parts: npr.Parts, batch: torch.Tensor, teacher) -> int:
    with FlopCounterMode(display=False) as counter:
        npr.prune_step(parts, batch, teacher, 0.25)
    return counter.get_total_flops()


def time_steps(parts: npr.Parts, batch: torch.Tensor, teacher, repeats: int) -> dict:
    """Median wall and CPU (this thread's, and the process's) seconds of a step, after one warm-up step."""
    npr.prune_step(parts, batch, teacher, 0.25)
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        npr.prune_step(parts, batch, teacher, 0.25)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu), "each_wall_s": wall}


def gemm_rate(m: int, k: int, n: int, repeats: int, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of a plain (m x k) @ (k x n) in dtype, median of repeats after a warm-up."""
    x, w = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    x @ w
    times = []
    for _ in range(max(repeats, 3)):
        t0 = time.perf_counter()
        x @ w
        times.append(time.perf_counter() - t0)
    return 2 * m * k * n / statistics.median(times)


def classify(name: str, shapes: list, cfg: llama.LlamaConfig, rank: int) -> str:
    """Operator class of a profiler entry from its name and input shapes. A matmul with the LoRA rank among its
    dimensions is LoRA's (so a micro-batch of B*T = rank tokens would be misread: the bench's shapes never are)."""
    dims = {d for s in shapes if isinstance(s, (list, tuple)) for d in s}
    if name in MATMULS:
        if cfg.vocab_size in dims:
            return CLASSES[1]
        return CLASSES[5] if rank in dims and rank not in (cfg.dim, cfg.ffn_dim) else CLASSES[0]
    if "attention" in name:
        return CLASSES[3]
    if any(isinstance(s, (list, tuple)) and s and s[-1] == cfg.vocab_size for s in shapes):
        return CLASSES[2]
    if name == "aten::mul" and len(shapes) == 2 and is_mask_shape(shapes[1], cfg):
        return CLASSES[4]
    return CLASSES[6]


def is_mask_shape(shape, cfg: llama.LlamaConfig) -> bool:
    """z broadcast against activations: (I,) intermediate, (D,) hidden, (1, H, 1, 1) head (llama.py's forwards)."""
    shape = list(shape) if isinstance(shape, (list, tuple)) else []
    return shape in ([cfg.ffn_dim], [cfg.dim], [1, cfg.n_heads, 1, 1])


def profile_step(parts: npr.Parts, batch: torch.Tensor, teacher) -> dict:
    """Self CPU seconds and FLOPs per operator class over one profiled step."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as prof:
        npr.prune_step(parts, batch, teacher, 0.25)
    out = {k: {"self_s": 0.0, "flops": 0} for k in CLASSES}
    rank = parts.c.lora_rank
    for e in prof.key_averages(group_by_input_shape=True):
        k = classify(e.key, e.input_shapes or [], parts.model.config, rank)
        out[k]["self_s"] += e.self_cpu_time_total / 1e6
        out[k]["flops"] += int(e.flops or 0)
    return out


def measure(a: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model = load_model(a)
    cfg = model.config
    parts, teacher = build(model, a)
    batch = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))
    flops = step_flops(parts, batch, teacher)
    t = time_steps(parts, batch, teacher, a.repeats)
    bt = a.batch * a.seq
    dtype = llama.parse_dtype(a.dtype, "cpu")
    gemm = {"ffn (BT x D) @ (D x I)": gemm_rate(bt, cfg.dim, cfg.ffn_dim, a.repeats, dtype),
            "lm head (BT x D) @ (D x V)": gemm_rate(bt, cfg.dim, cfg.vocab_size, a.repeats, dtype)}
    classes = profile_step(parts, batch, teacher)
    achieved = flops / t["wall_s"]
    return {"model": cli.recorded_path(a.ckpt) if a.ckpt else f"random {a.preset}",
            "config": {k: getattr(cfg, k) for k in PRESETS["tiny"]},
            "batch": a.batch, "seq": a.seq, "micro_batch": a.micro_batch, "distill": a.distill,
            "layer_weight": a.layer_weight, "dtype": a.dtype,
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
            "step": t, "step_flops": flops, "achieved_flops_s": achieved, "gemm_flops_s": gemm,
            "ratio_to_ffn_gemm": achieved / gemm["ffn (BT x D) @ (D x I)"],
            "tokens_per_s": bt / t["wall_s"], "classes": classes}


def report(r: dict) -> str:
    g = r["gemm_flops_s"]
    lines = [f"{r['model']}: prune_step ({r['distill']}, {r.get('dtype', 'fp32')}), batch {r['batch']} x {r['seq']} tokens, micro-batch "
             f"{r['micro_batch']}, {r['threads']} thread(s)",
             f"step {r['step']['wall_s']:.3f} s wall, {r['step']['cpu_s']:.3f} s CPU; {r['step_flops'] / 1e9:.1f} "
             f"GFLOP; achieved {r['achieved_flops_s'] / 1e9:.1f} GFLOP/s; {r['tokens_per_s']:.1f} tokens/s",
             "plain GEMM: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in g.items()),
             f"achieved / FFN GEMM: {r['ratio_to_ffn_gemm']:.2f}", "",
             "| operator class | self s (profiled) | share | GFLOP | GFLOP/s |", "|---|---|---|---|---|"]
    total = sum(v["self_s"] for v in r["classes"].values()) or 1.0
    for k, v in r["classes"].items():
        rate = f"{v['flops'] / v['self_s'] / 1e9:.1f}" if v["flops"] and v["self_s"] else "—"
        lines.append(f"| {k} | {v['self_s']:.3f} | {v['self_s'] / total:.1%} | {v['flops'] / 1e9:.2f} | {rate} |")
    lines.append(f"\nprofiled step: {total:.3f} s of self CPU time (the profiler adds its own overhead per operator)")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", help="a checkpoint (default: the shared SmolLM2 GGUF, else --preset smollm2)")
    ap.add_argument("--preset", choices=list(PRESETS), help="random weights of this shape instead of a checkpoint")
    ap.add_argument("--batch", type=int, default=4, help="blocks per step")
    ap.add_argument("--seq", type=int, default=128, help="tokens per block")
    ap.add_argument("--micro-batch", type=int, default=4, help="blocks per forward")
    ap.add_argument("--distill", choices=["pkd", "kd", "none"], default="pkd")
    ap.add_argument("--layer-weight", type=float, default=npr.RunConfig.layer_weight, help="0: no layer loss")
    ap.add_argument("--dtype", default="fp32", help="the base weights, autocast and the plain GEMMs (as nuteprune.py "
                    "--dtype): fp32, bf16, or fp32,bf16 to measure both in one run and give bf16's speed-up")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, or OMP_NUM_THREADS)")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps (after one warm-up)")
    ap.add_argument("--json", default=None, help="write the measurement here (e.g. bench/prune_flops.json)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.ckpt is None and a.preset is None:
        a.ckpt, a.preset = (str(SMOLLM2), None) if SMOLLM2.is_file() else (None, "smollm2")
    dtypes = a.dtype.split(",")
    if not set(dtypes) <= {"fp32", "bf16"}:
        ap.error(f"--dtype: fp32, bf16 or fp32,bf16, got {a.dtype!r}")
    runs = {}
    for dtype in dtypes:  # one after the other in this process: the same machine state for both
        runs[dtype] = measure(argparse.Namespace(**{**vars(a), "dtype": dtype}))
        print(report(runs[dtype]))
    r = runs[dtypes[0]] if len(runs) == 1 else {
        "runs": runs, "bf16_speedup": {"step": runs["fp32"]["step"]["wall_s"] / runs["bf16"]["step"]["wall_s"],
                                       "ffn_gemm": runs["bf16"]["gemm_flops_s"]["ffn (BT x D) @ (D x I)"] /
                                       runs["fp32"]["gemm_flops_s"]["ffn (BT x D) @ (D x I)"]}}
    if len(runs) > 1:
        print(f"bf16 against fp32: a step {r['bf16_speedup']['step']:.2f}x faster, the FFN GEMM "
              f"{r['bf16_speedup']['ffn_gemm']:.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2) + "\n")
        print(f"wrote {a.json}")
    return r


if __name__ == "__main__":
    main()
