"""lm-evaluation-harness 0.4 against evaluate.py, item by item, on one exported Hugging Face folder.

    python experiments/lmeval_parity.py MODEL_DIR [--tasks boolq,piqa,...] [--limit 100] [--out runs/lmeval-parity/NAME]
                                        [--lm-eval-python PYTHON] [--model-args add_bos_token=False] [--json FILE]

MODEL_DIR is what `export.py CKPT --hf DIR` or a run's `pruned/` holds: a plain Llama folder, or a pruned one with
its transformers code (loaded with trust_remote_code). lm_eval runs offline (--model hf, float32, CPU, batch 1,
--log_samples) on the task files of experiments/lmeval_tasks/, lm-eval's own piqa, arc_easy, arc_challenge,
hellaswag, boolq, winogrande and openbookqa on ../shared/data/tasks/*.jsonl; evaluate.py's scorer (--harness fixed,
float32) runs here on the same first --limit items. Per task: acc and acc_norm from both, the items whose prompt,
gold, or chosen answer (acc, acc_norm) differ, and the largest log-likelihood difference; each differing item is
listed with both sets of log-likelihoods. lm_eval runs as installed: with a tokenizer that adds BOS (LLaMA's) it puts
BOS before every context, which evaluate.py (the paper's v0.3 protocol) does not; --model-args add_bos_token=False
compares like with like (docs/evaluation.md). lm-eval is an optional dependency (`pip install "lm-eval[hf]>=0.4,<0.5"`),
in this interpreter or another one (--lm-eval-python).
"""
from __future__ import annotations

import argparse
import ast
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cli  # noqa: E402
import evaluate  # noqa: E402

TASKS_DIR = ROOT / "experiments" / "lmeval_tasks"
DEFAULT_DATA = ROOT.parent / "shared" / "data"
VERSIONS = ("import json, lm_eval, torch, transformers; print(json.dumps({'lm_eval': lm_eval.__version__, "
            "'transformers': transformers.__version__, 'torch': torch.__version__}))")
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def rel(path) -> str:
    # as results record paths: relative to the repository (../shared/... beside it), never this machine's
    return os.path.relpath(Path(path).resolve(), ROOT)

# -----------------------------------------------------------------------------
# the task files, read as lm-eval reads them (jinja templates; `!function` names a function beside the file)


class Function(str):
    pass


def _read_yaml(path: Path) -> dict:
    import yaml  # transformers' dependency; lm-eval's too

    class Loader(yaml.SafeLoader):
        pass
    Loader.add_constructor("!function", lambda loader, node: Function(loader.construct_scalar(node)))
    return yaml.load(path.read_text(), Loader=Loader)


def task_config(task: str, folder: Path = TASKS_DIR) -> dict:
    cfg = _read_yaml(folder / f"{task}.yaml")
    if "include" in cfg:  # lm-eval's include: the included file's keys, overridden by this file's
        cfg = {**_read_yaml(folder / cfg.pop("include")), **cfg}
    return cfg


