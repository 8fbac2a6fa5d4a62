"""Export a model for other runtimes: GGUF for llama.cpp (and llama-cpp-python), or a Hugging Face folder.

    python export.py OUT/pruned --gguf model.gguf [--type f32|f16|q8_0|q4_0|q4_k_m|q5_k_m|q6_k] [--pad]
    python export.py CKPT --hf DIR         # what export_pruned writes: transformers loads it (remote code if pruned)

The input is anything llama.py reads (a pruned `OUT/pruned/`, an HF, Meta or llama2.c checkpoint); `gguf` (the
official writer package, `pip install gguf`) is needed only for --gguf. Quantised types are llama.cpp's own: an f16
GGUF is written first, then llama.cpp's quantizer (llama-cpp-python's `llama_model_quantize`, or the `llama-quantize`
binary) makes the file, and the export lists every weight matrix that got another type than the one asked: llama.cpp
quantises a matrix only when its rows are whole blocks (32 values for Q4_0 / Q8_0, 256 for the K-quants) and
otherwise falls back (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, F16 when not even 32 divides). Widths that avoid
this: nuteprune.py --round-to N, or --pad here.

llama.cpp runs a pruned model through its `deci` architecture (Nemotron-NAS), the one that reads per-layer head counts,
K/V head counts and FFN widths. It cannot express everything our export produces, so the exporter pads, exactly
(the output is unchanged), and reports what the padding cost:
- uniform groups: llama.cpp maps query head q to K/V head q // (H / Hkv), so the query heads of each layer are sorted
  by their K/V head and uneven groups are evened out by zero-output query heads (zero q rows and o columns) or by
  duplicating a K/V head, whichever adds fewer parameters;
- layer 0 must have a head (llama.cpp reads the head size from it): a zero-output head when it has none;
- a layer whose FFN is skipped (width 0) also drops its attention output, and in the last layer the selection of
  the output rows: width 1 with zero weights there.
With --pad, FFN widths and attention outputs (query heads x Dh) are padded up to whole blocks of the type the same
way (zero channels, zero-output heads), and the hidden width up to blocks of 32 (zero hidden dims: zero embedding
columns, zero input columns and output rows, norm weights scaled by sqrt(D / D_padded) and eps by D / D_padded, so
that the norms, which now divide by the padded width, give the same values; padded_dim says why not 256). A model
whose padded layers all have the same sizes is written as the plain `llama` architecture.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

import checkpoint
import cli  # its Parser: one-line errors, as every command of the project
import llama
import tokenization

# -----------------------------------------------------------------------------
# the GGUF layout of each layer (pure: sizes in, sizes out)


@dataclass
class LayerPlan:
    q_src: list  # per GGUF query head: our query head it copies, or None (a zero-output head)
    kv_src: list  # per GGUF K/V head: our K/V head it copies, or None (zero, for the head of an empty layer 0)
    ffn: int  # GGUF FFN width (>= ours; extra channels are zero)
    added: int  # parameters the padding adds


HIDDEN_BLOCK = 32  # the hidden width is padded to at most this block: see padded_dim


def padded_dim(cfg: llama.LlamaConfig, pad: int = 1) -> int:
    """The GGUF hidden width: ours, up to whole blocks of min(pad, 32) (zero dims). Not to 256 for the K-quants: the
    hidden width is a row of nearly every matrix, and their fallbacks for rows of 32-blocks (Q5_0, Q5_1, Q8_0) cost
    fewer bits than widening every matrix (SmolLM2: 576 -> 768, +33%); a row off the 32-blocks falls back to F16."""
    block = min(pad, HIDDEN_BLOCK)
    return -(-cfg.dim // block) * block


def plan_layer(cfg: llama.LlamaConfig, i: int, pad: int = 1) -> LayerPlan:
    D, D2, dh, kv_map, f = cfg.dim, padded_dim(cfg, pad), cfg.head_dim, cfg.kv_map[i], cfg.ffn[i]
    groups = {}  # our K/V head -> its query heads, in order
    for q, k in enumerate(kv_map):
        groups.setdefault(k, []).append(q)
    if not kv_map:  # no attention; layer 0 still needs one head
        q_src, kv_src = ([None] * _padded_group(1, 1, dh, pad), [None]) if i == 0 else ([], [])
    else:
        # group size g for every K/V head: a group of n queries becomes ceil(n / g) copies of its K/V head, each
        # with g query heads (zero-output ones filling the last). g = max pads only, g = 1 duplicates only.
        def size(g):
            kv = sum(math.ceil(len(qs) / g) for qs in groups.values())
            return kv * g + kv  # query heads + K/V heads, in units of head_cost

        g = min(range(max(map(len, groups.values())), 0, -1), key=size)  # fewest added; ties: the larger g
        width = _padded_group(g, sum(math.ceil(len(qs) / g) for qs in groups.values()), dh, pad)
        q_src, kv_src = [], []
        for k in sorted(groups):
            qs = groups[k]
            for start in range(0, len(qs), g):
                chunk = qs[start:start + g]
                q_src += chunk + [None] * (width - len(chunk))
                kv_src.append(k)
    last = i == cfg.n_layers - 1
    ffn = 1 if f == 0 and (q_src or last) else f
    ffn = -(-ffn // pad) * pad  # --pad: zero channels up to whole blocks
    # one query head: q rows + o columns; one K/V head: k rows + v rows; an FFN channel: gate, up rows + a down column;
    # a padded hidden dim also in each norm GGUF writes (a sublayer without units has none there)
    added = ((len(q_src) + len(kv_src)) * D2 - (cfg.heads[i] + cfg.kv_heads[i]) * D) * 2 * dh \
        + (ffn * D2 - f * D) * 3 + (D2 - D) * (bool(q_src) + bool(ffn))
    return LayerPlan(q_src, kv_src, ffn, added)


def _padded_group(g: int, n_kv: int, dh: int, pad: int) -> int:
    """Query heads per K/V head so that attn_output's rows (n_kv * g' * Dh long) are whole blocks of pad."""
    step = pad // math.gcd(pad, n_kv * dh)
    return -(-g // step) * step


def plan_gguf(cfg: llama.LlamaConfig, pad: int = 1) -> list[LayerPlan]:
    return [plan_layer(cfg, i, pad) for i in range(cfg.n_layers)]


def padding_report(cfg: llama.LlamaConfig, plans: list[LayerPlan], pad: int = 1) -> dict:
    rows = [{"layer": i, "heads": [cfg.heads[i], len(p.q_src)], "kv_heads": [cfg.kv_heads[i], len(p.kv_src)],
             "ffn": [cfg.ffn[i], p.ffn], "added_params": p.added} for i, p in enumerate(plans)]
    D2 = padded_dim(cfg, pad)
    embeddings = (D2 - cfg.dim) * (cfg.vocab_size * (1 if cfg.tie_embeddings else 2) + 1)  # + the final norm
    added, total = sum(p.added for p in plans) + embeddings, llama.count_params(cfg)
    return {"layers": rows, "hidden": [cfg.dim, D2], "added_params": added, "params": total,
            "added_fraction": added / total}


def format_report(report: dict) -> str:
    lines = ["layer | heads | K/V heads | FFN | added params"]
    for r in report["layers"]:
        h, kv, f = (f"{a}" if a == b else f"{a} -> {b}" for a, b in (r["heads"], r["kv_heads"], r["ffn"]))
        lines.append(f"{r['layer']} | {h} | {kv} | {f} | {r['added_params']}")
    if report["hidden"][0] != report["hidden"][1]:
        lines.append("hidden width {} -> {} (zero dims)".format(*report["hidden"]))
    lines.append(f"padding: {report['added_params']} parameters added to {report['params']} "
                 f"({100 * report['added_fraction']:.2f}%)")
    return "\n".join(lines)

# -----------------------------------------------------------------------------
# tensors


def to_interleaved(w: torch.Tensor, dh: int) -> torch.Tensor:
    """q/k rows of each head from HF's rotate-half order (x_j pairs with x_{j+Dh/2}) to llama.cpp's adjacent pairs."""
    return w.view(-1, 2, dh // 2, w.shape[-1]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(cfg: llama.LlamaConfig, state: dict, plans: list[LayerPlan], dim: int | None = None):
    """(GGUF name, fp32 tensor in PyTorch's (out, in) shape), one at a time: a 7B model never sits in memory in fp32.
    dim: the GGUF hidden width (padded_dim), zero dims beyond ours."""
    D, dh, extra = cfg.dim, cfg.head_dim, (dim or cfg.dim) - cfg.dim
    f32 = lambda key: state[key].float()  # noqa: E731
    cols = lambda key: F.pad(f32(key), (0, extra))  # noqa: E731  (out, D): zero input columns
    rows = lambda t: F.pad(t, (0, 0, 0, extra))  # noqa: E731  (D, in): zero output rows
    # a norm over the padded width divides by D + extra: its weight times sqrt(D / (D + extra)) (and eps times
    # D / (D + extra), _add_hparams) gives the same values on our dims, and 0 on the zero ones
    norm = lambda key: F.pad(f32(key) * math.sqrt(D / (D + extra)), (0, extra))  # noqa: E731
    yield "token_embd.weight", cols("model.embed_tokens.weight")
    yield "output_norm.weight", norm("model.norm.weight")
    if not cfg.tie_embeddings:  # tied: llama.cpp reuses token_embd
        yield "output.weight", cols("lm_head.weight")

    def heads(w, src):  # (n * Dh, D) -> rows of the heads in src, zeros for None
        blocks = w.view(w.shape[0] // dh, dh, w.shape[-1])
        return torch.cat([blocks[s] if s is not None else blocks.new_zeros(dh, w.shape[-1]) for s in src])

    for i, p in enumerate(plans):
        src, dst = f"model.layers.{i}.", f"blk.{i}."
        if p.q_src:
            yield dst + "attn_norm.weight", norm(src + "input_layernorm.weight")
            yield dst + "attn_q.weight", to_interleaved(heads(cols(src + "self_attn.q_proj.weight"), p.q_src), dh)
            yield dst + "attn_k.weight", to_interleaved(heads(cols(src + "self_attn.k_proj.weight"), p.kv_src), dh)
            yield dst + "attn_v.weight", heads(cols(src + "self_attn.v_proj.weight"), p.kv_src)
            wo = rows(f32(src + "self_attn.o_proj.weight"))  # (D, H * Dh): its columns are per query head
            yield dst + "attn_output.weight", heads(wo.T.contiguous(), p.q_src).T.contiguous()
        if p.ffn:
            pad = p.ffn - cfg.ffn[i]
            yield dst + "ffn_norm.weight", norm(src + "post_attention_layernorm.weight")
            yield dst + "ffn_gate.weight", F.pad(cols(src + "mlp.gate_proj.weight"), (0, 0, 0, pad))
            yield dst + "ffn_up.weight", F.pad(cols(src + "mlp.up_proj.weight"), (0, 0, 0, pad))
            yield dst + "ffn_down.weight", F.pad(rows(f32(src + "mlp.down_proj.weight")), (0, pad))

# -----------------------------------------------------------------------------
# writing


def _vocab(tok: tokenization.Tokenizer, vocab_size: int):
    """SentencePiece pieces, scores and token types (llama.cpp's numbering), padded to the model's vocabulary."""
    import gguf
    sp, tokens, scores, types = tok.sp, [], [], []
    for i in range(vocab_size):
        if i >= sp.vocab_size():
            tokens.append(f"[PAD{i}]".encode())
            scores.append(0.0)
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(sp.IdToPiece(i).encode("utf-8"))
        scores.append(sp.GetScore(i))
        types.append(gguf.TokenType.UNKNOWN if sp.IsUnknown(i) else gguf.TokenType.CONTROL if sp.IsControl(i)
                     else gguf.TokenType.UNUSED if sp.IsUnused(i) else gguf.TokenType.BYTE if sp.IsByte(i)
                     else gguf.TokenType.NORMAL)
    return tokens, scores, types


def _rope(w, cfg: llama.LlamaConfig) -> torch.Tensor | None:
    """Writes RoPE keys; returns llama.cpp's per-frequency divisors for Llama-3.1 scaling (rope_freqs), else None."""
    import gguf
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    kind = (cfg.rope_scaling or {}).get("rope_type", "default")
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_scaling["factor"])
    elif kind == "llama3":  # llama.cpp divides each default frequency by this factor
        return llama.rope_inv_freq(replace(cfg, rope_scaling=None)) / llama.rope_inv_freq(cfg)
    return None


# Quantised types, made by llama.cpp's own quantizer from an f16 GGUF: the llama_ftype of each (llama.h), the tensor
# types its mixture gives weight matrices whose rows are whole blocks (q4_0 and the K mixtures put output.weight, and
# in the K mixtures attn_v / ffn_down of some layers, at Q6_K), and the block --pad pads to.
QUANT_TYPES = {"q8_0": 7, "q4_0": 2, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
MIXTURES = {"q8_0": ("Q8_0",), "q4_0": ("Q4_0", "Q6_K"), "q4_k_m": ("Q4_K", "Q5_K", "Q6_K"),
            "q5_k_m": ("Q5_K", "Q6_K"), "q6_k": ("Q6_K",)}
PAD_BLOCK = {"f32": 1, "f16": 1, "q8_0": 32, "q4_0": 32, "q4_k_m": 256, "q5_k_m": 256, "q6_k": 256}
FILE_TYPES = ("f32", "f16", *QUANT_TYPES)


def _encode(t: torch.Tensor, ftype: str):
    """(array, raw_dtype) for the writer: 1-D tensors stay f32; q8_0 (the gguf package's, used only without llama.cpp)
    needs rows that are whole blocks of 32."""
    import gguf
    a = t.contiguous().numpy()
    if t.dim() == 1 or ftype == "f32":
        return a, None
    if ftype == "q8_0" and t.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return a.astype("float16"), None


def _check_output(out_path, ftype: str) -> Path:
    if ftype not in FILE_TYPES:
        raise ValueError(f"--type {ftype!r} is not one of {', '.join(FILE_TYPES)}")
    out_path = Path(out_path)
    if not out_path.parent.is_dir():
        raise ValueError(f"output folder {out_path.parent} does not exist")
    if out_path.is_dir():
        raise ValueError(f"--gguf {out_path} is a folder; give a file name")
    return out_path


def _checkpoint_and_tokenizer(ckpt, tokenizer):
    """(config, state dict, tokenizer) of the checkpoint, the tokenizer checked against the model's vocabulary."""
    cfg, state = checkpoint.read_checkpoint(ckpt)
    tok = checkpoint.find_tokenizer(ckpt, tokenizer)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} pieces but the model's vocabulary is "
                         f"{cfg.vocab_size}: wrong tokenizer? pass --tokenizer PATH")
    return cfg, state, tok


