"""What a pruned model buys in llama.cpp: speed (llama-bench's protocol, through llama-cpp-python), file size and
WikiText-2 perplexity of dense and pruned models, side by side, at the weight types users run.

    python bench/llama_cpp_speed.py --dense DENSE --pruned P20 P50 [--types f16,q8_0,q4_0,q4_k_m] [--threads N]
                                    [--flash-attn off|on] [--reps 5] [--ppl-windows 32]
                                    [--json bench/llama_cpp_speed.json]

Models: DENSE and each P are a checkpoint llama.py reads (a folder, a .gguf, a llama2.c .bin), a nuteprune run folder
(its pruned/; the label is the folder's name) or LABEL=PATH. export.py converts each to every --types (f16, or
quantised by llama.cpp's own quantizer: its fallbacks are counted in the table), in --work. --as-is FILE.gguf
takes a GGUF file unconverted (its own type). --round-to 32,256 adds each pruned run re-exported with its final
masks rounded (nuteprune.py --round-to, from the run's trained gates: with and without rounding on the same
training); --pad adds each pruned model padded to the quantised type's block (export.py --pad). The dense model is converted the same way, so the ratios compare like
with like (a dense Q4_1 GGUF is dequantised and written again, as the pruned models were pruned from its values).

Protocol (llama-bench's): pp512 is one Llama.eval of 512 random tokens from an empty KV cache (n_batch = n_ubatch =
512); tg128 is 128 single-token Llama.eval calls from an empty cache; one untimed warm-up of each; --reps rounds in
which every model runs once (interleaved, so the ratios to dense are measured side by side), the median over rounds;
the thread count is stated; flash attention off (llama-cpp-python's default) unless --flash-attn on, which fuses each
layer's attention into one graph node; llama.cpp's defaults otherwise (f16 KV cache, mmap). Ratios are times, pruned
/ dense of the same type: below 1 is faster. `kept` is params_pruned / params_dense, embeddings included, counted on
our tensors (before any GGUF padding): the time ratio a memory-bound decode would reach if time followed the weights
read. Perplexity: the first --ppl-windows non-overlapping windows of 512 tokens of WikiText-2 test (evaluate.py's
text: rows joined by blank lines; llama.cpp's tokenizer, with a BOS at the start if the model adds one), every token
after a window's first scored, from llama.cpp's logits. Writes the table and --json (after the timings, then after
each perplexity: they take minutes per model).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import checkpoint  # noqa: E402
import cli  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
import export  # noqa: E402
import llama  # noqa: E402

PP, TG = 512, 128  # llama-bench's pp512 and tg128
TYPES = ("f16", "q8_0", "q4_0", "q4_k_m")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", required=True, help="the dense model (LABEL=PATH to name it)")
    ap.add_argument("--pruned", nargs="*", default=[], help="pruned models: checkpoints or nuteprune run folders")
    ap.add_argument("--as-is", nargs="*", default=[], metavar="GGUF", help="GGUF files measured unconverted")
    ap.add_argument("--round-to", default="", help="N,N: also each pruned run's final masks rounded to N (its "
                    "state.pt: the same trained gates and LoRA)")
    ap.add_argument("--pad", action="store_true", help="also each pruned model padded to the quantised type's block "
                    "(export.py --pad)")
    ap.add_argument("--types", default=",".join(TYPES), help=f"GGUF types to convert to ({', '.join(export.FILE_TYPES)})")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp threads (default: all cores)")
    ap.add_argument("--flash-attn", choices=("off", "on"), default="off",
                    help="llama.cpp's flash attention (default off, as llama-cpp-python opens a model)")
    ap.add_argument("--reps", type=int, default=5, help="rounds; the median is reported (llama-bench: 5)")
    ap.add_argument("--ppl-windows", type=int, default=32, help="WikiText-2 windows of 512 tokens (0: no perplexity)")
    ap.add_argument("--wikitext", default=str(ROOT.parent / "shared" / "data" / "wikitext2" / "wiki.test.raw"))
    ap.add_argument("--work", default="/tmp/nuteprune-llama-cpp-speed", help="folder for the converted GGUF files")
    ap.add_argument("--json", default=str(ROOT / "bench" / "llama_cpp_speed.json"))
    a = ap.parse_args(argv)
    a.types = [t for t in a.types.split(",") if t]
    a.round_to = [int(n) for n in a.round_to.split(",") if n]
    bad = [t for t in a.types if t not in export.FILE_TYPES]
    if bad or a.reps < 1 or a.threads < 1:
        ap.error(f"--types {bad} not in {export.FILE_TYPES}" if bad else "--reps and --threads must be at least 1")
    return a

# -----------------------------------------------------------------------------
# the models: converted GGUF files, with what each holds


def resolve(spec: str) -> tuple[str, Path]:
    """(label, checkpoint) of LABEL=PATH, a nuteprune run folder (its pruned/) or a checkpoint."""
    label, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
    p = Path(path)
    if (p / "pruned" / "config.json").is_file():  # a run folder
        return label or p.name, p / "pruned"
    return label or (p.parent.name if p.name == "pruned" else p.stem if p.is_file() else p.name), p


def params_of(ckpt: Path) -> int:
    """All parameters of our model (embeddings included, a tied head once), from its config."""
    cfg, _ = checkpoint.read_checkpoint(ckpt)
    return llama.count_params(cfg)


def gguf_params(path: Path) -> int:
    import gguf
    return sum(int(t.n_elements) for t in gguf.GGUFReader(path).tensors)


def gguf_type(path: Path) -> str:
    import gguf
    ftype = int(gguf.GGUFReader(path).fields["general.file_type"].contents())
    return gguf.LlamaFileType(ftype).name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()


def rounded_runs(spec: str, sizes: list[int], work: Path) -> list[tuple[str, Path]]:
    """A finished nuteprune run exported again with its final masks rounded to each N (--round-to N from the same
    trained gates and LoRA, state.pt): (label, folder) each. Post fine-tuning trained its LoRA on the unrounded masks,
    so a fine-tuned run's variants carry a LoRA that never saw them (said in a line)."""
    import nuteprune as npr
    import rounding
    import runfolder
    label, ckpt = resolve(spec)
    run = ckpt.parent
    if not (run / "state.pt").is_file():
        raise SystemExit(f"error: --round-to needs nuteprune run folders (with state.pt); {spec} is not one")
    state = runfolder.load_state(run)
    c = npr.RunConfig.from_dict(state["config"])
    model, _, tok = npr.load_run(run)
    gates = npr.Gates(model.config, keep_hidden=c.keep_hidden)
    gates.load_state_dict(state["gates"])
    if state["ft_lora"] is not None:
        print(f"note: {run} was fine-tuned on its own masks; its --round-to variants keep that LoRA")
    out = []
    for n in sizes:
        final = npr.final_masks(gates, model.config, c.target, c.tolerance, n)
        unmet = rounding.unmet(final, model.config, n)
        print(f"{label} rounded to {n}: sparsity {float(npr.expected_sparsity(final, model.config)):.4f}"
              + (f"; not met: {'; '.join(unmet)}" if unmet else ""))
        checkpoint.export_pruned(model, final, work / f"{label}-r{n}", tok)
        out.append((f"{label}-r{n}", work / f"{label}-r{n}"))
    return out


