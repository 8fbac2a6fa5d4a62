"""Issues 19 and 28: NutePrune on a real pretrained model with massive activations. SmolLM2-135M-Instruct pruned to
20% and 50% by NutePrune (the paper's recipe and the modern one, each PKD and KD) and by two one-shot baselines
(Taylor + LoRA on the next-token loss; Minitron-style activation importance + LoRA on the dense model's logits), on
the same tokens and steps, two seeds a row, evaluated in the shape of the paper's Table 1.

    python experiments/smollm2.py --out runs/smollm2 [--budget-min M] [--code DIR]   # rerun the same command to go on
    python experiments/smollm2.py --out runs/smollm2 --only JOB,JOB                  # a worker (two side by side)
    python experiments/smollm2.py --out runs/smollm2 --report-only                   # the report from finished work

Jobs run one at a time (one thread each), cheapest informative first, so that a partial run still yields a table:
the dense model's evaluation; for each seed, at 50% then 20%, the two baselines and the four NutePrune rows; the
budget point (--scale times the tokens at 20%, first seed); the dense model on the full sets of the cheaper tasks
(how far --limit moves the numbers). Every run is a subprocess: `nuteprune.py` (an interrupted one continues with
`--resume`), `experiments/baselines.py` (continues from its state.pt) and `evaluate.py` (twice per model: WikiText-2
/ PTB perplexity and the seven zero-shot tasks, `--harness fixed`, the same first --limit items for every row).
Finished work is never redone (OUT/runs/<job>/row-<row>.json, report.json, eval-*.json). With --budget-min the
command starts nothing after the deadline and sends the running subprocess SIGTERM (training saves a checkpoint; an
evaluation is simply redone next time); rerun the same command to continue. Commands are recorded as they would be
typed in the repository folder (`python nuteprune.py ...`, `../shared/...`), never with this machine's paths.

Writes RESULTS/results.md (the table, the budget plan, the controller, the dense model beside its authors' numbers,
--limit against the full sets, every run with its command, seed, steps, tokens, wall and CPU time and code hash, what
has not run), RESULTS/results.json, RESULTS/smollm2.png (average zero-shot accuracy and WikiText-2 perplexity against
kept parameters, per method) and RESULTS/controller.png (expected sparsity against the step, per recipe).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "experiments"), str(ROOT)]  # pkd, stories260k, plots, baselines; llama, evaluate, ...

import massive  # noqa: E402
import pkd  # noqa: E402
from evaluate import PAPER_METRIC, PPL_TASKS, ZERO_SHOT  # noqa: E402  (the task names and the paper's metrics)
from evaluate import HEADERS as TASK_NAMES  # noqa: E402

# -----------------------------------------------------------------------------
# what runs

HEADERS = {t: TASK_NAMES[t] + ("↓" if t in PPL_TASKS else "") for t in PPL_TASKS + ZERO_SHOT}
FULL_CHECK = ("winogrande", "openbookqa", "arc_challenge")  # the cheaper tasks, run in full on the dense model
REUSE = {"MALLOC_MMAP_THRESHOLD_": str(2 ** 32), "MALLOC_TRIM_THRESHOLD_": str(2 ** 32)}  # glibc keeps freed memory
# (bench/train_cost.py: without it every logits-sized buffer page-faults in afresh, +13% on a training step)
CODE_FILES = ("experiments/baselines.py", "experiments/smollm2.py", "experiments/massive.py")  # and every top-level module (pkd.code_id)
PAPER_TOKENS = 7 * 20000 * 512  # the paper's calibration: 7 epochs of 20k C4 blocks of 512 tokens


@dataclass(frozen=True)
class Job:
    name: str  # folder under OUT/runs
    kind: str  # dense | oneshot | nuteprune | full
    method: str  # one of LABELS
    target: float = 0.0
    seed: int | None = None
    scale: int = 1  # tokens and steps, in multiples of --steps (the budget point: 4)


LABELS = {"dense": "dense", "taylor": "Taylor one-shot + LoRA", "minitron": "Minitron-style one-shot + KD LoRA",
          "pkd": "NutePrune PKD, paper recipe", "kd": "NutePrune KD, paper recipe",
          "pkd-m": "NutePrune PKD, modern recipe", "kd-m": "NutePrune KD, modern recipe"}
ONESHOT = ("minitron", "taylor")
NUTEPRUNE = ("pkd-m", "kd-m", "pkd", "kd")


def job(method: str, target: float, seed: int, scale: int = 1) -> Job:
    kind = "oneshot" if method in ONESHOT else "nuteprune"
    return Job(f"{method}-{round(target * 100)}-s{seed}" + (f"-x{scale}" if scale > 1 else ""), kind, method, target,
               seed, scale)


def plan(a: argparse.Namespace) -> list[Job]:
    """Every job, cheapest informative first: the dense model, each seed's rows (50% first), the rows at --scale
    times the tokens, the dense model on the full sets."""
    jobs = [Job("dense", "dense", "dense")]
    jobs += [job(m, t, s) for s in a.seeds for t in (0.5, 0.2) for m in ONESHOT + NUTEPRUNE]
    jobs += [job(m, 0.2, a.seeds[0], a.scale) for m in a.scaled]
    return jobs + [Job("dense-full", "full", "dense")]


def rows_of(a: argparse.Namespace, job: Job) -> list[str]:
    """The table rows a job's models become."""
    return [] if job.kind == "full" else [job.name]

# -----------------------------------------------------------------------------
# the commands, as results record them: `python SCRIPT` and paths relative to the repository (../shared/... for the
# shared files), run with this interpreter from the --code copy (run_cmd), in the repository folder


def rel(path) -> str:
    return os.path.relpath(Path(path).resolve(), ROOT)


def paths(a: argparse.Namespace) -> dict:
    d = Path(a.data_dir)
    p = {"model": Path(a.model), "c4": d / "c4" / "c4_en_train00000_first1000.jsonl"}
    for name, f in p.items():
        if not (f.exists() if name == "model" else f.is_file()):  # the model: a GGUF file or an HF folder
            raise ValueError(f"{f} does not exist: --model and --data-dir must name the shared model and data "
                             f"(the layout of shared/: {name})")
    return p


def train_flags(a: argparse.Namespace, job: Job) -> list[str]:
    """What NutePrune and the baselines share: the calibration blocks, the step budget and the precision."""
    return ["--block-size", str(a.block_size), "--batch-size", str(a.batch_size), "--heldout-blocks",
            str(a.heldout_blocks), "--dtype", a.dtype, "--seed", str(job.seed), "--cache-dir", rel(Path(a.out) / "cache")]


def nuteprune_cmd(a: argparse.Namespace, job: Job, run: Path) -> list[str]:
    p = paths(a)
    if (run / "state.pt").is_file():
        return ["python", "nuteprune.py", "--resume", rel(run)]
    recipe = ["--recipe", "modern", "--lr-lambda", str(a.lr_lambda_modern)] if job.method.endswith("-m") else \
        ["--lr-lambda", str(a.lr_lambda)]
    return ["python", "nuteprune.py", "--ckpt", rel(p["model"]), "--data", rel(p["c4"]), "--target", str(job.target),
            "--out", rel(run), "--overwrite", *train_flags(a, job), "--micro-batch-size", str(a.batch_size),
            "--max-steps", str(a.steps * job.scale), "--epochs", "7", "--lr-mask", str(a.lr_mask), *recipe,
            "--eval-every", str(a.eval_every), "--log-every", "1", "--save-every", "10", "--device", "cpu",
            *(["--distill", "kd"] if job.method.startswith("kd") else [])]


