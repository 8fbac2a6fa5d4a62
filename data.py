"""Text in, token ids out: C4 calibration blocks (METHOD.md §7), Stanford Alpaca fine-tuning examples (METHOD.md §7, post
fine-tuning) and the WikiText-2 / PTB strings of the LLM-Pruner perplexity protocol (METHOD.md §9).

A tokenizer here is anything with .encode(text, bos=False, eos=False) -> list[int], .bos_id, .eos_id, .add_bos and
.fingerprint() (what keys the token cache), i.e. tokenization.Tokenizer.

BOS follows the tokenizer: a document starts with BOS where the tokenizer adds one (LLaMA's SentencePiece, Llama-3);
where it does not (SmolLM2, GPT-2-style BPE), documents are separated by EOS instead, as such models were trained.
"""
from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from checkpoint import atomic_write

IGNORE = -100  # label of tokens that carry no loss (cross_entropy's ignore_index)

# -----------------------------------------------------------------------------
# reading documents


def check_file(path, what: str = "data file") -> Path:
    """path, if it names a readable, non-empty file; else a ValueError that names `what` and the problem."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{what} {p} is a directory; give a file")
    if not p.is_file():
        raise ValueError(f"{what} {p} does not exist")
    if p.stat().st_size == 0:
        raise ValueError(f"{what} {p} is empty")
    if not os.access(p, os.R_OK):
        raise ValueError(f"{what} {p} is not readable (permissions)")
    return p


def _json_records(p: Path, n: int | None):
    """Records of a .jsonl / .json / .json.gz / .jsonl.gz file, in order, stopping after n.

    C4 shards (c4-train.00000-of-01024.json.gz) are JSON lines despite the .json name; a plain .json may also be one
    JSON list. Lines are streamed so that the first 20,000 documents of a 300 MB shard cost only those documents.
    """
    opener = gzip.open if p.name.endswith(".gz") else open
    with opener(p, "rt", encoding="utf-8") as f:
        first, skipped = f.readline(), 0
        while first and not first.strip():
            first, skipped = f.readline(), skipped + 1
        if first.lstrip().startswith("["):  # one JSON list (Alpaca's layout)
            try:
                records = json.loads(first + f.read())
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}: not valid JSON ({e})") from None
            yield from records[:n]
            return
        count = 0
        for lineno, line in enumerate(itertools.chain([first], f), skipped + 1):
            if n is not None and count >= n:
                return
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{lineno}: not a JSON line ({e.msg})") from None
            count += 1


def read_documents(path, n_docs: int | None = None) -> list[str]:
    """The first n_docs documents of a corpus file: `text` of each JSON record, or blank-line-separated chunks of a
    plain text file."""
    p = check_file(path)
    if re.search(r"\.(jsonl|json)(\.gz)?$", p.name):
        docs = []
        for i, rec in enumerate(_json_records(p, n_docs)):
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise ValueError(f"{p}: record {i} has no string 'text' field")
            docs.append(rec["text"])
    else:
        text = p.read_text(encoding="utf-8")
        docs = [d.strip() for d in re.split(r"\n\s*\n", text)]
        docs = [d for d in docs if d][:n_docs]
    if not docs:
        raise ValueError(f"data file {p} holds no documents")
    return docs

# -----------------------------------------------------------------------------
# C4 calibration blocks (METHOD.md §7): one BOS per document, no EOS, concatenated, cut into blocks


def _sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("NUTEPRUNE_CACHE") or Path.home() / ".cache" / "nuteprune")


def corpus_tokens(path, tokenizer, n_docs: int = 20000, cache_dir=None) -> np.ndarray:
    """All token ids of the first n_docs documents as one int32 stream: BOS before each document, or EOS after each
    where the tokenizer adds no BOS.

    Cached on disk keyed by (tokenizer, data file content, n_docs): tokenising 20,000 C4 documents (47 MB)
    takes ~15 s on one CPU core, reading the cache milliseconds. The key hashes contents, not paths, so a renamed or copied
    file still hits and an edited one misses.
    """
    p = check_file(path)
    bos = tokenizer.add_bos
    separator = "" if bos else "|eos"  # the key of a BOS stream is what it always was
    key = hashlib.sha256(f"{tokenizer.fingerprint()}|{_sha256_file(p)}|{n_docs}{separator}".encode()).hexdigest()[:32]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = folder / f"tokens-{key}.npy"
    if cached.is_file():
        try:
            return np.load(cached)
        except (OSError, ValueError):  # a corrupt cache entry (disk full, foreign file): rebuild it
            pass
    ids = [t for doc in read_documents(p, n_docs) for t in tokenizer.encode(doc, bos=bos, eos=not bos)]
    arr = np.asarray(ids, dtype=np.int32)
    folder.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path):
        with open(tmp, "wb") as f:
            np.save(f, arr)
    atomic_write(cached, write)  # a concurrent reader sees either no file or the whole file, never a partial one
    return arr


def calibration_blocks(path, tokenizer, n_docs: int = 20000, block_size: int = 512, cache_dir=None) -> torch.Tensor:
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}")
    ids = corpus_tokens(path, tokenizer, n_docs, cache_dir)
    n = len(ids) // block_size  # the remainder is dropped
    if n == 0:
        raise ValueError(f"{path}: {len(ids)} tokens in the first {n_docs} documents, too few for one block of "
                         f"{block_size}")
    return torch.from_numpy(ids[:n * block_size].astype(np.int64)).view(n, block_size)  # (N, block_size)

# -----------------------------------------------------------------------------
# Stanford Alpaca (METHOD.md §7 post fine-tuning): the template of tatsu-lab/stanford_alpaca train.py


ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                 "Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. "
                          "Write a response that appropriately completes the request.\n\n"
                          "### Instruction:\n{instruction}\n\n### Response:")


def alpaca_prompt(record: dict) -> str:
    template = ALPACA_PROMPT if record.get("input") else ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input", ""))


def alpaca_examples(path, tokenizer, max_len: int = 512) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per record: [BOS] + prompt + output + EOS (BOS where the tokenizer adds one), labels -100
    on the prompt.

    As in stanford_alpaca: the output follows "### Response:" with no separator, the text is tokenised whole and the
    prompt's own tokenisation fixes how many leading tokens are masked; truncation keeps the first max_len tokens.
    Records whose output is truncated away entirely are dropped (they would carry no loss at all).
    """
    p = check_file(path)
    out = []
    for i, rec in enumerate(_json_records(p, None)):
        if not (isinstance(rec, dict) and all(isinstance(rec.get(k), str) for k in ("instruction", "output"))):
            raise ValueError(f"{p}: record {i} needs string 'instruction' and 'output' fields (Alpaca format)")
        prompt = alpaca_prompt(rec)
        ids = tokenizer.encode(prompt + rec["output"], bos=tokenizer.add_bos, eos=True)[:max_len]
        n_prompt = len(tokenizer.encode(prompt, bos=tokenizer.add_bos))
        labels = [IGNORE] * min(n_prompt, len(ids)) + ids[n_prompt:]
        if any(t != IGNORE for t in labels):
            out.append((ids, labels))
    if not out:
        raise ValueError(f"{p}: no Alpaca example has an output token within max_len={max_len}")
    return out


def pad_batch(examples, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example: ids [B, T] with pad_id, labels [B, T] with -100 on padding."""
    T = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for b, (x, y) in enumerate(examples):
        ids[b, :len(x)] = torch.tensor(x, dtype=torch.long)
        labels[b, :len(y)] = torch.tensor(y, dtype=torch.long)
    return ids, labels

# -----------------------------------------------------------------------------
# perplexity corpora, joined exactly as LLM-Pruner's ppl_dataset.py joins the Hugging Face rows (METHOD.md §9)


def wikitext2_text(path) -> str:
    # HF wikitext-2-raw-v1 rows are the file's lines with their "\n" kept, blank lines (" \n") becoming "".
    # Iterating the file splits on newlines only (str.splitlines would also split on \x0b, \u2028, ...).
    p = check_file(path)
    with open(p, encoding="utf-8") as f:
        rows = [line if line.strip() else "" for line in f]
    return "\n\n".join(rows)


def ptb_text(path) -> str:
    # HF ptb_text_only rows ("sentence") are the stripped lines of ptb.<split>.txt
    p = check_file(path)
    with open(p, encoding="utf-8") as f:
        rows = [line.strip() for line in f]
    return "\n\n".join(rows)