def sources(a: argparse.Namespace, work: Path) -> list[tuple[str, str, Path, int]]:
    """(role, label, checkpoint, pad) of every model to convert: the dense, the pruned, their --round-to variants,
    and with --pad the pruned ones padded to each quantised type's block (pad -1: the type's)."""
    out = [("dense", *resolve(a.dense), 1)]
    for spec in a.pruned:
        out.append(("pruned", *resolve(spec), 1))
        if a.pad:
            out.append(("pruned", resolve(spec)[0] + "+pad", resolve(spec)[1], -1))
        if a.round_to:
            out += [("pruned", label, path, 1) for label, path in rounded_runs(spec, a.round_to, work)]
    return out


def models(a: argparse.Namespace) -> list[dict]:
    """Every (model, type) to measure: label, role, type, GGUF path, params, fallbacks, padding."""
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    out = []
    for role, label, ckpt, pad in sources(a, work):
        params = params_of(ckpt)
        for ftype in a.types:
            if pad == -1 and export.PAD_BLOCK[ftype] == 1:
                continue  # nothing to pad at f16 / f32
            path = work / f"{label}-{ftype}.gguf"
            print(f"converting {label} ({ckpt}) to {ftype}", flush=True)
            report = export.write_gguf(ckpt, path, ftype, pad=export.PAD_BLOCK[ftype] if pad == -1 else 1)
            out.append({"label": label, "role": role, "type": ftype, "path": str(path), "source": str(ckpt),
                        "params": params, "gguf_params": gguf_params(path), "fallbacks": report["fallbacks"],
                        "padding_params": report["added_params"]})
    for f in a.as_is:
        label, path = resolve(f)
        out.append({"label": label, "role": "as-is", "type": gguf_type(path), "path": str(path), "source": str(path),
                    "params": gguf_params(path), "gguf_params": gguf_params(path), "fallbacks": [],
                    "padding_params": 0})
    for m in out:
        m["file_mb"] = os.path.getsize(m["path"]) / 1e6
    return out

