"""Checkpoint and tokenizer I/O: every format a LLaMA comes in, read into a llama.Llama, and the pruned model written
back as a Hugging Face folder. llama.py holds the model; this file holds the file formats.
"""
from __future__ import annotations

import functools
import json
import math
import mmap
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch

from llama import Llama, LlamaConfig, Masks, lora_modules, meta_model, pruned_config, pruned_state, rope_inv_freq
from tokenization import SentencePieceTokenizer, Tokenizer, looks_like_tiktoken, open_tokenizer, tokenizer_from_gguf

# -----------------------------------------------------------------------------
# reading: HF directory, Meta original directory, llama2.c .bin, GGUF


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Zero-copy tensors over a private (copy-on-write) mmap of the file: loading costs no second copy."""
    with open(path, "rb") as f:
        try:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except (struct.error, ValueError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a safetensors file ({e})") from None
    out = {}
    for k, info in header.items():
        if k == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor '{k}' has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        dtype = _ST_DTYPES[info["dtype"]]
        if 8 + n + end > len(buf):
            raise ValueError(f"{path}: tensor '{k}' lies beyond the end of the file (truncated download?)")
        count = (end - start) // dtype.itemsize
        t = torch.frombuffer(buf, dtype=dtype, count=count, offset=8 + n + start) if count else torch.empty(0, dtype=dtype)
        out[k] = t.view(info["shape"])
    return out


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # pickle / zip errors of a corrupt file
        raise ValueError(f"{path}: cannot read PyTorch checkpoint ({type(e).__name__}: {e})") from None


def _hf_state(folder: Path) -> dict[str, torch.Tensor]:
    for index_name, reader in (("model.safetensors.index.json", _read_safetensors),
                               ("pytorch_model.bin.index.json", _torch_load)):
        if (folder / index_name).is_file():
            files = sorted(set(json.loads((folder / index_name).read_text())["weight_map"].values()))
            state = {}
            for fname in files:
                if not (folder / fname).is_file():
                    raise ValueError(f"{folder / index_name} names shard {fname}, which is missing")
                state.update(reader(folder / fname))
            return state
    if (folder / "model.safetensors").is_file():
        return _read_safetensors(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").is_file():
        return _torch_load(folder / "pytorch_model.bin")
    raise ValueError(f"{folder}: config.json found but no model.safetensors, pytorch_model.bin or shard index")


def _meta_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # Meta / llama2.c rotate interleaved pairs (x0,x1),(x2,x3)...; HF rotates halves. Reorder each head's rows.
    out, inp = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def _meta_dir(folder: Path) -> tuple[LlamaConfig, dict]:
    params = json.loads((folder / "params.json").read_text())
    shards = sorted(folder.glob("consolidated.*.pth"))
    if not shards:
        raise ValueError(f"{folder}: params.json found but no consolidated.*.pth weights")
    parts = [_torch_load(s) for s in shards]
    # Model-parallel shards: column-parallel weights split rows, row-parallel split columns, embeddings split D.
    cat_dim = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}

    def merged(key):
        if key not in parts[0]:
            raise ValueError(f"{shards[0]}: missing key '{key}'")
        kind = key.split(".")[-2]
        if len(parts) == 1 or kind not in cat_dim:
            return parts[0][key]
        return torch.cat([p[key] for p in parts], dim=cat_dim[kind])

    emb = merged("tok_embeddings.weight")
    L, H = params["n_layers"], params["n_heads"]
    cfg = LlamaConfig(dim=params["dim"], n_layers=L, n_heads=H, n_kv_heads=params.get("n_kv_heads") or H,
                      ffn_dim=merged("layers.0.feed_forward.w1.weight").shape[0], vocab_size=emb.shape[0],
                      norm_eps=params.get("norm_eps", 1e-5), rope_theta=params.get("rope_theta", 10000.0),
                      max_seq_len=params.get("max_seq_len", 2048),
                      rope_scaling=({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
                                    if params.get("use_scaled_rope") else None))
    names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
             "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
             "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    state = {"model.embed_tokens.weight": emb, "model.norm.weight": merged("norm.weight"),
             "lm_head.weight": merged("output.weight")}
    for i in range(L):
        for src, dst in names.items():
            w = merged(f"layers.{i}.{src}.weight")
            if src == "attention.wq":
                w = _meta_permute(w, H)
            elif src == "attention.wk":
                w = _meta_permute(w, cfg.n_kv_heads)
            state[f"model.layers.{i}.{dst}.weight"] = w
    return cfg, state


def _llama2c_bin(path: Path) -> tuple[LlamaConfig, dict]:
    """Karpathy's llama2.c export: legacy (v0, 7 int32 header) or version 1 (magic 'ak42', fp32)."""
    raw = path.read_bytes()
    if len(raw) < 28:
        raise ValueError(f"{path}: too short to be a llama2.c checkpoint")
    offset = 28
    if struct.unpack("<I", raw[:4])[0] == 0x616B3432:  # "ak42"
        version = struct.unpack("<i", raw[4:8])[0]
        if version != 1:
            raise ValueError(f"{path}: llama2.c version {version} is not supported (export it with version 0 or 1)")
        dim, hidden, L, H, Hkv, vocab, seq = struct.unpack("<7i", raw[8:36])
        shared = bool(raw[36])
        offset = 256
    else:
        dim, hidden, L, H, Hkv, vocab, seq = struct.unpack("<7i", raw[:28])
        shared = vocab > 0
        vocab = abs(vocab)
    if min(dim, hidden, L, H, Hkv, vocab, seq) <= 0 or dim % H or H % Hkv:
        raise ValueError(f"{path}: not a llama2.c checkpoint (header {dim, hidden, L, H, Hkv, vocab, seq})")
    cfg = LlamaConfig(dim=dim, n_layers=L, n_heads=H, n_kv_heads=Hkv, ffn_dim=hidden, vocab_size=vocab,
                      norm_eps=1e-5, max_seq_len=seq, tie_embeddings=shared)
    data = torch.frombuffer(bytearray(raw[offset:]), dtype=torch.float32)
    dh, pos = dim // H, 0

    def take(*shape):
        nonlocal pos
        n = math.prod(shape)
        if pos + n > data.numel():
            raise ValueError(f"{path}: file ends early (truncated?) — header says {cfg}")
        t = data[pos:pos + n].view(*shape)
        pos += n
        return t

    state = {"model.embed_tokens.weight": take(vocab, dim)}
    att_norm, wq = take(L, dim), take(L, dim, dim)
    wk, wv, wo = take(L, Hkv * dh, dim), take(L, Hkv * dh, dim), take(L, dim, dim)
    ffn_norm, w1, w2, w3 = take(L, dim), take(L, hidden, dim), take(L, dim, hidden), take(L, hidden, dim)
    state["model.norm.weight"] = take(dim)
    if offset == 28:
        take(seq * dh)  # legacy freq_cis_real, freq_cis_imag: unused
    if not shared:
        state["lm_head.weight"] = take(vocab, dim)
    for i in range(L):
        p = f"model.layers.{i}."
        state.update({p + "input_layernorm.weight": att_norm[i], p + "post_attention_layernorm.weight": ffn_norm[i],
                      p + "self_attn.q_proj.weight": _meta_permute(wq[i], H),
                      p + "self_attn.k_proj.weight": _meta_permute(wk[i], Hkv),
                      p + "self_attn.v_proj.weight": wv[i], p + "self_attn.o_proj.weight": wo[i],
                      p + "mlp.gate_proj.weight": w1[i], p + "mlp.down_proj.weight": w2[i],
                      p + "mlp.up_proj.weight": w3[i]})
    return cfg, state


