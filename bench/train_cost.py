"""Training cost per step (paper Table 5): plain next-token loss vs KD vs progressive KD vs progressive KD with the
layer loss, as step time and peak memory relative to plain training.

A random LLaMA (default 134M parameters: dim 768, 12 layers, 12 heads, FFN 2048, 32k vocabulary) with LoRA on
q_proj, v_proj (rank 8) and nuteprune.Gates; sequence 512, micro-batch 1, one micro-batch per optimizer step. Every
step is `nuteprune.prune_step` itself, the step the command runs (sampled masks on leaf copies, the teacher first
under no_grad inside `teacher_lora`, then the student, the losses, backward, the Lagrangian and the surrogate that
carries dz to log_alpha, clipping, AdamW, clamping), its phases timestamped from outside (`timed_phases`):

    plain      student forward with sampled masks + next-token cross-entropy (--distill none)
    floor      one no-grad forward of the same batch, alone: what a teacher costs at the least
    kd         the intact model teaches (masks None, LoRA zeroed by teacher_lora) + KL of Eq. 7
    pkd        a snapshot teaches (deterministic masks + LoRA copies held on the CPU, swapped in by teacher_lora);
               --snapshots of them are kept in memory as a run would
    pkd_layer  pkd + the layer loss of Eq. 8 (output_hidden=True) -- what `nuteprune.py --distill pkd` runs

Time: the modes run interleaved (the order rotates every round), --repeats rounds after one warm-up round; medians
of step times and of per-round ratios (a ratio within one round cancels slow load drift on a shared machine).
Memory: on CPU, each mode in a fresh child process: peak RSS while building everything and running two steps,
minus the RSS once torch, its kernels and the meta-device machinery are loaded (by a tiny model first); glibc is
told to mmap every allocation >= 64 KiB so that freed tensors leave RSS at once (then RSS follows live tensor
bytes). On CUDA, torch.cuda.max_memory_allocated per mode (snapshots stay on the CPU and are not counted).
Also timed alone: each loss (lm_loss, kd_loss and a fused candidate for kd_loss) forward + backward on logits of
the step's shape: what KD costs beyond its teacher's forward.

CPU timing with --malloc reuse keeps freed memory in the process (glibc told never to unmap), as the CUDA caching
allocator does; under glibc's defaults every fresh buffer over 32 MiB is a new mapping whose pages fault in.

    python bench/train_cost.py [--device cpu|cuda] [--repeats 7] [--threads 1] [--malloc default|reuse]
                               [--json bench/train_cost.json]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import distributed  # noqa: E402
import llama  # noqa: E402
import memory_model  # noqa: E402  (bench/, beside this file)
import nuteprune as npr  # noqa: E402

PRESETS = {"bench": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=2048, vocab_size=32000),
           "7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008, vocab_size=32000)}
MODES = ("plain", "floor", "kd", "pkd", "pkd_layer")
LORA_TARGETS, LORA_RANK = ("q_proj", "v_proj"), 8
KD_TEMP, TARGET = npr.RunConfig.kd_temp, 0.25  # the command's temperature (METHOD.md §5)
PAPER = {"kd_over_plain_time": 1.18, "layer_over_pkd_memory": 1.32, "snapshots_7b_40_mb": 728.0,
         "memory_gb": (27.7, 38.0)}
GOALS = {"kd_over_plain_plus_floor": 1.05, "pkd_over_kd_time": 1.02, "pkd_extra_memory_frac": 0.01}
MIB = 2 ** 20
REUSE = {"MALLOC_MMAP_THRESHOLD_": str(2 ** 32), "MALLOC_TRIM_THRESHOLD_": str(2 ** 32)}  # glibc: never unmap


def random_llama(cfg: llama.LlamaConfig, device, dtype, seed: int = 0) -> llama.Llama:
    # built on the meta device and filled in place: no fp32 copy of a large model, no slow default init
    with torch.device("meta"):
        model = llama.Llama(cfg)
    model = model.to(dtype).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@dataclass
class Setup:
    parts: npr.Parts  # the model, gates, optimizer and scaler that nuteprune.prune_step steps
    snapshots: list
    device: torch.device


# each mode's loss terms, as the command's flags set them (the rest of RunConfig is the paper's default)
MODE_FLAGS = {"plain": dict(distill="none"), "kd": dict(distill="kd", layer_weight=0.0),
              "pkd": dict(distill="pkd", layer_weight=0.0), "pkd_layer": dict(distill="pkd")}


def build(cfg: llama.LlamaConfig, device: str, dtype, n_snapshots: int, grad_ckpt: bool, seed: int = 0) -> Setup:
    device = torch.device(device)
    model = random_llama(cfg, device, dtype, seed)
    llama.add_lora(model, LORA_TARGETS, LORA_RANK, float(LORA_RANK))
    with torch.no_grad():  # a student some steps in: B != 0, so a zeroed (intact) teacher differs from it
        for name, w in llama.lora_state(model).items():
            if name.endswith("lora_b"):
                w.normal_(0.0, 1e-3)
    model.gradient_checkpointing = grad_ckpt
    model.train()
    gates = npr.Gates(cfg).to(device)
    optimizers = npr.prune_optimizer(gates, list(llama.lora_state(model).values()))
    npr.set_learning_rates(optimizers, {"log_alpha": 0.1, "lambda": 0.1, "lora": 1e-3})
    snapshots = []
    for level in range(1, n_snapshots + 1):  # what the run stores at each interval crossed (METHOD.md §6), all distinct copies
        masks = gates.deterministic()
        snapshots.append(npr.Snapshot(level, float(npr.expected_sparsity(masks, cfg)), masks.to("cpu"),
                                      distributed.cpu_lora(model)))
    cuda = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=dtype)) if cuda and dtype != torch.float32 else nullcontext
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and dtype == torch.float16)
    config = npr.RunConfig(ckpt="bench", target=TARGET, data="bench", micro_batch_size=10 ** 6)  # one forward a step
    return Setup(npr.Parts(model, gates, optimizers, scaler, config, autocast), snapshots, device)


def snapshot_bytes(s: npr.Snapshot) -> int:
    tensors = list(npr.mask_tensors(s.masks)) + list(s.lora.values())
    return sum(x.numel() * x.element_size() for x in tensors)


def train_step(s: Setup, idx: torch.Tensor, mode: str, marks: list) -> None:
    """One optimizer step of `mode`: nuteprune.prune_step itself, its phases timed; appends (phase, time)."""
    with timed_phases(s, marks):
        if mode == "floor":
            with torch.no_grad(), s.parts.autocast():
                s.parts.model(idx)
            return
        parts = replace(s.parts, c=replace(s.parts.c, **MODE_FLAGS[mode]))
        # the oldest snapshot teaches (a gap of all but one level): the step is what any snapshot teacher costs
        teacher = npr.pick_teacher(0, s.snapshots, None, 10 ** 9, len(s.snapshots) - 1, 0) if mode.startswith("pkd") \
            else None
        npr.prune_step(parts, idx, teacher, TARGET)


@contextmanager
def timed_phases(s: Setup, marks: list):
    """Timestamps of prune_step's phases, taken from outside it (the method has no timing parameters): a forward hook
    on the model marks the end of each forward ("teacher" under no_grad, else "student"); nuteprune.student_loss
    returning marks "loss"; nuteprune.expected_sparsity, which the step computes right after the micro-batches'
    backward, marks "backward"; leaving the step marks "optimizer" (the Lagrangian, surrogate backward, AdamW, clamp).
    Every mode here runs one micro-batch per step, so each phase is marked once."""
    sync = torch.cuda.synchronize if s.device.type == "cuda" else (lambda: None)

    def mark(phase):
        sync()
        marks.append((phase, time.perf_counter()))

    def after(fn, phase):
        return lambda *a, **kw: (fn(*a, **kw), mark(phase))[0]

    def before(fn, phase):
        return lambda *a, **kw: (mark(phase), fn(*a, **kw))[1]

    originals = npr.student_loss, npr.expected_sparsity
    hook = s.parts.model.register_forward_hook(lambda *_: mark("student" if torch.is_grad_enabled() else "teacher"))
    npr.student_loss, npr.expected_sparsity = after(originals[0], "loss"), before(originals[1], "backward")
    mark("start")
    try:
        yield
        if len(marks) > 2:  # a training step, not the floor's bare forward
            mark("optimizer")
    finally:
        hook.remove()
        npr.student_loss, npr.expected_sparsity = originals


def phases(marks: list) -> dict:
    return {name: t - marks[i - 1][1] for i, (name, t) in enumerate(marks) if i}


def time_modes(s: Setup, idx, modes, repeats: int) -> list[dict]:
    rounds = []
    for r in range(1 + repeats):  # round 0 warms up (allocations, kernel choice) and is dropped
        order = modes[r % len(modes):] + modes[:r % len(modes)]
        row = {}
        for mode in order:
            marks = []
            before = resource.getrusage(resource.RUSAGE_SELF)
            train_step(s, idx, mode, marks)
            after = resource.getrusage(resource.RUSAGE_SELF)
            row[mode] = {"total": marks[-1][1] - marks[0][1], **phases(marks),
                         # page faults and kernel time of the step: fresh large buffers show up here
                         "minor_faults": after.ru_minflt - before.ru_minflt, "sys": after.ru_stime - before.ru_stime}
        if r:
            rounds.append(row)
        print(f"  round {r}{' (warm-up)' if not r else ''}: "
              + "  ".join(f"{m} {row[m]['total']:.2f}s" for m in modes), flush=True)
    return rounds

# -----------------------------------------------------------------------------
# the loss head alone: where KD's time beyond a forward goes, and a candidate that allocates less


class FusedKD(torch.autograd.Function):
    """Candidate for nuteprune.kd_loss (not used by the step): the same value, T^2 KL(teacher || student) summed
    over tokens / B, with its analytic gradient T / B * (softmax(s / T) - softmax(t / T)) computed chunk by chunk in
    the forward. One N x V fp32 buffer (the gradient) instead of the ~7 of the autograd version."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, temperature: float, chunk: int = 64):
        B, V = student_logits.shape[0], student_logits.shape[-1]
        s, t = student_logits.reshape(-1, V), teacher_logits.reshape(-1, V)
        grad = torch.empty(s.shape, dtype=torch.float32, device=s.device)
        total = torch.zeros((), dtype=torch.float32, device=s.device)
        for i in range(0, s.shape[0], chunk):
            ls = torch.log_softmax(s[i:i + chunk].float() / temperature, -1)
            lt = torch.log_softmax(t[i:i + chunk].float() / temperature, -1)
            pt = lt.exp()
            total += (pt * (lt - ls)).sum()
            grad[i:i + chunk] = (ls.exp_() - pt) * (temperature / B)
        ctx.save_for_backward(grad)
        ctx.shape, ctx.dtype = student_logits.shape, student_logits.dtype
        return total * temperature ** 2 / B

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return (grad * g).view(ctx.shape).to(ctx.dtype), None, None, None