# -----------------------------------------------------------------------------
# timing: llama-bench's pp512 and tg128


def open_llama(path: str, threads: int, n_ctx: int, logits_all: bool = False, flash_attn: bool = False):
    import llama_cpp
    return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=PP, n_ubatch=PP, n_threads=threads,
                           n_threads_batch=threads, logits_all=logits_all, flash_attn=flash_attn, verbose=False)


def time_pp(llm, tokens: list[int]) -> float:
    llm.reset()  # an empty KV cache: eval drops every cell past n_tokens = 0
    t = time.perf_counter()
    llm.eval(tokens)
    return time.perf_counter() - t


def time_tg(llm, tokens: list[int]) -> float:
    llm.reset()
    t = time.perf_counter()
    for tok in tokens:  # one token per decode, as generation runs
        llm.eval([tok])
    return time.perf_counter() - t


def measure(ms: list[dict], threads: int, reps: int, flash_attn: bool = False) -> None:
    """pp and tg seconds of every model, one entry per round, into ms[i]['pp_s'], ['tg_s']. One weight type at a time
    (its dense and pruned models loaded together, interleaved within each round: the ratios are side by side)."""
    rng = np.random.default_rng(0)
    for ftype in dict.fromkeys(m["type"] for m in ms):
        group = [m for m in ms if m["type"] == ftype]
        # pp and tg each start from an empty cache
        llms = [open_llama(m["path"], threads, PP, flash_attn=flash_attn) for m in group]
        for m, llm in zip(group, llms):
            vocab = llm.n_vocab()
            m["pp_tokens"], m["tg_tokens"] = (rng.integers(0, vocab, n).tolist() for n in (PP, TG))
            time_pp(llm, m["pp_tokens"])  # warm-up: pages mapped, buffers allocated
            time_tg(llm, m["tg_tokens"][:8])
            m["pp_s"], m["tg_s"] = [], []
        for r in range(reps):
            for m, llm in zip(group, llms):
                m["pp_s"].append(time_pp(llm, m["pp_tokens"]))
                m["tg_s"].append(time_tg(llm, m["tg_tokens"]))
            print(f"  {ftype} round {r}: " + "  ".join(f"{m['label']} {PP / m['pp_s'][-1]:.0f}|{TG / m['tg_s'][-1]:.1f}"
                                                      for m in group) + " tok/s (pp|tg)", flush=True)
        for m, llm in zip(group, llms):
            llm.close()
            del m["pp_tokens"], m["tg_tokens"]

# -----------------------------------------------------------------------------
# perplexity from llama.cpp's logits


def wikitext_windows(path: str, gguf_path: str, n: int) -> list[list[int]]:
    """The first n windows of 512 tokens of WikiText-2 test, tokenised by llama.cpp (BOS as the model says)."""
    import llama_cpp
    vocab_only = llama_cpp.Llama(model_path=gguf_path, vocab_only=True, verbose=False)
    ids = vocab_only.tokenize(data.wikitext2_text(path).encode("utf-8"), add_bos=True, special=False)
    return evaluate.windows(ids, PP, n).tolist()


def perplexity(path: str, windows: list[list[int]], threads: int, flash_attn: bool = False) -> float:
    llm = open_llama(path, threads, PP, logits_all=True, flash_attn=flash_attn)
    nll, count = 0.0, 0
    for w in windows:
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[:len(w) - 1], dtype=np.float64)  # (T-1, V): predicts tokens 1..T-1
        top = logits.max(-1, keepdims=True)
        logz = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
        nll += float((logz - logits[np.arange(len(w) - 1), w[1:]]).sum())
        count += len(w) - 1
    llm.close()
    return math.exp(nll / count)

