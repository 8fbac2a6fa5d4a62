"""Where llama.cpp's decode time goes for pruned shapes: one dense model cut by hand-made masks (heads only, FFN only,
hidden only, both, and a near-empty skeleton of the same depth), timed side by side with llama_cpp_speed.py's
protocol, and each time split by a least-squares fit into a fixed cost per token, a cost per matrix row and a cost
per weight.

    python bench/llama_cpp_shapes.py [--model GGUF|DIR] [--type q8_0] [--threads N] [--flash-attn off|on]
                                     [--reps 5] [--json bench/llama_cpp_shapes.json]

Why: a memory-bound decode would take time in proportion to the weights it reads (`kept`), whichever units are
pruned. On a small model it does not: every row of a matrix-vector product has a cost of its own (its dot-product
set-up, the activation block loop, the store), so pruning the hidden width, which shortens the rows of q, k, v, gate,
up and the output head but removes few of them, buys less time than its weights; pruning heads and FFN channels
removes whole rows. The fit says how much each costs here. Weight values do not matter to speed: the variants keep
the first units of each group of the dense model (`checkpoint.export_pruned`), converted like llama_cpp_speed.py's
models (export.py, llama.cpp's quantizer).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import checkpoint  # noqa: E402
import cli  # noqa: E402
import export  # noqa: E402
import llama  # noqa: E402
import llama_cpp_speed as speed  # noqa: E402
from llama import Masks  # noqa: E402

SMOLLM2 = ROOT.parent / "shared" / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def masks(cfg: llama.LlamaConfig, groups: int | None = None, ffn: int | None = None, hidden: int | None = None,
          heads: int | None = None) -> Masks:
    """Masks keeping the first `groups` K/V groups (with `heads` query heads each, default all of the group), the
    first `ffn` channels and the first `hidden` dims of every layer; None keeps a group whole."""
    G = cfg.n_heads // cfg.n_kv_heads
    head = torch.zeros(cfg.n_layers, cfg.n_kv_heads, G)
    head[:, :cfg.n_kv_heads if groups is None else groups, :G if heads is None else heads] = 1
    inter = torch.zeros(cfg.n_layers, cfg.ffn_dim)
    inter[:, :cfg.ffn_dim if ffn is None else ffn] = 1
    hid = torch.zeros(cfg.dim)
    hid[:cfg.dim if hidden is None else hidden] = 1
    return Masks(head.view(cfg.n_layers, -1), inter, hid)


def variants(cfg: llama.LlamaConfig) -> dict[str, dict]:
    """label: masks arguments. About three quarters and half of each group (in multiples of 32, so that q8_0 and
    q4_0 take every matrix as it is), alone and together; the skeleton keeps one head, 32 FFN channels and 32 hidden
    dims per layer (what a token costs with next to no weights)."""
    D, F, H, kv = cfg.dim, cfg.ffn_dim, cfg.n_heads, cfg.n_kv_heads
    G = H // kv
    d75, d50, f75, f50 = (max(round(n * frac / 32), 1) * 32 for n in (D, F) for frac in (0.75, 0.5))
    out = {"dense": {}, "skeleton": dict(groups=1, heads=1, ffn=32, hidden=32)}
    out |= {f"hidden {d}": dict(hidden=d) for d in (d75, d50)}
    out |= {f"ffn {f}": dict(ffn=f) for f in (f75, f50)}
    if kv > 1:
        out[f"heads {(kv - 1) * G}/{H}"] = dict(groups=kv - 1)
        out[f"heads {(kv - 1) * G}/{H} + ffn {f50}"] = dict(groups=kv - 1, ffn=f50)
    out[f"hidden {d75} + ffn {f50}"] = dict(hidden=d75, ffn=f50)
    return out


def shape(cfg: llama.LlamaConfig) -> dict:
    """Rows and weights of the matrix-vector products of one decoded token (every projection and the output head; the
    embedding lookup reads one row). Norms, RoPE and attention over the cache are the fixed part."""
    dh, D = cfg.head_dim, cfg.dim
    rows = weights = 0
    for i in range(cfg.n_layers):
        h, kv, f = cfg.heads[i], cfg.kv_heads[i], cfg.ffn[i]
        rows += (h + 2 * kv) * dh + D + 2 * f + D  # q, k, v (D long); o (h * dh long); gate, up (D); down (f)
        weights += (h + 2 * kv) * dh * D + h * dh * D + 3 * f * D
    return {"rows": rows + cfg.vocab_size, "weights": weights + cfg.vocab_size * D, "params": llama.count_params(cfg)}


def build(model: llama.Llama, tok, work: Path, ftype: str) -> list[dict]:
    out = []
    for name, kw in variants(model.config).items():
        folder = work / name.replace(" + ", "_").replace(" ", "").replace("/", "of")
        cfg = checkpoint.export_pruned(model, masks(model.config, **kw), folder, tok)
        path = folder.with_suffix(f".{ftype}.gguf")
        print(f"converting {name} to {ftype}", flush=True)
        report = export.write_gguf(folder, path, ftype)
        out.append({"label": name, "role": "dense" if name == "dense" else "pruned", "type": ftype,
                    "path": str(path), "masks": kw, "fallbacks": len(report["fallbacks"]), **shape(cfg)})
    return out


def fit(ms: list[dict], key: str) -> dict:
    """Least squares: seconds per token = fixed + per_row * rows + per_weight * weights (non-negative not enforced:
    the three are reported as fitted), over every variant; and each variant's residual."""
    X = np.array([[1.0, m["rows"], m["weights"]] for m in ms])
    y = np.array([statistics.median(m[key]) / (speed.TG if key == "tg_s" else speed.PP) for m in ms])
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    dense = next(m for m in ms if m["role"] == "dense")
    share = dict(zip(("fixed", "rows", "weights"), coef * np.array([1.0, dense["rows"], dense["weights"]]) / y[0]))
    return {"fixed_ms": coef[0] * 1e3, "per_row_ns": coef[1] * 1e9, "per_weight_ps": coef[2] * 1e12,
            "dense_share": share, "residual_pct": {m["label"]: 100 * (float(X[i] @ coef) / y[i] - 1)
                                                    for i, m in enumerate(ms)}}