def loss_profile(cfg: llama.LlamaConfig, micro_batch: int, seq_len: int, device: str, repeats: int) -> dict:
    """Forward + backward of each loss on logits of the step's shape (B, T, V), fp32."""
    g = torch.Generator().manual_seed(2)
    shape = (micro_batch, seq_len, cfg.vocab_size)
    s0, t0 = torch.randn(shape, generator=g).to(device), torch.randn(shape, generator=g).to(device)
    labels = torch.randint(0, cfg.vocab_size, shape[:2], generator=g).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fns = {"lm_loss": lambda s: npr.lm_loss(s, labels), "kd_loss": lambda s: npr.kd_loss(s, t0, KD_TEMP),
           "fused candidate": lambda s: FusedKD.apply(s, t0, KD_TEMP)}
    out, grads = {}, {}
    for name, fn in fns.items():
        times = []
        for _ in range(1 + repeats):
            s = s0.clone().requires_grad_()
            sync()
            t = time.perf_counter()
            loss = fn(s)
            loss.backward()
            sync()
            times.append(time.perf_counter() - t)
        out[name] = {"s": statistics.median(times[1:]), "loss": float(loss.detach())}
        grads[name] = s.grad
    out["fused candidate"]["max_abs_grad_diff"] = float((grads["fused candidate"] - grads["kd_loss"]).abs().max())
    return out

