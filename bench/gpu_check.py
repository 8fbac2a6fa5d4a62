"""The GPU check (issue 29): what only a GPU runs, on one GPU, in one command of a few minutes.

    python bench/gpu_check.py [--data-dir ../shared/data] [--model SmolLM2.gguf] [--out /tmp/gpu_check]
    python bench/gpu_check.py --dry-run       # the same runs and assertions on the CPU (gloo, bf16 autocast): CI

Every run is stories260K pruned to 50% (a subprocess: nuteprune.py, or torchrun with one rank and NUTEPRUNE_FSDP=1,
which takes the multi-GPU path on one GPU: the NCCL process group, FSDP2's DTensors, its foreach AdamW and
clip_grad_norm_, the GradScaler on DTensors, activation checkpointing as a CUDA run has it on). The checks and their
tolerances ("units": attention heads, FFN channels and hidden dims of the final masks):
  1. cpu-ref      1 process on the CPU, fp32, the reference (--steps long)
  2. gpu-bf16     1 process on the GPU, bf16: sparsity within 0.005 of 0.5, held-out perplexity within 10% of cpu-ref
  3. fsdp-bf16    1 rank under FSDP2, bf16, activation checkpointing, --ft-data: against 1 process on the GPU with the
                  same flags, at most 2% of the units differ, LoRA (pruning and post fine-tuning) within 5e-2
  4. fsdp-fp16    the same in fp16 against 1 process in fp16: the same bounds, and the same final loss scale
  5. resume       run 3 stopped by SIGTERM to torchrun at step 8 and resumed under FSDP2: against run 3, at most
                  1% of the units differ, LoRA within 1e-2, and the resumed run ends with the same number of steps
  6. memory       a SmolLM2-135M-shaped run (the GGUF if --model exists, else random weights of its shape), bf16,
                  4 x 512 tokens with the layer loss: peak GPU memory within 15% of `nuteprune.py --plan` (not run
                  in a dry run: the CPU has no such counter)
  7. nccl-2       with 2 or more GPUs: torchrun 2 ranks against 1 process on one GPU (the bounds of 3)
It ends with one summary line (GPU CHECK: PASS | FAIL ...) and exits 1 if a check failed. --dry-run takes 12
steps (--steps) and 4 post fine-tuning steps everywhere; tolerances stay those above.

Taking the data to a lent machine (only the repository travels; see the device tool's README): copy what it reads
into an ignored folder and carry it, e.g.
    mkdir -p .gpu_data && cp -r ../shared/data/{stories260K,tinystories,alpaca} .gpu_data/
    echo /.gpu_data/ >> .git/info/exclude
    run: python bench/gpu_check.py --data-dir .gpu_data      (carry: [".gpu_data"])
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMOLLM2 = dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536, vocab_size=49152, tie_embeddings=True,
               rope_theta=100000.0, max_seq_len=8192)  # SmolLM2-135M's config (its GGUF's metadata)
UNITS_SAME_DEVICE = 0.05  # share of the final mask units that may differ, FSDP2 against one process (3, 4, 7)
UNITS_RESUME = 0.01  # resumed against uninterrupted (5)
LORA_SAME_DEVICE, LORA_RESUME = 5e-2, 1e-2  # largest LoRA difference (bf16 / fp16 training)
PPL_REL = 0.10  # held-out perplexity on the GPU against the CPU's (2)
PLAN_REL = 0.15  # peak GPU memory against --plan (6)


def stories(a, dtype: str, device: str, steps: int) -> list[str]:
    d = Path(a.data_dir)
    s = d / "stories260K"
    return ["--ckpt", str(s / "stories260K.bin"), "--tokenizer", str(s / "tok512.model"),
            "--data", str(d / "tinystories" / "tinystories_val.txt"), "--target", "0.5", "--block-size", "128",
            "--batch-size", "8", "--micro-batch-size", "4", "--max-steps", str(steps), "--lr-mask", "1",
            "--lr-lambda", "5", "--seed", "0", "--device", device, "--dtype", dtype, "--log-every", "1",
            "--save-every", "1000"]


def with_ft(a) -> list[str]:
    return ["--ft-data", str(Path(a.data_dir) / "alpaca" / "alpaca_data_first200.json"), "--ft-max-steps",
            str(4 if a.dry_run else 20), "--ft-batch-size", "4", "--ft-max-len", "128", "--grad-ckpt"]


def launch(a, name: str, argv: list[str], fsdp: bool = False, ranks: int = 1, stop_at: str | None = None,
           fresh: bool = True) -> tuple[int, str, Path]:
    """nuteprune.py ARGV --out OUT/name as a subprocess (under torchrun with `ranks` ranks if fsdp); stop_at: SIGTERM
    to torchrun at the first stdout line starting with it. (exit code, output, run folder)."""
    import distributed
    out = Path(a.out) / name
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
                              if fsdp else []) + [str(ROOT / "nuteprune.py"), *argv]
    if fresh:
        cmd += ["--out", str(out), "--overwrite"]
    env = {**os.environ, **({distributed.FORCE: "1"} if fsdp else {})}
    if a.dry_run:
        env["OMP_NUM_THREADS"] = "1"
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if stop_at and line.startswith(stop_at):
            p.send_signal(signal.SIGTERM)
            stop_at = None
    p.wait()
    return p.returncode, "".join(lines), out


def ran(code: int, text: str, what: str):
    if code:
        print(text[-4000:], flush=True)
        raise RuntimeError(f"{what} exited {code}")


def state(out: Path) -> dict:
    import torch
    return torch.load(out / "state.pt", map_location="cpu", weights_only=True)


def differences(x: Path, y: Path) -> tuple[float, float]:
    """(share of the final mask units that differ, largest LoRA difference over pruning and post fine-tuning)."""
    s1, s2 = state(x), state(y)
    groups = ("head", "intermediate", "hidden")
    units = sum(s1["final_masks"][g].numel() for g in groups)
    differ = sum(int((s1["final_masks"][g] != s2["final_masks"][g]).sum()) for g in groups)
    lora = 0.0
    for key in ("lora", "ft_lora"):
        if s1[key] is not None:
            lora = max([lora] + [float((s1[key][k].float() - s2[key][k].float()).abs().max()) for k in s1[key]])
    return differ / units, lora


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


class Checks:
    def __init__(self, a):
        self.a, self.device = a, "cpu" if a.dry_run else "cuda"
        self.steps = a.steps or (12 if a.dry_run else 100)
        self.short = a.steps or (12 if a.dry_run else 24)  # the runs compared unit by unit drift apart with length

    def cpu_ref(self):
        code, text, self.ref = launch(self.a, "cpu-ref", stories(self.a, "fp32", "cpu", self.steps))
        ran(code, text, "cpu-ref")
        r = report(self.ref)
        return f"sparsity {r['sparsity']:.4f}, ppl {r['ppl_after']:.2f}", True

    def gpu_bf16(self):
        code, text, out = launch(self.a, "gpu-bf16", stories(self.a, "bf16", self.device, self.steps))
        ran(code, text, "gpu-bf16")
        r, ref = report(out), report(self.ref)
        rel = r["ppl_after"] / ref["ppl_after"] - 1
        ok = abs(r["sparsity"] - 0.5) <= 0.005 and abs(rel) <= PPL_REL
        return f"sparsity {r['sparsity']:.4f}, ppl {r['ppl_after']:.2f} ({rel:+.1%} vs cpu)", ok

    def pair(self, dtype: str, name: str, ranks: int = 1) -> tuple[str, bool, Path]:
        argv = stories(self.a, dtype, self.device, self.short) + with_ft(self.a)
        code, text, one = launch(self.a, f"{name}-1proc", argv)
        ran(code, text, f"{name} (1 process)")
        code, text, sharded = launch(self.a, name, argv, fsdp=True, ranks=ranks)
        ran(code, text, f"{name} (torchrun)")
        if f"FSDP2 over {ranks} rank" not in text:
            return "torchrun ran without FSDP2", False, sharded
        units, lora = differences(one, sharded)
        ok = units <= UNITS_SAME_DEVICE and lora <= LORA_SAME_DEVICE and state(sharded)["ft_lora"] is not None
        if dtype == "fp16":
            s1, s2 = state(one)["scaler"], state(sharded)["scaler"]
            ok &= s1 is not None and s1["scale"] == s2["scale"]
        return f"{units:.1%} units differ, LoRA max diff {lora:.1e}", ok, sharded

    def fsdp_bf16(self):
        line, ok, self.whole = self.pair("bf16", "fsdp-bf16")
        return line, ok

    def fsdp_fp16(self):
        line, ok, _ = self.pair("fp16", "fsdp-fp16")
        return line, ok

    def resume(self):
        argv = stories(self.a, "bf16", self.device, self.short) + with_ft(self.a)
        code, text, out = launch(self.a, "resume", argv, fsdp=True, stop_at="phase prune | step 8 ")
        stopped = state(out)["step"]
        if not (code and "stopped by SIGTERM" in text and stopped < self.short):
            return f"the SIGTERM did not stop the run with a checkpoint (exit {code}, step {stopped})", False
        code, text, out = launch(self.a, "resume", ["--resume", str(out)], fsdp=True, fresh=False)
        ran(code, text, "resume")
        units, lora = differences(self.whole, out)
        ok = units <= UNITS_RESUME and lora <= LORA_RESUME and report(out)["steps"] == report(self.whole)["steps"]
        return f"stopped after step {stopped}, resumed: {units:.1%} units differ, LoRA max diff {lora:.1e}", ok

    def memory(self):
        if self.a.dry_run:
            return "not run (dry run)", True
        import torch

        import llama
        import memory_plan
        import nuteprune as npr
        ckpt, tok = smollm2_ckpt(self.a)
        argv = ["--ckpt", ckpt, "--tokenizer", tok, "--data",
                str(Path(self.a.data_dir) / "tinystories" / "tinystories_val.txt"), "--target", "0.5", "--block-size",
                "512", "--batch-size", "4", "--micro-batch-size", "4", "--max-steps", "20", "--device", "cuda",
                "--dtype", "bf16", "--out", str(Path(self.a.out) / "smollm2"), "--overwrite", "--heldout-blocks", "2",
                "--lr-mask", "1", "--lr-lambda", "1"]
        torch.cuda.reset_peak_memory_stats()
        npr.main(argv)
        measured = torch.cuda.max_memory_allocated() / 1e9
        rep = report(Path(self.a.out) / "smollm2")
        planned = memory_plan.memory_plan(llama.LlamaConfig(**SMOLLM2), 2, ("q_proj", "v_proj"), 8, rep["snapshots"],
                                          4, 512, True, True, "pkd", 1)["device total"]
        return f"peak {measured:.2f} GB, plan {planned:.2f} GB ({planned / measured:.2f}x)", \
            abs(planned / measured - 1) <= PLAN_REL

    def nccl_2(self):
        import torch
        if self.a.dry_run:
            return "not run (dry run: 2 gloo ranks are in the tests)", True
        if torch.cuda.device_count() < 2:
            return "not run (one GPU)", True
        line, ok, _ = self.pair("bf16", "nccl-2", ranks=2)
        return line, ok


def smollm2_ckpt(a) -> tuple[str, str]:
    """(--ckpt, --tokenizer): the GGUF if given, else random weights of SmolLM2-135M's shape with tok512."""
    tok = str(Path(a.data_dir) / "stories260K" / "tok512.model")
    if a.model and Path(a.model).is_file():
        return a.model, a.model
    import torch

    import checkpoint
    import llama
    folder = Path(a.out) / "smollm2-shape"
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        model = llama.Llama(llama.LlamaConfig(**SMOLLM2))
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
        checkpoint.save_model(model.to(torch.bfloat16), folder)
    return str(folder), tok