INSTALL_GGUF = "pip install gguf"
GGUF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def _gguf_reader(path: Path):
    """The gguf package's reader, kept for the file's current version: parsing the metadata of a 49k-token
    vocabulary takes seconds, and a load asks for it three times (checks, weights, tokenizer)."""
    st = Path(path).stat()
    return _cached_reader(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, size: int, mtime_ns: int):
    try:
        import gguf
    except ImportError:
        raise ValueError(f"{path}: reading GGUF needs the `gguf` package: {INSTALL_GGUF}") from None
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (no GGUF magic)")
    try:
        reader = gguf.GGUFReader(path)
        reader.metadata = {k: _gguf_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        return reader
    except Exception as e:  # struct/numpy/ValueError on a truncated or damaged file
        raise ValueError(f"{path}: cannot read GGUF (truncated download? {type(e).__name__}: {e})") from None


def _gguf_value(field):
    v = field.contents()
    return v.tolist() if hasattr(v, "tolist") else v


def gguf_metadata(path) -> dict:
    """Every key/value of a GGUF file (arrays as lists); the tensors are not read."""
    return _gguf_reader(Path(path)).metadata


def _gguf_config(path: Path, meta: dict, names: dict) -> LlamaConfig:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: GGUF architecture '{arch}' is not a LLaMA (only 'llama' is read); "
                         f"convert the original Hugging Face folder instead")
    a = lambda k, d=None: meta.get(f"llama.{k}", d)  # noqa: E731
    H = a("attention.head_count")
    if any(isinstance(a(k), list) for k in ("attention.head_count", "attention.head_count_kv", "feed_forward_length")):
        raise ValueError(f"{path}: per-layer head or FFN counts are not read; load the Hugging Face export instead")
    emb = names["token_embd.weight"]
    cfg = LlamaConfig(dim=a("embedding_length"), n_layers=a("block_count"), n_heads=H,
                      n_kv_heads=a("attention.head_count_kv", H), head_dim=a("attention.key_length", 0),
                      ffn_dim=a("feed_forward_length"), vocab_size=int(emb.shape[1]),
                      norm_eps=a("attention.layer_norm_rms_epsilon", 1e-5), rope_theta=a("rope.freq_base", 10000.0),
                      max_seq_len=a("context_length", 2048), tie_embeddings="output.weight" not in names)
    kind = a("rope.scaling.type", "none")
    if kind == "linear":
        cfg.rope_scaling = {"rope_type": "linear", "factor": a("rope.scaling.factor")}
    elif kind not in ("none", None):
        raise ValueError(f"{path}: RoPE scaling '{kind}' is not supported (linear, llama3)")
    if "rope_freqs.weight" in names:  # Llama-3.1/3.2: llama3 scaling stored as per-frequency factors
        cfg.rope_scaling = _llama3_scaling(path, cfg, _dequantize(names["rope_freqs.weight"], path))
    return cfg