# -----------------------------------------------------------------------------
# memory


def rss_bytes() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hwm_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_hwm():
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak RSS to the current RSS (Linux >= 4.0)
        f.write("5")


def child_memory(args) -> dict:
    """Runs in a fresh process: one mode's memory on CPU."""
    torch.set_num_threads(args.threads)
    # a tiny model through the same path first: the meta-device machinery (~70 MiB of Python modules) and the
    # BLAS / oneDNN code load once per process and are not the step's memory
    tiny = llama.LlamaConfig(dim=64, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=128, vocab_size=64, max_seq_len=8)
    ids = torch.zeros(1, 8, dtype=torch.long)
    train_step(build(tiny, "cpu", torch.float32, 1, args.grad_ckpt), ids, "pkd_layer", [])
    del tiny
    gc.collect()
    base = rss_bytes()  # python, torch and its kernels
    cfg = llama.LlamaConfig(**PRESETS[args.preset], max_seq_len=args.seq_len)
    n_snap = args.snapshots if args.child.startswith("pkd") else 0
    s = build(cfg, "cpu", torch.float32, n_snap, grad_ckpt=args.grad_ckpt)
    idx = torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq_len), generator=torch.Generator().manual_seed(1))
    train_step(s, idx, args.child, [])  # AdamW states appear on the first step
    gc.collect()
    reset_hwm()
    ready = rss_bytes()  # weights, LoRA + AdamW states, gates, snapshots
    train_step(s, idx, args.child, [])
    peak = hwm_bytes()
    return {"mode": args.child, "static_bytes": ready - base, "step_bytes": peak - ready, "total_bytes": peak - base,
            "snapshot_bytes": sum(snapshot_bytes(x) for x in s.snapshots)}


