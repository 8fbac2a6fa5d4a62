"""Batched, prefix-sharing scorer (evaluate.score_requests) against the naive loop (one forward pass per choice).

Builds the requests of every zero-shot task and MMLU from the first --items items of DIR/tasks/*.jsonl, scores
them both ways with the same model, checks the log-likelihoods agree, and reports time, tokens run and speed-up.
The model is a random LLaMA of the given size with the 32k LLaMA tokenizer (throughput does not depend on the
weights), or --ckpt.

    python bench/eval_throughput.py [--data-dir ../shared/data] [--items 24] [--dim 256 --layers 4]
                                    [--ckpt PATH] [--json bench/eval_throughput.json]
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import checkpoint
import evaluate as ev  # noqa: E402
import llama  # noqa: E402
import tokenization


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--items", type=int, default=24, help="items per task")
    ap.add_argument("--tasks", default=",".join(ev.ZERO_SHOT + ("mmlu",)))
    ap.add_argument("--harness", default="fixed", choices=["fixed", "legacy"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--ckpt", default=None, help="a real checkpoint instead of the random model")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: stable timings on a shared machine)")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs of each scorer per task; the best counts")
    ap.add_argument("--json", default=str(ROOT / "bench" / "eval_throughput.json"))
    return ap.parse_args(argv)


def build_model(args, data_dir: Path):
    """(model, tokenizer, label): --ckpt, or a random LLaMA with the 32k LLaMA tokenizer."""
    if args.ckpt:
        model, tok = checkpoint.load(args.ckpt)
        return model, tok, args.ckpt
    tok = tokenization.SentencePieceTokenizer(data_dir / "llama_tokenizer" / "tokenizer.model")
    torch.manual_seed(0)
    cfg = llama.LlamaConfig(dim=args.dim, n_layers=args.layers, n_heads=args.dim // 64, n_kv_heads=args.dim // 64,
                            ffn_dim=int(args.dim * 8 / 3) // 32 * 32, vocab_size=tok.vocab_size, max_seq_len=2048)
    model = llama.Llama(cfg).eval()
    return model, tok, f"random LLaMA dim {cfg.dim}, {cfg.n_layers} layers, ffn {cfg.ffn_dim}, vocab {cfg.vocab_size}"


def compare_task(model, reqs: list, task: str, args) -> dict:
    """Both scorers on one task's requests: best times, tokens run, and whether they agree (printed as a line)."""
    t_naive = t_batched = float("inf")
    for _ in range(args.repeat):  # interleaved, best of: other processes on a shared machine only add time
        t = time.perf_counter()
        naive = ev.score_requests_naive(model, reqs)
        t_naive = min(t_naive, time.perf_counter() - t)
        t = time.perf_counter()
        batched = ev.score_requests(model, reqs, args.batch_size)
        t_batched = min(t_batched, time.perf_counter() - t)
    diff = max(abs(a - b) for x, y in zip(naive, batched) for a, b in zip(x, y))
    tok_naive, tok_batched = ev.tokens_run(reqs, args.batch_size, model.config.max_seq_len)
    row = {"task": task, "items": len(reqs), "choices": sum(len(r.pairs) for r in reqs),
           "naive_s": t_naive, "batched_s": t_batched, "speedup": t_naive / t_batched,
           "tokens_naive": tok_naive, "tokens_batched": tok_batched, "max_abs_diff": diff,
           "same_metrics": ev.metrics(reqs, naive) == ev.metrics(reqs, batched)}
    print(f"{task:<14} items {row['items']:>4}  choices {row['choices']:>4}  naive {t_naive:7.2f}s  batched "
          f"{t_batched:7.2f}s  speed-up {row['speedup']:5.2f}x  tokens {tok_naive:>7} -> {tok_batched:>7}  "
          f"max|diff| {diff:.1e}")
    return row


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data_dir = Path(args.data_dir)
    model, tok, label = build_model(args, data_dir)
    print(f"model: {label}; {args.items} items per task; harness {args.harness}; batch {args.batch_size} items; "
          f"CPU, {torch.get_num_threads()} threads")
    paths = ev.default_paths(data_dir)
    dev = ev.read_jsonl(paths["mmlu_dev"])
    rows, total_naive, total_batched = [], 0.0, 0.0
    # warm-up: first calls pay allocator and kernel-selection costs that would flatter whichever runs second
    warm = ev.task_requests("arc_easy", ev.read_jsonl(paths["arc_easy"], 4), tok, args.harness)
    ev.score_requests(model, warm, args.batch_size), ev.score_requests_naive(model, warm)
    for task in args.tasks.split(","):
        items = ev.read_jsonl(paths["mmlu_test" if task == "mmlu" else task], args.items)
        reqs = ev.task_requests(task, items, tok, args.harness, model.config.max_seq_len, dev)
        rows.append(compare_task(model, reqs, task, args))
        total_naive += rows[-1]["naive_s"]
        total_batched += rows[-1]["batched_s"]
    speedup = total_naive / total_batched
    print(f"{'all':<14} naive {total_naive:.2f}s  batched {total_batched:.2f}s  speed-up {speedup:.2f}x")
    out = {"model": label, "items_per_task": args.items, "harness": args.harness, "batch_size": args.batch_size,
           "threads": torch.get_num_threads(), "repeat": args.repeat, "tasks": rows, "naive_s": total_naive,
           "batched_s": total_batched, "speedup": speedup}
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