# -----------------------------------------------------------------------------
# the table


def add_ratios(ms: list[dict]) -> None:
    """Medians, and per round pruned / dense of the same type (then the median): time ratios and kept weights."""
    dense = {m["type"]: m for m in ms if m["role"] == "dense"}
    for m in ms:
        m["pp_tok_s"], m["tg_tok_s"] = PP / statistics.median(m["pp_s"]), TG / statistics.median(m["tg_s"])
        d = dense.get(m["type"])
        m["kept"] = m["params"] / d["params"] if d else None
        for k in ("pp", "tg"):
            m[f"{k}_ratio"] = statistics.median(a / b for a, b in zip(m[f"{k}_s"], d[f"{k}_s"])) if d else None
            m[f"{k}_vs_kept"] = m[f"{k}_ratio"] / m["kept"] if d else None


def table(ms: list[dict], n_windows: int) -> str:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    ppl = f"PPL ({n_windows}×512)" if n_windows else "PPL"
    lines = [f"| model | type | file MB | params | kept | pp512 tok/s | pp time ratio | pp ratio / kept | tg128 tok/s | "
             f"tg time ratio | tg ratio / kept | {ppl} | fallbacks |", "|" + "---|" * 13]
    for m in ms:
        lines.append(f"| {m['label']} | {m['type']} | {m['file_mb']:.1f} | {m['params'] / 1e6:.1f}M | "
                     f"{fmt(m['kept'], '.3f')} | {m['pp_tok_s']:.0f} | {fmt(m['pp_ratio'], '.3f')} | "
                     f"{fmt(m['pp_vs_kept'], '.2f')} | "
                     f"{m['tg_tok_s']:.1f} | {fmt(m['tg_ratio'], '.3f')} | {fmt(m['tg_vs_kept'], '.2f')} | "
                     f"{fmt(m.get('ppl'), '.2f')} | {len(m['fallbacks'])} |")
    return "\n".join(lines)


def environment(threads: int, flash_attn: bool = False) -> dict:
    import llama_cpp
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), None) \
        if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"llama_cpp_python": llama_cpp.__version__, "threads": threads, "flash_attn": flash_attn, "cpu": cpu,
            "cores": os.cpu_count(), "machine": platform.machine()}


def main(argv=None):
    a = parse_args(argv)
    ms = models(a)
    fa = a.flash_attn == "on"
    env = environment(a.threads, fa)
    print(f"\nllama.cpp via llama-cpp-python {env['llama_cpp_python']}, {a.threads} thread(s) of {env['cores']} "
          f"({env['cpu']}), flash attention {a.flash_attn}; pp{PP} and tg{TG}, {a.reps} round(s), medians", flush=True)
    measure(ms, a.threads, a.reps, fa)
    add_ratios(ms)
    windows = wikitext_windows(a.wikitext, ms[0]["path"], a.ppl_windows) if a.ppl_windows else []
    write(a, env, ms, windows)  # the timings are kept whatever happens to the perplexities (minutes per model)
    for i, m in enumerate(ms if windows else []):
        t = time.perf_counter()
        m["ppl"] = perplexity(m["path"], windows, a.threads, fa)
        print(f"perplexity {i + 1}/{len(ms)} {m['label']} {m['type']}: {m['ppl']:.2f} "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
        write(a, env, ms, windows)
    print("\n" + table(ms, len(windows)))
    print(f"wrote {a.json}")


def recorded(ms: list[dict]) -> list[dict]:
    # files as results name them: the GGUFs in --work by name, sources relative to the repository (cli.recorded_path)
    return [{**m, "path": cli.recorded_path(m["path"]), "source": cli.recorded_path(m["source"])} for m in ms]


def write(a: argparse.Namespace, env: dict, ms: list[dict], windows: list) -> None:
    out = {"protocol": {"pp": PP, "tg": TG, "reps": a.reps, "statistic": "median", "ppl_windows": len(windows),
                        "ppl_window_tokens": PP, "wikitext": cli.recorded_path(a.wikitext)}, "environment": env,
           "models": recorded(ms), "table": table(ms, len(windows))}
    Path(a.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
