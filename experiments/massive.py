"""Issue 28, step 1: what a NutePrune run does to a model with massive activations (SmolLM2, Llama-3, TinyLlama).

    python experiments/massive.py --out runs/massive/paper -- --ckpt M.gguf --data c4.jsonl --target 0.5 ...
    python experiments/massive.py --out runs/massive/paper --report-only      # the report from a finished run
    python experiments/massive.py --compare runs/massive/paper runs/massive/...  # one table over finished runs

Everything after `--` is nuteprune.py's command line (its --out is set to OUT/run). The run is nuteprune.py's own
(runner.run and nuteprune.prune, unchanged); every --every steps a recorder beside it reads, without drawing from
the run's random stream:
  - the hidden mask: which dims the deterministic masks remove, and P(z != 0) of the massive dims;
  - the layer loss of Eq. 8 on a fixed probe batch (the first --probe-blocks held-out blocks; the intact model as
    teacher, the student's deterministic masks and LoRA), split per hidden dim: each dim's share of what Eq. 8
    counts, and the error it does not count (a pruned dim is 0 in the student, so its (0 - t)^2 drops out);
  - from log.jsonl, the expected-sparsity trace: how far it swings about the target once the warm-up is over.
The massive dims are ranked by their share of the squared norm of the dense model's hidden states that Eq. 8
compares (outputs of layers 1..L-1 and the final normed output), on the same probe batch.

Writes OUT/massive.json, OUT/massive.md and OUT/massive.png (the trace; P(z != 0) of the top dims).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "experiments"), str(ROOT)]

import torch  # noqa: E402

import flags  # noqa: E402
import llama  # noqa: E402
import nuteprune  # noqa: E402
import runner  # noqa: E402

TOP = 8  # the massive dims reported by name (SmolLM2: 8 dims hold 98% of the squared norm)

# -----------------------------------------------------------------------------
# per-dim statistics of the hidden states Eq. 8 compares


@torch.no_grad()
def hidden_states(model: llama.Llama, idx: torch.Tensor, masks, autocast) -> list[torch.Tensor]:
    """The states Eq. 8 compares, in fp32: outputs of layers 1..L-1 and the final normed output, each (B, T, D)."""
    with autocast():
        _, hidden = model(idx, masks, output_hidden=True)
    return [h.float() for h in hidden]


def norm_share(teacher: list[torch.Tensor]) -> torch.Tensor:
    """(D,): each dim's share of the summed squared norm of the teacher's states."""
    sq = sum(t.pow(2).sum((0, 1)) for t in teacher)
    return sq / sq.sum()


def loss_split(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> dict:
    """Eq. 8 per hidden dim. counted[d]: the squared error Eq. 8 sums in dim d over layers and tokens, each layer's
    sum divided by that layer's count of non-zero student elements (as Eq. 8 does); uncounted[d]: the same for the
    elements where the student is exactly 0 (pruned dims), which Eq. 8 leaves out."""
    counted = torch.zeros(student[0].shape[-1])
    uncounted = torch.zeros_like(counted)
    for s, t in zip(student, teacher):
        keep = (s != 0).float()
        n = keep.sum().clamp(min=1)
        err = (s - t).pow(2)
        counted += (err * keep).sum((0, 1)) / n
        uncounted += (err * (1 - keep)).sum((0, 1)) / n
    return {"counted": counted, "uncounted": uncounted}


def top_dims(share: torch.Tensor, k: int = TOP) -> list[int]:
    return share.argsort(descending=True)[:k].tolist()

# -----------------------------------------------------------------------------
# the recorder: a Checkpointer beside the run's own (nuteprune.prune calls step_done after every step)


class Recorder:
    def __init__(self, ckpt, probe: torch.Tensor, every: int, records: list):
        self.ckpt, self.probe, self.every, self.records = ckpt, probe, every, records
        self.teacher = None  # the intact model's states on the probe batch, computed once

    def step_done(self, parts, step: int, total: int):
        if step == 1 or step % self.every == 0 or step == total:
            self.record(parts, step)
        self.ckpt.step_done(parts, step, total)

    def save(self, parts):
        self.ckpt.save(parts)

    @torch.no_grad()
    def record(self, parts, step: int):
        model, gates = parts.model, parts.gates
        was_training = model.training
        model.eval()
        device = gates.lambda_1.device
        probe = self.probe.to(device)
        if self.teacher is None:
            with nuteprune.teacher_lora(model, None):
                self.teacher = hidden_states(model, probe, None, parts.autocast)
        det = gates.deterministic()
        student = hidden_states(model, probe, det.to(device), parts.autocast)
        split = loss_split(student, self.teacher)
        model.train(was_training)
        self.records.append({
            "step": step, "expected_sparsity": float(nuteprune.expected_sparsity(gates.prob_nonzero(), model.config)),
            "hidden_p": gates.hidden.prob_nonzero().cpu().tolist(), "hidden_kept": det.hidden.cpu().tolist(),
            "counted": split["counted"].tolist(), "uncounted": split["uncounted"].tolist(),
            "norm_share": norm_share(self.teacher).tolist()})


def recorded_method(probe: torch.Tensor, every: int, records: list) -> types.SimpleNamespace:
    """nuteprune as runner.run sees it (the method handed in), with prune's checkpointer wrapped by a Recorder."""
    m = types.SimpleNamespace(**{k: getattr(nuteprune, k) for k in dir(nuteprune) if not k.startswith("__")})
    m.prune = lambda parts, st, blocks, heldout, sched, log, ckpt: nuteprune.prune(
        parts, st, blocks, heldout, sched, log, Recorder(ckpt, probe, every, records))
    return m

