"""Issue 19: NutePrune on a real pretrained model. SmolLM2-135M-Instruct pruned to 20% and 50% by NutePrune (PKD,
and KD with the intact teacher) and by one-shot magnitude and first-order Taylor pruning, each followed by LoRA on
the same tokens and steps, evaluated in the shape of the paper's Table 1.

    python experiments/smollm2.py --out runs/smollm2 [--budget-min M] [--code DIR]   # rerun the same command to go on
    python experiments/smollm2.py --out runs/smollm2 --report-only                   # the report from finished work

Jobs run one at a time (one thread each), cheapest informative first, so that a partial run still yields a table:
the dense model's evaluation; magnitude and Taylor one-shot at 50% and 20%, each + LoRA (`experiments/baselines.py`);
NutePrune PKD 50%, KD 50%, PKD 20% with post fine-tuning on Alpaca (its model before fine-tuning is the PKD 20% row,
so one run gives both); the dense model on the full sets of the cheaper tasks (how far --limit moves the numbers);
PKD 50% with --keep-hidden (heads and FFN channels only: the model bench/llama_cpp_speed.py finds faster per weight);
then a second seed of PKD and KD at 50%. Every run is a subprocess: `nuteprune.py` (an interrupted one continues
with `--resume`), `experiments/baselines.py` (continues from its state.pt) and `evaluate.py` (twice per model:
WikiText-2 / PTB perplexity and the seven zero-shot tasks, `--harness fixed`, the same first --limit items for
every row). Finished work is never redone (OUT/runs/<job>/row-<row>.json, report.json, eval-*.json). With
--budget-min the command starts nothing after the deadline and sends the running subprocess SIGTERM (training
saves a checkpoint; an evaluation is simply redone next time); rerun the same command to continue.

Writes RESULTS/results.md (the table, the budget plan, the dense model beside its authors' numbers, --limit against
the full sets, every run with its command, seed, steps, tokens, wall and CPU time and code hash, what has not run),
RESULTS/results.json and RESULTS/smollm2.png (average zero-shot accuracy and WikiText-2 perplexity against kept
parameters, per method).
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

import pkd  # noqa: E402
from evaluate import PAPER_METRIC, PPL_TASKS, ZERO_SHOT  # noqa: E402  (the task names and the paper's metrics)
from evaluate import HEADERS as TASK_NAMES  # noqa: E402

# -----------------------------------------------------------------------------
# what runs

HEADERS = {t: TASK_NAMES[t] + ("↓" if t in PPL_TASKS else "") for t in PPL_TASKS + ZERO_SHOT}
FULL_CHECK = ("winogrande", "openbookqa", "arc_challenge")  # the cheaper tasks, run in full on the dense model
REUSE = {"MALLOC_MMAP_THRESHOLD_": str(2 ** 32), "MALLOC_TRIM_THRESHOLD_": str(2 ** 32)}  # glibc keeps freed memory
# (bench/train_cost.py: without it every logits-sized buffer page-faults in afresh, +13% on a training step)
CODE_FILES = ("experiments/baselines.py", "experiments/smollm2.py")  # and every top-level module (pkd.code_id)
PAPER_TOKENS = 7 * 20000 * 512  # the paper's calibration: 7 epochs of 20k C4 blocks of 512 tokens


@dataclass(frozen=True)
class Job:
    name: str  # folder under OUT/runs
    kind: str  # dense | oneshot | nuteprune | full
    method: str  # dense | magnitude | taylor | pkd | kd
    target: float = 0.0
    seed: int | None = None


LABELS = {"dense": "dense", "magnitude": "magnitude one-shot + LoRA", "taylor": "Taylor one-shot + LoRA",
          "kd": "NutePrune, KD (intact teacher)", "pkd": "NutePrune, PKD",
          "pkd+ft": "NutePrune, PKD + post fine-tuning", "pkd-kh": "NutePrune, PKD, hidden width kept"}


def plan(a: argparse.Namespace) -> list[Job]:
    """Every job, cheapest informative first."""
    jobs = [Job("dense", "dense", "dense")]
    jobs += [Job(f"{m}-{round(t * 100)}-s0", "oneshot", m, t, 0) for t in (0.5, 0.2) for m in ("magnitude", "taylor")]
    jobs += [Job("pkd-50-s0", "nuteprune", "pkd", 0.5, 0), Job("kd-50-s0", "nuteprune", "kd", 0.5, 0),
             Job("pkd-20-s0", "nuteprune", "pkd", 0.2, 0)]
    jobs.append(Job("dense-full", "full", "dense"))
    jobs.append(Job("pkd-kh-50-s0", "nuteprune", "pkd-kh", 0.5, 0))  # --keep-hidden: faster in llama.cpp per weight
    jobs += [Job(f"{m}-50-s{s}", "nuteprune", m, 0.5, s) for s in a.extra_seeds for m in ("pkd", "kd")]
    return jobs


def with_ft(a: argparse.Namespace, job: Job) -> bool:
    return job.method == "pkd" and job.target == 0.2 and not a.no_ft


def rows_of(a: argparse.Namespace, job: Job) -> list[str]:
    """The table rows a job's models become (pkd-20 with post fine-tuning: before and after it)."""
    if job.kind == "full":
        return []
    return [job.name, job.name + "+ft"] if with_ft(a, job) else [job.name]

