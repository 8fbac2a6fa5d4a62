"""Peak memory to load a checkpoint, as a multiple of its size on disk (issue: llama.py loads without doubling).

Writes a synthetic HF checkpoint (random LLaMA, ~1.8 GB fp32 by default), then in a fresh process for each loader
measures peak resident memory above the process's baseline (torch imported) while loading the checkpoint and
touching every weight once (a forward pass), and reports peak / size on disk.

    python bench/load_memory.py [--dir /tmp/nuteprune_bench_ckpt] [--layers 6] [--json bench/load_memory.json]
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import resource, sys, time, torch
sys.path.insert(0, {root!r})
import checkpoint
import llama
torch.set_num_threads(2)
def rss_mb():  # current resident set size, from /proc
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
base = rss_mb()
t = time.time()
if {loader!r} == "checkpoint.load_model":
    model = checkpoint.load_model({path!r})
else:  # the naive way: read the whole state dict into memory, then build and fill a model
    from safetensors.torch import load_file
    cfg, _ = checkpoint.read_checkpoint({path!r})
    state = load_file({path!r} + "/model.safetensors")
    model = llama.Llama(cfg)
    model.load_state_dict(state)
load_s = time.time() - t
with torch.no_grad():
    model(torch.zeros(1, 8, dtype=torch.long))  # every weight read at least once
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MB (Linux reports KiB)
print(peak - base, load_s)
"""


def make_checkpoint(folder: Path, layers: int) -> int:
    import torch

    import checkpoint
    import llama
    cfg = llama.LlamaConfig(dim=2048, n_layers=layers, n_heads=16, n_kv_heads=16, ffn_dim=5632, vocab_size=32000)
    if not (folder / "model.safetensors").exists():
        torch.manual_seed(0)
        with torch.device("meta"):
            model = llama.Llama(cfg)
        model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(std=0.02)
        checkpoint.save_model(model, folder)
        del model
    return (folder / "model.safetensors").stat().st_size


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/nuteprune_bench_ckpt", help="where the synthetic checkpoint is written")
    ap.add_argument("--layers", type=int, default=6, help="layers of the dim-2048 model (6 -> ~1.8 GB fp32)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    folder = Path(args.dir)
    size = make_checkpoint(folder, args.layers)
    rows = []
    for loader in ("checkpoint.load_model", "safetensors.load_file + load_state_dict"):
        code = CHILD.format(root=str(ROOT), loader=loader, path=str(folder))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
        peak_mb, load_s = float(out[0]), float(out[1])
        rows.append({"loader": loader, "disk_mb": size / 2**20, "peak_mb": peak_mb,
                     "ratio": peak_mb * 2**20 / size, "load_s": load_s})
    print(f"checkpoint: {folder} ({size / 2**30:.2f} GiB on disk)")
    print(f"{'loader':<42} {'peak MB':>9} {'peak/disk':>9} {'load s':>7}")
    for r in rows:
        print(f"{r['loader']:<42} {r['peak_mb']:9.0f} {r['ratio']:9.2f} {r['load_s']:7.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint_bytes": size, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