CHECKS = ("cpu_ref", "gpu_bf16", "fsdp_bf16", "fsdp_fp16", "resume", "memory", "nccl_2")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"),
                   help="stories260K/, tinystories/ and alpaca/")
    p.add_argument("--model", default=str(ROOT.parent / "shared" / "models" / "smollm2-135m-instruct" /
                                          "SmolLM2-135M-Instruct.Q4_1.gguf"), help="SmolLM2's GGUF, if present")
    p.add_argument("--out", default="/tmp/gpu_check")
    p.add_argument("--dry-run", action="store_true", help="every run on the CPU (gloo, bf16 autocast), short")
    p.add_argument("--steps", type=int, default=0, help="pruning steps of every stories260K run (0: the defaults)")
    a = p.parse_args(argv)
    import torch
    if not a.dry_run and not torch.cuda.is_available():
        print("GPU CHECK: not run (no CUDA device; --dry-run runs it on the CPU)")
        return 1
    checks, t0, lines, ok = Checks(a), time.time(), [], True
    for name in CHECKS:
        t = time.time()
        try:
            line, good = getattr(checks, name)()
        except Exception as e:  # a crash is a result too: report it and go on
            line, good = f"CRASHED ({type(e).__name__}: {e})", False
        line = f"{name.replace('_', '-')} {'ok' if good else 'FAILED'} ({time.time() - t:.0f} s): {line}"
        print(line, flush=True)
        lines.append(line)
        ok &= good
    where = "cpu (dry run)" if a.dry_run else torch.cuda.get_device_name()
    print(f"GPU CHECK: {'PASS' if ok else 'FAIL'} on {where} in {time.time() - t0:.0f} s | " + " | ".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