def baseline_cmd(a: argparse.Namespace, job: Job, run: Path) -> list[str]:
    p = paths(a)
    return ["python", "experiments/baselines.py", "--ckpt", rel(p["model"]), "--data", rel(p["c4"]), "--method",
            job.method, "--target", str(job.target), "--steps", str(a.steps * job.scale), *train_flags(a, job),
            "--lr", "1e-3", "--lora-rank", "8", "--lora-targets", "q_proj,v_proj",
            "--loss", "kd" if job.method == "minitron" else "ce", "--out", rel(run), "--save-every", "10",
            "--scores", rel(Path(a.out) / f"scores-{job.method}-{a.dtype}.pt")]


def eval_cmds(a: argparse.Namespace, model: Path, prefix: str, full: bool = False) -> list[tuple[str, list, str]]:
    """(kind, evaluate.py command, its JSON) for a model: perplexity, then the zero-shot tasks; full: the dense
    model's check of --limit (PTB and the cheaper tasks, every item)."""
    dense = paths(a)["model"]  # a GGUF's tokenizer for every model: the same token ids in every row
    tok = ["--tokenizer", rel(dense)] if dense.suffix == ".gguf" else []
    base = ["python", "evaluate.py", "--ckpt", rel(model), *tok, "--data-dir", rel(a.data_dir), "--device", "cpu",
            "--dtype", a.eval_dtype, "--batch-size", "8"]
    ppl_limit = [] if full or not a.ppl_windows else ["--limit", str(a.ppl_windows)]
    zs_limit = [] if full or not a.limit else ["--limit", str(a.limit)]
    return [("ppl", base + ["--tasks", "ptb" if full else "wikitext2,ptb", "--seq-len", str(a.seq_len), *ppl_limit,
                            "--json", rel(f"{prefix}-ppl.json")], f"{prefix}-ppl.json"),
            ("zs", base + ["--tasks", ",".join(FULL_CHECK if full else ZERO_SHOT), "--harness", "fixed", *zs_limit,
                           "--json", rel(f"{prefix}-zs.json")], f"{prefix}-zs.json")]

# -----------------------------------------------------------------------------
# running: every subprocess through pkd.supervise (one thread, SIGTERM at the deadline), its time in RUN/times.json


def read_times(run: Path) -> list[dict]:
    f = run / "times.json"
    return json.loads(f.read_text()) if f.is_file() else []


def add_time(run: Path, rec: dict):
    pkd.write_json(run / "times.json", read_times(run) + [rec])


def run_cmd(ctx: pkd.Ctx, run: Path, what: str, cmd: list[str], done: Path) -> bool:
    """Run `cmd` unless `done` exists; True once it does. False when the deadline came first or stopped it."""
    if done.exists():
        return True
    if ctx.late():
        ctx.stopped = True
        return False
    ctx.log(f"{what}: {run.name}")
    t0 = time.time()
    argv = [sys.executable, str(pkd.code_dir(ctx.a) / cmd[1]), *cmd[2:]] if cmd[0] == "python" else cmd
    status, usage, termed = pkd.supervise(ctx, argv, run, REUSE)
    code = os.waitstatus_to_exitcode(status)
    add_time(run, {"what": what, "cmd": cmd, "wall_s": time.time() - t0, "cpu_s": usage.ru_utime + usage.ru_stime,
                   "exit": code, "code": pkd.code_id(ctx.a, CODE_FILES)})
    if done.exists():
        return True
    if termed:
        ctx.stopped = True
        return False
    raise RuntimeError(f"{' '.join(cmd)} failed with exit code {code}; see {run / 'console.txt'}")


def train(ctx: pkd.Ctx, job: Job, run: Path) -> list[tuple[str, Path]] | None:
    """The job's models as (row, model path) once trained; None when stopped before."""
    a = ctx.a
    if job.kind == "dense":
        return [(job.name, paths(a)["model"])]
    if job.kind == "oneshot":
        ok = run_cmd(ctx, run, "train", baseline_cmd(a, job, run), run / "report.json")
        return [(job.name, run / "pruned")] if ok else None
    ok = run_cmd(ctx, run, "train", nuteprune_cmd(a, job, run), run / "report.json")
    return [(job.name, run / "pruned")] if ok else None


def evaluate_row(ctx: pkd.Ctx, job: Job, run: Path, row: str, model: Path) -> dict | None:
    """The row's record once both evaluations are done (None when stopped first)."""
    done = run / f"row-{row}.json"
    if done.is_file():
        return json.loads(done.read_text())
    evals = {}
    for kind, cmd, out in eval_cmds(ctx.a, model, str(run / f"eval-{row}")):
        if not run_cmd(ctx, run, f"eval {row} {kind}", cmd, Path(out)):
            return None
        evals[kind] = json.loads(Path(out).read_text())
    rec = row_record(ctx.a, job, run, row, evals)
    pkd.write_json(done, rec)
    m = rec["metrics"]
    ctx.log(f"{row}: sparsity {rec['sparsity']:.4f}, WikiText-2 {m.get('wikitext2', float('nan')):.2f}, "
            f"average {m.get('average', float('nan')):.2f}")
    return rec


def full_check(ctx: pkd.Ctx, run: Path) -> dict | None:
    """The dense model on the full PTB and the full cheaper tasks (RUN/full.json), against its --limit numbers."""
    if (run / "full.json").is_file():
        return json.loads((run / "full.json").read_text())
    evals = {}
    for kind, cmd, out in eval_cmds(ctx.a, paths(ctx.a)["model"], str(run / "eval-full"), full=True):
        if not run_cmd(ctx, run, f"eval full {kind}", cmd, Path(out)):
            return None
        evals[kind] = json.loads(Path(out).read_text())
    rec = {"metrics": metrics(evals), "time": time_sums(read_times(run)), "commands": [t["cmd"] for t in
                                                                                     read_times(run)]}
    pkd.write_json(run / "full.json", rec)
    return rec


def run_job(ctx: pkd.Ctx, job: Job) -> list[dict]:
    """The job's finished rows, running what is missing (nothing with --report-only or after the deadline)."""
    run = ctx.out / "runs" / job.name
    if ctx.a.report_only or ctx.stopped or (ctx.a.only and job.name not in ctx.a.only):
        return [json.loads(f.read_text()) for r in rows_of(ctx.a, job) if (f := run / f"row-{r}.json").is_file()]
    run.mkdir(parents=True, exist_ok=True)
    if job.kind == "full":
        full_check(ctx, run)
        return []
    models = train(ctx, job, run)
    rows = []
    for row, model in models or []:
        rec = evaluate_row(ctx, job, run, row, model)
        if rec is None:
            break
        rows.append(rec)
    return rows

# -----------------------------------------------------------------------------
# records: pure functions of the files a job leaves


