"""Host memory per rank while torchrun loads and shards the base (issue 18: no rank holds a whole converted copy).

Writes a synthetic HF checkpoint in fp16 (random LLaMA, ~0.62 GB by default: 24 layers of width 1024, a vocabulary of 8,000, so that the decoder layers hold 95% of the weights as in a 7B) and loads it as bf16, as a GPU run of a
LLaMA-2 checkpoint does, the way nuteprune.py's setup does: the base, the pruning LoRA, then FSDP2's sharding (gloo,
on the CPU). Three loads, each in fresh processes:
  - 1 process: the whole model converted (what a single-process run holds);
  - 2 ranks, converted then sharded: every rank converts the whole model, then keeps its shards (the old load);
  - 2 ranks, cast per layer: the base stays memory-mapped as stored and each layer is cast just before FSDP shards
    it (distributed.shard_model's dtype; the load now);
  - 2 ranks, resumed in post fine-tuning: the same, each layer's q and v converted and the pruning LoRA merged into
    them just before the layer is cast and sharded (runner.setup on a checkpoint in post fine-tuning);
and compares the last with the host RAM `nuteprune.py --plan` gives for that load (memory_plan.host_plan). Then the
export rank 0 does (half the heads and FFN channels pruned, bf16, shards of SHARD_MB), from the base as stored
(now) and from a base converted whole.
A thread in each process samples /proc/self/smaps_rollup every 2 ms; reported per rank, above the process's baseline
(torch imported, process group up): peak anonymous memory (what the process allocated: converted copies, shards),
peak PSS (anonymous plus its share of the memory-mapped file's pages) and peak USS (pages no other process maps),
and the same after loading.

    python bench/host_memory.py [--dir /tmp/nuteprune_bench_hostmem] [--layers 24] [--vocab 8000] [--json bench/host_memory.json]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = {"1 process": (1, "converted"), "2 ranks, converted then sharded": (2, "converted"),
         "2 ranks, cast per layer": (2, "per-layer"),
         "2 ranks, resumed in post fine-tuning": (2, "resume-ft"),
         "export, base converted whole": (1, "export-converted"), "export, base as stored (rank 0 now)": (1, "export")}
SHARD_MB = 64  # the export's safetensors shards here (transformers' default: 5 GB), so that one shard is not the model


def smaps() -> dict:
    """MB of the process: anonymous, PSS, RSS and USS (private clean + private dirty)."""
    kb = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == "kB":
                kb[parts[0].rstrip(":")] = int(parts[1])
    return {"anon": kb.get("Anonymous", 0) / 1024, "pss": kb.get("Pss", 0) / 1024, "rss": kb.get("Rss", 0) / 1024,
            "uss": (kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)) / 1024}


class Sampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.base, self.peak, self.done = smaps(), {}, False

    def run(self):
        while not self.done:
            for k, v in smaps().items():
                self.peak[k] = max(self.peak.get(k, 0.0), v - self.base[k])
            time.sleep(0.002)

    def stop(self) -> dict:
        self.done = True
        self.join()
        now = smaps()
        return {"peak": self.peak, "after": {k: now[k] - self.base[k] for k in now}}


def worker(a):
    import torch

    import checkpoint
    import distributed
    import nuteprune as npr
    distributed.init(torch.device("cpu"))
    sampler = Sampler()
    sampler.start()
    dtype, sharded = torch.bfloat16, distributed.world_size() > 1
    if a.worker.startswith("export"):
        return export_worker(a, sampler, dtype)
    c = npr.RunConfig(ckpt=a.ckpt, target=0.5, device="cpu", dtype="bf16")
    per_layer = a.worker in ("per-layer", "resume-ft")
    model = checkpoint.load_model(a.ckpt, "cpu", dtype, as_stored=sharded and per_layer)
    npr.attach_lora(model, c, None, torch.Generator().manual_seed(0))
    before = None
    if a.worker == "resume-ft":  # runner.setup on a checkpoint in post fine-tuning: each layer's q, v converted and
        import runner  # the pruning LoRA merged as the layer is sharded
        before = runner.finetune_layer(npr, c, dtype, torch.Generator().manual_seed(1))
    if sharded:
        distributed.shard_model(model, torch.device("cpu"), dtype if per_layer else None, before)
    import gc
    gc.collect()
    rec = sampler.stop()
    Path(a.out, f"rank{distributed.rank_id()}.json").write_text(json.dumps(rec))
    distributed.finish()


def export_worker(a, sampler, dtype):
    """The export of rank 0 under torchrun: the base as stored, half the heads and FFN channels pruned, written layer
    by layer in bf16 into SHARD_MB shards (or, for comparison, from a base converted whole first)."""
    import torch

    import checkpoint
    import llama
    model = checkpoint.load_model(a.ckpt, "cpu", dtype, as_stored=a.worker == "export")
    cfg, g = model.config, torch.Generator().manual_seed(0)
    masks = llama.Masks((torch.rand(cfg.n_layers, cfg.n_heads, generator=g) < 0.5).float(),
                        (torch.rand(cfg.n_layers, cfg.ffn_dim, generator=g) < 0.5).float(), torch.ones(cfg.dim))
    with tempfile.TemporaryDirectory() as out:
        checkpoint.export_pruned(model, masks, out, shard_bytes=SHARD_MB * 2**20, dtype=dtype)
    rec = sampler.stop()
    rec["layer_fp32_mb"] = 4 * llama.count_params(model.model.layers[0]) / 2**20
    Path(a.out, "rank0.json").write_text(json.dumps(rec))


def make_checkpoint(folder: Path, layers: int, vocab: int) -> int:
    import torch

    import checkpoint
    import llama
    cfg = llama.LlamaConfig(dim=1024, n_layers=layers, n_heads=16, n_kv_heads=16, ffn_dim=2816, vocab_size=vocab)
    if not (folder / "model.safetensors").exists() or checkpoint.check_checkpoint(folder, False) != cfg:
        torch.manual_seed(0)
        with torch.device("meta"):
            model = llama.Llama(cfg)
        model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(std=0.02)
        checkpoint.save_model(model.half(), folder)
        del model
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def run_mode(ckpt: Path, ranks: int, mode: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        argv = [str(Path(__file__).resolve()), "--worker", mode, "--ckpt", str(ckpt), "--out", out]
        cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
               if ranks > 1 else [sys.executable]) + argv
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(ranks)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="/tmp/nuteprune_bench_hostmem", help="where the synthetic checkpoint goes")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    folder = Path(a.dir)
    folder.mkdir(parents=True, exist_ok=True)
    size_mb = make_checkpoint(folder, a.layers, a.vocab) / 2**20  # fp16 on disk = the bf16 model's size
    results = {"checkpoint_mb": size_mb, "modes": {}}
    print(f"checkpoint: {size_mb:.0f} MB fp16 on disk, loaded as bf16 ({size_mb:.0f} MB converted, "
          f"{size_mb / 2:.0f} MB per rank's half)")
    print(f"{'load':34s} {'rank':>4s} {'peak anon':>10s} {'peak PSS':>9s} {'peak USS':>9s} {'anon after':>11s} "
          f"{'peak anon / model':>18s}")
    for name, (ranks, mode) in MODES.items():
        recs = run_mode(folder, ranks, mode)
        results["modes"][name] = recs
        for r, rec in enumerate(recs):
            pk = rec["peak"]
            print(f"{name:34s} {r:4d} {pk['anon']:8.0f}MB {pk['pss']:7.0f}MB {pk['uss']:7.0f}MB "
                  f"{rec['after']['anon']:9.0f}MB {pk['anon'] / size_mb:17.2f}x")
    import checkpoint
    import memory_plan
    cfg = checkpoint.check_checkpoint(folder)
    planned = memory_plan.host_plan(cfg, 2, 2, n_snapshots=0, device="cpu")["load"] / 2 * 1e9 / 2**20  # a rank
    measured = max(rec["peak"]["anon"] for rec in results["modes"]["2 ranks, cast per layer"])
    results["plan_load_mb_per_rank"] = planned
    print(f"--plan's host RAM at load, per rank: {planned:.0f} MB; measured peak {measured:.0f} MB "
          f"(plan / measured {planned / measured:.2f})")
    all7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # --ft-lora-targets
    merged = (memory_plan.merge_bytes(cfg, 2, ("q_proj", "v_proj")) / cfg.n_layers  # one layer's q, v
              + 4 * memory_plan.lora_param_count(cfg, all7, 8)) / 2**20  # and the fine-tuning LoRA, fp32
    planned_ft = planned + merged
    measured_ft = max(rec["peak"]["anon"] for rec in results["modes"]["2 ranks, resumed in post fine-tuning"])
    results["plan_resume_ft_mb_per_rank"] = planned_ft
    print(f"--plan's host RAM for a resume in post fine-tuning, per rank (the load, one layer's q/v merge and the "
          f"fine-tuning LoRA: {merged:.0f} MB): {planned_ft:.0f} MB; measured peak {measured_ft:.0f} MB (plan / "
          f"measured {planned_ft / measured_ft:.2f})")
    exp = results["modes"]["export, base as stored (rank 0 now)"][0]
    planned_exp = memory_plan.host_plan(cfg, 2, 1, (), shard_bytes=SHARD_MB * 2**20)["export (rank 0)"] * 1e9 / 2**20
    results["plan_export_mb"] = planned_exp
    print(f"export: peak {exp['peak']['anon']:.0f} MB; one layer in fp32 is {exp['layer_fp32_mb']:.0f} MB, a shard "
          f"{SHARD_MB} MB; --plan's export figure for it {planned_exp:.0f} MB (plan / measured "
          f"{planned_exp / exp['peak']['anon']:.2f})")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