def table(ms: list[dict], fits: dict) -> str:
    dense = ms[0]
    lines = ["| variant | rows | weights | kept weights | tg128 tok/s | tg time ratio | ratio / kept | pp512 tok/s | "
             "pp time ratio | ratio / kept | tg fit residual |", "|" + "---|" * 11]
    for m in ms:
        kept = m["weights"] / dense["weights"]
        tg, pp = (statistics.median(m[k]) / statistics.median(dense[k]) for k in ("tg_s", "pp_s"))
        lines.append(f"| {m['label']} | {m['rows']:,} | {m['weights'] / 1e6:.1f}M | {kept:.3f} | "
                     f"{speed.TG / statistics.median(m['tg_s']):.1f} | {tg:.3f} | {tg / kept:.2f} | "
                     f"{speed.PP / statistics.median(m['pp_s']):.0f} | {pp:.3f} | {pp / kept:.2f} | "
                     f"{fits['tg']['residual_pct'][m['label']]:+.1f}% |")
    for what, f in fits.items():
        s = f["dense_share"]
        lines.append(f"\n{what}: {f['fixed_ms']:.3f} ms per token + {f['per_row_ns']:.2f} ns per row + "
                     f"{f['per_weight_ps']:.1f} ps per weight; of the dense model's time: fixed {s['fixed']:.0%}, rows "
                     f"{s['rows']:.0%}, weights {s['weights']:.0%}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SMOLLM2), help="the dense checkpoint (default: ../shared's SmolLM2-135M)")
    ap.add_argument("--type", default="q8_0", choices=export.FILE_TYPES, help="GGUF weight type")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp threads (default: all cores)")
    ap.add_argument("--flash-attn", choices=("off", "on"), default="off", help="llama.cpp's flash attention")
    ap.add_argument("--reps", type=int, default=5, help="rounds; the median is reported")
    ap.add_argument("--work", default="/tmp/nuteprune-llama-cpp-shapes", help="folder for the variants")
    ap.add_argument("--json", default=str(ROOT / "bench" / "llama_cpp_shapes.json"))
    a = ap.parse_args(argv)
    if not Path(a.model).exists():
        raise SystemExit(f"error: {a.model} does not exist (--model: a dense checkpoint llama.py reads)")
    model, tok = checkpoint.load(a.model)
    ms = build(model, tok, Path(a.work), a.type)
    fa = a.flash_attn == "on"
    speed.measure(ms, a.threads, a.reps, fa)
    fits = {"tg": fit(ms, "tg_s"), "pp": fit(ms, "pp_s")}
    out = {"protocol": {"pp": speed.PP, "tg": speed.TG, "reps": a.reps, "statistic": "median",
                        "model": cli.recorded_path(a.model)}, "environment": speed.environment(a.threads, fa),
           "models": [{**m, "path": cli.recorded_path(m["path"])} for m in ms], "fits": fits,
           "table": table(ms, fits)}
    Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    print("\n" + out["table"] + f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