def _layer_counts(plans: list[LayerPlan]) -> tuple[str, tuple]:
    """The architecture and the (query heads, K/V heads, FFN width) keys: a number each when every layer has the same
    sizes (plain llama), else per-layer arrays (deci)."""
    heads, kv_heads, ffn = ([len(p.q_src) for p in plans], [len(p.kv_src) for p in plans], [p.ffn for p in plans])
    if len(set(heads)) == len(set(kv_heads)) == len(set(ffn)) == 1:
        return "llama", (heads[0], kv_heads[0], ffn[0])
    return "deci", (heads, kv_heads, ffn)


def _add_hparams(w, name: str, cfg: llama.LlamaConfig, ftype: str, counts: tuple, dim: int) -> None:
    import gguf
    heads, kv_heads, ffn = counts
    w.add_name(name)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[ftype])
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(dim)  # padded_dim: eps scaled below as the norm weights are in gguf_tensors
    w.add_block_count(cfg.n_layers)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_feed_forward_length(ffn)
    w.add_key_length(cfg.head_dim)  # explicit: the hidden width is no longer heads * head_dim
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.norm_eps * cfg.dim / dim)
    w.add_vocab_size(cfg.vocab_size)


def _add_bpe_tokenizer(w, tok: tokenization.BPETokenizer, vocab_size: int) -> None:
    """A byte-level BPE vocabulary as llama.cpp's gpt2 model: tokens, merges and the pre-tokenizer's name."""
    import gguf
    if tok.pre is None:
        raise ValueError(f"tokenizer {tok.path}: its pre-tokenizer is none llama.cpp knows (gpt2, smollm, llama-bpe)")
    tokens, merges, special = tok.vocab()
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    types += [gguf.TokenType.UNUSED] * (vocab_size - len(types))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok.pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if tok.bos_id >= 0:
        w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    w.add_add_bos_token(tok.add_bos)
    w.add_add_space_prefix(False)