# -----------------------------------------------------------------------------
# the controller: how far the expected sparsity swings about the target once the warm-up is over


def controller_stats(log: list[dict], target: float) -> dict:
    """From the pruning log lines (every step logged): after the warm-up (target reached its final value), the
    half peak-to-peak swing and the RMS of (expected - target) over the second half of those steps, the largest
    |gap| there, and the gap at the last step."""
    rows = [r for r in log if r.get("phase") == "prune" and not r.get("settled")]  # --settle: the gates fixed
    after = [r for r in rows if r["target"] >= target - 1e-9]
    if not after:
        return {}
    tail = after[len(after) // 2:]
    gaps = [r["expected_sparsity"] - target for r in tail]
    return {"warmup_end_step": after[0]["step"], "steps_after_warmup": len(after),
            "half_peak_to_peak": (max(gaps) - min(gaps)) / 2, "rms_gap": math.sqrt(statistics.mean(g * g for g in gaps)),
            "max_abs_gap": max(abs(g) for g in gaps), "last_gap": rows[-1]["expected_sparsity"] - target,
            "last_step": rows[-1]["step"]}

# -----------------------------------------------------------------------------
# the report


def summary(records: list[dict], report: dict, log: list[dict], target: float) -> dict:
    first, last = records[0], records[-1]
    share = torch.tensor(first["norm_share"])
    top = top_dims(share)
    out = {"top_dims": top, "top_norm_share": [float(share[d]) for d in top],
           "top_norm_share_sum": float(share[top].sum()), "dim": len(share), "per_record": []}
    for r in records:
        counted, uncounted = torch.tensor(r["counted"]), torch.tensor(r["uncounted"])
        kept = torch.tensor(r["hidden_kept"])
        total = float(counted.sum())
        out["per_record"].append({
            "step": r["step"], "expected_sparsity": r["expected_sparsity"],
            "hidden_pruned": int((kept == 0).sum()), "top_pruned": [d for d in top if kept[d] == 0],
            "top_p": [r["hidden_p"][d] for d in top],
            "layer_loss_counted": total, "layer_loss_uncounted": float(uncounted.sum()),
            "top_share_of_counted": float(counted[top].sum()) / total if total > 0 else None,
            "top_counted_share_each": [float(counted[d]) / total if total > 0 else None for d in top]})
    out["controller"] = controller_stats(log, target)
    out["final"] = {k: report.get(k) for k in ("sparsity", "ppl_before", "ppl_after", "expected_sparsity_at_end",
                                               "trained_masks_sparsity", "warning", "hidden")}
    return out


def markdown(s: dict, argv: list[str]) -> str:
    top = s["top_dims"]
    lines = ["# Massive activations under a NutePrune run (experiments/massive.py)", "",
             f"Command: `python experiments/massive.py {' '.join(argv)}`", "",
             f"Dense model: {len(top)} of {s['dim']} hidden dims hold {100 * s['top_norm_share_sum']:.1f}% of the "
             f"squared norm of the states Eq. 8 compares (probe batch).", "",
             "| dim | share of squared norm |", "|---|---|"]
    lines += [f"| {d} | {100 * v:.2f}% |" for d, v in zip(top, s["top_norm_share"])]
    lines += ["", "| step | expected sparsity | hidden dims pruned | top dims pruned | top dims' share of the counted "
              "Eq. 8 | Eq. 8 counted | error not counted (pruned dims) |", "|---|---|---|---|---|---|---|"]
    for r in s["per_record"]:
        share = "—" if r["top_share_of_counted"] is None else f"{100 * r['top_share_of_counted']:.1f}%"
        lines.append(f"| {r['step']} | {r['expected_sparsity']:.4f} | {r['hidden_pruned']} | "
                     f"{', '.join(map(str, r['top_pruned'])) or 'none'} | {share} | {r['layer_loss_counted']:.4g} | "
                     f"{r['layer_loss_uncounted']:.4g} |")
    c, f = s["controller"], s["final"]
    if c:
        lines += ["", f"Controller (after the warm-up ended at step {c['warmup_end_step']}, second half of the "
                  f"{c['steps_after_warmup']} steps after it): half peak-to-peak {100 * c['half_peak_to_peak']:.2f} pp, "
                  f"RMS gap {100 * c['rms_gap']:.2f} pp, largest |gap| {100 * c['max_abs_gap']:.2f} pp; gap at the "
                  f"last step ({c['last_step']}) {100 * c['last_gap']:+.2f} pp."]
    lines += ["", f"End of the run: exported sparsity {f['sparsity']}, held-out perplexity {f['ppl_before']} -> "
              f"{f['ppl_after']}, expected / trained-mask sparsity at the end {f['expected_sparsity_at_end']} / "
              f"{f['trained_masks_sparsity']}, kept hidden width {f['hidden']}"
              + (f"; warning: {f['warning']}" if f["warning"] else "") + "."]
    return "\n".join(lines) + "\n"


def plot(s: dict, log: list[dict], target: float, path: Path):
    import plots
    plt = plots._pyplot()
    rows = [r for r in log if r.get("phase") == "prune"]
    fig, (ax, p) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    ax.plot([r["step"] for r in rows], [r["expected_sparsity"] for r in rows], label="expected sparsity")
    ax.plot([r["step"] for r in rows], [r["target"] for r in rows], "--", color="k", lw=1, label="target")
    ax.set_ylabel("sparsity")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    steps = [r["step"] for r in s["per_record"]]
    for i, d in enumerate(s["top_dims"]):
        p.plot(steps, [r["top_p"][i] for r in s["per_record"]], label=f"dim {d}")
    p.set_ylabel("P(z != 0), hidden")
    p.set_xlabel("step")
    p.legend(fontsize=7, ncol=4)
    p.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, argv: list[str], no_plot: bool = False) -> dict:
    rec = json.loads((out / "records.json").read_text())
    run = out / "run"
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x.strip()]
    report = json.loads((run / "report.json").read_text())
    s = summary(rec["records"], report, log, report["target"])
    (out / "massive.json").write_text(json.dumps({"argv": argv, **s}, indent=1))
    (out / "massive.md").write_text(markdown(s, argv))
    if not no_plot:
        plot(s, log, report["target"], out / "massive.png")
    return s