def memory_cpu(args) -> dict:
    out = {}
    env = {k: v for k, v in os.environ.items() if k not in REUSE}
    env.update({"MALLOC_MMAP_THRESHOLD_": str(64 * 1024), "OMP_NUM_THREADS": str(args.threads)})
    for mode in MODES:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--preset", args.preset,
               "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch), "--snapshots",
               str(args.snapshots), "--threads", str(args.threads)] + (["--grad-ckpt"] if args.grad_ckpt else [])
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode:
            raise RuntimeError(f"memory child for {mode} failed:\n{res.stderr}")
        out[mode] = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"  memory {mode}: peak {out[mode]['total_bytes'] / MIB:.0f} MiB "
              f"(step {out[mode]['step_bytes'] / MIB:.0f} MiB)", flush=True)
    return out


def memory_cuda(s: Setup, idx) -> dict:
    out = {}
    for mode in MODES:
        train_step(s, idx, mode, [])
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        ready = torch.cuda.memory_allocated()
        train_step(s, idx, mode, [])
        peak = torch.cuda.max_memory_allocated()
        # snapshots live on the CPU: no GPU bytes
        out[mode] = {"mode": mode, "static_bytes": ready, "step_bytes": peak - ready, "total_bytes": peak,
                     "snapshot_bytes": 0}
    return out

# -----------------------------------------------------------------------------


def summarise(rounds: list[dict]) -> tuple[dict, dict, dict]:
    """Median phase times per mode; ratios within each round, then their median."""
    med = {m: {ph: statistics.median(r[m][ph] for r in rounds) for ph in rounds[0][m]} for m in MODES}

    def ratio(num, *den):
        return statistics.median(r[num]["total"] / sum(r[d]["total"] for d in den) for r in rounds)

    time_ratios = {"kd_over_plain_plus_floor": ratio("kd", "plain", "floor"), "kd_over_plain": ratio("kd", "plain"),
                   "pkd_over_kd_time": ratio("pkd", "kd"), "pkd_layer_over_pkd_time": ratio("pkd_layer", "pkd"),
                   "floor_over_plain": ratio("floor", "plain")}
    return med, {m: ratio(m, "plain") for m in MODES}, time_ratios


def verdict(value: float, goal: float) -> dict:
    return {"value": value, "goal": goal, "met": value <= goal}


