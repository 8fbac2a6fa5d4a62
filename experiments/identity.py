"""Before/after check of a refactor: four short stories260K runs of `python nuteprune.py` whose outputs must not change.

    python experiments/identity.py --save /tmp/ref            # on the old code: run, keep the outputs
    python experiments/identity.py --save /tmp/new --ref /tmp/ref   # on the new code: run, compare

The runs (pkd, kd, none, and pkd with post fine-tuning on Alpaca) are 60 pruning steps of 4 blocks of 128 tokens,
with mask and lambda rates high enough that the pkd run crosses many snapshot levels (log.jsonl's teacher columns),
--eval-every on so that snapshot and student perplexities are logged, and a checkpoint saved on the way. Each runs in
the same folder (--work) every time, so that report.json's `args.out` is the same before and after. Kept per run:
pruned/model.safetensors, log.jsonl, report.json. The comparison: sha256 of the first two, and report.json key by
key, where only the wall time may differ (printed), and `args` may hold flags added since the reference (at their
defaults, printed). Exit status 1 when anything else differs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEPT = ("pruned/model.safetensors", "log.jsonl", "report.json")
WALL_TIME = ("wall_time_s",)  # report.json fields that are allowed to differ


def runs(data_dir: Path) -> dict[str, list[str]]:
    d = data_dir
    common = ["--ckpt", str(d / "stories260K" / "stories260K.bin"), "--tokenizer", str(d / "stories260K" / "tok512.model"),
              "--data", str(d / "tinystories" / "tinystories_val.txt"), "--target", "0.5", "--block-size", "128",
              "--batch-size", "4", "--micro-batch-size", "2", "--max-steps", "60", "--lr-mask", "1", "--lr-lambda", "5",
              "--heldout-blocks", "8", "--log-every", "1", "--save-every", "25", "--eval-every", "20", "--seed", "0",
              "--device", "cpu"]
    ft = ["--ft-data", str(d / "alpaca" / "alpaca_data_first200.json"), "--ft-max-steps", "8", "--ft-batch-size", "4",
          "--ft-max-len", "128"]
    return {"pkd": common, "kd": common + ["--distill", "kd"], "none": common + ["--distill", "none"],
            "pkd-ft": common + ft}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_all(a: argparse.Namespace) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, flags in runs(Path(a.data_dir)).items():
        work, keep = Path(a.work) / name, Path(a.save) / name
        cmd = [sys.executable, str(ROOT / "nuteprune.py"), *flags, "--out", str(work), "--overwrite",
               "--cache-dir", str(Path(a.work) / "cache")]
        print(f"[{name}] {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        for f in KEPT:
            (keep / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(work / f, keep / f)


def compare(new: Path, ref: Path) -> bool:
    same = True
    for name in runs(Path(".")):
        for f in KEPT[:2]:
            a, b = sha256(ref / name / f), sha256(new / name / f)
            print(f"{name:7} {f:25} {'same' if a == b else 'DIFFERS'} {a[:16]} {b[:16]}")
            same &= a == b
        r, n = (json.loads((p / name / "report.json").read_text()) for p in (ref, new))
        added = sorted(n["args"].keys() - r["args"].keys())  # flags added since ref: their defaults change nothing
        n["args"] = {k: v for k, v in n["args"].items() if k not in added}
        differ = sorted(k for k in r.keys() | n.keys() if r.get(k) != n.get(k))
        print(f"{name:7} {'report.json':25} fields that differ: {differ or 'none'}"
              + (f"; new flags at their defaults: {added}" if added else ""))
        same &= set(differ) <= set(WALL_TIME)
    return same


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--save", required=True, help="folder for the kept outputs of the four runs")
    p.add_argument("--ref", help="kept outputs of an earlier run of this script to compare with")
    p.add_argument("--work", default="/tmp/nuteprune-identity", help="where the runs run (the same every time)")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"), help="the layout of shared/data")
    p.add_argument("--no-run", action="store_true", help="only compare --save with --ref")
    a = p.parse_args(argv)
    if not a.no_run:
        run_all(a)
    if a.ref:
        return 0 if compare(Path(a.save), Path(a.ref)) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
