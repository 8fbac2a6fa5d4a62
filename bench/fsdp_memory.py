"""The memory plan (`nuteprune.py --plan`, memory_plan.memory_plan) against what one rank really holds, on the CPU with
1 and 2 ranks (torchrun, gloo, FSDP2): the bench model of bench/train_cost.py, one pkd + layer-loss step of
nuteprune.prune_step on each rank's share of the batch.

    python bench/fsdp_memory.py [--preset bench] [--batch 2] [--seq-len 512] [--json bench/fsdp_memory.json]

Each world size runs under `torchrun --standalone --nproc-per-node N` in fresh processes; glibc is told to return
freed memory at once (as in train_cost.py), so RSS follows live tensors. Per rank: static = RSS once the sharded
model, LoRA + AdamW states, gates and snapshots are in (above the RSS of python + torch + the FSDP machinery, loaded
by a tiny model first); step = peak RSS during one step above that. The plan is computed for the same sizes (fp32,
world N, micro-batch = the rank's share); its snapshots live in the same CPU memory here, so they are added to it.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import distributed  # noqa: E402
import llama  # noqa: E402
import memory_plan  # noqa: E402
from memory_plan import GB  # noqa: E402
import nuteprune as npr  # noqa: E402
import train_cost as tc  # noqa: E402

MIB = 2 ** 20


def sharded_setup(cfg, n_snapshots: int) -> tc.Setup:
    s = tc.build(cfg, "cpu", torch.float32, n_snapshots, grad_ckpt=False)
    if distributed.world_size() > 1:
        distributed.shard_model(s.parts.model, torch.device("cpu"))
        lora = list(llama.lora_state(s.parts.model).values())
        optimizers = npr.prune_optimizer(s.parts.gates, lora)
        npr.set_learning_rates(optimizers, {"log_alpha": 0.1, "lambda": 0.1, "lora": 1e-3})
        s.parts = npr.replace(s.parts, optimizers=optimizers)
    return s


def rank_memory(args) -> dict:
    """Runs on every rank under torchrun: this rank's static and step memory."""
    torch.set_num_threads(1)
    distributed.init(torch.device("cpu"))
    tiny = llama.LlamaConfig(dim=64, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=128, vocab_size=64, max_seq_len=8)
    tc.train_step(sharded_setup(tiny, 1), torch.zeros(2, 8, dtype=torch.long), "pkd_layer", [])
    gc.collect()
    base = tc.rss_bytes()  # python, torch, gloo and the FSDP machinery
    cfg = llama.LlamaConfig(**tc.PRESETS[args.preset], max_seq_len=args.seq_len)
    s = sharded_setup(cfg, args.snapshots)
    gc.collect()
    idx = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(1))
    tc.train_step(s, idx, "pkd_layer", [])  # AdamW states appear on the first step
    gc.collect()
    tc.reset_hwm()
    ready = tc.rss_bytes()
    tc.train_step(s, idx, "pkd_layer", [])
    peak = tc.hwm_bytes()
    return {"rank": distributed.rank_id(), "static_bytes": ready - base, "step_bytes": peak - ready, "total_bytes": peak - base}


def measure(args, world: int) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in tc.REUSE}
    env.update({"MALLOC_MMAP_THRESHOLD_": str(64 * 1024), "OMP_NUM_THREADS": "1"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
           str(Path(__file__).resolve()), "--rank-child", "--preset", args.preset, "--batch", str(args.batch),
           "--seq-len", str(args.seq_len), "--snapshots", str(args.snapshots)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        raise RuntimeError(f"torchrun with {world} ranks failed:\n{res.stderr[-3000:]}")
    return [json.loads(ln) for ln in res.stdout.splitlines() if ln.startswith("{")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="bench", choices=list(tc.PRESETS))
    ap.add_argument("--batch", type=int, default=2, help="global batch of the step, split over the ranks")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--snapshots", type=int, default=10)
    ap.add_argument("--worlds", default="1,2")
    ap.add_argument("--json", default=str(ROOT / "bench" / "fsdp_memory.json"))
    ap.add_argument("--rank-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rank_child:
        print(json.dumps(rank_memory(args)), flush=True)
        return
    cfg = llama.LlamaConfig(**tc.PRESETS[args.preset], max_seq_len=args.seq_len)
    out = {"preset": args.preset, "batch": args.batch, "seq_len": args.seq_len, "snapshots": args.snapshots, "runs": {}}
    print(f"{args.preset} model ({llama.count_params(cfg) / 1e6:.0f}M, fp32), pkd + layer loss, global batch "
          f"{args.batch} x {args.seq_len}, {args.snapshots} snapshots; MiB per rank")
    print(f"{'ranks':>5} {'rank':>4} {'plan static':>11} {'measured':>9} {'plan step':>10} {'measured':>9} "
          f"{'plan total':>10} {'measured':>9} {'ratio':>6}")
    for world in map(int, args.worlds.split(",")):
        p = memory_plan.memory_plan(cfg, 4, tc.LORA_TARGETS, tc.LORA_RANK, args.snapshots, args.batch // world,
                                    args.seq_len, False, True, "pkd", world)
        step = sum(v for k, v in p.items() if k.startswith("activations")) * GB
        static = (p["device total"] + p["snapshots (CPU)"]) * GB - step  # snapshots share the CPU's memory here
        gathered = p.get("FSDP gathered (2 layers + root)", 0.0) * GB  # held during the step, not between steps
        static, step = static - gathered, step + gathered
        rows = []
        for r in measure(args, world):
            r.update(plan_static=static, plan_step=step, plan_total=static + step,
                     ratio=(static + step) / r["total_bytes"])
            rows.append(r)
            print(f"{world:5d} {r['rank']:4d} {static / MIB:11.0f} {r['static_bytes'] / MIB:9.0f} {step / MIB:10.0f} "
                  f"{r['step_bytes'] / MIB:9.0f} {(static + step) / MIB:10.0f} {r['total_bytes'] / MIB:9.0f} "
                  f"{r['ratio']:6.3f}")
        out["runs"][world] = rows
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"ratio = plan / measured total; wrote {args.json}")


if __name__ == "__main__":
    main()
