"""Evaluate a model with the protocols behind the paper's tables (METHOD.md §9).

    python evaluate.py --ckpt PATH [--tokenizer PATH] --data-dir DIR [--tasks wikitext2,ptb,boolq,...,mmlu]
                       [--seq-len 128] [--harness fixed|legacy] [--limit N] [--json OUT]

- perplexity: LLM-Pruner's protocol (WikiText-2 raw test, PTB validation; rows joined with "\\n\\n", one BOS at the
  start, non-overlapping windows of --seq-len, PPL = exp(mean token cross-entropy));
- zero-shot BoolQ, PIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OpenBookQA: lm-evaluation-harness v0.3 prompts and
  metrics (no BOS; score = summed log-prob of the continuation; acc, and acc_norm = argmax of score / characters),
  with the continuation tokenised in context ("fixed", harness PR #531 and v0.4) or separately ("legacy", the
  tokenisation behind the paper's Table 1 and LLM-Pruner's tables);
- MMLU 5-shot in the format of Hendrycks et al.; the answer is the letter with the highest log-probability.

--ckpt is anything checkpoint.load reads (HF / Meta directory, llama2.c .bin, an exported pruned model) or a nuteprune
output directory (state.pt or report.json inside), evaluated through its exported pruned/ model.

Scoring shares work: the tokens every choice of an item has in common are run once, into a KV cache, and only the
choice-specific suffixes are run, batched across items and choices (bench/eval_throughput.py measures the gain).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import checkpoint
import cli
import data
import hub
import llama

ZERO_SHOT = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
PPL_TASKS = ("wikitext2", "ptb")
ALL_TASKS = PPL_TASKS + ZERO_SHOT + ("mmlu",)
# The metric each task contributes to the paper's average (LLM-Pruner's mix, METHOD.md §9).
PAPER_METRIC = {"boolq": "acc", "piqa": "acc", "hellaswag": "acc_norm", "winogrande": "acc", "arc_easy": "acc",
                "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}
HEADERS = {"wikitext2": "WikiText2", "ptb": "PTB", "boolq": "BoolQ", "piqa": "PIQA", "hellaswag": "HellaSwag",
           "winogrande": "WinoGrande", "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "openbookqa": "OBQA",
           "mmlu": "MMLU"}


def default_paths(data_dir) -> dict[str, Path]:
    d = Path(data_dir)
    paths = {t: d / "tasks" / f"{t}.jsonl" for t in ZERO_SHOT}
    paths.update(wikitext2=d / "wikitext2" / "wiki.test.raw", ptb=d / "ptb" / "ptb.valid.txt",
                 mmlu_dev=d / "tasks" / "mmlu_dev.jsonl", mmlu_test=d / "tasks" / "mmlu_test.jsonl")
    return paths


def read_jsonl(path, limit: int | None = None) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"task file {p} does not exist (give --data-dir or --path TASK=FILE)")
    items = []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(items) >= limit:
                break
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}:{lineno}: not a JSON line ({e.msg})") from None
    if not items:
        raise ValueError(f"task file {p} holds no items")
    return items


# -----------------------------------------------------------------------------
# perplexity (METHOD.md §9, LLM-Pruner's ppl_dataset.py + PPLMetric); the one perplexity loop of the project


@torch.no_grad()
def heldout_ppl(model, blocks: torch.Tensor, batch_size: int, masks=None, autocast=nullcontext) -> float | None:
    """exp(mean next-token cross-entropy) over held-out blocks (N, T); None without any."""
    return math.exp(mean_nll(model, blocks, batch_size, masks, autocast=autocast)) if len(blocks) else None


def mean_nll(model, windows: torch.Tensor, batch_size: int, masks=None, autocast=nullcontext,
             bar: cli.Progress | None = None) -> float:
    """Mean next-token cross-entropy over windows (N, T); a window's first token is context only."""
    device = model.lm_head.weight.device
    nll, count = 0.0, 0
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        with autocast():
            logits = model(batch, masks)  # (B, T, V)
        nll += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
        if bar is not None:
            bar.advance(len(batch))
    return nll / max(count, 1)