def _add_tokenizer(w, tok: tokenization.Tokenizer, vocab_size: int) -> None:
    if isinstance(tok, tokenization.BPETokenizer):
        return _add_bpe_tokenizer(w, tok, vocab_size)
    tokens, scores, types = _vocab(tok, vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    for setter, i in ((w.add_bos_token_id, tok.sp.bos_id()), (w.add_eos_token_id, tok.sp.eos_id()),
                      (w.add_unk_token_id, tok.sp.unk_id())):
        if i >= 0:
            setter(i)
    w.add_add_bos_token(tok.add_bos)
    w.add_add_eos_token(False)


def _write_file(w, path) -> None:
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_gguf(ckpt, out_path, ftype: str = "f32", tokenizer=None, pad: int = 1, threads: int = 0) -> dict:
    """Write a GGUF file of the checkpoint; returns the padding report (also printed), with `fallbacks` for a quantised
    type. Quantised types: an f16 GGUF first (a temporary file beside out_path), then llama.cpp's quantizer (only q8_0
    has a fallback without llama.cpp: the gguf package's Q8_0). pad: FFN widths and attention outputs padded up to
multiples of it, and the hidden width too (--pad: the type's block, PAD_BLOCK)."""
    try:
        import gguf
    except ImportError:
        raise ValueError("writing GGUF needs the gguf package: pip install gguf") from None
    out_path = _check_output(out_path, ftype)
    how = quantizer() if ftype in QUANT_TYPES else None
    if ftype in QUANT_TYPES and how is None and ftype != "q8_0":
        raise ValueError(f"--type {ftype} needs llama.cpp's quantizer: pip install llama-cpp-python (or put "
                         f"llama-quantize on PATH)")
    cfg, state, tok = _checkpoint_and_tokenizer(ckpt, tokenizer)
    pad = max(pad, 1)
    plans, dim = plan_gguf(cfg, pad), padded_dim(cfg, pad)
    report = padding_report(cfg, plans, pad)
    arch, counts = _layer_counts(plans)
    written = "f16" if how else ftype

    w = gguf.GGUFWriter(None, arch, use_temp_file=True)  # tensor data waits on disk, not in memory
    _add_hparams(w, Path(ckpt).resolve().name, cfg, written, counts, dim)
    rope_freqs = _rope(w, cfg)  # writes the RoPE keys; the tensor (Llama 3.1 scaling) leads the tensors
    _add_tokenizer(w, tok, cfg.vocab_size)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.numpy())
    for name, t in gguf_tensors(cfg, state, plans, dim):
        a, raw = _encode(t, written)
        w.add_tensor(name, a, raw_dtype=raw)

    print(format_report(report))
    if how:
        with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=f".{out_path.name}.") as tmp:
            _write_file(w, Path(tmp) / "f16.gguf")
            checkpoint.atomic_write(out_path, lambda path: llama_quantize(Path(tmp) / "f16.gguf", path, ftype,
                                                                            threads))
        report.update(type=ftype, quantizer=how, fallbacks=quant_fallbacks(out_path, ftype))
        print(format_fallbacks(report["fallbacks"], ftype))
    else:  # a failed export leaves no half-written file
        checkpoint.atomic_write(out_path, lambda path: _write_file(w, path))
        report.update(type=ftype, quantizer=None, fallbacks=[])
    print(f"wrote {out_path} ({arch}, {ftype}, {out_path.stat().st_size / 1e6:.2f} MB)")
    return report