def metrics(evals: dict) -> dict:
    """evaluate.py's JSONs -> {wikitext2, ptb: PPL; each task: the paper's metric in %; average; items per task}."""
    ppl, zs = evals.get("ppl", {}), evals.get("zs", {})
    out = {t: ppl[t]["ppl"] for t in PPL_TASKS if t in ppl}
    out.update({t: 100 * zs[t][PAPER_METRIC[t]] for t in ZERO_SHOT if t in zs})
    if "average" in zs:
        out["average"] = 100 * zs["average"]["acc"]
    out["items"] = {**ppl.get("meta", {}).get("items", {}), **zs.get("meta", {}).get("items", {})}
    return out


def time_sums(times: list[dict]) -> dict:
    return {"wall_s": sum(t["wall_s"] for t in times), "cpu_s": sum(t["cpu_s"] for t in times),
            "invocations": len(times)}


def job_report(a: argparse.Namespace, job: Job, run: Path, row: str) -> dict:
    """What training reported (nuteprune.py's or baselines.py's report.json; for the dense model its own sizes)."""
    if job.kind == "dense":
        import checkpoint
        import llama
        n = llama.count_params(checkpoint.check_checkpoint(paths(a)["model"]))
        return {"sparsity": 0.0, "sparsity_total": 0.0, "params_dense": n, "params_pruned": n, "steps": 0}
    return json.loads((run / "report.json").read_text())


def tokens_seen(rep: dict) -> int:
    if "tokens" in rep:  # baselines.py
        return rep["tokens"]
    args = rep.get("args", {})
    return rep.get("steps", 0) * args.get("batch_size", 0) * args.get("block_size", 0)


def row_record(a: argparse.Namespace, job: Job, run: Path, row: str, evals: dict) -> dict:
    rep, times = job_report(a, job, run, row), read_times(run)
    trained = [t for t in times if t["what"] == "train"]
    evaluated = [t for t in times if t["what"].startswith(f"eval {row} ")]
    rec = {"row": row, "job": job.name, "kind": job.kind, "method": job.method, "scale": job.scale,
           "target": job.target, "seed": job.seed, "sparsity": rep["sparsity"],
           "sparsity_total": rep.get("sparsity_total"), "params": rep["params_pruned"],
           "params_dense": rep["params_dense"], "warning": rep.get("warning"),
           "expected_sparsity_at_end": rep.get("expected_sparsity_at_end"),
           "trained_masks_sparsity": rep.get("trained_masks_sparsity"), "steps": rep.get("steps", 0),
           "tokens_seen": tokens_seen(rep), "score_tokens": rep.get("score_tokens", 0),
           "heldout_ppl": {"dense": rep.get("ppl_before"), "oneshot": rep.get("ppl_oneshot"),
                           "after": rep.get("ppl_after")},
           "metrics": metrics(evals), "train_time": time_sums(trained), "eval_time": time_sums(evaluated),
           "commands": [" ".join(t["cmd"]) for t in trained + evaluated],
           "code": list({json.dumps(t.get("code"), sort_keys=True): t.get("code") for t in trained + evaluated}
                        .values())}
    if job.kind == "nuteprune" and (run / "log.jsonl").is_file():
        log = pkd.read_log(run / "log.jsonl")
        rec["log"] = pkd.summarize_log(log)
        rec["controller"] = massive.controller_stats(log, job.target)
        rec["trace"] = [[r["step"], r["expected_sparsity"]] for r in log if r.get("phase") == "prune"]
    return rec

# -----------------------------------------------------------------------------
# the budget plan: measured costs (CPU seconds on the 2-core machine with two one-thread workers; bench/README.md
# for the bf16 step) and what they imply for the grid's flags

MEASURED = {
    "prune_step_s": 2.8,  # nuteprune.prune_step in bf16, pkd + layer loss, 4 x 128 tokens, beside a second worker
    "lora_step_s": {0.5: 1.2, 0.2: 1.6},  # baselines.finetune in bf16, 4 x 128 tokens
    "kd_lora": 1.4,  # the same with the dense model's forward for KD (Minitron)
    "scores_s": 60.0,  # Taylor or activation scores on 128 blocks of 128 tokens (once per method: cached)
    "zs_tokens_s": 180.0,  # evaluate.py zero-shot on the dense model in fp32, positions per CPU second
    "ppl_tokens_s": 215.0,  # evaluate.py perplexity on the dense model in fp32
    "load_s": 15.0,  # a process start: torch, the GGUF dequantised, the tokenizer
}
ITEM_TOKENS = {"boolq": 145.5, "piqa": 62.0, "hellaswag": 177.6, "winogrande": 27.7, "arc_easy": 45.4,
               "arc_challenge": 57.2, "openbookqa": 25.3}  # positions per item the evaluator runs, full sets
FULL_TOKENS = {"ptb": 93459, "winogrande": 35139, "openbookqa": 12636, "arc_challenge": 66998}  # full sets
ALL_ZS_TOKENS, ALL_PPL_TOKENS = 2_595_178, 304_978 + 93_459  # the seven full sets; WikiText-2 test + PTB valid
PRUNABLE_SHARE = 106.2 / 134.5  # prunable weights of SmolLM2-135M: compute falls by about target x this share


def eval_cost(a: argparse.Namespace, target: float) -> float:
    """Estimated CPU seconds of a model's two evaluations."""
    zs = (a.limit * sum(ITEM_TOKENS.values()) if a.limit else ALL_ZS_TOKENS) / MEASURED["zs_tokens_s"]
    ppl = (2 * a.ppl_windows * a.seq_len if a.ppl_windows else ALL_PPL_TOKENS) / MEASURED["ppl_tokens_s"]
    return (zs + ppl) * (1 - target * PRUNABLE_SHARE) + 2 * MEASURED["load_s"]