# -----------------------------------------------------------------------------
# the commands


def paths(a: argparse.Namespace) -> dict:
    d = Path(a.data_dir)
    p = {"model": Path(a.model), "c4": d / "c4" / "c4_en_train00000_first1000.jsonl",
         "alpaca": d / "alpaca" / "alpaca_data_first200.json"}
    for name, f in p.items():
        if not (f.exists() if name == "model" else f.is_file()):  # the model: a GGUF file or an HF folder
            raise ValueError(f"{f} does not exist: --model and --data-dir must name the shared model and data "
                             f"(the layout of shared/: {name})")
    return p


def train_flags(a: argparse.Namespace) -> list[str]:
    """What NutePrune and the baselines' LoRA share: the calibration blocks and the step budget."""
    return ["--block-size", str(a.block_size), "--batch-size", str(a.batch_size), "--heldout-blocks",
            str(a.heldout_blocks)]


def nuteprune_cmd(a: argparse.Namespace, job: Job, run: Path) -> list[str]:
    p, code = paths(a), pkd.code_dir(a)
    if (run / "state.pt").is_file():
        return [sys.executable, str(code / "nuteprune.py"), "--resume", str(run)]
    ft = ["--ft-data", str(p["alpaca"]), "--ft-batch-size", str(a.ft_batch_size), "--ft-max-steps",
          str(a.ft_steps), "--ft-max-len", str(a.ft_max_len)] if with_ft(a, job) else []
    return [sys.executable, str(code / "nuteprune.py"), "--ckpt", str(p["model"]), "--data", str(p["c4"]),
            "--target", str(job.target), "--out", str(run), "--overwrite", "--seed", str(job.seed), *train_flags(a),
            "--micro-batch-size", str(a.batch_size), "--max-steps", str(a.steps), "--epochs", "7",
            "--lr-mask", str(a.lr_mask), "--lr-lambda", str(a.lr_lambda), "--layer-weight", str(a.layer_weight),
            "--eval-every", str(a.eval_every),
            "--log-every", "1", "--save-every", "10", "--device", "cpu", "--dtype", "fp32",
            "--cache-dir", str(Path(a.out) / "cache"), *(["--distill", "kd"] if job.method == "kd" else []),
            *(["--keep-hidden"] if job.method == "pkd-kh" else []), *ft]


def baseline_cmd(a: argparse.Namespace, job: Job, run: Path) -> list[str]:
    p = paths(a)
    return [sys.executable, str(pkd.code_dir(a) / "experiments" / "baselines.py"), "--ckpt", str(p["model"]),
            "--data", str(p["c4"]), "--method", job.method, "--target", str(job.target), "--seed", str(job.seed),
            "--steps", str(a.steps), *train_flags(a), "--lr", "1e-3", "--lora-rank", "8",
            "--lora-targets", "q_proj,v_proj", "--out", str(run), "--save-every", "10",
            "--cache-dir", str(Path(a.out) / "cache"), "--scores", str(Path(a.out) / f"scores-{job.method}.pt")]


def eval_cmds(a: argparse.Namespace, model: Path, prefix: str, full: bool = False) -> list[tuple[str, list, str]]:
    """(kind, evaluate.py command, its JSON) for a model: perplexity, then the zero-shot tasks; full: the dense
    model's check of --limit (PTB and the cheaper tasks, every item)."""
    dense = paths(a)["model"]  # a GGUF's tokenizer for every model: the same token ids in every row
    tok = ["--tokenizer", str(dense)] if dense.suffix == ".gguf" else []
    base = [sys.executable, str(pkd.code_dir(a) / "evaluate.py"), "--ckpt", str(model), *tok, "--data-dir",
            str(a.data_dir), "--device", "cpu", "--dtype", "fp32", "--batch-size", "8"]
    ppl_limit = [] if full or not a.ppl_windows else ["--limit", str(a.ppl_windows)]
    zs_limit = [] if full or not a.limit else ["--limit", str(a.limit)]
    return [("ppl", base + ["--tasks", "ptb" if full else "wikitext2,ptb", "--seq-len", str(a.seq_len), *ppl_limit,
                            "--json", f"{prefix}-ppl.json"], f"{prefix}-ppl.json"),
            ("zs", base + ["--tasks", ",".join(FULL_CHECK if full else ZERO_SHOT), "--harness", "fixed", *zs_limit,
                           "--json", f"{prefix}-zs.json"], f"{prefix}-zs.json")]

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
    status, usage, termed = pkd.supervise(ctx, cmd, run, REUSE)
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
    if not run_cmd(ctx, run, "train", nuteprune_cmd(a, job, run), run / "report.json"):
        return None
    if not with_ft(a, job):
        return [(job.name, run / "pruned")]
    if not export_before_ft(ctx, run):
        return None
    return [(job.name, run / "pruned-noft"), (job.name + "+ft", run / "pruned")]


