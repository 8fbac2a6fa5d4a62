"""The prepared GPU check (issue 18): what the CPU cannot show, in one command of a few minutes on one GPU.

    python bench/gpu_check.py [--data-dir ../shared/data] [--model SmolLM2.gguf] [--out /tmp/gpu_check]

  1. stories260K on CUDA in bf16, one process: prune to 50%, the export's sparsity, its perplexity on the GPU.
  2. A SmolLM2-135M run on CUDA in bf16 (the real GGUF if --model exists, else random weights of its shape, which is
     what memory depends on): 20 steps of the paper's recipe at 4 x 512 tokens with the layer loss, peak GPU memory
     (torch.cuda.max_memory_allocated) against `nuteprune.py --plan`'s device total.
  3. With 2 or more GPUs: `torchrun --nproc-per-node 2` over NCCL on stories260K against one process on one GPU:
     the final masks and the largest LoRA difference.
It ends with one summary line (GPU CHECK: ...) and exits 1 if a check failed.

Taking the data to a lent machine (only the repository travels; see the device tool's README): copy what it reads
into an ignored folder and carry it, e.g.
    mkdir -p .gpu_data && cp -r ../shared/data/stories260K ../shared/data/tinystories .gpu_data/
    echo /.gpu_data/ >> .git/info/exclude
    run: python bench/gpu_check.py --data-dir .gpu_data      (carry: [".gpu_data"])
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMOLLM2 = dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536, vocab_size=49152, tie_embeddings=True,
               rope_theta=100000.0, max_seq_len=8192)  # SmolLM2-135M's config (its GGUF's metadata)


def stories(a) -> list[str]:
    d = Path(a.data_dir)
    return ["--ckpt", str(d / "stories260K" / "stories260K.bin"), "--tokenizer", str(d / "stories260K" / "tok512.model"),
            "--data", str(d / "tinystories" / "tinystories_val.txt"), "--target", "0.5", "--block-size", "128",
            "--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "100", "--lr-mask", "1", "--lr-lambda", "5",
            "--seed", "0", "--device", a.device, "--dtype", "bf16", "--log-every", "20"] + \
        (["--max-steps", str(a.steps)] if a.steps else [])


def check_stories(a) -> tuple[str, bool]:
    import nuteprune as npr
    out = Path(a.out) / "stories-1gpu"
    npr.main(stories(a) + ["--out", str(out), "--overwrite"])
    rep = json.loads((out / "report.json").read_text())
    ok = abs(rep["sparsity"] - 0.5) <= 0.005
    return f"stories260K {a.device} bf16 {'ok' if ok else 'FAILED'} (sparsity {rep['sparsity']:.4f}, held-out ppl " \
           f"{rep['ppl_before']:.2f} -> {rep['ppl_after']:.2f})", ok


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


def check_smollm2_memory(a) -> tuple[str, bool]:
    import torch

    import memory_plan
    import nuteprune as npr
    ckpt, tok = smollm2_ckpt(a)
    argv = ["--ckpt", ckpt, "--tokenizer", tok, "--data", str(Path(a.data_dir) / "tinystories" / "tinystories_val.txt"),
            "--target", "0.5", "--block-size", "512", "--batch-size", "4", "--micro-batch-size", "4",
            "--max-steps", str(a.steps or 20), "--device", a.device, "--dtype", "bf16", "--out", str(Path(a.out) / "smollm2"),
            "--overwrite", "--heldout-blocks", "2", "--lr-mask", "1", "--lr-lambda", "1"]
    cuda = a.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.time()
    npr.main(argv)
    measured = torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan")
    rep = json.loads((Path(a.out) / "smollm2" / "report.json").read_text())
    import llama
    cfg = llama.LlamaConfig(**SMOLLM2)
    planned = memory_plan.memory_plan(cfg, 2, ("q_proj", "v_proj"), 8, rep["snapshots"], 4, 512, True, True, "pkd",
                                      1)["device total"]
    ok = abs(planned / measured - 1) <= 0.15 or not cuda
    return (f"SmolLM2-shape {a.device} bf16 {'ok' if ok else 'OFF'} ({rep['steps']} steps {time.time() - t:.0f} s, peak "
            f"{measured:.2f} GB, plan {planned:.2f} GB, plan/measured {planned / measured:.2f})"), ok


def check_nccl(a) -> tuple[str, bool]:
    import torch
    if a.device != "cuda" or torch.cuda.device_count() < 2:
        return "torchrun nccl: not run (one GPU)", True
    two = Path(a.out) / "stories-2gpu"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "nuteprune.py"), *stories(a), "--out", str(two), "--overwrite"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode:
        print(r.stdout[-3000:], r.stderr[-3000:])
        return f"torchrun nccl 2 ranks FAILED (exit {r.returncode})", False
    s1, s2 = (torch.load(Path(a.out) / x / "state.pt", weights_only=True) for x in ("stories-1gpu", "stories-2gpu"))
    differ = sum(int((s1["final_masks"][g] != s2["final_masks"][g]).sum()) for g in ("head", "intermediate", "hidden"))
    lora = max(float((s1["lora"][k].float() - s2["lora"][k].float()).abs().max()) for k in s1["lora"])
    return f"torchrun nccl 2 ranks ok ({differ} mask units differ from 1 GPU, LoRA max diff {lora:.1e})", True


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"), help="stories260K/ and tinystories/")
    p.add_argument("--model", default=str(ROOT.parent / "shared" / "models" / "smollm2-135m-instruct" /
                                          "SmolLM2-135M-Instruct.Q4_1.gguf"), help="SmolLM2's GGUF, if present")
    p.add_argument("--out", default="/tmp/gpu_check")
    p.add_argument("--device", default="cuda", help="cpu: a dry run of the script's plumbing (no memory check)")
    p.add_argument("--steps", type=int, default=0, help="pruning steps of every run (0: 100 and 20)")
    a = p.parse_args()
    import torch
    if a.device == "cuda" and not torch.cuda.is_available():
        print("GPU CHECK: not run (no CUDA device)")
        sys.exit(1)
    t0, lines, ok = time.time(), [], True
    for check in (check_stories, check_smollm2_memory, check_nccl):
        try:
            line, good = check(a)
        except (Exception, SystemExit) as e:  # a crash is a result too: report it and go on
            line, good = f"{check.__name__} CRASHED ({type(e).__name__}: {e})", False
        print(line, flush=True)
        lines.append(line)
        ok &= good
    name = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    print(f"GPU CHECK: {'PASS' if ok else 'FAIL'} on {name} in {time.time() - t0:.0f} s | "
          + " | ".join(lines))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