def print_report(med, per_mode, time_ratios, mem, head, goals, n_snap, cuda, micro_batch, seq_len, vocab):
    mem_cols = f" {'peak MiB':>9} {'x plain':>8} {'step MiB':>9}" if mem else ""
    print(f"\n{'mode':<10} {'step s':>7} {'x plain':>8} {'teacher':>8} {'student':>8} {'loss':>6} {'backward':>9} "
          f"{'optim':>6} {'faults':>7} {'sys s':>6}" + mem_cols)
    for m in MODES:
        p = med[m]
        line = (f"{m:<10} {p['total']:7.2f} {per_mode[m]:7.2f}x {p.get('teacher', 0):8.2f} {p.get('student', 0):8.2f} "
                f"{p.get('loss', 0):6.2f} {p.get('backward', 0):9.2f} {p.get('optimizer', 0):6.2f} "
                f"{p['minor_faults']:7.0f} {p['sys']:6.2f}")
        if mem:
            line += (f" {mem[m]['total_bytes'] / MIB:9.0f} {mem[m]['total_bytes'] / mem['plain']['total_bytes']:7.2f}x"
                     f" {mem[m]['step_bytes'] / MIB:9.0f}")
        print(line)
    word = {True: "met", False: "MISSED"}
    print(f"\nKD / (plain + floor) = {time_ratios['kd_over_plain_plus_floor']:.3f}  (goal <= "
          f"{GOALS['kd_over_plain_plus_floor']}: {word[goals['kd_time']['met']]})")
    print(f"KD / plain = {time_ratios['kd_over_plain']:.3f}  (paper, A100, LLaMA-7B: {PAPER['kd_over_plain_time']}); "
          f"floor / plain = {time_ratios['floor_over_plain']:.3f}")
    print(f"PKD / KD time = {time_ratios['pkd_over_kd_time']:.3f}  (goal <= {GOALS['pkd_over_kd_time']}: "
          f"{word[goals['pkd_time']['met']]}); PKD+layer / PKD time = {time_ratios['pkd_layer_over_pkd_time']:.3f}")
    if mem:
        extra = mem["pkd"]["total_bytes"] - mem["kd"]["total_bytes"] - mem["pkd"]["snapshot_bytes"]
        where = ", on the CPU, not counted on the GPU" if cuda else ""
        print(f"PKD - KD memory - snapshots = {extra / MIB:+.1f} MiB = {100 * goals['pkd_memory']['value']:+.2f}% of "
              f"KD  (goal <= +1%: {word[goals['pkd_memory']['met']]}; the {n_snap} snapshots: "
              f"{mem['pkd']['snapshot_bytes'] / MIB:.1f} MiB{where})")
        print(f"PKD+layer / PKD memory = {mem['pkd_layer']['total_bytes'] / mem['pkd']['total_bytes']:.3f}  "
              f"(paper: {PAPER['layer_over_pkd_memory']})")
    print(f"loss head alone, forward + backward on ({micro_batch}, {seq_len}, {vocab}) fp32 logits: "
          + ", ".join(f"{k} {v['s']:.3f}s" for k, v in head.items())
          + f" (candidate: |grad - kd_loss grad| <= {head['fused candidate']['max_abs_grad_diff']:.1e})")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="base weights: float32 (CPU default) or bfloat16 (CUDA default)")
    ap.add_argument("--preset", default="bench", choices=sorted(PRESETS), help="model shape (7b: LLaMA-7B)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--snapshots", type=int, default=10, help="snapshots held in memory in the pkd modes")
    ap.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=None,
                    help="per-layer gradient checkpointing (default: on for CUDA, as nuteprune.py)")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds (all modes each) after one warm-up round")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: stable timings on a shared machine)")
    ap.add_argument("--malloc", default="default", choices=["default", "reuse"],
                    help="CPU timing under glibc's defaults, or with freed memory kept for reuse (as the CUDA "
                         "caching allocator does): no page faults on every fresh logits-sized buffer")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    ap.add_argument("--memory-only", action="store_true", help="skip the timing")
    ap.add_argument("--json", default=str(ROOT / "bench" / "train_cost.json"))
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def describe(args, cfg: llama.LlamaConfig, s: Setup, dtype) -> dict:
    """Prints the setting; returns it as the head of the JSON record."""
    cuda = args.device.startswith("cuda")
    n_params = llama.count_params(s.parts.model)
    where = f"{args.device}, {str(dtype).removeprefix('torch.')}" + (
        f", {args.threads} thread(s), malloc {args.malloc}" if not cuda else "")
    print(f"model: random LLaMA {args.preset} ({n_params / 1e6:.0f}M parameters: dim {cfg.dim}, {cfg.n_layers} layers, "
          f"{cfg.n_heads} heads, FFN {cfg.ffn_dim}, vocab {cfg.vocab_size}); LoRA q,v rank {LORA_RANK}; "
          f"batch {args.micro_batch} x {args.seq_len}; grad ckpt {args.grad_ckpt}; {where}", flush=True)
    return {"device": args.device, "dtype": str(dtype).removeprefix("torch."),
            "threads": None if cuda else args.threads, "malloc": None if cuda else args.malloc,
            "preset": args.preset, "config": PRESETS[args.preset], "params": n_params, "seq_len": args.seq_len,
            "micro_batch": args.micro_batch, "grad_ckpt": args.grad_ckpt, "snapshots_held": len(s.snapshots),
            "lora": {"targets": list(LORA_TARGETS), "rank": LORA_RANK}}


