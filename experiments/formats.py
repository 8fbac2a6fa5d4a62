"""One pruned model in three runtimes: llama.py, transformers (the exported remote code) and llama.cpp (GGUF).

    python experiments/formats.py OUT/pruned --text heldout.txt [--windows 16] [--seq-len 256] [--new-tokens 100]

For each runtime: the largest |logit difference| from llama.py over --windows windows of held-out text, perplexity
on those windows, and how many of --new-tokens greedy tokens agree with `llama.generate`. llama.cpp runs each GGUF
weight type (written by export.py into a temporary folder) with an f32 and its default f16 KV cache. A runtime whose
package is missing (transformers, gguf, llama_cpp) is reported as such.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import checkpoint
import export  # noqa: E402
import llama  # noqa: E402

GGML_F32, GGML_F16 = 0, 1  # llama.cpp KV-cache types


def agreement(logits, ref_logits, windows, greedy, ref_greedy) -> dict:
    nll = sum(F.cross_entropy(torch.as_tensor(np.asarray(lg, dtype=np.float32))[:-1], torch.tensor(w[1:]),
                              reduction="sum").item() for lg, w in zip(logits, windows))
    same = next((i for i, (a, b) in enumerate(zip(greedy, ref_greedy)) if a != b), len(ref_greedy))
    return {"diff": max(float(np.abs(np.asarray(a) - b.numpy()).max()) for a, b in zip(logits, ref_logits)),
            "ppl": math.exp(nll / sum(len(w) - 1 for w in windows)), "greedy": same}


def run_transformers(path, windows, prompt, n):
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = [hf(torch.tensor([w])).logits[0] for w in windows]
        greedy = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return f"transformers {transformers.__version__}", logits, greedy[0, len(prompt):].tolist()


def run_llama_cpp(gguf_path, kv_type, windows, prompt, n):
    from llama_cpp import Llama
    kw = dict(model_path=str(gguf_path), n_ctx=max(map(len, windows)) + len(prompt) + n, n_threads=1, verbose=False,
              type_k=kv_type, type_v=kv_type)
    cpp, logits = Llama(logits_all=True, **kw), []
    for w in windows:
        cpp.reset()
        cpp.eval(w)
        logits.append(np.array(cpp.scores[:len(w)]))
    greedy = []
    for t in Llama(**kw).generate(prompt, top_k=1, temp=0.0, reset=True):
        greedy.append(t)
        if len(greedy) == n:
            break
    return logits, greedy


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("pruned", help="an exported model folder (OUT/pruned)")
    p.add_argument("--text", required=True, help="held-out plain text")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=100)
    p.add_argument("--prompt", default="Once upon a time, there was a little girl named Lily.")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    model, tok = checkpoint.load(a.pruned)
    ids = tok.encode(Path(a.text).read_text()[:a.windows * a.seq_len * 8], bos=True)
    windows = [ids[i:i + a.seq_len] for i in range(0, len(ids) - a.seq_len, a.seq_len)][:a.windows]
    prompt = tok.encode(a.prompt, bos=True)
    with torch.no_grad():
        ref_logits = [model(torch.tensor([w]))[0] for w in windows]
    ref_greedy = llama.generate(model, torch.tensor([prompt]), a.new_tokens)[0, len(prompt):].tolist()
    ref = agreement(ref_logits, ref_logits, windows, ref_greedy, ref_greedy)
    print(f"{len(windows)} windows of {a.seq_len} tokens; greedy: {a.new_tokens} tokens after {a.prompt!r}\n")
    print("| runtime | weights | KV cache | max abs logit diff | perplexity | greedy tokens equal |")
    print("|---|---|---|---|---|---|")
    print(f"| llama.py | f32 | f32 | — | {ref['ppl']:.4f} | — |")
    row = lambda name, w, kv, r: print(  # noqa: E731
        f"| {name} | {w} | {kv} | {r['diff']:.2e} | {r['ppl']:.4f} | {r['greedy']}/{a.new_tokens} |")
    try:
        name, logits, greedy = run_transformers(a.pruned, windows, prompt, a.new_tokens)
        row(name, "f32", "f32", agreement(logits, ref_logits, windows, greedy, ref_greedy))
    except ImportError as e:
        print(f"| transformers | not installed ({e}) | | | | |")
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError as e:
        print(f"| llama.cpp | not installed ({e}) | | | | |")
        return
    with tempfile.TemporaryDirectory() as tmp:
        for ftype in export.FILE_TYPES:
            path = Path(tmp) / f"model-{ftype}.gguf"
            with contextlib.redirect_stdout(io.StringIO()):  # the padding table is export.py's to print
                export.write_gguf(a.pruned, path, ftype)
            for kv_name, kv in (("f32", GGML_F32), ("f16 (default)", GGML_F16)):
                logits, greedy = run_llama_cpp(path, kv, windows, prompt, a.new_tokens)
                row("llama.cpp", ftype, kv_name, agreement(logits, ref_logits, windows, greedy, ref_greedy))


if __name__ == "__main__":
    main()