def train_cost(a: argparse.Namespace, job: Job) -> float:
    """Estimated CPU seconds of a job's training (export and held-out perplexities included)."""
    steps = a.steps * job.scale * a.batch_size * a.block_size / 512  # the measurements are of 4 x 128-token steps
    if job.kind == "oneshot":
        lora = MEASURED["lora_step_s"][job.target] * (MEASURED["kd_lora"] if job.method == "minitron" else 1.0)
        return steps * lora + MEASURED["scores_s"] + 2 * MEASURED["load_s"]
    if job.kind != "nuteprune":
        return 0.0
    snapshots = round(job.target / 0.01) if a.eval_every and job.method.startswith("pkd") else 0
    evals = (snapshots + a.steps * job.scale // a.eval_every if a.eval_every else 0) * a.heldout_blocks * a.block_size
    return steps * MEASURED["prune_step_s"] + evals / MEASURED["ppl_tokens_s"] + 3 * MEASURED["load_s"]


def budget_lines(a: argparse.Namespace, results: dict) -> list[str]:
    """The plan: every job's tokens and estimated CPU time, beside the measured time of the finished ones."""
    lines = ["| job | training tokens | est. training CPU-min | est. evaluation CPU-min | measured CPU-min |",
             "|---|---|---|---|---|"]
    total = 0.0
    for job in plan(a):
        est_t = train_cost(a, job)
        if job.kind == "full":
            est_e = sum(FULL_TOKENS.values()) / MEASURED["zs_tokens_s"] + 2 * MEASURED["load_s"]
        else:
            est_e = eval_cost(a, job.target) * len(rows_of(a, job))
        total += est_t + est_e
        tokens = a.steps * job.scale * a.batch_size * a.block_size if job.kind in ("oneshot", "nuteprune") else 0
        got = results.get("job_cpu", {}).get(job.name)
        lines.append(f"| {job.name} | {tokens:,} | {est_t / 60:.0f} | {est_e / 60:.0f} | "
                     f"{'—' if got is None else f'{got / 60:.0f}'} |")
    lines.append(f"| **total** | | | **{total / 3600:.1f} CPU-hours** (budget {a.budget_hours:g}) | "
                 f"{results.get('cpu_s', 0) / 3600:.2f} CPU-hours so far |")
    return lines

# -----------------------------------------------------------------------------
# tables: pure functions of the row records

COLUMNS = PPL_TASKS + ZERO_SHOT + ("average",)
TUNING = {"dense": "—", "taylor": "LoRA after pruning (next-token loss)", "minitron": "LoRA after pruning (KD)",
          "pkd": "LoRA while pruning", "kd": "LoRA while pruning", "pkd-m": "LoRA while pruning",
          "kd-m": "LoRA while pruning"}
ORDER = ("dense", "taylor", "minitron", "pkd", "kd", "pkd-m", "kd-m")


def fmt(values: list[float], digits: int = 2) -> str:
    """Mean (± sample std over seeds, when more than one) at `digits` decimals; — for none."""
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def key(r: dict) -> tuple:
    return r["target"], r["method"], r.get("scale", 1)


def order(k: tuple) -> tuple:
    return k[2], k[0], ORDER.index(k[1])  # the 4x-token rows after the rest


def groups(rows: list[dict]) -> list[tuple[tuple, list[dict]]]:
    """Rows grouped by (target, method, scale), in the table's order: ratio, then method; the scaled rows last."""
    out = {}
    for r in sorted(rows, key=lambda r: (*order(key(r)), r["seed"] or 0)):
        out.setdefault(key(r), []).append(r)
    return list(out.items())


def flag(rows: list[dict]) -> str:
    """Forced-target warnings and exported sparsity off the target by more than 0.5 pp, per seed."""
    notes = []
    for r in rows:
        if r.get("warning"):
            notes.append(f"**forced target** (seed {r['seed']}: masks trained to {r['trained_masks_sparsity']:.3f}, "
                         f"expected {r['expected_sparsity_at_end']:.3f})")
        if r["target"] and abs(r["sparsity"] - r["target"]) > 0.005:
            notes.append(f"**sparsity {r['sparsity']:.4f} off the target by > 0.5 pp** (seed {r['seed']})")
    return "; ".join(notes) or "ok"


def planned(a: argparse.Namespace) -> list[tuple]:
    """(target, method, scale) of every table row the grid makes, in the table's order."""
    return sorted({(j.target, j.method, j.scale) for j in plan(a) if rows_of(a, j)}, key=order)


def label(k: tuple) -> str:
    return LABELS[k[1]] + (f", {k[2]}× tokens" if k[2] > 1 else "")


def main_table(rows: list[dict], todo: list[tuple] = ()) -> list[str]:
    """The paper's Table 1 shape: per ratio and method, perplexities, the seven tasks and their average. The dense
    model's C4 held-out perplexity is the one every run measured before pruning (the same blocks)."""
    dense_heldout = [v for r in rows if (v := r["heldout_ppl"]["dense"]) is not None][:1]
    head = ["Ratio", "Method", "Tuning", "Seeds", "Kept params", "Sparsity (target)"] + [
        HEADERS.get(c, "Average↑") for c in COLUMNS] + ["C4 held-out PPL", "Sparsity check"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    done = dict(groups(rows))
    for k in sorted(set(todo) | set(done), key=order):
        target, method, _ = k
        rs = done.get(k)
        if rs is None:
            lines.append(f"| {round(target * 100)}% | {label(k)} | {TUNING[method]} | pending |"
                         + " |" * (len(head) - 4))
            continue
        cells = [f"{round(target * 100)}%", label(k), TUNING[method], ", ".join(
            str(r["seed"]) for r in rs) if rs[0]["seed"] is not None else "—",
                 f"{statistics.mean(r['params'] for r in rs) / 1e6:.1f}M "
                 f"({statistics.mean(r['params'] / r['params_dense'] for r in rs):.1%})",
                 f"{fmt([r['sparsity'] for r in rs], 4)} ({target:g})"]
        for c in COLUMNS:
            cells.append(fmt([r["metrics"][c] for r in rs if c in r["metrics"]]))
        cells.append(fmt(dense_heldout if method == "dense" else
                         [r["heldout_ppl"]["after"] for r in rs if r["heldout_ppl"]["after"] is not None]))
        lines.append("| " + " | ".join(cells + [flag(rs)]) + " |")
    return lines


def compare(a_rows: list[dict], b_rows: list[dict], metric: str, lower_better: bool) -> str:
    """'beats' / 'loses to' beyond one std (the larger of the two rows' seed stds), else 'level with'."""
    av, bv = ([r["metrics"][metric] for r in rs if metric in r["metrics"]] for rs in (a_rows, b_rows))
    if not av or not bv:
        return "not comparable"
    std = max(statistics.stdev(v) if len(v) > 1 else 0.0 for v in (av, bv))
    diff = statistics.mean(av) - statistics.mean(bv)
    if min(len(av), len(bv)) < 2:
        word = "one seed: no std to judge by"
    elif abs(diff) <= std:
        word = f"within one std ({std:.2f})"
    else:
        word = f"beyond one std ({std:.2f})"
    better = (diff < 0) == lower_better
    return f"{fmt(av)} vs {fmt(bv)}: {'better' if better else 'worse'}, {word}"


def verdicts(rows: list[dict]) -> list[str]:
    """Plain comparisons from the table at each ratio: the modern recipe (PKD) against the two baselines and against
    the paper's recipe, on WikiText-2 perplexity and the average accuracy, judged against the seed std."""
    by = {k[:2]: rs for k, rs in groups(rows) if k[2] == 1}
    out = []
    for t in (0.2, 0.5):
        for a_m, b_m in (("pkd-m", "taylor"), ("pkd-m", "minitron"), ("kd-m", "minitron"), ("pkd-m", "pkd"),
                         ("pkd-m", "kd-m")):
            a_rows, b_rows = by.get((t, a_m)), by.get((t, b_m))
            if a_rows and b_rows:
                out.append(f"{round(t * 100)}%, {LABELS[a_m]} vs {LABELS[b_m]}: WikiText-2 "
                           f"{compare(a_rows, b_rows, 'wikitext2', True)}; average accuracy "
                           f"{compare(a_rows, b_rows, 'average', False)}.")
    return out


DIAGNOSTIC_DIR = ROOT / "experiments" / "results" / "smollm2" / "diagnostic"


def diagnostic_lines() -> list[str]:
    """experiments/massive.py's findings, read from the committed diagnostic folders (each massive.json and its
    command in DIAGNOSTIC_DIR/README.md): the massive dims of the dense model, what the paper's recipe did to them,
    and every pilot side by side (massive.compare)."""
    import massive
    dirs = sorted(d for d in DIAGNOSTIC_DIR.glob("*") if (d / "massive.json").is_file())
    paper = DIAGNOSTIC_DIR / "paper-50" / "massive.json"
    if not dirs or not paper.is_file():
        return ["Pending: the diagnostic folders (experiments/massive.py) are not in " + rel(DIAGNOSTIC_DIR) + "."]
    s = json.loads(paper.read_text())
    dims, share = s["top_dims"], s["top_norm_share"]
    last, c = s["per_record"][-1], s["controller"]
    top1 = [r["top_counted_share_each"][0] for r in s["per_record"] if r["step"] >= 10]
    return [f"With the paper's recipe at 50% (300 steps, seed 0; `{rel(paper.parent)}`): of {s['dim']} hidden dims, "
            f"dim {dims[0]} holds {100 * share[0]:.1f}% of the squared norm of the dense model's hidden states and the "
            f"top {len(dims)} ({', '.join(map(str, dims))}) {100 * s['top_norm_share_sum']:.1f}%. Dim {dims[0]} alone "
            f"carries a median {100 * statistics.median(top1):.0f}% of what Eq. 8 counts over the records from step "
            f"10 on (every 10 steps; range {100 * min(top1):.0f}–{100 * max(top1):.0f}%). By the end the masks had pruned {last['hidden_pruned']} "
            f"hidden dims, among them the massive dims {', '.join(map(str, last['top_pruned'])) or 'none'}, whose "
            f"error Eq. 8 then no longer counts (uncounted {last['layer_loss_uncounted']:.0f} against counted "
            f"{last['layer_loss_counted']:.0f}); the expected sparsity ended {100 * c['last_gap']:+.1f} pp off the "
            f"target (a forced target) and the held-out perplexity was {s['final']['ppl_after']:,.0f}. The pilots, "
            "each changing one thing (README.md there gives every command):", ""] + \
        massive.compare([str(d) for d in dirs]).splitlines()


def controller_lines(rows: list[dict]) -> list[str]:
    """The controller per NutePrune row (mean ± std over seeds): how far the expected sparsity swings about the
    target in the second half of the steps after the warm-up, and its gap at the last step."""
    lines = ["| Ratio | Method | Seeds | half peak-to-peak (pp) | RMS gap (pp) | largest gap (pp) | gap at the last step "
             "(pp) | forced target |", "|---|---|---|---|---|---|---|---|"]
    for k, rs in groups(rows):
        cs = [r["controller"] for r in rs if r.get("controller")]
        if not cs:
            continue
        pp = lambda name: fmt([100 * c[name] for c in cs])  # noqa: E731
        lines.append(f"| {round(k[0] * 100)}% | {label(k)} | {', '.join(str(r['seed']) for r in rs)} | "
                     f"{pp('half_peak_to_peak')} | {pp('rms_gap')} | {pp('max_abs_gap')} | {pp('last_gap')} | "
                     f"{sum(bool(r.get('warning')) for r in rs)} of {len(rs)} |")
    return lines


def authors_lines(rows: list[dict], full: dict | None, a: argparse.Namespace) -> list[str]:
    """The dense model's numbers beside what its authors report (a column for the lead to fill from a source)."""
    dense = next((r for r in rows if r["method"] == "dense"), {"metrics": {"items": {}}})
    fm = (full or {}).get("metrics", {})
    lines = ["| task (metric) | ours, first N items | ours, full set | SmolLM2 authors (model card) |",
             "|---|---|---|---|"]
    for t in PPL_TASKS + ZERO_SHOT:
        metric = "PPL" if t in PPL_TASKS else PAPER_METRIC[t]
        n = dense["metrics"]["items"].get(t)
        ours = dense["metrics"].get(t)
        lines.append(f"| {HEADERS[t].rstrip('↓')} ({metric}) | {'pending' if ours is None else f'{ours:.2f} (n={n})'}"
                     f" | {f'{fm[t]:.2f}' if t in fm else '—'} | not available offline |")
    lines += ["", "Harness differences to name when the authors' column is filled: their numbers come from the "
              "original bf16 checkpoint with their own evaluation suite (lighteval prompts and normalisation, "
              "often a different split or few-shot setting); ours from the Q4_1 GGUF dequantised to fp32, "
              f"lm-evaluation-harness v0.3 prompts with the fixed tokenisation, zero-shot, the first "
              f"{a.limit or 'all'} items of each set, and perplexity in windows of {a.seq_len} tokens (LLM-Pruner's "
              f"protocol)."]
    return lines


def limit_lines(rows: list[dict], full: dict | None, a: argparse.Namespace) -> list[str]:
    """How far the dense numbers move between the --limit subsets and the full sets (the cheaper tasks, PTB)."""
    dense = next((r for r in rows if r["method"] == "dense"), None)
    if dense is None or not full:
        return ["Pending: the `dense-full` job (the dense model on the full PTB and the full "
                f"{', '.join(FULL_CHECK)}) has not run yet."]
    fm, dm = full["metrics"], dense["metrics"]
    lines = ["| task (metric) | first N (n) | full set (n) | full − first N |", "|---|---|---|---|"]
    for t in ("ptb",) + FULL_CHECK:
        if t in fm and t in dm:
            lines.append(f"| {HEADERS[t].rstrip('↓')} ({'PPL' if t == 'ptb' else PAPER_METRIC[t]}) | {dm[t]:.2f} "
                         f"(n={dm['items'].get(t)}) | {fm[t]:.2f} (n={fm['items'].get(t)}) | {fm[t] - dm[t]:+.2f} |")
    zs = [t for t in FULL_CHECK if t in fm and t in dm]
    if zs:
        worst = max(abs(fm[t] - dm[t]) for t in zs)
        lines += ["", f"Zero-shot accuracies move by up to {worst:.2f} points between the first {a.limit} items and "
                  f"the full sets on these tasks (binomial standard error of one task at n={a.limit} and 50%: "
                  f"{100 * (0.25 / max(a.limit, 1)) ** 0.5:.1f} points; of the seven-task average about "
                  f"{100 * (0.25 / max(a.limit, 1) / 7) ** 0.5:.1f}). Every row uses the same items."]
    return lines


def runs_lines(rows: list[dict]) -> list[str]:
    lines = ["| row | seed | steps | tokens seen | sparsity (target) | expected / trained masks at the end | C4 "
             "held-out PPL dense → one-shot → final | train wall / CPU min | eval wall / CPU min |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (*order(key(r)), r["seed"] or 0)):
        h = r["heldout_ppl"]
        ppl = " → ".join("—" if v is None else f"{v:.2f}" for v in (h["dense"], h["oneshot"], h["after"]))
        fit = ("—" if r["expected_sparsity_at_end"] is None else
               f"{r['expected_sparsity_at_end']:.4f} / {r['trained_masks_sparsity']:.4f}")
        tr, ev = r["train_time"], r["eval_time"]
        lines.append(f"| {r['row']} | {r['seed'] if r['seed'] is not None else '—'} | {r['steps']} | "
                     f"{r['tokens_seen']:,} | {r['sparsity']:.4f} ({r['target']:g}) | {fit} | {ppl} "
                     f"| {tr['wall_s'] / 60:.1f} / {tr['cpu_s'] / 60:.1f} | {ev['wall_s'] / 60:.1f} / "
                     f"{ev['cpu_s'] / 60:.1f} |")
    return lines


def commands_lines(rows: list[dict]) -> list[str]:
    lines = []
    for r in sorted(rows, key=lambda r: (*order(key(r)), r["seed"] or 0)):
        lines += [f"- `{r['row']}`:"] + [f"  - `{c}`" for c in r["commands"]]
    return lines


def code_lines(rows: list[dict], info: dict) -> list[str]:
    files = lambda c: json.dumps({k: v for k, v in (c or {}).items() if k != "commit"}, sort_keys=True)  # noqa: E731
    codes = {files(c) for r in rows for c in r.get("code", [])}
    cid = info.get("code") or {}
    same = codes <= {files(cid)}
    return [f"Commit {cid.get('commit')}; sha256 prefixes of the files the runs executed: "
            + ", ".join(f"{k} {v}" for k, v in cid.items() if k != "commit") + ". "
            + ("Every run used these same files." if same else
               f"The runs used {len(codes)} different versions of them (results.json, rows[].code).")]

# -----------------------------------------------------------------------------
# results.md

# What experiments/massive.py found with the paper's recipe, and the pilots behind the modern recipe: written from
# experiments/results/smollm2/diagnostic/ (each with its command there), not rerun by this script.
DIAGNOSTIC = (
    "Why the paper's recipe fails on SmolLM2, and what the modern recipe changes: "
    "experiments/results/smollm2/diagnostic/README.md (experiments/massive.py, one command per run).")


def markdown(rows: list[dict], a: argparse.Namespace, info: dict) -> str:
    lines = intro_lines(a, info) + ["", "## Budget plan", ""] + plan_text(a) + budget_lines(a, info) + [""]
    lines += ["## What the diagnostic found", ""] + diagnostic_lines() + [""]
    lines += ["## Table 1 shape", "", f"Perplexity: WikiText-2 test and PTB validation, windows of {a.seq_len} tokens "
              f"({'the first ' + str(a.ppl_windows) + ' windows' if a.ppl_windows else 'every window'}). Accuracy "
              f"(%): acc for BoolQ, PIQA, WinoGrande, ARC-e; acc_norm for HellaSwag, ARC-c, OBQA (the paper's mix); "
              f"{'the first ' + str(a.limit) + ' items of each set' if a.limit else 'every item'}; mean ± sample std "
              f"over the seeds. C4 held-out PPL: the {a.heldout_blocks} blocks of {a.block_size} tokens every run "
              f"holds out of the calibration file. Sparsity check: exported prunable sparsity within 0.5 pp of the "
              f"target and no forced-target warning, or what went wrong.", ""]
    lines += main_table(rows, planned(a)) + [""] + [f"- {v}" for v in verdicts(rows)]
    lines += ["", "![](smollm2.png)", ""] if rows else [""]
    lines += ["## The controller", "", "The expected sparsity of every NutePrune run against its target: the swing in "
              "the second half of the steps after the warm-up, and the gap at the last step (a gap over 2 pp at the "
              "end forces the final masks to the target: the forced-target warning).", ""]
    lines += controller_lines(rows) + ["", "![](controller.png)", ""]
    lines += ["## The dense model beside its authors' numbers", ""] + authors_lines(rows, info.get("full"), a)
    lines += ["", "## --limit against the full sets (dense model)", ""] + limit_lines(rows, info.get("full"), a)
    lines += ["", "## Every run", ""] + runs_lines(rows) + ["", "Commands (from the repository folder):", ""]
    lines += commands_lines(rows)
    lines += ["", "## Code", ""] + code_lines(rows, info) + ["", "## Closing note", ""] + closing_lines(rows, info)
    return "\n".join(lines) + "\n"


def recorded(argv: list[str]) -> list[str]:
    """An invocation as results.json records it: --code's folder (a copy on the machine that ran it) named COPY."""
    return [("COPY" if i and argv[i - 1] == "--code" else x) for i, x in enumerate(argv)]


def intro_lines(a: argparse.Namespace, info: dict) -> list[str]:
    cal = info.get("calibration", {})
    tokens = a.steps * a.batch_size * a.block_size
    return ["# SmolLM2-135M-Instruct pruned to 20% and 50%: NutePrune, paper and modern recipes, against Taylor and "
            "Minitron-style one-shot pruning (issue 28)", "",
            (f"Generated by `python experiments/smollm2.py {' '.join(info['argv'])}` (the last invocation; each "
             f"worker ran its jobs with --only" + (", and --code COPY ran a copy of the repository at the commit "
                                                  "under Code (`git archive`), so that every run of the grid kept "
                                                  "its code while the repository moved on" if "COPY" in info["argv"]
                                                  else "") + ")." if info.get("ran") else
             "Nothing has run yet: this is the plan. The grid: `python experiments/smollm2.py --out runs/smollm2`."),
            "",
            "Model: SmolLM2-135M-Instruct (30 layers, hidden 576, 9 query / 3 K/V heads, FFN 1536, vocabulary 49,152, "
            "tied embeddings; 134.5M parameters, 106.2M of them prunable), the Q4_1 GGUF in shared/models "
            "dequantised: the dense row is that model, not the original bf16 one. It has massive activations: "
            "hidden dim 507 holds 95% of the squared norm of the hidden states.",
            "",
            f"Calibration, one set for every row: the first 1,000 documents of C4 en shard 00000, "
            f"{cal.get('blocks', 0):,} blocks of {a.block_size} tokens ({cal.get('tokens', 0):,} tokens), the last "
            f"{a.heldout_blocks} held out. Every pruned model saw {tokens:,} calibration tokens ({a.steps} steps of "
            f"{a.batch_size} × {a.block_size}; {tokens / PAPER_TOKENS:.2%} of the paper's 7 epochs of 20k × 512 = "
            f"{PAPER_TOKENS / 1e6:.1f}M tokens), {a.scale}× that in the rows marked so: NutePrune while pruning "
            f"(masks and LoRA together), the one-shot baselines in their LoRA phase (their scores also read 128 "
            f"blocks once). Training in {a.dtype} (frozen base weights and autocast; LoRA, gates and lambdas fp32), "
            f"evaluation in {a.eval_dtype}.",
            "",
            f"NutePrune runs: `nuteprune.py --target T --block-size {a.block_size} --batch-size {a.batch_size} "
            f"--micro-batch-size {a.batch_size} --max-steps {a.steps} --epochs 7 --lr-mask {a.lr_mask:g} --lr-lambda "
            f"{a.lr_lambda:g} --heldout-blocks {a.heldout_blocks} --eval-every {a.eval_every} --dtype {a.dtype}` "
            f"(+ `--distill kd`): the paper's recipe (Eq. 8's layer loss at 0.9, KL at 0.1, Adam on the lambdas, "
            f"gap 10%, interval 1%, KD temperature 2/3, LoRA rank 8 on q, v at 1e-3, warm-up 1 of 7 epochs at 50% "
            f"and 4 of 7 at 20%, scaled to the steps), but for the mask and lambda learning rates (the paper's 0.1 "
            f"barely moves the masks in {a.steps} steps). The modern recipe: the same with `--recipe modern "
            f"--lr-lambda {a.lr_lambda_modern:g}` ({modern_text()}).",
            "",
            "Baselines (`experiments/baselines.py`): query heads, FFN channels and hidden dims pruned one-shot to the "
            "target, the same keep fraction in every layer; Taylor = |dL/dz| at z = 1 summed over 128 calibration "
            "blocks (first-order |w · grad| per unit), then LoRA trained on the next-token loss; Minitron-style = "
            "activation importance on the same 128 blocks (a head by the L2 norm of its output, an FFN channel by "
            "|silu(gate) · up|, a hidden dim by |RMSNorm output| over every norm; massive dims rank first), then LoRA "
            "trained on the dense model's logits (KL at temperature 1). LoRA rank 8 on q, v, lr 1e-3 decaying to 0, "
            f"the same {a.steps} steps of {a.batch_size} blocks (sampled with replacement; NutePrune reads them in "
            f"epoch order)."]


def modern_text() -> str:
    import flags
    return ", ".join(f"--{k.replace('_', '-')} {v}" if not isinstance(v, bool) else f"--{k.replace('_', '-')}"
                     for k, v in flags.RECIPES["modern"].items())


def plan_text(a: argparse.Namespace) -> list[str]:
    m = MEASURED
    return [f"Measured on this 2-core machine with two one-thread workers side by side, CPU seconds: a "
            f"`nuteprune.prune_step` in bf16 on 4 × 128 tokens {m['prune_step_s']:.1f} s; a baseline LoRA step "
            f"{m['lora_step_s'][0.5]:.1f} s at 50% and {m['lora_step_s'][0.2]:.1f} s at 20% (×{m['kd_lora']:g} with "
            f"the dense model's forward for KD); the evaluator {m['zs_tokens_s']:.0f} positions/s (zero-shot) and "
            f"{m['ppl_tokens_s']:.0f} tokens/s (perplexity) on the dense model in fp32. The full zero-shot sets are "
            f"2.6M positions (HellaSwag 1.8M): about 4 CPU-hours per model, hence --limit.", "",
            f"The grid must fit about {a.budget_hours:g} CPU-hours, so: {a.steps} steps of {a.batch_size} × "
            f"{a.block_size} tokens (the paper: 512-token blocks, batch 16), {a.limit} items per zero-shot task, "
            f"{a.ppl_windows} perplexity windows, seeds {', '.join(map(str, a.seeds))} for every row, and "
            f"{a.scale}× the tokens at 20% for {', '.join(a.scaled) or 'no row'}.", "", DIAGNOSTIC, ""]


def closing_lines(rows: list[dict], info: dict) -> list[str]:
    t = info.get("timing", {})
    bench = info.get("bench")
    ratio = (f"{bench['ratio_to_ffn_gemm']:.2f} (achieved {bench['achieved_flops_s'] / 1e9:.1f} GFLOP/s against "
             f"{bench['gemm_flops_s']['ffn (BT x D) @ (D x I)'] / 1e9:.1f} for the plain FFN GEMM; "
             f"bench/prune_flops.json)" if bench else
             "pending: `python bench/prune_flops.py --json bench/prune_flops.json` on an idle machine")
    lines = [f"- Grid run: {', '.join(sorted(r['row'] for r in rows)) or 'nothing yet'}.",
             f"- Time: {t.get('cpu_s', 0) / 3600:.2f} CPU-hours in the runs and evaluations, "
             f"{t.get('wall_s', 0) / 3600:.2f} hours wall over {t.get('invocations', 0)} invocation(s) of the command.",
             f"- `prune_step` achieved FLOP/s / plain GEMM: {ratio}.",
             "- Conclusion: " + (" ".join(verdicts(rows)) or "pending (the PKD, KD and baseline rows have not run).")]
    missing = info.get("missing", [])
    lines += ["", f"Not run yet ({len(missing)}; rerun the same command to continue, finished work is kept):", ""] + \
        [f"- {m}" for m in missing] if missing else ["", "Every planned job has run."]
    return lines

# -----------------------------------------------------------------------------
# the command


def build_parser() -> argparse.ArgumentParser:
    shared = ROOT.parent / "shared"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/smollm2", help="run folders (rerun the same command to resume)")
    p.add_argument("--results", default=str(ROOT / "experiments" / "results" / "smollm2"),
                   help="where results.md, results.json and smollm2.png go")
    p.add_argument("--model", default=str(shared / "models" / "smollm2-135m-instruct" /
                                          "SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--data-dir", default=os.environ.get("NUTEPRUNE_DATA", str(shared / "data")),
                   help="shared/data: c4/, alpaca/, tasks/, wikitext2/, ptb/")
    p.add_argument("--steps", type=int, default=300, help="pruning steps = LoRA steps of the baselines")
    p.add_argument("--batch-size", type=int, default=4, help="blocks per step")
    p.add_argument("--block-size", type=int, default=128, help="tokens per calibration block")
    p.add_argument("--heldout-blocks", type=int, default=16, help="the last blocks of the C4 file, never trained on")
    p.add_argument("--lr-mask", type=float, default=1.0, help="log_alpha learning rate (paper 0.1; see results.md)")
    p.add_argument("--lr-lambda", type=float, default=1.0, help="lambda learning rate of the paper's recipe rows "
                   "(paper 0.1; see results.md)")
    p.add_argument("--lr-lambda-modern", type=float, default=30.0, help="lambda learning rate of the modern recipe rows "
                   "(its own, flags.RECIPES)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16", help="training precision (nuteprune.py and "
                   "baselines.py --dtype)")
    p.add_argument("--eval-dtype", choices=("fp32", "bf16"), default="fp32", help="evaluate.py --dtype")
    p.add_argument("--eval-every", type=int, default=100, help="student perplexity every N steps and each snapshot's "
                   "(nuteprune.py --eval-every; 0: none)")
    p.add_argument("--seeds", default="0,1", help="seeds of every row")
    p.add_argument("--scale", type=int, default=4, help="the budget point: this many times the tokens and steps")
    p.add_argument("--scaled", default="pkd-m,minitron", help="the rows run at --scale times the tokens, at 20%% and "
                   "the first seed ('' none)")
    p.add_argument("--budget-hours", type=float, default=10.0, help="the CPU-hours the plan is made for")
    p.add_argument("--limit", type=int, default=100, help="first N items of every zero-shot task (0: all)")
    p.add_argument("--ppl-windows", type=int, default=128, help="first N perplexity windows (0: all)")
    p.add_argument("--seq-len", type=int, default=128, help="perplexity window (LLM-Pruner's tables: 128)")
    p.add_argument("--budget-min", type=float, default=0, help="stop (SIGTERM the running job, which checkpoints) "
                   "after this many minutes; 0: no limit")
    p.add_argument("--code", default=None, help="run nuteprune.py, baselines.py and evaluate.py from this copy of "
                   "the project (see experiments/pkd.py --code) instead of the working tree")
    p.add_argument("--no-plots", action="store_true", help="skip the figure (no matplotlib needed)")
    p.add_argument("--report-only", action="store_true", help="run nothing; regenerate the report and figure")
    p.add_argument("--only", default="", help="comma-separated job names: run only these, in this order (the rest "
                   "are reported as they stand), e.g. to run two workers side by side with one thread each")
    return p


POSITIVE = ("steps", "batch_size", "block_size", "seq_len", "scale")


def parse_args(argv=None) -> argparse.Namespace:
    a = build_parser().parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        a.seeds = list(dict.fromkeys(int(s) for s in a.seeds.split(",") if s.strip()))
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {a.seeds!r}") from None
    if not a.seeds:
        raise ValueError("--seeds: give at least one seed")
    a.scaled = [m for m in a.scaled.split(",") if m.strip()]
    if unknown := [m for m in a.scaled if m not in ONESHOT + NUTEPRUNE]:
        raise ValueError(f"--scaled: no row {', '.join(unknown)}; the rows are {', '.join(ONESHOT + NUTEPRUNE)}")
    a.only = [j for j in a.only.split(",") if j.strip()]
    names = [j.name for j in plan(a)]
    if unknown := [j for j in a.only if j not in names]:
        raise ValueError(f"--only: no job named {', '.join(unknown)}; the jobs are {', '.join(names)}")
    for name in POSITIVE:
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    for name in ("limit", "ppl_windows", "eval_every", "heldout_blocks", "budget_min"):
        if getattr(a, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 0, got {getattr(a, name)}")
    return a


CONFIG_KEYS = ("model", "steps", "batch_size", "block_size", "heldout_blocks", "lr_mask", "lr_lambda",
               "lr_lambda_modern", "dtype", "eval_dtype", "eval_every", "scale", "limit", "ppl_windows", "seq_len")


def start(a: argparse.Namespace, t_start: float) -> pkd.Ctx:
    """--code's copy first on sys.path, one torch thread, the context; the output folder's flags checked."""
    if a.code:
        if not (Path(a.code) / "nuteprune.py").is_file():
            raise ValueError(f"--code {a.code}: no nuteprune.py there")
        sys.path.insert(0, str(pkd.code_dir(a)))
    import torch
    torch.set_num_threads(1)
    if not a.report_only:
        paths(a)  # fail before creating anything
    out = Path(a.out)
    pkd._s260k().check_config(out, {k: getattr(a, k) for k in CONFIG_KEYS}, indent=1)
    return pkd.Ctx(a, out, None if not a.budget_min else t_start + a.budget_min * 60)


def calibration(ctx: pkd.Ctx) -> dict:
    """Blocks and tokens of the C4 file at --block-size (OUT/calibration.json, counted once; its tokens are cached in
    OUT/cache for the runs)."""
    f = ctx.out / "calibration.json"
    if f.is_file():
        return json.loads(f.read_text())
    import checkpoint
    import data
    try:
        p = paths(ctx.a)
    except ValueError:  # --report-only without the data: the counts stay unknown
        return {}
    tok = checkpoint.find_tokenizer(p["model"])
    blocks = data.calibration_blocks(p["c4"], tok, 20000, ctx.a.block_size, ctx.out / "cache")
    rec = {"blocks": len(blocks), "tokens": blocks.numel(), "training_blocks": len(blocks) - ctx.a.heldout_blocks}
    pkd.write_json(f, rec)
    return rec


def totals(ctx: pkd.Ctx, jobs: list[Job]) -> dict:
    """CPU and wall of every subprocess (and export) per job, from the run folders' times.json."""
    per = {j.name: time_sums(read_times(ctx.out / "runs" / j.name)) for j in jobs}
    return {"job_cpu": {k: v["cpu_s"] for k, v in per.items() if v["invocations"]},
            "cpu_s": sum(v["cpu_s"] for v in per.values()), "runs_wall_s": sum(v["wall_s"] for v in per.values())}


def wall_union(invocations: list[dict]) -> float:
    """Wall seconds the invocations covered, workers that ran side by side (--only) counted once."""
    spans = sorted((i["start"], i["start"] + i["wall_s"]) for i in invocations if "start" in i)
    total, end = sum(i["wall_s"] for i in invocations if "start" not in i), float("-inf")
    for s, e in spans:
        total += max(0.0, e - max(s, end))
        end = max(end, e)
    return total


def missing(a: argparse.Namespace, jobs: list[Job], rows: list[dict], full: dict | None) -> list[str]:
    done = {r["row"] for r in rows}
    out = [r for j in jobs for r in rows_of(a, j) if r not in done]
    return out + ([] if full else ["dense-full (the dense model on the full PTB and cheaper tasks)"])


def plot(rows: list[dict], path: Path):
    import plots
    series = {}
    for k, rs in groups(rows):
        m = [r["metrics"] for r in rs]
        mean = lambda x: statistics.mean(v[x] for v in m) if all(x in v for v in m) else None  # noqa: E731
        series.setdefault(label(k), []).append(
            (statistics.mean(r["params"] for r in rs) / 1e6, mean("average"), mean("wikitext2")))
    plots.plot_methods(series, path, "SmolLM2-135M-Instruct: pruned to 20% and 50% (experiments/smollm2.py)")


def plot_controller(rows: list[dict], path: Path):
    """Expected sparsity against the step, the paper's recipe beside the modern one (first seed, both targets)."""
    plt = __import__("plots")._pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=False)
    for ax, target in zip(axes, (0.2, 0.5)):
        for method, colour in (("pkd", "C3"), ("kd", "C1"), ("pkd-m", "C0"), ("kd-m", "C2")):
            rs = [r for r in rows if r["target"] == target and r["method"] == method and r.get("scale", 1) == 1
                  and r.get("trace")]
            if rs:
                r = min(rs, key=lambda r: r["seed"])
                ax.plot(*zip(*r["trace"]), color=colour, lw=1.3, label=f"{LABELS[method]} (seed {r['seed']})")
        ax.axhline(target, color="k", ls="--", lw=0.8)
        ax.set_title(f"target {target:g}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("expected sparsity (Eq. 3)")
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main_run(a: argparse.Namespace) -> list[dict]:
    t_start = time.time()
    ctx = start(a, t_start)
    jobs, rows = plan(a), []
    if a.only:  # their order first, then the rest (reported as they stand)
        jobs = sorted(jobs, key=lambda j: a.only.index(j.name) if j.name in a.only else len(a.only))
    for job in jobs:
        if not a.report_only and ctx.late():
            ctx.stopped = True
        rows += run_job(ctx, job)
    full_file = ctx.out / "runs" / "dense-full" / "full.json"
    full = json.loads(full_file.read_text()) if full_file.is_file() else None
    results_dir = Path(a.results)
    old = json.loads((results_dir / "results.json").read_text()) if (results_dir / "results.json").is_file() else {}
    invocations = old.get("invocations", []) + ([] if a.report_only else [{"wall_s": time.time() - t_start,
                                                                            "start": t_start, "argv": a.argv}])
    invocations = [{**i, "argv": recorded(i["argv"])} for i in invocations]
    tot = totals(ctx, jobs)
    bench = ROOT / "bench" / "prune_flops.json"
    ran = [i["argv"] for i in invocations]  # the command that made the numbers, not a later --report-only
    info = {"argv": ran[-1] if ran else a.argv, "ran": bool(ran), "code": pkd.code_id(a, CODE_FILES),
            "calibration": calibration(ctx), "full": full,
            "timing": {**tot, "wall_s": wall_union(invocations), "invocations": len(invocations)},
            "missing": missing(a, jobs, rows, full), **tot,
            "bench": json.loads(bench.read_text()) if bench.is_file() else None}
    results_dir.mkdir(parents=True, exist_ok=True)
    if not a.no_plots and rows:
        plot(rows, results_dir / "smollm2.png")
        plot_controller(rows, results_dir / "controller.png")
    pkd.write_json(results_dir / "results.json", {"info": {k: v for k, v in info.items() if k != "bench"},
                                                  "invocations": invocations, "rows": rows})
    (results_dir / "results.md").write_text(markdown(rows, a, info))
    ctx.log(f"wrote {results_dir / 'results.md'} ({len(rows)} rows{', stopped at the budget' if ctx.stopped else ''})")
    return rows


def main(argv=None):
    try:
        main_run(parse_args(argv))
    except pkd.USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
