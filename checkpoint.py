"""Checkpoint and tokenizer I/O: every format a LLaMA comes in, read into a llama.Llama, and the pruned model written
back as a Hugging Face folder. llama.py holds the model; this file holds the file formats.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch

from llama import Llama, LlamaConfig, Masks, lora_modules, meta_model, prune_model

# -----------------------------------------------------------------------------
# tokenizer


class SentencePieceTokenizer:
    def __init__(self, path):
        import sentencepiece as spm
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise ValueError(f"tokenizer {self.path} does not exist; pass --tokenizer PATH/tokenizer.model")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(self.path)
        except Exception as e:  # sentencepiece raises OSError/RuntimeError on a bad file
            raise ValueError(f"tokenizer {self.path} is not a SentencePiece model ({e})") from None
        self.bos_id, self.eos_id, self.vocab_size = self.sp.bos_id(), self.sp.eos_id(), self.sp.vocab_size()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + self.sp.EncodeAsIds(text) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])


def find_tokenizer(ckpt_path, tokenizer_path=None) -> Tokenizer:
    if tokenizer_path:
        return SentencePieceTokenizer(tokenizer_path)
    p = Path(ckpt_path)
    folder = p if p.is_dir() else p.parent
    candidates = [folder / "tokenizer.model"] + sorted(folder.glob("*.model"))
    for c in candidates:
        if c.is_file():
            return SentencePieceTokenizer(c)
    raise ValueError(f"no SentencePiece tokenizer (tokenizer.model or *.model) beside {ckpt_path}; "
                     "pass --tokenizer PATH")

Tokenizer = SentencePieceTokenizer  # the type every command's tokenizer has

# -----------------------------------------------------------------------------
# reading: HF directory, Meta original directory, llama2.c .bin


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
    if p.is_file() and p.suffix == ".bin":
        with open(p, "rb") as f:
            if len(f.read(28)) < 28:
                raise ValueError(f"{p}: too short to be a llama2.c checkpoint")
        return None
    raise ValueError(f"{p}: unknown checkpoint format; expected an HF directory (config.json + *.safetensors/*.bin), "
                     "a Meta directory (params.json + consolidated.*.pth) or a llama2.c .bin file")


def read_checkpoint(path) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    p = Path(path)
    cfg = check_checkpoint(p)  # the layout, and for an HF directory its config, without reading weights
    if p.is_dir() and (p / "config.json").is_file():
        return cfg, _hf_state(p)
    if p.is_dir():
        return _meta_dir(p)
    return _llama2c_bin(p)


def load_model(path, device="cpu", dtype=torch.float32) -> Llama:
    cfg, state = read_checkpoint(path)
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
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for p in model.parameters():
        p.requires_grad_(False)  # the base is frozen in NutePrune; LoRA adds the trainable tensors
    return model.eval()



def load(path, tokenizer=None, device="cpu", dtype=torch.float32) -> tuple[Llama, Tokenizer]:
    model = load_model(path, device, dtype)
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


def save_model(model: Llama, out_dir, tokenizer_path=None) -> None:
    """HF-format directory: config.json + model.safetensors (+ tokenizer.model and tokenizer_config.json); a pruned
    model also gets its transformers code, configuration_nuteprune.py + modeling_nuteprune.py (trust_remote_code)."""
    from safetensors.torch import save_file
    if lora_modules(model):
        raise ValueError("model still has LoRA adapters; call merge_lora(model) before saving")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")
    hf = model.config.to_hf()
    hf["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    atomic_write(out / "model.safetensors", lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    for name in ("configuration_nuteprune.py", "modeling_nuteprune.py"):  # the transformers code of a pruned model
        if "auto_map" in hf:
            atomic_write(out / name, lambda p: shutil.copyfile(HF_CODE / name, p))
        elif (out / name).is_file():  # a stale copy from an earlier export into this folder
            (out / name).unlink()
    atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(hf, indent=2)))
    if tokenizer_path:
        atomic_write(out / "tokenizer.model", lambda p: shutil.copyfile(tokenizer_path, p))
        tok = json.dumps(_hf_tokenizer_config(tokenizer_path, model.config.max_seq_len), indent=2)
        atomic_write(out / "tokenizer_config.json", lambda p: p.write_text(tok))


def _hf_tokenizer_config(tokenizer_path, max_len: int) -> dict:
    """What transformers' AutoTokenizer needs to read tokenizer.model (it cannot guess from a nuteprune model_type)."""
    sp = SentencePieceTokenizer(tokenizer_path).sp
    c = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": True,
         "model_max_length": max_len, "clean_up_tokenization_spaces": False}
    for name, i in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id())):
        if i >= 0:
            c[name] = sp.IdToPiece(i)
    return c


def export_pruned(model: Llama, masks: Masks, out_dir, tokenizer_path=None) -> LlamaConfig:
    pruned = prune_model(model, masks)
    save_model(pruned, out_dir, tokenizer_path)
    return pruned.config