def _llama3_scaling(path: Path, cfg: LlamaConfig, factors: torch.Tensor) -> dict:
    """llama.cpp stores llama3 RoPE scaling as 1 / (per-frequency scale); recover Meta's parameters and check them."""
    s = {"rope_type": "llama3", "factor": float(factors.max()), "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192}
    base = LlamaConfig(**{**cfg.__dict__, "rope_scaling": None})
    expected = rope_inv_freq(base) / factors.float()
    if not torch.allclose(rope_inv_freq(LlamaConfig(**{**cfg.__dict__, "rope_scaling": s})), expected, rtol=1e-4):
        raise ValueError(f"{path}: rope_freqs.weight is not llama3 scaling with factor {s['factor']}, "
                         f"low/high 1/4 and 8192 positions; load the Hugging Face folder instead")
    return s


def _dequantize(t, path: Path) -> torch.Tensor:
    from gguf.quants import dequantize
    try:
        arr = dequantize(t.data, t.tensor_type)
    except (NotImplementedError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which the gguf package cannot "
                         f"dequantise ({e}); requantise it to q8_0 or f16 with llama-quantize") from None
    shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first
    arr = arr.reshape(shape).astype("float32", copy=False)
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy())  # F32 tensors are views of the read-only map


def _gguf(path: Path, dtype: torch.dtype | None = None) -> tuple[LlamaConfig, dict]:
    """A llama GGUF: dequantised (every type the gguf package reads), Q/K rows back from llama.cpp's RoPE order."""
    reader = _gguf_reader(path)
    names = {t.name: t for t in reader.tensors}
    cfg = _gguf_config(path, reader.metadata, names)
    state = {}
    for name, t in names.items():
        parts = name.split(".")
        if name == "rope_freqs.weight":
            continue
        if parts[0] == "blk":
            if parts[2] not in GGUF_NAMES:
                raise ValueError(f"{path}: unexpected tensor {name} (not a LLaMA layer)")
            key = f"model.layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.weight"
        else:
            key = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}.get(name)
            if key is None:
                raise ValueError(f"{path}: unexpected tensor {name} (not a LLaMA model)")
        w = _dequantize(t, path)
        if parts[-2] in ("attn_q", "attn_k"):  # llama.cpp stores Meta's interleaved order
            w = _meta_permute(w, cfg.n_heads if parts[-2] == "attn_q" else cfg.n_kv_heads)
        state[key] = w.to(dtype) if dtype is not None else w
    return cfg, state