def check_goals(time_ratios: dict, mem: dict | None) -> dict:
    goals = {"kd_time": verdict(time_ratios["kd_over_plain_plus_floor"], GOALS["kd_over_plain_plus_floor"]),
             "pkd_time": verdict(time_ratios["pkd_over_kd_time"], GOALS["pkd_over_kd_time"])}
    if mem:
        extra = mem["pkd"]["total_bytes"] - mem["kd"]["total_bytes"] - mem["pkd"]["snapshot_bytes"]
        goals["pkd_memory"] = verdict(extra / mem["kd"]["total_bytes"], GOALS["pkd_extra_memory_frac"])
    return goals


def snapshot_sizes(cfg: llama.LlamaConfig, s: Setup) -> dict:
    """A teacher snapshot's bytes here and at LLaMA-7B (printed)."""
    snap = memory_model.snapshot_bytes(cfg, LORA_TARGETS, LORA_RANK)  # the formula that scales to 7B ...
    if s.snapshots:  # ... is what a run stores
        assert snapshot_bytes(s.snapshots[0]) == snap, (snapshot_bytes(s.snapshots[0]), snap)
    snap_7b = memory_model.snapshot_bytes(llama.LlamaConfig(**PRESETS["7b"]), LORA_TARGETS, LORA_RANK)
    print(f"snapshot per teacher: {snap / 1e6:.2f} MB here; LLaMA-7B (L 32, H 32, I 11008, D 4096, LoRA q,v rank 8, "
          f"fp32): {snap_7b / 1e6:.2f} MB, x 40 teachers = {40 * snap_7b / 1e6:.1f} MB  (paper: 728 MB)")
    return {"snapshot_bytes_per_teacher": snap, "snapshot_bytes_per_teacher_7b": snap_7b,
            "snapshots_7b_40_mb": 40 * snap_7b / 1e6}


def write_json(out: dict, path) -> None:
    Path(path).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


def main(argv=None):
    args = parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.grad_ckpt is None:
        args.grad_ckpt = cuda
    if args.child:
        print(json.dumps(child_memory(args)))
        return
    if not cuda and args.malloc == "reuse" and any(os.environ.get(k) != v for k, v in REUSE.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **REUSE})  # glibc reads it at start
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    if not cuda:
        torch.set_num_threads(args.threads)
    cfg = llama.LlamaConfig(**PRESETS[args.preset], max_seq_len=args.seq_len)
    s = build(cfg, args.device, dtype, args.snapshots, args.grad_ckpt)
    idx = torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq_len),
                        generator=torch.Generator().manual_seed(1)).to(args.device)
    out = describe(args, cfg, s, dtype)

    if not args.memory_only:
        rounds = time_modes(s, idx, MODES, args.repeats)
        med, per_mode, time_ratios = summarise(rounds)
        head = loss_profile(cfg, args.micro_batch, args.seq_len, args.device, args.repeats)
        out.update(repeats=args.repeats, median_phase_s=med, ratio_to_plain=per_mode, time_ratios=time_ratios,
                   rounds=rounds, loss_head=head)
    mem = None if args.no_memory else memory_cuda(s, idx) if cuda else memory_cpu(args)
    out["memory"] = mem
    if args.memory_only:
        write_json(out, args.json)
        return

    goals = check_goals(time_ratios, mem)
    print_report(med, per_mode, time_ratios, mem, head, goals, len(s.snapshots), cuda, args.micro_batch, args.seq_len,
                 cfg.vocab_size)
    out.update(snapshot_sizes(cfg, s), goals=goals, paper=PAPER)
    write_json(out, args.json)


if __name__ == "__main__":
    main()
