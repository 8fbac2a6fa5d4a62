"""Threads for small models on a busy machine: the demo build's training step, a stories260K pruning step
(nuteprune.prune_step) and the evaluator's perplexity, each with 1 and 2 torch threads, on an idle machine and beside
one competing CPU-bound process (a pure-Python busy loop, as any other program on a laptop or shared box).

    python bench/threads.py [--repeats 3] [--json bench/threads.json]
    python bench/threads.py --first-command [--json bench/first_command.json]

Run it on an otherwise idle machine. --first-command times the README's first command, `python nuteprune.py --ckpt
demo --target 0.5`, from an empty cache (as on a fresh clone: the demo is built, then pruned) with the thread rule
left to choose (demo.build_threads for the build, cli.cpu_threads for the pruning), once on the idle machine and
once beside one busy process, and records the sha256 of the demo and pruned models of both (the rule must change no
byte). Otherwise each cell is the median seconds of --repeats runs of a fixed amount of work; ratios are against the
idle machine with the same threads.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import checkpoint
import demo  # noqa: E402
import evaluate  # noqa: E402
import llama  # noqa: E402
import nuteprune as npr  # noqa: E402

DATA = Path(os.environ.get("NUTEPRUNE_DATA", ROOT.parent / "shared" / "data"))


def demo_steps(steps: int = 20):
    """The demo build's training loop (demo.train_model) for a few steps on random tokens of its vocabulary."""
    cfg = demo.DemoConfig(steps=steps)
    train = torch.randint(0, cfg.vocab_size, (100_000,), generator=torch.Generator().manual_seed(0))
    return lambda: demo.train_model(cfg, train, cfg.vocab_size, log=lambda msg: None)


def prune_steps(steps: int = 8):
    """nuteprune.prune_step on stories260K: pkd with the layer loss, a batch of 16 blocks of 128 tokens."""
    model, _ = checkpoint.load(DATA / "stories260K" / "stories260K.bin", DATA / "stories260K" / "tok512.model")
    llama.add_lora(model)
    model.train()
    gates = npr.Gates(model.config)
    c = npr.RunConfig(ckpt="-", data="-", target=0.5, micro_batch_size=16)
    t = npr.Parts(model, gates, npr.prune_optimizer(gates, list(llama.lora_state(model).values())),
                  torch.amp.GradScaler("cpu", enabled=False), c)
    batch = torch.randint(0, 512, (16, 128), generator=torch.Generator().manual_seed(0))
    return lambda: [npr.prune_step(t, batch, None, 0.1) for _ in range(steps)]


def evaluator(windows: int = 64):
    """evaluate.mean_nll (the perplexity loop) on stories260K over windows of 256 tokens, batches of 8."""
    model, _ = checkpoint.load(DATA / "stories260K" / "stories260K.bin", DATA / "stories260K" / "tok512.model")
    w = torch.randint(0, 512, (windows, 256), generator=torch.Generator().manual_seed(0))
    return lambda: evaluate.mean_nll(model, w, 8)


WORKLOADS = {"demo build (20 steps)": demo_steps, "stories260K prune_step (8 steps)": prune_steps,
             "evaluator perplexity (64 x 256)": evaluator}


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def first_command(busy: bool) -> dict:
    """Wall seconds of the first command from an empty cache, and the threads the rule chose (from its log)."""
    import tempfile
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "NUTEPRUNE_THREADS", "MKL_NUM_THREADS")}
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            # run in the temporary folder, so that the summary lines it records name out/pruned, not the folder
            r = subprocess.run([sys.executable, str(ROOT / "nuteprune.py"), "--ckpt", "demo", "--target", "0.5",
                                "--out", "out"], env={**env, "NUTEPRUNE_CACHE": f"{tmp}/cache"}, cwd=tmp,
                               capture_output=True, text=True, check=True)
            wall = time.perf_counter() - t0
            sha = {name: hashlib.sha256(Path(tmp, f).read_bytes()).hexdigest()
                   for name, f in (("demo model", "cache/demo/model.safetensors"),
                                   ("pruned model", "out/pruned/model.safetensors"))}
    finally:
        if spinner:
            spinner.kill()
            spinner.wait()
    lines = r.stderr.splitlines() + r.stdout.splitlines()
    build = [ln for ln in lines if ln.startswith("demo: train loss")]
    threads = [ln for ln in lines if ln.startswith("demo: training on")]
    return {"wall_s": round(wall, 1), "build_line": build[-1] if build else None, "sha256": sha,
            "build_threads": threads[-1] if threads else None,
            "summary": [ln for ln in r.stdout.splitlines() if ln.startswith(("dense", "pruned", "sparsity"))]}


def main_first_command(path: str):
    results = {"idle": first_command(False), "beside one busy process": first_command(True)}
    for k, v in results.items():
        print(f"{k}: {v['wall_s']:.0f} s; {v['build_line']}; {' / '.join(v['summary'])}", flush=True)
    ratio = results["beside one busy process"]["wall_s"] / results["idle"]["wall_s"]
    same = results["idle"]["sha256"] == results["beside one busy process"]["sha256"]
    print(f"busy / idle: {ratio:.2f}×; demo and pruned models byte-identical idle and busy: {same}")
    Path(path).write_text(json.dumps({"cpu_count": os.cpu_count(), "busy_over_idle": round(ratio, 2),
                                      "same_bytes_idle_and_busy": same, **results},
                                     indent=2) + "\n")
    print(f"wrote {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="default: bench/threads.json (bench/first_command.json)")
    ap.add_argument("--first-command", action="store_true", help="time the README's first command, idle and busy")
    args = ap.parse_args(argv)
    if args.first_command:
        return main_first_command(args.json or str(ROOT / "bench" / "first_command.json"))
    args.json = args.json or str(ROOT / "bench" / "threads.json")
    results = {}
    for name, make in WORKLOADS.items():
        fn, row = make(), {}
        for busy in (False, True):
            spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
            try:
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    row[f"{threads} thread{'s' if threads > 1 else ''}, {'busy' if busy else 'idle'}"] = timed(
                        fn, args.repeats)
            finally:
                if spinner:
                    spinner.kill()
                    spinner.wait()
        results[name] = row
        print(f"{name}: " + ", ".join(f"{k} {v:.2f}s" for k, v in row.items()), flush=True)
    cols = list(next(iter(results.values())))
    print("\n| workload | " + " | ".join(cols) + " | busy / idle, 1 thread | busy / idle, 2 threads |")
    print("|---|" + "---|" * (len(cols) + 2))
    for name, row in results.items():
        r1, r2 = row["1 thread, busy"] / row["1 thread, idle"], row["2 threads, busy"] / row["2 threads, idle"]
        print(f"| {name} | " + " | ".join(f"{row[c]:.2f} s" for c in cols) + f" | {r1:.2f}× | {r2:.2f}× |")
    Path(args.json).write_text(json.dumps({"cpu_count": os.cpu_count(), "repeats": args.repeats,
                                           "seconds": results}, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