def export_before_ft(ctx: pkd.Ctx, run: Path) -> bool:
    """RUN/pruned-noft: the run's model before post fine-tuning, exported as nuteprune.py exports a run without
    --ft-data (base + the pruning LoRA, state.pt's "lora", under the final masks), and its held-out perplexity on
    the run's own held-out blocks (RUN/noft.json)."""
    if (run / "noft.json").is_file():
        return True
    if ctx.late():
        ctx.stopped = True
        return False
    import checkpoint
    import data
    import evaluate
    import llama
    import nuteprune
    import runfolder
    t0, c0 = time.time(), time.process_time()
    state = runfolder.load_state(run)
    c = nuteprune.RunConfig.from_dict(state["config"])
    model, tok = checkpoint.load(c.ckpt, c.tokenizer)
    nuteprune.attach_lora(model, c)
    llama.load_lora_state(model, state["lora"])
    checkpoint.export_pruned(model.eval(), llama.Masks(**state["final_masks"]), run / "pruned-noft", tok)
    heldout = data.calibration_blocks(c.data, tok, c.n_docs, c.block_size, c.cache_dir)[-c.heldout_blocks:]
    ppl = evaluate.heldout_ppl(checkpoint.load_model(run / "pruned-noft"), heldout, c.micro_batch_size)
    add_time(run, {"what": "export", "cmd": ["(in experiments/smollm2.py) export_before_ft"], "exit": 0,
                   "wall_s": time.time() - t0, "cpu_s": time.process_time() - c0,
                   "code": pkd.code_id(ctx.a, CODE_FILES)})
    pkd.write_json(run / "noft.json", {"ppl_after": ppl, "steps": state["step"]})
    return True


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
    rep = json.loads((run / "report.json").read_text())
    if row.endswith("+ft") or not with_ft(a, job):
        return rep
    return {**rep, **json.loads((run / "noft.json").read_text()), "ft_steps": 0}  # the model before fine-tuning


def tokens_seen(rep: dict) -> int:
    if "tokens" in rep:  # baselines.py
        return rep["tokens"]
    args = rep.get("args", {})
    return rep.get("steps", 0) * args.get("batch_size", 0) * args.get("block_size", 0)


def row_record(a: argparse.Namespace, job: Job, run: Path, row: str, evals: dict) -> dict:
    rep, times = job_report(a, job, run, row), read_times(run)
    ft = row.endswith("+ft")
    trained = [t for t in times if t["what"] in ("train", "export")]
    evaluated = [t for t in times if t["what"].startswith(f"eval {row} ")]
    rec = {"row": row, "job": job.name, "kind": job.kind, "method": job.method + ("+ft" if ft else ""),
           "target": job.target, "seed": job.seed, "sparsity": rep["sparsity"],
           "sparsity_total": rep.get("sparsity_total"), "params": rep["params_pruned"],
           "params_dense": rep["params_dense"], "warning": rep.get("warning"),
           "expected_sparsity_at_end": rep.get("expected_sparsity_at_end"),
           "trained_masks_sparsity": rep.get("trained_masks_sparsity"), "steps": rep.get("steps", 0),
           "ft_steps": rep.get("ft_steps", 0) if ft else 0, "tokens_seen": tokens_seen(rep),
           "ft_examples_seen": rep.get("ft_steps", 0) * rep.get("args", {}).get("ft_batch_size", 0) if ft else 0,
           "score_tokens": rep.get("score_tokens", 0),
           "heldout_ppl": {"dense": rep.get("ppl_before"), "oneshot": rep.get("ppl_oneshot"),
                           "after": rep.get("ppl_after")},
           "metrics": metrics(evals), "train_time": time_sums(trained), "eval_time": time_sums(evaluated),
           "commands": [" ".join(t["cmd"]) for t in trained + evaluated],
           "code": list({json.dumps(t.get("code"), sort_keys=True): t.get("code") for t in trained + evaluated}
                        .values())}
    if job.kind == "nuteprune" and (run / "log.jsonl").is_file():
        rec["log"] = pkd.summarize_log(pkd.read_log(run / "log.jsonl"))
    return rec