def check_checkpoint(path, weights: bool = True) -> LlamaConfig | None:
    """Cheap checks that path is a checkpoint read_checkpoint can load, reading no weights: the config (None for a
    Meta directory, whose sizes live in the weights) or a ValueError naming what is missing. weights=False accepts
    a directory with config.json alone."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"checkpoint {p} does not exist")
    if p.is_dir() and (p / "config.json").is_file():
        try:
            cfg = LlamaConfig.from_hf(json.loads((p / "config.json").read_text()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{p / 'config.json'}: not a LLaMA config ({type(e).__name__}: {e})") from None
        names = ("model.safetensors.index.json", "pytorch_model.bin.index.json", "model.safetensors", "pytorch_model.bin")
        if weights and not any((p / n).is_file() for n in names):
            raise ValueError(f"{p}: config.json found but no weights (model.safetensors, pytorch_model.bin or a "
                             f"shard index); is this the right directory?")
        return cfg
    if p.is_dir() and (p / "params.json").is_file():
        if not any(p.glob("consolidated.*.pth")):
            raise ValueError(f"{p}: params.json found but no consolidated.*.pth weights")
        return None
    if p.is_file() and p.suffix == ".gguf":
        reader = _gguf_reader(p)
        if reader.metadata.get("split.count", 1) > 1:
            raise ValueError(f"{p}: one part of a split GGUF; merge the parts first (llama-gguf-split --merge)")
        return _gguf_config(p, reader.metadata, {t.name: t for t in reader.tensors})
    if p.is_file() and p.suffix == ".bin":
        with open(p, "rb") as f:
            if len(f.read(28)) < 28:
                raise ValueError(f"{p}: too short to be a llama2.c checkpoint")
        return None
    raise ValueError(f"{p}: unknown checkpoint format; expected an HF directory (config.json + *.safetensors/*.bin), "
                     "a Meta directory (params.json + consolidated.*.pth), a llama2.c .bin or a .gguf file")


def read_checkpoint(path, dtype: torch.dtype | None = None) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """The config and state dict (HF names and RoPE order). dtype casts GGUF tensors as they are dequantised, so a
    quantised file never lies whole in fp32; the other formats are memory-mapped and cast by the caller."""
    p = Path(path)
    cfg = check_checkpoint(p)  # the layout, and for an HF directory its config, without reading weights
    if p.is_dir() and (p / "config.json").is_file():
        return cfg, _hf_state(p)
    if p.is_dir():
        return _meta_dir(p)
    if p.suffix == ".gguf":
        return _gguf(p, dtype)
    return _llama2c_bin(p)


def load_model(path, device="cpu", dtype=torch.float32, as_stored: bool = False) -> Llama:
    """as_stored: the weights keep the file's dtype (memory-mapped where the format allows: safetensors, PyTorch
    .bin, not converted; a GGUF is dequantised into dtype), for a caller that converts them piece by piece
    (distributed.shard_model)."""
    cfg, state = read_checkpoint(path, dtype)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    model = meta_model(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}  # old HF buffers
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match its config: missing keys {missing[:4]}, "
                         f"unexpected keys {unexpected[:4]}")
    for k, shape in expected.items():
        if state[k].shape != shape:
            raise ValueError(f"{path}: '{k}' has shape {tuple(state[k].shape)}, config implies {tuple(shape)}")
    # .to() is a no-op (no copy) when dtype and device already match, so mmap-backed tensors stay shared
    state = {k: v.to(device=device, dtype=None if as_stored else dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for p in model.parameters():
        p.requires_grad_(False)  # the base is frozen in NutePrune; LoRA adds the trainable tensors
    return model.eval()



def find_tokenizer(ckpt_path, tokenizer_path=None) -> Tokenizer:
    """--tokenizer if given (a file, or a .gguf's own tokenizer); else the tokenizer inside a GGUF checkpoint, or
    beside the weights: a SentencePiece tokenizer.model first (LLaMA-1/2 folders carry it beside an equivalent
    tokenizer.json), then tokenizer.json, then *.model."""
    p = Path(tokenizer_path or ckpt_path)
    if p.is_file() and p.suffix == ".gguf":
        return tokenizer_from_gguf(gguf_metadata(p), str(p))
    if tokenizer_path:
        return open_tokenizer(tokenizer_path)
    folder = p if p.is_dir() else p.parent
    candidates = [folder / "tokenizer.model", folder / "tokenizer.json"] + sorted(folder.glob("*.model"))
    for c in candidates:
        if c.is_file() and not (c.name == "tokenizer.model" and (folder / "tokenizer.json").is_file()
                                and looks_like_tiktoken(c)):
            return open_tokenizer(c)
    raise ValueError(f"no tokenizer (tokenizer.json, tokenizer.model or *.model) beside {ckpt_path}; "
                     "pass --tokenizer PATH")


def load(path, tokenizer=None, device="cpu", dtype=torch.float32, as_stored: bool = False) -> tuple[Llama, Tokenizer]:
    model = load_model(path, device, dtype, as_stored)
    tok = find_tokenizer(path, tokenizer)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} pieces but the model's vocabulary is "
                         f"{model.config.vocab_size}: wrong tokenizer? pass --tokenizer PATH")
    return model, tok

# -----------------------------------------------------------------------------
# writing


def atomic_write(path, write) -> None:
    """write(tmp) into a unique temporary file beside path, then rename it over path: a reader (or a kill) sees the
    old file or the whole new one, never half of one. The file gets the umask's permissions, like open() gives."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # created 0600
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


HF_CODE = Path(__file__).resolve().parent / "hf"  # configuration_nuteprune.py, modeling_nuteprune.py


SHARD_BYTES = 5 * 10 ** 9  # transformers' default max_shard_size, "5GB"


def write_safetensors(tensors, out: Path, shard_bytes: int = SHARD_BYTES) -> None:
    """(name, tensor) pairs, consumed one at a time, into out/model.safetensors, or, past shard_bytes, into
    model-0000k-of-0000n.safetensors shards with model.safetensors.index.json, as transformers' save_pretrained writes
    them: no more than one shard's tensors are held at once. Shards of an earlier export in out are removed."""
    from safetensors.torch import save_file
    parts, shard, size, total = [], {}, 0, 0

    def flush():
        tmp = out / f".model-{len(parts) + 1:05d}.safetensors.part"
        save_file(shard, str(tmp), metadata={"format": "pt"})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600; open() would give the umask's permissions
        parts.append((tmp, list(shard)))
    try:
        for name, t in tensors:
            if shard and size + t.nbytes > shard_bytes:
                flush()
                shard, size = {}, 0
            shard[name] = t.detach().contiguous().cpu()
            size, total = size + t.nbytes, total + t.nbytes
        flush()
        names = {tmp: "model.safetensors" if len(parts) == 1 else f"model-{k:05d}-of-{len(parts):05d}.safetensors"
                 for k, (tmp, _) in enumerate(parts, 1)}
        stale = [*out.glob("model-*-of-*.safetensors"), out / "model.safetensors.index.json", out / "model.safetensors"]
        for old in stale:  # an earlier export's files that this one does not replace
            if old.name not in names.values():
                old.unlink(missing_ok=True)
        for tmp, name in names.items():
            os.replace(tmp, out / name)
    finally:
        for tmp, _ in parts:
            tmp.unlink(missing_ok=True)
    if len(parts) > 1:
        weight_map = {n: names[tmp] for tmp, shard_names in parts for n in shard_names}
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write(out / "model.safetensors.index.json", lambda p: p.write_text(json.dumps(index, indent=2)))


def save_model(model: Llama, out_dir, tokenizer: Tokenizer | str | Path | None = None,
               shard_bytes: int = SHARD_BYTES) -> None:
    """HF-format directory: config.json + model.safetensors (sharded past shard_bytes) (+ the tokenizer's own files:
    tokenizer.model or tokenizer.json, and tokenizer_config.json); a pruned model also gets its transformers code,
    configuration_nuteprune.py + modeling_nuteprune.py (trust_remote_code)."""
    if lora_modules(model):
        raise ValueError("model still has LoRA adapters; call merge_lora(model) before saving")
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")
    write_hf(out_dir, state.items(), model.config, model.model.embed_tokens.weight.dtype, tokenizer, shard_bytes)


def write_hf(out_dir, tensors, cfg: LlamaConfig, dtype: torch.dtype, tokenizer: Tokenizer | str | Path | None = None,
             shard_bytes: int = SHARD_BYTES) -> None:
    """The folder of save_model from (name, tensor) pairs, written as they come."""
    if isinstance(tokenizer, (str, Path)):
        tokenizer = SentencePieceTokenizer(tokenizer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = cfg.to_hf()
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    if tokenizer is not None:
        hf.update(bos_token_id=tokenizer.bos_id if tokenizer.bos_id >= 0 else None, eos_token_id=tokenizer.eos_id)
    write_safetensors(tensors, out, shard_bytes)
    for name in ("configuration_nuteprune.py", "modeling_nuteprune.py"):  # the transformers code of a pruned model
        if "auto_map" in hf:
            atomic_write(out / name, lambda p: shutil.copyfile(HF_CODE / name, p))
        elif (out / name).is_file():  # a stale copy from an earlier export into this folder
            (out / name).unlink()
    atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(hf, indent=2)))
    if tokenizer is not None:
        for name, content in tokenizer.files(cfg.max_seq_len).items():
            atomic_write(out / name, lambda p: p.write_bytes(content))


def export_pruned(model: Llama, masks: Masks, out_dir, tokenizer: Tokenizer | None = None,
                  shard_bytes: int = SHARD_BYTES, dtype: torch.dtype | None = None) -> LlamaConfig:
    """The pruned model (llama.prune_model's) written layer by layer in dtype (default: the base's): never whole,
    never in fp32."""
    cfg = pruned_config(model.config, masks)
    dtype = dtype or model.model.embed_tokens.weight.dtype
    write_hf(out_dir, pruned_state(model, masks, dtype), cfg, dtype, tokenizer, shard_bytes)
    return cfg
