"""Inference cost of exported (physically pruned) models: decode latency and prefill throughput (paper Table 4).

A random LLaMA is pruned to 20% and 50% prunable sparsity with the structures NutePrune removes (query heads, FFN
channels, hidden dims) by llama.prune_model, and measured side by side with the dense model in one process: decode
latency for a 64-token prompt -> 256 new tokens (batch 1, KV cache, greedy; the paper's protocol) and prefill
throughput. Each latency ratio is reported next to two ideals: the ratio of all parameters, and the ratio of the
weights a decoded token actually reads (everything but the embedding table, which is a lookup), and the ratio of
the same models' matrix-vector products timed alone (`weights alone`: every projection and the LM head on a one-token
input, as many times as tokens are decoded), the floor a decode with no other work would reach; `other ms` is the
rest of a token's time (norms, RoPE, attention, cache writes, the Python between ops, the prompt's prefill).

Per-layer shapes: with --report OUT/report.json the per-layer keep fractions of a real NutePrune run are applied to
the bench model; otherwise a non-uniform profile in the spirit of the paper's Tables 11-12 (first and last layers
kept wider, the middle pruned harder, 17% of hidden dims removed at 50%; not the tables' exact numbers).

Defaults: on CPU a 134M model (dim 768, 12 layers, 12 heads, FFN 2048, 32k vocabulary), fp32, 1 thread, prefill
1 x 512, 3 rounds (about 2 minutes on a busy 2-core machine). On CUDA the Table-4 setting: LLaMA-7B shape, bf16,
prefill 4 x 512, 5 rounds. Rounds interleave the models (dense, 20%, 50%, dense, ...); medians are reported.

    python bench/inference.py [--device cpu|cuda] [--preset bench|7b] [--repeats 3] [--json bench/inference.json]
    python bench/inference.py --profile 32 --json /tmp/profile.json    # where a decode step's time goes, no timing
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import checkpoint
import llama  # noqa: E402
from train_cost import PRESETS, random_llama  # noqa: E402  (bench/, beside this file)

GOAL_50 = 0.70  # 50% model at <= 0.7x dense decode latency
PAPER = {"20%": 0.89, "50%": 0.71}  # Table 4: LLaMA-7B on vLLM, 64 -> 256 tokens, latency relative to dense


def run_profile(report: dict) -> tuple[list[float], list[float], float]:
    """Per-layer keep fractions (heads, FFN) and the hidden keep fraction of a finished run (OUT/report.json)."""
    dense, _ = checkpoint.read_checkpoint(report["args"]["ckpt"])  # the report records kept sizes, not the dense ones
    heads = [x["heads"] / dense.n_heads for x in report["layers"]]
    ffn = [x["ffn"] / dense.ffn_dim for x in report["layers"]]
    return heads, ffn, report["hidden"] / dense.dim


def profile_masks(cfg: llama.LlamaConfig, target: float, report: dict | None) -> llama.Masks:
    """Binary masks with a per-layer keep profile, scaled until the prunable sparsity is within 0.5 pp of target."""
    L = cfg.n_layers
    if report:  # layer i of the bench model takes the keep fractions of layer i * L_run / L of the run
        heads, ffn, hid = run_profile(report)
        prof_h = [heads[i * len(heads) // L] for i in range(L)]
        prof_f = [ffn[i * len(ffn) // L] for i in range(L)]
    else:  # wider at both ends, narrower in the middle
        shape = [1.0 - 0.6 * (1 - abs(2 * i / (L - 1) - 1)) for i in range(L)]
        prof_h, prof_f, hid = shape, shape, 0.88  # hidden pruned at 0.12 x the pressure
    dense = llama.prunable_params(cfg)
    lo, hi = 0.0, 4.0
    for _ in range(40):  # bisection on a global scale of pruning pressure
        s = (lo + hi) / 2
        keep_d = max(1, round(cfg.dim * min(1.0, 1 - (1 - hid) * s)))
        kh = [max(0, min(cfg.n_heads, round(cfg.n_heads * (1 - (1 - p) * s)))) for p in prof_h]
        kf = [max(1, min(cfg.ffn_dim, round(cfg.ffn_dim * (1 - (1 - p) * s)))) for p in prof_f]
        kept = sum(keep_d * cfg.head_dim * 4 * h + 3 * keep_d * f for h, f in zip(kh, kf))
        sparsity = 1 - kept / dense
        if abs(sparsity - target) < 0.005:
            break
        lo, hi = (s, hi) if sparsity < target else (lo, s)
    head = torch.zeros(L, cfg.n_heads)
    inter = torch.zeros(L, cfg.ffn_dim)
    for i in range(L):
        head[i, :kh[i]] = 1
        inter[i, :kf[i]] = 1
    hidden = torch.zeros(cfg.dim)
    hidden[:keep_d] = 1
    return llama.Masks(head, inter, hidden)


def timed(fn, device) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    ap.add_argument("--preset", default=None, choices=sorted(PRESETS), help="model shape (CPU: bench, CUDA: 7b)")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=256, help="tokens decoded")
    ap.add_argument("--prefill-batch", type=int, default=None, help="sequences of 512 tokens (CPU: 1, CUDA: 4)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds over all models (CPU: 3, CUDA: 5)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: stable timings on a shared machine)")
    ap.add_argument("--report", default=None, help="OUT/report.json of a NutePrune run: use its per-layer shape")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="instead of timing: torch.profiler over STEPS decode steps of each model, shares per op group")
    ap.add_argument("--json", default=str(ROOT / "bench" / "inference.json"))
    return ap.parse_args(argv)


def bench_models(dense: llama.Llama, cfg: llama.LlamaConfig, report: dict | None, device, dtype) -> dict:
    """The dense model and its exports at 20% and 50% prunable sparsity, by name."""
    models = {"dense": dense}
    for t in (0.2, 0.5):
        models[f"{round(t * 100)}%"] = llama.prune_model(dense, profile_masks(cfg, t, report)).to(device, dtype)
    return models


def weights_pass(m: llama.Llama, device, dtype):
    """One decode step's matrix-vector products and nothing else: every projection and the LM head applied to a
    one-token input. Timed as many times as tokens are decoded, it is the floor a decode with no other work (norms,
    RoPE, attention, cache writes, Python between ops) would reach."""
    ws = [mod.weight for mod in m.modules() if isinstance(mod, torch.nn.Linear) and mod.weight.numel()]
    xs = [torch.randn(1, 1, w.shape[1], device=device, dtype=dtype) for w in ws]

    def run(steps: int):
        for _ in range(steps):
            for w, x in zip(ws, xs):
                torch.nn.functional.linear(x, w)
    return run


def measure(models: dict, prompt, batch, new_tokens: int, repeats: int, device) -> tuple[dict, dict, dict]:
    """Decode, weights-alone (weights_pass, as many steps as decoded tokens) and prefill seconds of each model, one
    entry per round."""
    decode, weights, prefill = ({n: [] for n in models} for _ in range(3))
    passes = {n: weights_pass(m, device, m.lm_head.weight.dtype) for n, m in models.items()}
    with torch.no_grad():
        for n, m in models.items():  # warm-up: allocations, kernel choice
            llama.generate(m, prompt, 16)
            passes[n](16)
            m(batch)
        for r in range(repeats):
            for name, m in models.items():
                decode[name].append(timed(lambda: llama.generate(m, prompt, new_tokens), device))
                weights[name].append(timed(lambda: passes[name](new_tokens), device))
                prefill[name].append(timed(lambda: m(batch), device))
            print(f"  round {r}: " + "  ".join(f"{n} {decode[n][-1]:.2f}s (weights alone {weights[n][-1]:.2f}s)"
                                               for n in models), flush=True)
    return decode, weights, prefill


PROFILE_GROUPS = {"linear": "weights (linear)", "scaled_dot_product_attention": "attention (SDPA)",
                  "index_select": "K/V gather (index_select)", "copy_": "KV cache write", "slice": "KV cache write"}


def profile_decode(models: dict, prompt, steps: int) -> dict:
    """Where one decode step's time goes, per model: shares of the profiled wall time by top-level op group (each
    with its children), the rest being Python and dispatch between ops; and top-level ops per token. Shares, not
    timings: the profiler slows small ops most, and a busy machine slows everything."""
    from torch.profiler import profile
    out = {}
    with torch.no_grad():
        for name, m in models.items():
            cache = llama.new_kv_cache(m, 1, prompt.shape[1] + steps)
            tok = m(prompt, cache=cache)[:, -1:].argmax(-1)
            with profile() as prof:
                t = time.perf_counter()
                for pos in range(prompt.shape[1], prompt.shape[1] + steps):  # as llama.generate's loop
                    tok = m(tok, cache=cache, start_pos=pos)[:, -1:].argmax(-1)
                wall = (time.perf_counter() - t) * 1e6
            top = [e for e in prof.events() if e.cpu_parent is None]
            groups = {}
            for e in top:
                g = PROFILE_GROUPS.get(e.name.removeprefix("aten::"), "other ops (norms, RoPE, views, adds)")
                groups[g] = groups.get(g, 0.0) + e.cpu_time_total
            groups["Python and dispatch between ops"] = wall - sum(groups.values())
            out[name] = {"ops_per_token": len(top) / steps, "shares": {g: v / wall for g, v in groups.items()}}
    return out


def print_profile(prof: dict) -> None:
    names = list(prof)
    groups = list(dict.fromkeys(g for p in prof.values() for g in p["shares"]))
    print(f"\n{'share of a decode step':<40}" + "".join(f"{n:>9}" for n in names))
    for g in groups:
        print(f"{g:<40}" + "".join(f"{100 * prof[n]['shares'].get(g, 0):8.1f}%" for n in names))
    print(f"{'top-level ops per token':<40}" + "".join(f"{prof[n]['ops_per_token']:9.0f}" for n in names))


def result_rows(models: dict, cfg: llama.LlamaConfig, decode: dict, weights: dict, prefill: dict, new_tokens: int,
                prefill_tokens: int) -> list[dict]:
    rows = []
    for name, m in models.items():
        c = m.config
        params = llama.count_params(m)
        read = params - c.vocab_size * c.dim * (0 if c.tie_embeddings else 1)  # all but the embedding lookup
        prunable = llama.prunable_params(c)
        rows.append({"model": name, "params": params, "weights_read_per_token": read,
                     "prunable": prunable, "sparsity": 1 - prunable / llama.prunable_params(cfg),
                     "hidden": c.dim, "heads": c.heads, "ffn": c.ffn,
                     "decode_s": statistics.median(decode[name]), "decode_runs_s": decode[name],
                     "ms_per_token": 1e3 * statistics.median(decode[name]) / new_tokens,
                     "weights_alone_ms_per_token": 1e3 * statistics.median(weights[name]) / new_tokens,
                     "weights_alone_runs_s": weights[name],
                     "other_ms_per_token": 1e3 * statistics.median(d - w for d, w in zip(decode[name], weights[name]))
                     / new_tokens,
                     "prefill_tok_s": prefill_tokens / statistics.median(prefill[name])})
    base = rows[0]
    for r in rows:  # ratios within each round (models interleaved), then the median
        r["latency_ratio"] = statistics.median(a / b for a, b in zip(decode[r["model"]], decode["dense"]))
        r["weights_alone_ratio"] = statistics.median(a / b for a, b in zip(weights[r["model"]], weights["dense"]))
        r["prefill_speedup"] = statistics.median(b / a for a, b in zip(prefill[r["model"]], prefill["dense"]))
        r["ideal_params"] = r["params"] / base["params"]
        r["ideal_weights_read"] = r["weights_read_per_token"] / base["weights_read_per_token"]
        r["paper_latency_ratio"] = PAPER.get(r["model"])
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\n{'model':<6} {'sparsity':>8} {'params':>8} {'ms/token':>9} {'latency':>8} {'ideal(read)':>11} "
          f"{'weights alone':>13} {'other ms':>9} {'ideal(params)':>13} {'paper':>6} {'prefill tok/s':>14} "
          f"{'speed-up':>9}")
    for r in rows:
        paper = f"{r['paper_latency_ratio']:.2f}x" if r["paper_latency_ratio"] else "-"
        print(f"{r['model']:<6} {r['sparsity']:8.3f} {r['params'] / 1e6:7.1f}M {r['ms_per_token']:9.2f} "
              f"{r['latency_ratio']:7.2f}x {r['ideal_weights_read']:10.2f}x {r['weights_alone_ratio']:12.2f}x "
              f"{r['other_ms_per_token']:9.2f} {r['ideal_params']:12.2f}x {paper:>6} "
              f"{r['prefill_tok_s']:14.0f} {r['prefill_speedup']:8.2f}x")


def main(argv=None):
    args = parse_args(argv)
    cuda = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    preset = args.preset or ("7b" if cuda else "bench")
    prefill_batch = args.prefill_batch or (4 if cuda else 1)
    repeats = args.repeats or (5 if cuda else 3)
    if not cuda:
        torch.set_num_threads(args.threads)
    cfg = llama.LlamaConfig(**PRESETS[preset], max_seq_len=max(512, args.prompt + args.new_tokens))
    dense = random_llama(cfg, args.device, dtype).eval()
    report = json.loads(Path(args.report).read_text()) if args.report else None
    models = bench_models(dense, cfg, report, args.device, dtype)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt), generator=gen).to(args.device)
    batch = torch.randint(0, cfg.vocab_size, (prefill_batch, 512), generator=gen).to(args.device)
    print(f"model: random LLaMA {preset}, {args.device}, {str(dtype).removeprefix('torch.')}"
          + ("" if cuda else f", {args.threads} thread(s)") + f"; decode {args.prompt} -> {args.new_tokens} tokens, "
          f"batch 1, KV cache; prefill {prefill_batch} x 512; {repeats} rounds", flush=True)

    if args.profile:
        prof = profile_decode(models, prompt, args.profile)
        print_profile(prof)
        Path(args.json).write_text(json.dumps({"profile_steps": args.profile, "prompt": args.prompt,
                                               "threads": args.threads, "profile": prof}, indent=2) + "\n")
        print(f"wrote {args.json}")
        return
    decode, weights, prefill = measure(models, prompt, batch, args.new_tokens, repeats, args.device)
    rows = result_rows(models, cfg, decode, weights, prefill, args.new_tokens, batch.numel())
    print_table(rows)
    r50 = rows[2]
    met = r50["latency_ratio"] <= GOAL_50
    print(f"\n50% decode latency {r50['latency_ratio']:.3f}x dense (goal <= {GOAL_50}x: {'met' if met else 'MISSED'}; "
          f"paper 0.71x; ideal {r50['ideal_weights_read']:.2f}x by weights read; its matrix-vector products alone "
          f"{r50['weights_alone_ratio']:.2f}x, other work {r50['other_ms_per_token']:.2f} ms per token against the "
          f"dense model's {rows[0]['other_ms_per_token']:.2f})")
    out = {"device": args.device, "dtype": str(dtype).removeprefix("torch."), "preset": preset,
           "config": PRESETS[preset], "threads": None if cuda else args.threads, "prompt": args.prompt,
           "new_tokens": args.new_tokens, "prefill_batch": prefill_batch, "prefill_len": 512, "repeats": repeats,
           "profile": "report " + args.report if args.report else "built-in (ends wider, middle narrower)",
           "rows": rows, "goal_50": {"value": r50["latency_ratio"], "goal": GOAL_50, "met": met}, "paper": PAPER}
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