# -----------------------------------------------------------------------------
# the budget plan: measured costs (CPU seconds on the shared 2-core machine while other jobs ran, one thread; upper
# bounds) and what they imply for the grid's flags

MEASURED = {
    "prune_step_s": 8.9,  # nuteprune.prune_step, pkd + layer loss, 4 x 128 tokens (bench/prune_flops.py, CPU time)
    "lora_step_s": {0.5: 3.1, 0.2: 5.1},  # baselines.finetune, 4 x 128 tokens, on the magnitude-pruned model
    "taylor_scores_s": 170.0,  # baselines.unit_scores_taylor on 128 blocks of 128 tokens (once: cached per method)
    "zs_tokens_s": 180.0,  # evaluate.py zero-shot on the dense model, positions per CPU second
    "ppl_tokens_s": 215.0,  # evaluate.py perplexity on the dense model
    "load_s": 15.0,  # a process start: torch, the GGUF dequantised, the tokenizer
    "ft_step_s": 7.0,  # post fine-tuning step, 4 Alpaca examples of <= 256 tokens: estimated, not measured
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
    scale = a.batch_size * a.block_size / 512  # the measurements are of 4 x 128-token steps
    if job.kind == "oneshot":
        taylor = MEASURED["taylor_scores_s"] if job.method == "taylor" and job.target == 0.5 else 0.0
        return a.steps * MEASURED["lora_step_s"][job.target] * scale + taylor + 2 * MEASURED["load_s"]
    if job.kind != "nuteprune":
        return 0.0
    snapshots = round(job.target / 0.01) if a.eval_every and job.method in ("pkd", "pkd-kh") else 0
    evals = (snapshots + a.steps // a.eval_every if a.eval_every else 0) * a.heldout_blocks * a.block_size
    ft = a.ft_steps * MEASURED["ft_step_s"] + MEASURED["load_s"] if with_ft(a, job) else 0.0
    return (a.steps * MEASURED["prune_step_s"] * scale + evals / MEASURED["ppl_tokens_s"] + ft
            + 3 * MEASURED["load_s"])


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
        tokens = a.steps * a.batch_size * a.block_size if job.kind in ("oneshot", "nuteprune") else 0
        got = results.get("job_cpu", {}).get(job.name)
        lines.append(f"| {job.name} | {tokens:,} | {est_t / 60:.0f} | {est_e / 60:.0f} | "
                     f"{'—' if got is None else f'{got / 60:.0f}'} |")
    lines.append(f"| **total** | | | **{total / 3600:.1f} CPU-hours** (budget 8) | "
                 f"{results.get('cpu_s', 0) / 3600:.2f} CPU-hours so far |")
    return lines

# -----------------------------------------------------------------------------
# tables: pure functions of the row records

COLUMNS = PPL_TASKS + ZERO_SHOT + ("average",)
TUNING = {"dense": "—", "magnitude": "LoRA after pruning", "taylor": "LoRA after pruning",
          "pkd": "LoRA while pruning", "kd": "LoRA while pruning", "pkd+ft": "+ post fine-tuning (Alpaca)",
          "pkd-kh": "LoRA while pruning"}
ORDER = ("dense", "magnitude", "taylor", "kd", "pkd", "pkd-kh", "pkd+ft")


def fmt(values: list[float], digits: int = 2) -> str:
    """Mean (± sample std over seeds, when more than one) at `digits` decimals; — for none."""
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def groups(rows: list[dict]) -> list[tuple[tuple, list[dict]]]:
    """Rows grouped by (target, method), in the table's order: ratio, then method."""
    out = {}
    for r in sorted(rows, key=lambda r: (r["target"], ORDER.index(r["method"]), r["seed"] or 0)):
        out.setdefault((r["target"], r["method"]), []).append(r)
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


def planned(a: argparse.Namespace) -> list[tuple[float, str]]:
    """(target, method) of every table row the grid makes, in the table's order."""
    keys = {(j.target, j.method + ("+ft" if r.endswith("+ft") else "")) for j in plan(a) for r in rows_of(a, j)}
    return sorted(keys, key=lambda k: (k[0], ORDER.index(k[1])))


def main_table(rows: list[dict], todo: list[tuple[float, str]] = ()) -> list[str]:
    """The paper's Table 1 shape: per ratio and method, perplexities, the seven tasks and their average. The dense
    model's C4 held-out perplexity is the one every run measured before pruning (the same blocks)."""
    dense_heldout = [v for r in rows if (v := r["heldout_ppl"]["dense"]) is not None][:1]
    head = ["Ratio", "Method", "Tuning", "Seeds", "Kept params", "Sparsity (target)"] + [
        HEADERS.get(c, "Average↑") for c in COLUMNS] + ["C4 held-out PPL", "Sparsity check"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    done = dict(groups(rows))
    for target, method in sorted(set(todo) | set(done), key=lambda k: (k[0], ORDER.index(k[1]))):
        rs = done.get((target, method))
        if rs is None:
            lines.append(f"| {round(target * 100)}% | {LABELS[method]} | {TUNING[method]} | pending |"
                         + " |" * (len(head) - 4))
            continue
        cells = [f"{round(target * 100)}%", LABELS[method], TUNING[method], ", ".join(
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


def verdicts(rows: list[dict]) -> list[str]:
    """Plain comparisons from the table: NutePrune PKD against the better one-shot + LoRA at each ratio (WikiText-2
    perplexity and average accuracy), and PKD against KD at 50% (judged against the seed std when there are two)."""
    by = {k: rs for k, rs in groups(rows)}
    out = []
    for t in (0.2, 0.5):
        p = by.get((t, "pkd"))
        base = [(m, by[(t, m)]) for m in ("magnitude", "taylor") if (t, m) in by]
        if not p or not base:
            continue
        mean = lambda rs, k: statistics.mean(r["metrics"][k] for r in rs if k in r["metrics"])  # noqa: E731
        best = min(base, key=lambda mb: mean(mb[1], "wikitext2"))
        beats = mean(p, "wikitext2") < mean(best[1], "wikitext2")
        out.append(f"{round(t * 100)}%: PKD WikiText-2 {mean(p, 'wikitext2'):.2f} vs the better one-shot + LoRA "
                   f"({best[0]}) {mean(best[1], 'wikitext2'):.2f}; average accuracy {mean(p, 'average'):.2f} vs "
                   f"{mean(best[1], 'average'):.2f}. NutePrune {'beats' if beats else 'does not beat'} the one-shot "
                   f"baselines on perplexity at equal tokens and steps.")
    p, k = by.get((0.5, "pkd")), by.get((0.5, "kd"))
    if p and k:
        pv, kv = [r["metrics"]["wikitext2"] for r in p], [r["metrics"]["wikitext2"] for r in k]
        std = max(statistics.stdev(pv) if len(pv) > 1 else 0.0, statistics.stdev(kv) if len(kv) > 1 else 0.0)
        seeds = "one seed each: no seed std to judge by" if min(len(pv), len(kv)) < 2 else (
            f"{'beyond' if abs(statistics.mean(pv) - statistics.mean(kv)) > std else 'within'} the larger seed std "
            f"{std:.2f}")
        out.append(f"50%: PKD WikiText-2 {fmt(pv)} vs KD {fmt(kv)} ({seeds}); average accuracy "
                   f"{fmt([r['metrics']['average'] for r in p])} vs {fmt([r['metrics']['average'] for r in k])}.")
    return out


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
    lines = ["| row | seed | steps | tokens seen | post-ft steps | sparsity (target) | expected / trained masks at "
             "the end | C4 held-out PPL dense → one-shot → final | train wall / CPU min | eval wall / CPU min |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["target"], ORDER.index(r["method"]), r["seed"] or 0)):
        h = r["heldout_ppl"]
        ppl = " → ".join("—" if v is None else f"{v:.2f}" for v in (h["dense"], h["oneshot"], h["after"]))
        fit = ("—" if r["expected_sparsity_at_end"] is None else
               f"{r['expected_sparsity_at_end']:.4f} / {r['trained_masks_sparsity']:.4f}")
        tr, ev = r["train_time"], r["eval_time"]
        lines.append(f"| {r['row']} | {r['seed'] if r['seed'] is not None else '—'} | {r['steps']} | "
                     f"{r['tokens_seen']:,} | {r['ft_steps']} | {r['sparsity']:.4f} ({r['target']:g}) | {fit} | {ppl} "
                     f"| {tr['wall_s'] / 60:.1f} / {tr['cpu_s'] / 60:.1f} | {ev['wall_s'] / 60:.1f} / "
                     f"{ev['cpu_s'] / 60:.1f} |")
    return lines


def commands_lines(rows: list[dict]) -> list[str]:
    lines = []
    for r in sorted(rows, key=lambda r: (r["target"], ORDER.index(r["method"]), r["seed"] or 0)):
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

# The pilots behind --lr-mask, --lr-lambda and --layer-weight (pkd, seed 0, run by hand with nuteprune.py before the
# grid: the grid's 300 steps and warm-up, but one block of 64 tokens per step, so that each took minutes; not rerun
# by this script).
PILOT = (
    "Learning rates and the layer loss, from pilots (pkd, seed 0, the grid's 300 steps and warm-up but one block of "
    "64 tokens per step, so that each took minutes; run by hand with nuteprune.py, not by this script). The paper's "
    "`--lr-mask 0.1 --lr-lambda 0.1` barely move the masks in a few hundred steps (experiments/pkd.py's stories260K "
    "pilot: expected sparsity 0.010 at step 323 of 1,022), so the masks get 1 / 1, as in experiments/pkd.py. "
    "**The layer loss.** With the paper's Eq. 8 at weight 0.9, at 50% the expected sparsity passed the target at "
    "step ~70 and kept rising: 0.59 at step 180 with lambda_1 at 122 (stopped there); with `--lr-lambda 10` it stayed "
    "at 0.59-0.60 from step 190 to 300 with lambda_1 at 2,288, the final masks were forced (9,775 FFN channels moved) "
    "and the held-out perplexity went from 126 to 99,970. SmolLM2's hidden states have massive activations (dim 507 "
    "reaches |h| = 22,695, the next ones 1,941 and 1,834; 8 of the 576 dims hold 98% of the squared norm), so Eq. "
    "8's MSE is 1e4-1e6 and dominated by those dims, and it counts only the dims where the student is non-zero: "
    "pruning a massive dim removes its error from the loss. Our reading: the layer loss pulls the masks toward more "
    "sparsity and toward the massive dims (3 of the top 8 were pruned). So every NutePrune run here uses "
    "`--layer-weight 0`, the logit KL of Eq. 7 alone (weight 0.1), for PKD and KD alike, so their comparison stays "
    "fair (the baselines have no distillation loss). **The rates, without the layer loss.** The expected sparsity "
    "oscillates about the target with a period of 100-150 steps and an amplitude of 4-6 pp in every setting tried, "
    "so whether the last step lands within the 2 pp the forced-target warning allows is partly a matter of phase. "
    "50%, `--lr-lambda 1`: 0.61 at step 130, 0.46 at step 180, 0.4987 at step 300 (trained masks 0.4989: no forced "
    "target); `--lr-lambda 5`: swings of ±5 pp, 0.508 at step 300. 20%, `--lr-lambda 1`: 0.244 at step 200, 0.157 "
    "at step 300 (forced target); the same with the warm-up of 50% (1 epoch of 7): 0.46 at step 60, 0.10 at step "
    "260 (stopped); `--lr-lambda 5`: 0.142 (forced); `--lr-mask 0.3`: 0.137 at step 180, 0.251 at step 260, 0.198 "
    "at step 300; two blocks a step with 1 / 1: 0.154 at step 200, 0.2007 at step 300 (trained masks 0.1985: no "
    "forced target). The grid uses `--lr-mask 1 --lr-lambda 1 --layer-weight 0` and the paper's warm-up; each of "
    "the grid's steps reads 8 times the pilots' tokens (512 against 64), so its gradients are less noisy; the "
    "grid's own fit (expected and trained-mask sparsity at the end) is in the table, flagged when off.")


def markdown(rows: list[dict], a: argparse.Namespace, info: dict) -> str:
    lines = intro_lines(a, info) + ["", "## Budget plan", ""] + plan_text(a) + budget_lines(a, info) + [""]
    lines += ["## Table 1 shape", "", f"Perplexity: WikiText-2 test and PTB validation, windows of {a.seq_len} tokens "
              f"({'the first ' + str(a.ppl_windows) + ' windows' if a.ppl_windows else 'every window'}). Accuracy "
              f"(%): acc for BoolQ, PIQA, WinoGrande, ARC-e; acc_norm for HellaSwag, ARC-c, OBQA (the paper's mix); "
              f"{'the first ' + str(a.limit) + ' items of each set' if a.limit else 'every item'}; mean ± sample std "
              f"where a row has two seeds (the others have one). C4 held-out PPL: the {a.heldout_blocks} blocks of "
              f"{a.block_size} tokens every run holds out of the calibration file. Sparsity check: exported prunable "
              f"sparsity within 0.5 pp of the target and no forced-target warning, or what went wrong.", ""]
    lines += main_table(rows, planned(a)) + [""] + [f"- {v}" for v in verdicts(rows)]
    lines += ["", "![](smollm2.png)", ""] if rows else [""]
    lines += ["## The dense model beside its authors' numbers", ""] + authors_lines(rows, info.get("full"), a)
    lines += ["", "## --limit against the full sets (dense model)", ""] + limit_lines(rows, info.get("full"), a)
    lines += ["", "## Every run", ""] + runs_lines(rows) + ["", "Commands:", ""] + commands_lines(rows)
    lines += ["", "## Code", ""] + code_lines(rows, info) + ["", "## Closing note", ""] + closing_lines(rows, info)
    return "\n".join(lines) + "\n"


def intro_lines(a: argparse.Namespace, info: dict) -> list[str]:
    cal = info.get("calibration", {})
    tokens = a.steps * a.batch_size * a.block_size
    return ["# SmolLM2-135M-Instruct pruned to 20% and 50%: NutePrune against one-shot baselines (issue 19)", "",
            (f"Generated by `python experiments/smollm2.py {' '.join(info['argv'])}`." if info.get("ran") else
             "Nothing has run yet: this is the plan. The grid: `python experiments/smollm2.py --out runs/smollm2`."),
            "",
            "Model: SmolLM2-135M-Instruct (30 layers, hidden 576, 9 query / 3 K/V heads, FFN 1536, vocabulary 49,152, "
            "tied embeddings; 134.5M parameters, 106.2M of them prunable), the Q4_1 GGUF in shared/models "
            "dequantised to fp32: the dense row is that model, not the original bf16 one.",
            "",
            f"Calibration, one set for every row: the first 1,000 documents of C4 en shard 00000, "
            f"{cal.get('blocks', 0):,} blocks of {a.block_size} tokens ({cal.get('tokens', 0):,} tokens), the last "
            f"{a.heldout_blocks} held out. Every pruned model saw {tokens:,} calibration tokens ({a.steps} steps of "
            f"{a.batch_size} × {a.block_size}; {tokens / PAPER_TOKENS:.2%} of the paper's 7 epochs of 20k × 512 = "
            f"{PAPER_TOKENS / 1e6:.1f}M tokens): NutePrune while pruning (masks and LoRA together), the one-shot "
            f"baselines in their LoRA phase (Taylor's scores also read 128 blocks once).",
            "",
            f"NutePrune runs: `nuteprune.py --target T --block-size {a.block_size} --batch-size {a.batch_size} "
            f"--micro-batch-size {a.batch_size} --max-steps {a.steps} --epochs 7 --lr-mask {a.lr_mask:g} --lr-lambda "
            f"{a.lr_lambda:g} --layer-weight {a.layer_weight:g}"
            f"{'' if a.warmup_epochs is None else f' --warmup-epochs {a.warmup_epochs:g}'} --heldout-blocks "
            f"{a.heldout_blocks} --eval-every {a.eval_every}` (+ `--distill kd`); everything else is the paper's "
            f"recipe (gap 10%, interval 1%, KD temperature 2/3, KD weight 0.1, LoRA rank 8 on q, v at 1e-3, "
            + ("warm-up 1 of 7 epochs at 50% and 4 of 7 at 20%" if a.warmup_epochs is None else
               f"warm-up {a.warmup_epochs:g} of 7 epochs at both targets (the paper: 1 at 50%, 4 at 20%)")
            + ", scaled to the steps). "
            f"Post fine-tuning (PKD 20% only): {a.ft_steps} steps of {a.ft_batch_size} Stanford-Alpaca examples of "
            f"at most {a.ft_max_len} tokens (alpaca_data_first200.json: the first 200 of the 52k), LoRA on every "
            f"projection at 1e-4; its model before fine-tuning is the PKD 20% row.",
            "",
            f"Baselines (`experiments/baselines.py`): the same structures (query heads, FFN channels, hidden dims) "
            f"pruned one-shot to the target, a uniform keep fraction per layer; magnitude = L2 norm of the unit's "
            f"weights, Taylor = |dL/dz| at z = 1 summed over 128 calibration blocks (first-order |w · grad| per "
            f"unit); then LoRA rank 8 on q, v of the pruned model, next-token loss, lr 1e-3 decaying to 0, for the "
            f"same {a.steps} steps of {a.batch_size} blocks (sampled with replacement; NutePrune reads them in epoch "
            f"order)."]


def plan_text(a: argparse.Namespace) -> list[str]:
    m = MEASURED
    return [f"Measured on this (shared, busy) 2-core machine, one thread, CPU seconds, so upper bounds: a "
            f"`nuteprune.prune_step` (PKD with the layer loss; the grid's, without it, costs a little less) on 4 × "
            f"128 tokens takes {m['prune_step_s']:.1f} s (bench/prune_flops.py; about 58 tokens/s, 0.81 GFLOP a "
            f"token); a baseline LoRA step on the same tokens {m['lora_step_s'][0.5]:.1f} s at 50% and "
            f"{m['lora_step_s'][0.2]:.1f} s at 20%; Taylor scores {m['taylor_scores_s']:.0f} s once; the "
            f"evaluator {m['zs_tokens_s']:.0f} positions/s (zero-shot) and {m['ppl_tokens_s']:.0f} tokens/s "
            f"(perplexity) on the dense model. The full zero-shot sets are 2.6M positions (HellaSwag 1.8M): about "
            f"4 CPU-hours per model, hence --limit.", "",
            f"The grid must fit about 8 CPU-hours, so: {a.steps} steps of {a.batch_size} × {a.block_size} tokens "
            f"(the paper: 512-token blocks, batch 16), {a.limit} items per zero-shot task, {a.ppl_windows} "
            f"perplexity windows, "
            f"{'no second seed' if not a.extra_seeds else 'a second seed for PKD and KD at 50% last'}.",
            "", PILOT, ""]


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
    p.add_argument("--lr-lambda", type=float, default=1.0, help="lambda learning rate (paper 0.1; see results.md)")
    p.add_argument("--layer-weight", type=float, default=0.0, help="weight of the layer loss, Eq. 8 (paper 0.9; see "
                   "results.md: on SmolLM2 it prunes the massive-activation dims)")
    p.add_argument("--warmup-epochs", type=float, default=None, help="target warm-up in epochs of 7 (default: the "
                   "paper's, 4 at 20%%, 1 at 50%%; see results.md)")
    p.add_argument("--eval-every", type=int, default=100, help="student perplexity every N steps and each snapshot's "
                   "(nuteprune.py --eval-every; 0: none)")
    p.add_argument("--ft-steps", type=int, default=50, help="post fine-tuning steps of PKD 20%%")
    p.add_argument("--ft-batch-size", type=int, default=4)
    p.add_argument("--ft-max-len", type=int, default=256)
    p.add_argument("--no-ft", action="store_true", help="no post fine-tuning (and no PKD 20%% + ft row)")
    p.add_argument("--limit", type=int, default=100, help="first N items of every zero-shot task (0: all)")
    p.add_argument("--ppl-windows", type=int, default=128, help="first N perplexity windows (0: all)")
    p.add_argument("--seq-len", type=int, default=128, help="perplexity window (LLM-Pruner's tables: 128)")
    p.add_argument("--extra-seeds", default="1", help="seeds of the second PKD and KD 50%% runs, last ('' none)")
    p.add_argument("--budget-min", type=float, default=0, help="stop (SIGTERM the running job, which checkpoints) "
                   "after this many minutes; 0: no limit")
    p.add_argument("--code", default=None, help="run nuteprune.py, baselines.py and evaluate.py from this copy of "
                   "the project (see experiments/pkd.py --code) instead of the working tree")
    p.add_argument("--no-plots", action="store_true", help="skip the figure (no matplotlib needed)")
    p.add_argument("--report-only", action="store_true", help="run nothing; regenerate the report and figure")
    p.add_argument("--only", default="", help="comma-separated job names: run only these, in this order (the rest "
                   "are reported as they stand), e.g. to run two workers side by side with one thread each")
    return p


POSITIVE = ("steps", "batch_size", "block_size", "ft_steps", "ft_batch_size", "ft_max_len", "seq_len")


def parse_args(argv=None) -> argparse.Namespace:
    a = build_parser().parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        a.extra_seeds = [int(s) for s in a.extra_seeds.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--extra-seeds must be comma-separated integers, got {a.extra_seeds!r}") from None
    a.only = [j for j in a.only.split(",") if j.strip()]
    names = [j.name for j in plan(a)]
    if unknown := [j for j in a.only if j not in names]:
        raise ValueError(f"--only: no job named {', '.join(unknown)}; the jobs are {', '.join(names)}")
    if 0 in a.extra_seeds:
        raise ValueError("--extra-seeds: seed 0 is every job's first seed; give others")
    for name in POSITIVE:
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    if a.warmup_epochs is not None and not 0 <= a.warmup_epochs <= 7:
        raise ValueError(f"--warmup-epochs must lie in [0, 7] (of the 7 epochs), got {a.warmup_epochs}")
    for name in ("limit", "ppl_windows", "eval_every", "heldout_blocks", "budget_min"):
        if getattr(a, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 0, got {getattr(a, name)}")
    return a


CONFIG_KEYS = ("model", "steps", "batch_size", "block_size", "heldout_blocks", "lr_mask", "lr_lambda", "layer_weight",
               "warmup_epochs", "eval_every", "ft_steps", "ft_batch_size", "ft_max_len", "no_ft", "limit",
               "ppl_windows", "seq_len")


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
    for (target, method), rs in groups(rows):
        m = [r["metrics"] for r in rs]
        mean = lambda k: statistics.mean(x[k] for x in m) if all(k in x for x in m) else None  # noqa: E731
        series.setdefault(LABELS[method], []).append(
            (statistics.mean(r["params"] for r in rs) / 1e6, mean("average"), mean("wikitext2")))
    plots.plot_methods(series, path, "SmolLM2-135M-Instruct: pruned to 20% and 50% (experiments/smollm2.py)")


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