def compare(dirs: list[str]) -> str:
    """One markdown table over finished diagnostic folders (their massive.json): what each run changed from the
    paper's recipe, where its hidden mask and its controller ended, and the held-out perplexity of its model."""
    lines = ["| run | flags beside the common ones | hidden width kept | top dims pruned at the end | controller: half "
             "peak-to-peak / largest gap / last gap (pp) | forced target | held-out PPL |", "|---|---|---|---|---|---|---|"]
    for d in dirs:
        s = json.loads((Path(d) / "massive.json").read_text())
        npr_argv = s["argv"][s["argv"].index("--") + 1:]
        own = [x for x in npr_argv[npr_argv.index("--target"):] if x not in ("--target",)][1:]
        c, f, last = s["controller"], s["final"], s["per_record"][-1]
        lines.append(f"| {Path(d).name} | `{' '.join(own) or '(none)'}` | {f['hidden']} | "
                     f"{', '.join(map(str, last['top_pruned'])) or 'none'} | {100 * c['half_peak_to_peak']:.2f} / "
                     f"{100 * c['max_abs_gap']:.2f} / {100 * c['last_gap']:+.2f} | "
                     f"{'yes' if f['warning'] else 'no'} | {f['ppl_after']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--compare"]:  # python experiments/massive.py --compare DIR [DIR ...]
        print(compare(argv[1:]), end="")
        return None
    own, npr_argv = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--every", type=int, default=10, help="record every N steps")
    p.add_argument("--probe-blocks", type=int, default=2, help="held-out blocks in the probe batch")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args(own)
    out = Path(a.out)
    if not a.report_only:
        c, start = flags.parse_args(npr_argv + ["--out", str(out / "run"), "--overwrite", "--log-every", "1"],
                                    nuteprune.RunConfig)
        tok = runner.checkpoint.find_tokenizer(c.ckpt, c.tokenizer)
        heldout = runner.read_data(c, tok)[1]
        records: list = []
        runner.run(recorded_method(heldout[:a.probe_blocks], a.every, records), c, start)
        out.mkdir(parents=True, exist_ok=True)
        (out / "records.json").write_text(json.dumps({"records": records}))
    s = write_report(out, argv, a.no_plot)
    print((out / "massive.md").read_text())
    return s


if __name__ == "__main__":
    main()
