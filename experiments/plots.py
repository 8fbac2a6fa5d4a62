"""Figures of one nuteprune run (issue 5): the paper's Figure 3, its Tables 11-12 as bars, and the loss curves.

    python experiments/plots.py RUN_DIR [--out DIR]      # RUN_DIR holds log.jsonl and report.json

Writes DIR/sparsity.png (expected sparsity, target and teacher sparsity vs step, with the two lambdas below),
DIR/layers.png (kept query heads and FFN channels per layer) and DIR/losses.png (the loss terms vs step).
matplotlib is an optional dependency, imported only when a figure is drawn.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("the plots need matplotlib: pip install matplotlib (requirements-dev.txt)") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def read_run(run_dir) -> tuple[list[dict], dict]:
    """(pruning log lines, report) of a finished run."""
    d = Path(run_dir)
    for name in ("log.jsonl", "report.json"):
        if not (d / name).is_file():
            raise ValueError(f"{d / name} does not exist: not a finished nuteprune output directory")
    log = [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in log if r["phase"] == "prune"], json.loads((d / "report.json").read_text())


def dense_sizes(run_dir) -> tuple[int, int]:
    # the exported config keeps the dense head count and FFN width beside its per-layer kept sizes
    cfg = json.loads((Path(run_dir) / "pruned" / "config.json").read_text())
    return cfg["num_attention_heads"], cfg["intermediate_size"]


def plot_sparsity(log: list[dict], report: dict, path: Path, title: str = ""):
    plt = _pyplot()
    step = [r["step"] for r in log]
    fig, (ax, lam) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=[2, 1])
    ax.plot(step, [r["expected_sparsity"] for r in log], label="expected sparsity (student, Eq. 3)", lw=2)
    ax.plot(step, [r["target"] for r in log], "--", label="target", color="k", lw=1)
    ax.plot(step, [r["teacher_sparsity"] for r in log], label="teacher sparsity", lw=1.5)
    if report.get("stage2_start") is not None:
        ax.axvline(report["stage2_start"], color="grey", ls=":", lw=1)
        ax.text(report["stage2_start"], 0.02, " stage 2", color="grey", fontsize=8)
    ax.set_ylabel("sparsity")
    ax.set_ylim(0, max(1e-3, max(r["expected_sparsity"] for r in log)) * 1.1 + 0.02)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title or f"sparsity during pruning (target {report['target']:g})")
    ax.grid(alpha=0.3)
    lam.plot(step, [r["lambda_1"] for r in log], label="lambda_1")
    lam.plot(step, [r["lambda_2"] for r in log], label="lambda_2")
    lam.axhline(0, color="k", lw=0.5)
    lam.set_xlabel("step")
    lam.set_ylabel("Lagrange multiplier")
    lam.legend(loc="upper left", fontsize=8)
    lam.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_layers(report: dict, n_heads: int, ffn_dim: int, path: Path, title: str = ""):
    plt = _pyplot()
    layers = report["layers"]
    x = list(range(1, len(layers) + 1))
    fig, (h, f) = plt.subplots(1, 2, figsize=(9, 3.6))
    h.bar(x, [n_heads] * len(x), color="0.88", label="dense")
    h.bar(x, [r["heads"] for r in layers], label="kept query heads")
    h.plot(x, [r["kv_heads"] for r in layers], "o", color="C3", label="kept K/V heads")
    h.set_ylabel("heads")
    h.legend(fontsize=8, loc="lower right")
    f.bar(x, [ffn_dim] * len(x), color="0.88", label="dense")
    f.bar(x, [r["ffn"] for r in layers], color="C1", label="kept FFN channels")
    f.set_ylabel("FFN channels")
    f.legend(fontsize=8, loc="lower right")
    for ax in (h, f):
        ax.set_xlabel("layer")
        ax.set_xticks(x)
        for i, r in zip(x, layers):
            v = r["heads"] if ax is h else r["ffn"]
            ax.text(i, v, str(v), ha="center", va="bottom", fontsize=8)
    fig.suptitle(title or f"kept structure per layer at sparsity {report['sparsity']:.3f} "
                          f"(hidden {report['hidden']} kept)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_losses(log: list[dict], path: Path, title: str = ""):
    plt = _pyplot()
    step = [r["step"] for r in log]
    fig, (ax, l0) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    for key, label in (("kd", "KD: logit KL x weight (Eq. 7)"), ("layer", "layer MSE x weight (Eq. 8)"),
                       ("lm", "next-token CE (--distill none)")):
        values = [r[key] for r in log]
        if any(v != 0 for v in values):
            ax.plot(step, values, label=label)
    ax.set_yscale("log")
    ax.set_ylabel("distillation / LM loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(title or "loss terms during pruning")
    l0.plot(step, [r["l0"] for r in log], color="C3", label="Lagrangian (Eq. 5)")
    l0.axhline(0, color="k", lw=0.5)
    l0.set_xlabel("step")
    l0.set_ylabel("Lagrangian")
    l0.legend(fontsize=8)
    l0.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def teacher_series(log: list[dict], intact_ppl: float | None, distill: str = "pkd") -> dict:
    """Per-step teacher record of a run (issue 12), from its log lines (`--log-every 1` for every step): steps, the
    teacher's sparsity and held-out perplexity at each step (the snapshot's, taken when it was stored; the intact
    model's for level 0; None without distillation), the student's expected sparsity, the student's
    deterministic-mask perplexity over time (`eval` lines) and the snapshots (step, sparsity, ppl)."""
    snap_ppl = {r["level"]: r.get("ppl") for r in log if r.get("phase") == "snapshot"}
    prune = [r for r in log if r.get("phase") == "prune"]
    teacher_ppl = []
    for r in prune:
        level = r.get("teacher_level", 0)
        teacher_ppl.append(None if distill == "none" else intact_ppl if level == 0 else snap_ppl.get(level))
    return {"step": [r["step"] for r in prune], "expected_sparsity": [r["expected_sparsity"] for r in prune],
            "teacher_sparsity": [None if distill == "none" else r.get("teacher_sparsity", 0.0) for r in prune],
            "teacher_ppl": teacher_ppl,
            "eval_step": [r["step"] for r in log if r.get("phase") == "eval"],
            "student_ppl": [r["student_ppl"] for r in log if r.get("phase") == "eval"],
            "snapshots": [(r["step"], r["sparsity"], r.get("ppl")) for r in log if r.get("phase") == "snapshot"]}


def plot_teachers(log: list[dict], intact_ppl: float | None, path, title: str = "", distill: str = "pkd"):
    """One run's teachers (issue 12): top, the student's expected sparsity and the teacher's sparsity per step;
    bottom (log scale when it spans more than 3x), held-out perplexity of the student's deterministic masks over
    time, of each snapshot when it was taken, of the teacher in use at each step, and of the intact model."""
    plt = _pyplot()
    s = teacher_series(log, intact_ppl, "none" if distill == "none" else "pkd")
    fig, (ax, pp) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=[1, 1.3])
    ax.plot(s["step"], s["expected_sparsity"], label="student (expected sparsity)", lw=1.5)
    if distill != "none":
        ax.plot(s["step"], s["teacher_sparsity"], label="teacher in use (0 = intact model)", lw=1.5)
    ax.set_ylabel("sparsity")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    if s["eval_step"]:
        pp.plot(s["eval_step"], s["student_ppl"], "o-", ms=3, label="student, deterministic masks")
    snaps = [(st, p) for st, _, p in s["snapshots"] if p is not None]
    if snaps:
        pp.plot(*zip(*snaps), "x", ms=4, color="C2", label="snapshot when taken")
    if distill != "none" and any(p is not None for p in s["teacher_ppl"]):
        pp.plot(s["step"], [float("nan") if p is None else p for p in s["teacher_ppl"]], color="C1", lw=1.5,
                label="teacher in use")
    if intact_ppl:
        pp.axhline(intact_ppl, color="k", ls="--", lw=0.8, label="intact model")
    shown = [p for p in s["student_ppl"] + [p for _, p in snaps] + [intact_ppl or 0] if p]
    if shown and max(shown) / min(shown) > 3:
        pp.set_yscale("log")
    pp.set_xlabel("step")
    pp.set_ylabel("held-out perplexity")
    pp.legend(loc="upper left", fontsize=8)
    pp.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_methods(series: dict[str, list[tuple]], path, title: str = ""):
    """Issue 19: average zero-shot accuracy and WikiText-2 perplexity against kept parameters, one line per method.
    series: a method's label -> its points (kept parameters in millions, average accuracy %, WikiText-2 PPL), None
    where a number is missing; a one-point series (the dense model) is drawn as a star."""
    plt = _pyplot()
    fig, (acc, ppl) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (label, pts) in enumerate(series.items()):
        pts = sorted(pts)
        style = dict(marker="*" if len(pts) == 1 else "o", ms=11 if len(pts) == 1 else 5, color=f"C{i}", label=label)
        for ax, k in ((acc, 1), (ppl, 2)):
            shown = [(p[0], p[k]) for p in pts if p[k] is not None]
            if shown:
                ax.plot(*zip(*shown), **style)
    acc.set_ylabel("average zero-shot accuracy (%)")
    ppl.set_ylabel("WikiText-2 perplexity")
    ppl.set_yscale("log")
    for ax in (acc, ppl):
        ax.set_xlabel("kept parameters (millions)")
        ax.grid(alpha=0.3, which="both")
    acc.legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_run(run_dir, out_dir=None, label: str = "") -> list[Path]:
    log, report = read_run(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    n_heads, ffn_dim = dense_sizes(run_dir)
    prefix = f"{label}: " if label else ""
    paths = [out / "sparsity.png", out / "layers.png", out / "losses.png"]
    plot_sparsity(log, report, paths[0], f"{prefix}sparsity during pruning (target {report['target']:g})")
    plot_layers(report, n_heads, ffn_dim, paths[1], f"{prefix}kept per layer, sparsity {report['sparsity']:.3f}, "
                f"hidden {report['hidden']} kept")
    plot_losses(log, paths[2], f"{prefix}loss terms during pruning")
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a nuteprune output directory (log.jsonl, report.json, pruned/)")
    p.add_argument("--out", help="folder for the PNGs (default: RUN_DIR/plots)")
    p.add_argument("--label", default="", help="prefix of the figure titles")
    a = p.parse_args(argv)
    try:
        for path in plot_run(a.run_dir, a.out, a.label):
            print(path)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