def windows(ids, seq_len: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping windows (N, seq_len) of a token stream, the remainder dropped."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    n = len(ids) // seq_len if limit is None else min(len(ids) // seq_len, limit)
    if n == 0:
        raise ValueError(f"text of {len(ids)} tokens is shorter than one window of seq_len={seq_len}")
    return ids[:n * seq_len].view(n, seq_len)


def perplexity(model, tokenizer, text: str, seq_len: int = 2048, batch_size: int = 1, masks=None,
               limit: int | None = None, verbose: bool = False) -> float:
    return _perplexity(model, tokenizer.encode(text, bos=tokenizer.add_bos), seq_len, batch_size, masks, limit, verbose)[0]


def _perplexity(model, ids: list[int], seq_len, batch_size, masks, limit, verbose, label="perplexity"):
    if seq_len > model.config.max_seq_len:
        raise ValueError(f"seq_len {seq_len} exceeds the model's maximum length {model.config.max_seq_len}")
    w = windows(ids, seq_len, limit)  # the whole corpus, one BOS at its start
    bar = cli.Progress(f"{label} (seq_len {seq_len})", len(w), enabled=verbose)
    nll = mean_nll(model, w, batch_size, masks, bar=bar)
    bar.close()
    return math.exp(nll), len(w)  # (PPL, windows)

# -----------------------------------------------------------------------------
# zero-shot tasks: lm-evaluation-harness v0.3 prompts (METHOD.md §9)


@dataclass
class Doc:
    contexts: list[str]  # one per choice (WinoGrande's differ, the other tasks repeat one)
    continuations: list[str]  # one per choice, leading space included
    gold: int
    choices: list[str] | None = None  # the choice strings whose character lengths normalise acc_norm; None: no acc_norm
    subject: str | None = None  # MMLU


def hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")  # brackets are artifacts of HellaSwag's WikiHow portion
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def _letter_index(key: str, letters="ABCDE") -> int:
    key = {"1": "A", "2": "B", "3": "C", "4": "D", "5": "E"}.get(key.strip(), key.strip())  # ARC's numeric keys
    if key not in letters:
        raise ValueError(f"answerKey '{key}' is not one of {list(letters)}")
    return letters.index(key)


def _multiple_choice(query: str, choices: list[str], gold: int) -> Doc:
    # v0.3 MultipleChoiceTask: continuation " {choice}", acc_norm over len(choice)
    return Doc([query] * len(choices), [" " + c for c in choices], gold, choices)


def build_doc(task: str, item: dict) -> Doc:
    try:
        if task == "boolq":  # superglue.py BoolQ; acc only; a tie predicts "no" ((ll_yes > ll_no) == gold)
            gold = int(item["label"]) if "label" in item else int(bool(item["answer"]))
            ctx = f"{item['passage']}\nQuestion: {item['question']}?\nAnswer:"
            return Doc([ctx, ctx], [" no", " yes"], gold)
        if task == "piqa":
            return _multiple_choice("Question: " + item["goal"] + "\nAnswer:", [item["sol1"], item["sol2"]],
                                    int(item["label"]))
        if task == "hellaswag":
            ctx = item["ctx_a"] + " " + item["ctx_b"].capitalize()
            return _multiple_choice(hellaswag_preprocess(item["activity_label"] + ": " + ctx),
                                    [hellaswag_preprocess(e) for e in item["endings"]], int(item["label"]))
        if task in ("arc_easy", "arc_challenge"):
            return _multiple_choice("Question: " + item["question"] + "\nAnswer:", list(item["choices"]["text"]),
                                    _letter_index(item["answerKey"]))
        if task == "openbookqa":
            return _multiple_choice(item["question_stem"], list(item["choices"]["text"]),
                                    _letter_index(item["answerKey"], "ABCD"))
        if task == "winogrande":  # partial scoring: the option fills "_", the rest of the sentence is scored; acc only
            i = item["sentence"].index("_")
            target = " " + item["sentence"][i + 1:].strip()
            return Doc([item["sentence"][:i] + o for o in (item["option1"], item["option2"])], [target, target],
                       {"1": 0, "2": 1}[str(item["answer"])])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{task}: item does not have the Hugging Face fields of this task ({type(e).__name__}: "
                         f"{e}): {str(item)[:200]}") from None
    raise ValueError(f"unknown task '{task}'; valid: {', '.join(ZERO_SHOT)}")


def mmlu_prompt(subject: str, shots: list[dict], item: dict) -> str:
    def example(x, answer: bool) -> str:
        s = x["question"] + "".join(f"\n{l}. {c}" for l, c in zip("ABCD", x["choices"])) + "\nAnswer:"
        return s + f" {'ABCD'[int(x['answer'])]}\n\n" if answer else s
    head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return head + "".join(example(s, True) for s in shots) + example(item, False)


def mmlu_docs(dev: list[dict], test: list[dict], tokenizer, max_len: int, k: int = 5) -> list[Doc]:
    shots = {}
    for x in dev:  # the first k dev questions of each subject, in file order (the dev split has exactly 5)
        shots.setdefault(x["subject"], [])
        if len(shots[x["subject"]]) < k:
            shots[x["subject"]].append(x)
    docs = []
    for x in test:
        if x["subject"] not in shots:
            raise ValueError(f"mmlu: no dev examples for subject '{x['subject']}'")
        n = len(shots[x["subject"]])
        prompt = mmlu_prompt(x["subject"], shots[x["subject"]], x)
        # as Hendrycks' evaluate.py: drop shots (keeping the first ones) until [BOS] + prompt + answer fits
        while n > 0 and len(tokenizer.encode(prompt, bos=tokenizer.add_bos)) + 1 > max_len:
            n -= 1
            prompt = mmlu_prompt(x["subject"], shots[x["subject"]][:n], x)
        docs.append(Doc([prompt] * 4, [" A", " B", " C", " D"], int(x["answer"]), None, x["subject"]))
    return docs

# -----------------------------------------------------------------------------
# tokenisation (METHOD.md §9, Appendix A of the paper)


def encode_pair(tokenizer, context: str, continuation: str, harness: str = "fixed", bos: bool = False):
    if harness == "legacy":  # v0.3 before PR #531: separately, so " yes" -> ['▁', '▁yes'] with LLaMA's tokenizer
        ctx = tokenizer.encode(context) if context else [tokenizer.eos_id]
        cont = tokenizer.encode(continuation)
    elif harness == "fixed":  # PR #531 / v0.4: trailing spaces move to the continuation, tokenised in context
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        if context:
            whole = tokenizer.encode(context + continuation)
            ctx = tokenizer.encode(context)
            cont = whole[len(ctx):]
        else:
            ctx, cont = [tokenizer.eos_id], tokenizer.encode(continuation)
    else:
        raise ValueError(f"harness '{harness}' is not one of fixed, legacy")
    return ([tokenizer.bos_id] if bos else []) + ctx, cont


@dataclass
class Request:
    doc: Doc
    pairs: list[tuple[list[int], list[int]]]  # per choice: (context ids, continuation ids)


def task_requests(task: str, items: list[dict], tokenizer, harness: str = "fixed", max_len: int = 2048,
                  dev: list[dict] | None = None) -> list[Request]:
    if task == "mmlu":
        # Hendrycks' format is not a harness task: BOS where the HF tokenizer adds it (the reference's instruct-eval),
        # the letter tokenised in context ("Answer:" + " A" -> '▁A'), whichever --harness is chosen.
        docs = mmlu_docs(dev or [], items, tokenizer, max_len)
        harness, bos = "fixed", tokenizer.add_bos
    else:
        docs, bos = [build_doc(task, x) for x in items], False
    return [Request(d, [encode_pair(tokenizer, c, t, harness, bos) for c, t in zip(d.contexts, d.continuations)])
            for d in docs]

# -----------------------------------------------------------------------------
# scoring: sum of log-probs of each continuation


def _plan(req: Request, max_len: int):
    """Rows to run for one item, and where each choice's scored tokens sit in them.

    Like the harness, the model input is (context + continuation)[-(max_len + 1):][:-1]; its last len(continuation)
    logits score the continuation. Identical inputs (single-token continuations: MMLU, BoolQ fixed) share a row.
    Returns rows, per choice (row, first scored position, targets), and `shared`: how many leading tokens all rows
    have in common and no choice needs logits from, i.e. what a KV cache can hold once for every choice.
    """
    rows, row_of, choices = [], {}, []
    for ctx, cont in req.pairs:
        whole = (ctx + cont)[-(max_len + 1):]
        inp, c = whole[:-1], min(len(cont), len(whole) - 1)
        if c == 0:
            raise ValueError("a continuation tokenised to nothing: nothing to score")
        key = tuple(inp)
        if key not in row_of:
            row_of[key] = len(rows)
            rows.append(inp)
        choices.append((row_of[key], len(inp) - c, whole[-c:]))
    common = len(rows[0])
    for r in rows[1:]:
        n = min(common, len(r))
        common = next((i for i in range(n) if rows[0][i] != r[i]), n)
    shared = min(common, min(first for _, first, _ in choices))
    return rows, choices, shared


MAX_SPLITS = 4  # forward passes per batch for the choice-specific rows, grouped by length (less padding)


def _split_rows(lengths: list[int], k: int = MAX_SPLITS) -> list[list[int]]:
    # Rows sorted longest first, cut into at most k runs minimising the padded tokens sum(len(run) * its longest):
    # a dynamic programme over the cut points, O(k n^2) for n rows. Fewer runs win ties (fewer forward passes).
    order = sorted(range(len(lengths)), key=lambda j: -lengths[j])
    L, n = [lengths[j] for j in order], len(lengths)
    cost = [[math.inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    cost[0][0] = 0
    for g in range(1, k + 1):
        for j in range(1, n + 1):
            for i in range(j):  # the last run is order[i:j]; its longest row is L[i]
                c = cost[g - 1][i] + (j - i) * L[i]
                if c < cost[g][j]:
                    cost[g][j], cut[g][j] = c, i
    g = min(range(1, k + 1), key=lambda g: cost[g][n])
    runs, j = [], n
    while j > 0:
        runs.append(order[cut[g][j]:j])
        j, g = cut[g][j], g - 1
    return runs[::-1]


def _schedule(plans, batch_size: int):
    """What score_requests runs: per batch, its items, Q and the runs of its rows (indices in item order)."""
    order = sorted(range(len(plans)), key=lambda i: -plans[i][2])
    for b in range(0, len(order), batch_size):
        batch = order[b:b + batch_size]
        Q = min(plans[i][2] for i in batch)
        yield batch, Q, _split_rows([len(r) - Q for i in batch for r in plans[i][0]])


def tokens_run(requests: list[Request], batch_size: int, max_len: int) -> tuple[int, int]:
    """Positions the naive loop and score_requests push through the model (padding included)."""
    plans = [_plan(r, max_len) for r in requests]
    naive = sum(len(p[0][row]) for p in plans for row, _, _ in p[1])
    batched = 0
    for batch, Q, runs in _schedule(plans, batch_size):
        lengths = [len(r) - Q for i in batch for r in plans[i][0]]
        batched += len(batch) * Q + sum(len(run) * max(lengths[j] for j in run) for run in runs)
    return naive, batched


@torch.no_grad()
def score_requests(model, requests: list[Request], batch_size: int = 16, masks=None, max_len: int | None = None,
                   verbose: bool = False, label: str = "scoring") -> list[list[float]]:
    """Log-likelihood of every choice of every request: the naive loop's numbers (to float rounding), fewer FLOPs.

    Items are sorted by their shared length and taken batch_size at a time. In a batch, the first Q tokens
    (Q = the smallest shared length in the batch) of each item are run once into a KV cache; the cache is copied
    to one row per distinct choice input and the rest of every row runs right-padded, rows of similar length
    together (padding sits after the real tokens, so causal attention never sees it).
    """
    max_len = max_len or model.config.max_seq_len
    device = model.lm_head.weight.device
    plans = [_plan(r, max_len) for r in requests]
    scores: list[list[float] | None] = [None] * len(requests)
    bar = cli.Progress(label, len(requests), enabled=verbose)
    for batch, Q, runs in _schedule(plans, batch_size):
        rows, owner, choices = [], [], []  # rows of the batch, the item slot of each, (row, first, targets) per choice
        for slot, i in enumerate(batch):
            rows_i, choices_i, _ = plans[i]
            choices += [(len(rows) + row, first - Q, tgt) for row, first, tgt in choices_i]  # suffix coordinates
            rows += rows_i
            owner += [slot] * len(rows_i)
        cache = None
        if Q > 0:  # the shared prefix once per item: (G, Q)
            prefix = torch.tensor([plans[i][0][0][:Q] for i in batch], dtype=torch.long, device=device)
            cache = llama.new_kv_cache(model, len(batch), max(map(len, rows)))
            model(prefix, masks, cache=cache, start_pos=0)
        sums = torch.zeros(len(choices), dtype=torch.float64, device=device)
        for run in runs:
            S = max(len(rows[j]) for j in run) - Q
            suffix = torch.zeros(len(run), S, dtype=torch.long, device=device)  # (R, S), right-padded with token 0
            for k, j in enumerate(run):
                suffix[k, :len(rows[j]) - Q] = torch.tensor(rows[j][Q:], dtype=torch.long)
            run_cache = None
            if cache is not None:  # each row continues its item's prefix: (R, Hkv, Q + S, Dh) per layer
                idx = torch.tensor([owner[j] for j in run], device=device)
                run_cache = [(k_[:, :, :Q + S].index_select(0, idx), v_[:, :, :Q + S].index_select(0, idx))
                             for k_, v_ in cache]
            logits = model(suffix, masks, cache=run_cache, start_pos=Q)  # (R, S, V); position p is Q + p
            # gather the scored positions before the log_softmax over V: (N scored tokens, V)
            at = {j: k for k, j in enumerate(run)}
            mine = [(c, at[row], first, tgt) for c, (row, first, tgt) in enumerate(choices) if row in at]
            r_idx = torch.tensor([k for _, k, _, tgt in mine for _ in tgt], device=device)
            p_idx = torch.tensor([p for _, _, first, tgt in mine for p in range(first, first + len(tgt))],
                                 device=device)
            targets = torch.tensor([t for *_, tgt in mine for t in tgt], device=device)
            seg = torch.tensor([c for c, _, _, tgt in mine for _ in tgt], device=device)  # the choice of each token
            lp = logits[r_idx, p_idx].float().log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
            sums.index_add_(0, seg, lp.double())
        sums = sums.tolist()
        for i in batch:
            k = len(requests[i].pairs)
            scores[i], sums = sums[:k], sums[k:]
        bar.advance(len(batch))
    bar.close()
    return scores


@torch.no_grad()
def score_requests_naive(model, requests: list[Request], masks=None, max_len: int | None = None) -> list[list[float]]:
    """The reference loop: one forward pass per (item, choice), nothing shared or batched."""
    max_len = max_len or model.config.max_seq_len
    device = model.lm_head.weight.device
    out = []
    for req in requests:
        out.append([])
        for ctx, cont in req.pairs:
            whole = (ctx + cont)[-(max_len + 1):]
            inp, c = whole[:-1], min(len(cont), len(whole) - 1)
            logits = model(torch.tensor([inp], device=device), masks)[0, len(inp) - c:].float()  # (c, V)
            targets = torch.tensor(whole[-c:], device=device)
            out[-1].append(logits.log_softmax(-1).gather(1, targets[:, None]).sum().item())
    return out


def _argmax(xs) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # the first maximum, as np.argmax


def metrics(requests: list[Request], scores: list[list[float]]) -> dict[str, float]:
    acc = [float(_argmax(s) == r.doc.gold) for r, s in zip(requests, scores)]
    out = {"acc": sum(acc) / len(acc)}
    if requests[0].doc.choices is not None:  # acc_norm: score divided by the choice's length in characters
        norm = [float(_argmax([x / len(c) for x, c in zip(s, r.doc.choices)]) == r.doc.gold)
                for r, s in zip(requests, scores)]
        out["acc_norm"] = sum(norm) / len(norm)
    return out

# -----------------------------------------------------------------------------
# the whole evaluation


def paper_average(results: dict) -> float | None:
    if not all(t in results for t in ZERO_SHOT):
        return None
    return sum(results[t][PAPER_METRIC[t]] for t in ZERO_SHOT) / len(ZERO_SHOT)


def evaluate(model, tokenizer, tasks, data_dir=None, *, masks=None, seq_len: int = 2048, limit: int | None = None,
             harness: str = "fixed", batch_size: int = 8, paths: dict | None = None, verbose: bool = False) -> dict:
    """{task: {metric: value}} for the given tasks, plus "average" (the paper's, when all seven zero-shot tasks ran)
    and "meta" (items per task, protocol, MMLU per subject)."""
    unknown = [t for t in tasks if t not in ALL_TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; valid: {', '.join(ALL_TASKS)}")
    if harness not in ("fixed", "legacy"):
        raise ValueError(f"harness '{harness}' is not one of fixed, legacy")
    defaults = default_paths(data_dir) if data_dir is not None else {}
    files = {**defaults, **{k: Path(v) for k, v in (paths or {}).items()}}
    max_len = model.config.max_seq_len

    def path(key):
        if key not in files:
            raise ValueError(f"no file for '{key}': give --data-dir or --path {key}=FILE")
        if not files[key].is_file():
            raise FileNotFoundError(f"{key}: {files[key]} does not exist")
        return files[key]

    results, items = {}, {}
    meta = {"items": items, "seq_len": seq_len,
            "protocol": {"ppl": "LLM-Pruner: rows joined with '\\n\\n', one BOS, non-overlapping windows",
                         "zero_shot": f"lm-eval-harness v0.3 tasks, no BOS, {harness} tokenisation",
                         "mmlu": "5-shot Hendrycks format, BOS, letter with the highest log-prob", "harness": harness},
            # the files each task read; "overrides" the ones that replaced the standard file (--path), which the table
            # names instead of the data set
            "files": {}, "overrides": {}}
    for task in tasks:
        t0 = time.time()
        for key in ("mmlu_dev", "mmlu_test") if task == "mmlu" else (task,):
            meta["files"][key] = str(path(key))
            if key not in defaults or files[key].resolve() != defaults[key].resolve():
                meta["overrides"][key] = str(files[key])
        if task in PPL_TASKS:
            text = (data.wikitext2_text if task == "wikitext2" else data.ptb_text)(path(task))
            ppl, items[task] = _perplexity(model, tokenizer.encode(text, bos=tokenizer.add_bos), seq_len, batch_size, masks,
                                           limit, verbose, task)
            results[task] = {"ppl": ppl}
        else:
            dev = read_jsonl(path("mmlu_dev")) if task == "mmlu" else None
            rows = read_jsonl(path("mmlu_test" if task == "mmlu" else task), limit)
            reqs = task_requests(task, rows, tokenizer, harness, max_len, dev)
            scores = score_requests(model, reqs, batch_size, masks, max_len, verbose, task)
            results[task] = metrics(reqs, scores)
            items[task] = len(reqs)
            if task == "mmlu":
                per = {}
                for r, s in zip(reqs, scores):
                    per.setdefault(r.doc.subject, []).append(float(_argmax(s) == r.doc.gold))
                meta["mmlu_subjects"] = {k: {"acc": sum(v) / len(v), "n": len(v)} for k, v in sorted(per.items())}
        if verbose:
            print(f"{task}: {results[task]} ({time.time() - t0:.1f}s)", file=sys.stderr)
    avg = paper_average(results)
    if avg is not None:
        results["average"] = {"acc": avg}
    results["meta"] = meta
    return results


def format_table(results: dict, label: str = "model") -> str:
    """Two rows shaped like the paper's Tables 1-2 (percent for accuracies; each header names its metric, and the
    file in place of the data set where --path replaced one), then every metric per task."""
    meta = results.get("meta", {})
    over = meta.get("overrides", {})

    def header(t):  # "WikiText2 PPL", "HellaSwag acc_norm"; "heldout.txt PPL" when --path wikitext2=heldout.txt
        key = "mmlu_test" if t == "mmlu" else t
        name = Path(over[key]).name if key in over else HEADERS[t]
        dev = f" (dev {Path(over['mmlu_dev']).name})" if t == "mmlu" and "mmlu_dev" in over else ""
        return f"{name} {'PPL' if t in PPL_TASKS else PAPER_METRIC.get(t, 'acc')}{dev}"

    cols = [t for t in ALL_TASKS if t in results]
    head, row = ["Model"], [label]
    for t in cols:
        head.append(header(t))
        if t in PPL_TASKS:
            row.append(f"{results[t]['ppl']:.2f}")
        else:
            row.append(f"{100 * results[t][PAPER_METRIC.get(t, 'acc')]:.2f}")
        if t == "openbookqa" and "average" in results:
            head.append("Average")  # of the columns before it, each in the metric its header names
            row.append(f"{100 * results['average']['acc']:.2f}")
    widths = [max(len(h), len(r)) for h, r in zip(head, row)]
    lines = ["| " + " | ".join(h.rjust(w) for h, w in zip(head, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|",
             "| " + " | ".join(r.rjust(w) for r, w in zip(row, widths)) + " |", ""]
    for t in cols:
        ms = "  ".join(f"{k} {v:.4f}" if k == "ppl" else f"{k} {100 * v:.2f}" for k, v in results[t].items())
        lines.append(f"{t:<14} n={meta.get('items', {}).get(t, '?'):<6} {ms}")
    for subject, r in meta.get("mmlu_subjects", {}).items():
        lines.append(f"  mmlu {subject:<40} n={r['n']:<5} acc {100 * r['acc']:.2f}")
    for key, f in over.items():
        lines.append(f"{key}: read from {f} (--path), not the standard file")
    return "\n".join(lines)

# -----------------------------------------------------------------------------
# loading whatever --ckpt names


def load_for_eval(ckpt, tokenizer=None, device="cpu", dtype=torch.float32):
    """-> (model, masks or None, tokenizer, kind). kind: dense, pruned (an exported model), nuteprune-run (a run
    directory, evaluated through its exported pruned/, which equals the masked model with the run's LoRA)."""
    p = Path(ckpt)
    kind = None
    if p.is_dir() and ((p / "state.pt").is_file() or (p / "report.json").is_file()):
        if not (p / "pruned" / "config.json").is_file():
            raise ValueError(f"{p} is a nuteprune run that has not exported its model yet; finish it with "
                             f"python nuteprune.py --resume {p}")
        p, kind = p / "pruned", "nuteprune-run"
    model, tok = checkpoint.load(p, tokenizer, device, dtype)
    return model, None, tok, kind or ("dense" if model.config.uniform else "pruned")


def build_parser() -> argparse.ArgumentParser:
    ap = cli.Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True,
                    help="checkpoint (HF/Meta dir, llama2.c .bin, .gguf, exported pruned model, hub id or short name) "
                         "or nuteprune output dir")
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer.model, tokenizer.json or .gguf; default: beside the checkpoint (inside a .gguf)")
    ap.add_argument("--tasks", default=",".join(ALL_TASKS), help=f"comma-separated, from {','.join(ALL_TASKS)}")
    ap.add_argument("--data-dir", default=None,
                    help="DIR/tasks/<task>.jsonl, DIR/wikitext2/wiki.test.raw, DIR/ptb/ptb.valid.txt")
    ap.add_argument("--path", action="append", default=[], metavar="TASK=FILE",
                    help="per-task file override (also mmlu_dev=, mmlu_test=); repeatable")
    ap.add_argument("--seq-len", type=int, default=None,
                    help="perplexity window, 2 to the model's maximum (default: 2048, or the model's maximum if less)")
    ap.add_argument("--harness", default="fixed", choices=["fixed", "legacy"],
                    help="zero-shot tokenisation (METHOD.md §9)")
    ap.add_argument("--limit", type=int, default=None,
                    help="first N items per task (MMLU: first N test questions in file order; perplexity: N windows)")
    ap.add_argument("--batch-size", type=int, default=8, help="items (perplexity: windows) per forward batch")
    ap.add_argument("--device", default="auto", help="torch device (auto: cuda when available, else cpu)")
    ap.add_argument("--dtype", default="auto", choices=list(llama.DTYPES),
                    help="weights and compute (auto: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--json", default=None, metavar="OUT", help="write {task: {metric: value}, meta: {...}}")
    return ap


def check_args(args) -> tuple[list[str], dict[str, str]]:
    """(tasks, path overrides), every flag and file checked before the model is loaded."""
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in ALL_TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown task(s) {unknown or args.tasks!r}; valid: {', '.join(ALL_TASKS)}")
    paths = {}
    for spec in args.path:
        key, sep, value = spec.partition("=")
        if not sep or not value:
            raise ValueError(f"--path '{spec}' is not TASK=FILE")
        paths[key] = value
    for name in ("limit", "seq_len", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    files = {**(default_paths(args.data_dir) if args.data_dir is not None else {}), **paths}
    for task in tasks:
        for key in ("mmlu_dev", "mmlu_test") if task == "mmlu" else (task,):
            if key not in files:
                raise ValueError(f"no file for '{key}': give --data-dir or --path {key}=FILE")
            data.check_file(files[key], f"{key} file")
    args.ckpt = hub.resolve_checkpoint(args.ckpt)  # a hub id or a short name: its folder in the Hugging Face cache
    if not Path(args.ckpt).exists():
        raise FileNotFoundError(f"--ckpt {args.ckpt} does not exist")
    return tasks, paths


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        tasks, paths = check_args(args)
        device, dtype = cli.device_dtype(args.device, args.dtype)
        model, masks, tok, kind = load_for_eval(args.ckpt, args.tokenizer, device, dtype)
        if device.type == "cpu":
            cli.cpu_threads(llama.count_params(model))
        max_len = model.config.max_seq_len
        if args.seq_len is not None and not 2 <= args.seq_len <= max_len:
            raise ValueError(f"--seq-len {args.seq_len} is out of range: the model reads 2 to {max_len} tokens")
        seq_len = args.seq_len or min(2048, max_len)
        if args.seq_len is None and max_len < 2048:
            print(f"note: perplexity windows of {max_len} tokens, the model's maximum (default 2048)", file=sys.stderr)
        results = evaluate(model, tok, tasks, args.data_dir, masks=masks, seq_len=seq_len, limit=args.limit,
                           harness=args.harness, batch_size=args.batch_size, paths=paths, verbose=True)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dtype_name = str(dtype).removeprefix("torch.")
    results["meta"].update(checkpoint=str(args.ckpt), kind=kind, tokenizer=tok.path, dtype=dtype_name, limit=args.limit)
    print(format_table(results, Path(args.ckpt).name or str(args.ckpt)))
    print(f"checkpoint {args.ckpt} ({kind}), harness {args.harness}, ppl seq_len {seq_len}, dtype {dtype_name}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write(args.json, lambda p: p.write_text(json.dumps(results, indent=2) + "\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