def _field(spec, doc: dict):
    # lm-eval's rules for doc_to_text / doc_to_target / doc_to_choice: a column name, a jinja template (a rendered
    # list or integer is parsed as Python), or a literal list
    if isinstance(spec, list):
        return spec
    if spec in doc:
        return doc[spec]
    import jinja2
    env = jinja2.Environment(loader=jinja2.BaseLoader, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    out = env.from_string(spec).render(**doc)
    return ast.literal_eval(out) if out.startswith("[") or out.isdigit() else out


def render(cfg: dict, doc: dict) -> tuple[list[str], list[str], int]:
    """(context per choice, continuation per choice, gold) of one item as the task file asks lm-eval to score it;
    template tasks only (a `!function` needs lm-eval itself)."""
    if any(isinstance(cfg.get(k), Function) for k in ("process_docs", "doc_to_text", "doc_to_choice")):
        raise ValueError(f"{cfg['task']}: its prompt is an lm-eval function; only lm-eval renders it")
    text, choices = _field(cfg["doc_to_text"], doc), _field(cfg["doc_to_choice"], doc)
    gold = int(_field(cfg["doc_to_target"], doc))
    delim = cfg.get("target_delimiter", " ")
    return [text] * len(choices), [delim + c for c in choices], gold


def data_file(cfg: dict) -> str:
    (path,) = cfg["dataset_kwargs"]["data_files"].values()
    return path

# -----------------------------------------------------------------------------
# the two evaluators


def task_folder(a: argparse.Namespace, out: Path) -> Path:
    """The shipped task files; copies naming --data-dir's files when it is not ../shared/data."""
    if Path(a.data_dir).resolve() == DEFAULT_DATA.resolve():
        return TASKS_DIR
    folder = out / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    for f in TASKS_DIR.iterdir():
        text = f.read_text()
        if f.suffix == ".yaml":
            text = text.replace("../shared/data/", str(Path(a.data_dir).resolve()) + "/")
        (folder / f.name).write_text(text)
    return folder


def lm_eval_cmd(a: argparse.Namespace, tasks: list[str], folder: Path, out: Path) -> list[str]:
    # paths relative to the repository, where lm_eval runs: the command is recorded as it ran
    model_args = f"pretrained={rel(a.model)},trust_remote_code=True,dtype=float32" + (f",{a.model_args}"
                                                                                      if a.model_args else "")
    return ["python", "-m", "lm_eval", "--model", "hf", "--model_args", model_args, "--tasks",
            ",".join(f"{t}_offline" for t in tasks), "--include_path", rel(folder), "--limit", str(a.limit),
            "--batch_size", "1", "--device", "cpu", "--log_samples", "--output_path", rel(out / "lm_eval")]


def run_lm_eval(a: argparse.Namespace, tasks: list[str], out: Path) -> dict:
    """{task: [sample, ...] in document order} from lm_eval's --log_samples files, and its versions."""
    cmd = [a.lm_eval_python, *lm_eval_cmd(a, tasks, task_folder(a, out), out)[1:]]
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(out / "lm_eval.log", "w") as log:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code:
        raise RuntimeError(f"lm_eval failed (exit {code}); see {out / 'lm_eval.log'}")
    samples = {}
    for t in tasks:
        files = sorted(glob.glob(str(out / "lm_eval" / "**" / f"samples_{t}_offline_*.jsonl"), recursive=True),
                       key=os.path.getmtime)
        rows = [json.loads(line) for line in open(files[-1])]
        samples[t] = sorted(rows, key=lambda r: r["doc_id"])
    versions = subprocess.run([a.lm_eval_python, "-c", VERSIONS], capture_output=True, text=True, check=True).stdout
    return {"samples": samples, "versions": json.loads(versions)}


def run_ours(a: argparse.Namespace, tasks: list[str]) -> dict:
    """{task: (requests, scores)}: evaluate.py --harness fixed on the first --limit items, float32, CPU."""
    import torch
    model, _, tok, _ = evaluate.load_for_eval(a.model, device="cpu", dtype=torch.float32)
    out = {}
    for t in tasks:
        items = evaluate.read_jsonl(Path(a.data_dir) / "tasks" / f"{t}.jsonl", a.limit)
        reqs = evaluate.task_requests(t, items, tok, "fixed", model.config.max_seq_len)
        out[t] = (reqs, evaluate.score_requests(model, reqs, a.batch_size))
    return out

# -----------------------------------------------------------------------------
# the comparison


def lm_eval_item(sample: dict) -> tuple[list[tuple[str, str]], list[float]]:
    """(context, continuation) per choice and the log-likelihoods lm-eval scored, from one logged sample."""
    pairs = [(x["arg_0"], x["arg_1"]) for x in sample["arguments"].values()]
    return pairs, [float(r[0][0]) for r in sample["resps"]]


def compare_task(task: str, samples: list[dict], reqs: list, scores: list[list[float]]) -> dict:
    ours_m = evaluate.metrics(reqs, scores)
    rec = {"items": len(reqs), "lm_eval": {}, "evaluate": ours_m, "prompt_differs": 0, "gold_differs": 0,
           "acc_choice_differs": 0, "acc_norm_choice_differs": 0, "max_abs_loglik_diff": 0.0, "differing": []}
    if len(samples) != len(reqs):
        raise ValueError(f"{task}: lm-eval scored {len(samples)} items, evaluate.py {len(reqs)}")
    for m in ours_m:
        rec["lm_eval"][m] = sum(float(s[m]) for s in samples) / len(samples)
    for s, r, ours in zip(samples, reqs, scores):
        pairs, theirs = lm_eval_item(s)
        prompt = pairs != list(zip(r.doc.contexts, r.doc.continuations))
        picks = {"acc": (evaluate._argmax(theirs), evaluate._argmax(ours))}
        if r.doc.choices is not None:
            norm = [len(c) for c in r.doc.choices]
            picks["acc_norm"] = (evaluate._argmax([x / n for x, n in zip(theirs, norm)]),
                                 evaluate._argmax([x / n for x, n in zip(ours, norm)]))
        # lm-eval logs no gold index for WinoGrande (its target is the scored text), so its gold is checked through
        # its own per-item score: right under evaluate.py's gold exactly when lm-eval marked it right
        gold = any(float(s[m]) != float(x == r.doc.gold) for m, (x, _) in picks.items())
        moved = [m for m, (x, y) in picks.items() if x != y]
        rec["prompt_differs"] += prompt
        rec["gold_differs"] += gold
        rec["max_abs_loglik_diff"] = max(rec["max_abs_loglik_diff"], *(abs(x - y) for x, y in zip(theirs, ours)))
        for m in moved:
            rec[f"{m}_choice_differs"] += 1
        if prompt or moved or gold:
            rec["differing"].append({"doc_id": s["doc_id"], "prompt_differs": prompt, "gold_differs": gold,
                                     "choice_differs": moved, "lm_eval": theirs, "evaluate": ours})
    return rec


def table(results: dict) -> str:
    pct = lambda r, m: f"{100 * r[m]:.1f}" if m in r else "-"  # noqa: E731
    lines = ["| task | items | lm-eval acc | evaluate.py acc | lm-eval acc_norm | evaluate.py acc_norm | "
             "choice differs (acc / acc_norm) | prompt / gold differs | max abs log-lik diff |", "|---" * 9 + "|"]
    for t, r in results.items():
        le, ev = r["lm_eval"], r["evaluate"]
        norm = r["acc_norm_choice_differs"] if "acc_norm" in ev else "-"
        lines.append(f"| {t} | {r['items']} | {pct(le, 'acc')} | {pct(ev, 'acc')} | {pct(le, 'acc_norm')} | "
                     f"{pct(ev, 'acc_norm')} | {r['acc_choice_differs']} / {norm} | {r['prompt_differs']} / "
                     f"{r['gold_differs']} | {r['max_abs_loglik_diff']:.1e} |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# the command


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="an exported Hugging Face folder (export.py --hf, or a run's pruned/)")
    p.add_argument("--tasks", default=",".join(evaluate.ZERO_SHOT), help="comma-separated, from "
                   + ",".join(evaluate.ZERO_SHOT))
    p.add_argument("--limit", type=int, default=100, help="the first N items of each task")
    p.add_argument("--data-dir", default=os.environ.get("NUTEPRUNE_DATA", str(DEFAULT_DATA)),
                   help="folder with tasks/<task>.jsonl")
    p.add_argument("--out", help="lm_eval's output, its log and parity.json (default: under runs/lmeval-parity/)")
    p.add_argument("--lm-eval-python", default=sys.executable, help="the interpreter that has lm-eval installed")
    p.add_argument("--model-args", default="", help="more lm_eval --model_args, e.g. add_bos_token=False")
    p.add_argument("--batch-size", type=int, default=8, help="evaluate.py's scoring batch")
    p.add_argument("--json", help="also write the summary (per task, without per-item lists) here")
    return p


def check_args(a: argparse.Namespace) -> list[str]:
    tasks = [t for t in a.tasks.split(",") if t]
    bad = [t for t in tasks if t not in evaluate.ZERO_SHOT]
    if bad or not tasks:
        raise ValueError(f"--tasks {a.tasks}: valid tasks are {', '.join(evaluate.ZERO_SHOT)}")
    if not (Path(a.model) / "config.json").is_file():
        raise ValueError(f"{a.model} holds no config.json: give an exported folder (python export.py CKPT --hf DIR)")
    for t in tasks:
        if not (Path(a.data_dir) / "tasks" / f"{t}.jsonl").is_file():
            raise FileNotFoundError(f"{Path(a.data_dir) / 'tasks' / f'{t}.jsonl'} does not exist (--data-dir)")
    if a.limit < 1:
        raise ValueError(f"--limit {a.limit}: must be at least 1")
    if subprocess.run([a.lm_eval_python, "-c", "import lm_eval"], capture_output=True).returncode:
        raise ValueError(f"{a.lm_eval_python} cannot import lm_eval: pip install \"lm-eval>=0.4,<0.5\" (or give "
                         f"--lm-eval-python with the interpreter that has it)")
    return tasks


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        tasks = check_args(a)
        name = "-".join(x for x in Path(rel(a.model)).parts if x not in ("..", "runs"))  # runs/x/hf -> x-hf
        out = Path(a.out or Path("runs") / "lmeval-parity" / name)
        out.mkdir(parents=True, exist_ok=True)
        theirs = run_lm_eval(a, tasks, out)
        ours = run_ours(a, tasks)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = {t: compare_task(t, theirs["samples"][t], *ours[t]) for t in tasks}
    summary = {"command": ["python", "experiments/lmeval_parity.py", rel(a.model), "--limit", str(a.limit),
                           "--tasks", ",".join(tasks)] + (["--model-args", a.model_args] if a.model_args else []),
               "lm_eval_command": lm_eval_cmd(a, tasks, task_folder(a, out), out),
               "versions": theirs["versions"],
               "tasks": {t: {k: v for k, v in r.items() if k != "differing"} for t, r in results.items()}}
    (out / "parity.json").write_text(json.dumps({**summary, "tasks": results}, indent=1) + "\n")
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=1) + "\n")
    print(table(results))
    for t, r in results.items():
        for d in r["differing"]:
            print(f"{t} item {d['doc_id']}: {', '.join(d['choice_differs']) or 'prompt'} differs; lm-eval "
                  f"{[round(x, 4) for x in d['lm_eval']]}, evaluate.py {[round(x, 4) for x in d['evaluate']]}")
    print(f"per item: {out / 'parity.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