# -----------------------------------------------------------------------------
# llama.cpp's quantizer, and what it did


def quantizer() -> str | None:
    """llama.cpp's quantizer on this machine: llama-cpp-python's binding, else the llama-quantize binary, else None."""
    try:
        import llama_cpp  # noqa: F401
        return "llama_cpp"
    except ImportError:
        return "llama-quantize" if shutil.which("llama-quantize") else None


def llama_quantize(src: Path, dst: Path, ftype: str, threads: int = 0) -> list[str]:
    """src (an f16 GGUF) -> dst at ftype, by llama.cpp (threads 0: all cores); returns its log lines, which it would
    otherwise print by the hundred."""
    if quantizer() == "llama-quantize":
        r = subprocess.run(["llama-quantize", str(src), str(dst), ftype.upper(), str(threads or os.cpu_count())],
                           capture_output=True, text=True)
        if r.returncode:
            raise ValueError(f"llama-quantize failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
        return (r.stdout + r.stderr).splitlines()
    import ctypes
    import llama_cpp
    from llama_cpp import _logger  # llama-cpp-python's own log callback, restored after
    lines = []
    capture = llama_cpp.llama_log_callback(lambda level, text, user_data: lines.append(text.decode("utf-8", "replace")))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = QUANT_TYPES[ftype], threads
    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    log = "".join(lines).splitlines()
    if rc != 0:
        raise ValueError(f"llama.cpp's quantizer failed ({rc}): {log[-1:]}")
    return log


def quant_fallbacks(path, ftype: str) -> list[dict]:
    """Every weight matrix of a quantised GGUF that is none of the types llama.cpp's mixture for ftype uses, read back
    from the file: its name, type, row length and the block the row is not a multiple of. llama.cpp falls back when a
    row is not whole blocks: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0 (output.weight too), F16 when not even 32
    divides."""
    import gguf
    mixture = [gguf.GGMLQuantizationType[t] for t in MIXTURES[ftype]]
    blocks = sorted({gguf.GGML_QUANT_SIZES[t][0] for t in mixture})
    found = []
    for t in gguf.GGUFReader(path).tensors:
        if t.tensor_type in mixture or (t.tensor_type == gguf.GGMLQuantizationType.F32 and len(t.shape) == 1):
            continue  # as asked, or a norm (1-D tensors stay f32)
        row = int(t.shape[0])  # GGUF's ne[0]: the row length
        found.append({"tensor": t.name, "type": t.tensor_type.name, "row": row,
                      "block": next((b for b in blocks if row % b), None)})
    return found


def format_fallbacks(found: list[dict], ftype: str, each: int = 12) -> str:
    """One line per tensor (more than `each`: one per type and row length, with a count and the first tensor)."""
    if not found:
        return f"llama.cpp quantised every weight matrix as {ftype} asks"
    why = lambda f: (f"row {f['row']} not a multiple of {f['block']}" if f["block"]  # noqa: E731
                     else f"row {f['row']}: llama.cpp's choice")
    lines = [f"llama.cpp fell back on {len(found)} weight matrices (asked {ftype}: {', '.join(MIXTURES[ftype])}):"]
    if len(found) <= each:
        return "\n".join(lines + [f"  {f['tensor']:<28} {f['type']:<5} {why(f)}" for f in found])
    groups = {}
    for f in found:
        groups.setdefault((f["type"], f["row"], f["block"]), []).append(f["tensor"])
    for (kind, row, block), names in groups.items():
        lines.append(f"  {len(names):4} x {kind:<5} {why({'row': row, 'block': block})} (e.g. {names[0]})")
    return "\n".join(lines)

# -----------------------------------------------------------------------------


def write_hf(ckpt, out_dir, tokenizer=None) -> None:
    """A Hugging Face folder as export_pruned writes it (remote code included for a pruned model): converts a Meta
    or llama2.c checkpoint, or brings an older nuteprune export up to date."""
    if Path(out_dir).resolve() == Path(ckpt).resolve():
        raise ValueError(f"--hf {out_dir} is the checkpoint itself; write to another folder")
    model = checkpoint.load_model(ckpt)
    checkpoint.save_model(model, out_dir, checkpoint.find_tokenizer(ckpt, tokenizer))
    kind = "plain Llama" if model.config.uniform else "pruned: load with trust_remote_code=True"
    print(f"wrote {out_dir} ({kind})")


def main(argv=None) -> int:
    p = cli.Parser(description="Export a checkpoint (a pruned OUT/pruned/ included) for other runtimes.")
    p.add_argument("ckpt", help="model folder or file, any layout llama.py reads")
    p.add_argument("--gguf", metavar="FILE", help="write a GGUF file for llama.cpp")
    p.add_argument("--type", default="f32", choices=FILE_TYPES,
                   help="weight type of 2-D tensors; q8_0, q4_0, q4_k_m, q5_k_m, q6_k by llama.cpp's quantizer "
                   "(llama-cpp-python or llama-quantize), which lists the tensors it had to give another type")
    p.add_argument("--pad", action="store_true",
                   help="pad FFN widths and attention outputs up to the type's block (32: q8_0/q4_0, 256: K-quants) "
                   "with zero channels and zero-output heads: exact, at the cost of the padded weights")
    p.add_argument("--threads", type=int, default=0, help="quantizer threads (0: all cores)")
    p.add_argument("--hf", metavar="DIR", help="write a Hugging Face folder (safetensors, config, tokenizer, code)")
    p.add_argument("--tokenizer", help="SentencePiece model (default: beside the checkpoint)")
    args = p.parse_args(argv)
    if not (args.gguf or args.hf):
        p.error("nothing to write: give --gguf FILE and/or --hf DIR")
    try:
        if args.hf:
            write_hf(args.ckpt, args.hf, args.tokenizer)
        if args.gguf:
            write_gguf(args.ckpt, args.gguf, args.type, args.tokenizer, PAD_BLOCK[args.type] if args.pad else 1,
                       args.threads)
    except (ValueError, OSError) as e:  # OSError: an output path that cannot be written
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
