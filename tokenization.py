"""Tokenizers: SentencePiece (LLaMA-1/2, `tokenizer.model`), byte-level BPE (Llama-3, SmolLM2, `tokenizer.json`) and
the tokenizer stored inside a GGUF file (either kind). Every command sees the same small interface, `Tokenizer`.

BOS follows the tokenizer (`add_bos`): a LLaMA SentencePiece model adds it; a `tokenizer.json` adds it where its
`tokenizer_config.json` says `add_bos_token` or its post-processor template starts with a special token (Llama-3);
a GGUF file says so in `tokenizer.ggml.add_bos_token`. Text that spells a special token (a literal `<s>` or
`<|im_start|>` in a document) is tokenised as text, as SentencePiece and llama.cpp (`special=False`) do.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from abc import ABC, abstractmethod
from pathlib import Path

INSTALL_TOKENIZERS = "pip install tokenizers"


class Tokenizer(ABC):
    """encode / decode, and the ids every protocol needs. `path` names where it came from (a file, or a GGUF)."""
    path: str
    bos_id: int
    eos_id: int
    vocab_size: int
    add_bos: bool

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + self._encode(text) + [self.eos_id] * eos

    @abstractmethod
    def _encode(self, text: str) -> list[int]:
        """The text's tokens, no BOS or EOS."""

    @abstractmethod
    def decode(self, ids) -> str:
        """The text of the ids."""

    @abstractmethod
    def fingerprint(self) -> str:
        """sha256 of what decides the tokens: the key of the token cache (data.corpus_tokens)."""

    @abstractmethod
    def files(self, max_len: int) -> dict[str, bytes]:
        """The files transformers' AutoTokenizer reads (name -> content), tokenising exactly as this tokenizer does."""


# -----------------------------------------------------------------------------
# SentencePiece


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path=None, proto: bytes | None = None, add_bos: bool = True):
        import sentencepiece as spm
        self.path = str(path)
        self.sp = spm.SentencePieceProcessor()
        if proto is None:
            if not os.path.isfile(self.path):
                raise ValueError(f"tokenizer {self.path} does not exist; pass --tokenizer PATH/tokenizer.model")
            try:
                self.sp.Load(self.path)
            except Exception as e:  # sentencepiece raises OSError/RuntimeError on a bad file
                raise ValueError(f"tokenizer {self.path} is not a SentencePiece model ({e})") from None
        else:
            self.sp.LoadFromSerializedProto(proto)
        self.proto = proto
        self.bos_id, self.eos_id, self.vocab_size = self.sp.bos_id(), self.sp.eos_id(), self.sp.vocab_size()
        self.add_bos = add_bos

    def _encode(self, text: str) -> list[int]:
        return self.sp.EncodeAsIds(text)

    def decode(self, ids) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])

    def model_bytes(self) -> bytes:
        return self.proto if self.proto is not None else Path(self.path).read_bytes()

    def fingerprint(self) -> str:
        return hashlib.sha256(self.model_bytes()).hexdigest()

    def files(self, max_len: int) -> dict[str, bytes]:
        """tokenizer.model for sentencepiece users, and tokenizer.json with the model's own normaliser, which
        transformers' PreTrainedTokenizerFast follows exactly (its LlamaTokenizer conversion ignores
        remove_extra_whitespaces, and transformers 5 splits leading and repeated spaces its own way). Without the
        `tokenizers` package only tokenizer.model is written, for LlamaTokenizer."""
        files = {"tokenizer.model": self.model_bytes()}
        c = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": self.add_bos, "add_eos_token": False,
             "legacy": True, "model_max_length": max_len, "clean_up_tokenization_spaces": False}
        for name, i in (("bos_token", self.sp.bos_id()), ("eos_token", self.sp.eos_id()), ("unk_token", self.sp.unk_id())):
            if i >= 0:
                c[name] = self.sp.IdToPiece(i)
        try:
            tk = spm_as_tokenizers(self.sp, spm_spec(self.model_bytes()))
        except ValueError:  # no tokenizers package, or a model type it cannot express
            tk = None
        if tk is not None:
            bos = self.sp.IdToPiece(self.bos_id) if self.bos_id >= 0 else None
            if self.add_bos and bos:
                t = _tokenizers()
                tk.post_processor = t.processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                                    special_tokens=[(bos, self.bos_id)])
            files["tokenizer.json"] = tk.to_str().encode()
            c.update(tokenizer_class="PreTrainedTokenizerFast", split_special_tokens=True)
            c.pop("legacy")
        files["tokenizer_config.json"] = json.dumps(c, indent=2).encode()
        return files


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # protobuf writes negative int32 as 10-byte two's complement
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _pb(field: int, value) -> bytes:
    """One protobuf field: bytes/str (length-delimited), float (fixed32), bool/int (varint)."""
    if isinstance(value, (bytes, str)):
        value = value.encode() if isinstance(value, str) else value
        return _varint(field << 3 | 2) + _varint(len(value)) + value
    if isinstance(value, float):
        return _varint(field << 3 | 5) + struct.pack("<f", value)
    return _varint(field << 3) + _varint(int(value))


def spm_proto(tokens, scores, types, unk: int, bos: int, eos: int, add_space_prefix: bool = True) -> bytes:
    """A SentencePiece ModelProto (sentencepiece_model.proto) from a GGUF `llama` vocabulary: the pieces with their
    scores and types, BPE merging by score (as llama.cpp's SPM tokenizer), byte fallback when <0xNN> pieces exist, no
    whitespace normalisation (llama.cpp does none)."""
    pieces = b"".join(_pb(1, _pb(1, t) + _pb(2, float(s)) + _pb(3, int(k))) for t, s, k in zip(tokens, scores, types))
    byte_fallback = any(int(k) == 6 for k in types)
    trainer = (_pb(3, 2) + _pb(4, len(tokens)) + _pb(35, byte_fallback) + _pb(40, unk) + _pb(41, bos) + _pb(42, eos)
               + _pb(43, -1))
    normalizer = _pb(1, "identity") + _pb(3, add_space_prefix) + _pb(4, False) + _pb(5, True)
    return pieces + _pb(2, trainer) + _pb(3, normalizer)


def _pb_fields(buf: bytes):
    """(field number, value) of one protobuf message: ints for varints, bytes for length-delimited, floats for
    fixed32 (the wire types sentencepiece_model.proto uses)."""
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(buf, i)
        elif wire == 2:
            n, i = _read_varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = struct.unpack("<f", buf[i:i + 4])[0], i + 4
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        else:
            raise ValueError(f"protobuf wire type {wire} is not a SentencePiece model's")
        yield field, value


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = buf[i]
        n |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if b < 0x80:
            return n, i


def spm_spec(proto: bytes) -> dict:
    """What decides a SentencePiece model's tokens besides its pieces: the model type, byte fallback and the
    normaliser (with sentencepiece_model.proto's defaults)."""
    spec = {"model_type": 1, "byte_fallback": False, "charsmap": b"", "add_dummy_prefix": True,
            "remove_extra_whitespaces": True, "escape_whitespaces": True}
    for field, value in _pb_fields(proto):
        if field == 2:  # TrainerSpec
            for f, v in _pb_fields(value):
                if f == 3:
                    spec["model_type"] = v
                elif f == 35:
                    spec["byte_fallback"] = bool(v)
        elif field == 3:  # NormalizerSpec
            for f, v in _pb_fields(value):
                key = {2: "charsmap", 3: "add_dummy_prefix", 4: "remove_extra_whitespaces", 5: "escape_whitespaces"}.get(f)
                if key:
                    spec[key] = v if key == "charsmap" else bool(v)
    return spec


def spm_as_tokenizers(sp, spec: dict):
    """The `tokenizers` equivalent of a SentencePiece model (sentencepiece.SentencePieceProcessor), normaliser
    included: transformers reads it from tokenizer.json. BPE merges come from the pieces: a pair merges when their
    concatenation is a piece, the higher its score the earlier. The whitespace rules are emitted only where the
    model asks for them (remove_extra_whitespaces: stories260K's tok512 yes, LLaMA's no)."""
    t = _tokenizers()
    n = sp.vocab_size()
    pieces = [sp.IdToPiece(i) for i in range(n)]
    if spec["model_type"] == 2:
        vocab = {p: i for i, p in enumerate(pieces)}
        ranked = sorted(((sp.GetScore(vocab[p]), vocab[p], p[:k], p[k:]) for p in vocab if len(p) > 1
                         for k in range(1, len(p)) if p[:k] in vocab and p[k:] in vocab), key=lambda m: (-m[0], m[1]))
        model = t.models.BPE(vocab, [(a, b) for _, _, a, b in ranked], unk_token=pieces[sp.unk_id()], fuse_unk=True,
                             byte_fallback=spec["byte_fallback"])
    elif spec["model_type"] == 1:
        model = t.models.Unigram([(p, sp.GetScore(i)) for i, p in enumerate(pieces)], sp.unk_id(),
                                 spec["byte_fallback"])
    else:
        raise ValueError(f"SentencePiece model type {spec['model_type']} has no tokenizer.json equivalent here")
    tk = t.Tokenizer(model)
    steps = [t.normalizers.Precompiled(spec["charsmap"])] if spec["charsmap"] else []
    if spec["remove_extra_whitespaces"]:
        steps += [t.normalizers.Replace(t.Regex("^ +| +$"), ""), t.normalizers.Replace(t.Regex(" {2,}"), " ")]
    if spec["add_dummy_prefix"]:
        steps.append(t.normalizers.Prepend("\u2581"))
    if spec["escape_whitespaces"]:
        steps.append(t.normalizers.Replace(" ", "\u2581"))
    tk.normalizer = t.normalizers.Sequence(steps)
    tk.decoder = t.decoders.Sequence([t.decoders.Replace("\u2581", " "), t.decoders.ByteFallback(), t.decoders.Fuse(),
                                      t.decoders.Strip(" ", 1 if spec["add_dummy_prefix"] else 0, 0)])
    tk.add_special_tokens([t.AddedToken(pieces[i], special=True, normalized=False) for i in range(n)
                           if sp.IsControl(i) or sp.IsUnknown(i)])
    return tk


# -----------------------------------------------------------------------------
# byte-level BPE (the `tokenizers` library: the well-kept implementation of Hugging Face's tokenizer.json)


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ValueError(f"this checkpoint has a byte-level BPE tokenizer, which needs the `tokenizers` package: "
                         f"{INSTALL_TOKENIZERS}") from None
    return tokenizers


class BPETokenizer(Tokenizer):
    """pre: llama.cpp's name of the pre-tokenizer (gpt2, smollm, llama-bpe), None for one it does not know."""

    def __init__(self, tk, path: str, bos_id: int, eos_id: int, add_bos: bool, config: dict | None = None,
                 pre: str | None = None):
        self.tk, self.path, self.pre = tk, str(path), pre
        self.tk.encode_special_tokens = True  # a literal "<|im_start|>" in a document is text, not a control token
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)
        self.config = config or {}

    def _encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=False)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.tk.to_str().encode()).hexdigest()

    def vocab(self) -> tuple[list[str], list[str], set[int]]:
        """(tokens by id, merges as 'a b', ids of special tokens): what a GGUF gpt2 vocabulary holds."""
        model = json.loads(self.tk.to_str())["model"]
        tokens = [self.tk.id_to_token(i) for i in range(self.vocab_size)]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        special = {i for i, t in self.tk.get_added_tokens_decoder().items() if t.special}
        return tokens, merges, special

    def files(self, max_len: int) -> dict[str, bytes]:
        token = lambda i: self.tk.id_to_token(i) if i is not None and i >= 0 else None  # noqa: E731
        c = {k: v for k, v in self.config.items() if k in ("chat_template", "pad_token", "unk_token")}
        c.update({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": token(self.bos_id),
                  "eos_token": token(self.eos_id), "add_bos_token": self.add_bos, "add_eos_token": False,
                  "split_special_tokens": True, "model_max_length": max_len, "clean_up_tokenization_spaces": False})
        return {"tokenizer.json": self.tk.to_str().encode(), "tokenizer_config.json": json.dumps(c, indent=2).encode()}


def _token_name(v) -> str | None:
    return v.get("content") if isinstance(v, dict) else v


def _template_bos(tk_json: dict) -> str | None:
    """The special token a TemplateProcessing post-processor puts before the text (Llama-3's <|begin_of_text|>)."""
    post = tk_json.get("post_processor") or {}
    procs = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for p in procs:
        if p.get("type") == "TemplateProcessing" and p.get("single"):
            first = p["single"][0]
            if "SpecialToken" in first:
                return first["SpecialToken"]["id"]
    return None


def bpe_from_file(path: Path) -> BPETokenizer:
    """tokenizer.json, with BOS/EOS and add_bos from tokenizer_config.json (else config.json / the template)."""
    tokenizers = _tokenizers()
    try:
        tk_json = json.loads(Path(path).read_text())
        tk = tokenizers.Tokenizer.from_str(json.dumps(tk_json))
    except Exception as e:  # a JSON error, or tokenizers' own Exception for a model it does not know
        raise ValueError(f"{path}: not a tokenizer.json the `tokenizers` library reads ({str(e).splitlines()[0]})") from None
    kind = (tk_json.get("model") or {}).get("type")
    if kind not in ("BPE",):
        raise ValueError(f"{path}: a {kind} tokenizer.json is not supported (byte-level BPE, as Llama-3 and SmolLM2 "
                         f"ship, is); pass --tokenizer tokenizer.model for a SentencePiece model")
    folder = Path(path).parent
    cfg = _read_json(folder / "tokenizer_config.json")
    model_cfg = _read_json(folder / "config.json")
    template = _template_bos(tk_json)
    bos_name, eos_name = _token_name(cfg.get("bos_token")) or template, _token_name(cfg.get("eos_token"))
    bos = tk.token_to_id(bos_name) if bos_name else model_cfg.get("bos_token_id")
    eos = tk.token_to_id(eos_name) if eos_name else model_cfg.get("eos_token_id")
    add_bos = cfg["add_bos_token"] if "add_bos_token" in cfg else template is not None
    if eos is None:
        raise ValueError(f"{path}: no EOS token (tokenizer_config.json eos_token or config.json eos_token_id)")
    return BPETokenizer(tk, path, -1 if bos is None else bos, eos, bool(add_bos and bos is not None), cfg,
                        _pre_name(tk_json.get("pre_tokenizer")))


def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not JSON ({e})") from None


# GGUF `tokenizer.ggml.pre` -> the pre-tokenizer of the original tokenizer.json (as llama.cpp's llama-vocab.cpp maps
# them). The regexes are the original tokenizers'.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE = ("default", "gpt2", "smollm", "llama-bpe", "llama3")


def _pre_tokenizer(pre: str):
    t = _tokenizers()
    pt = t.pre_tokenizers
    if pre in ("default", "gpt2"):
        return pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # digits one by one, then GPT-2's byte-level split
        return pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in ("llama-bpe", "llama3"):
        return pt.Sequence([pt.Split(t.Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
                            pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    raise ValueError(f"GGUF tokenizer pre-tokenizer '{pre}' is not supported ({', '.join(GGUF_PRE)} are); "
                     f"pass --tokenizer tokenizer.json from the model's Hugging Face folder")


def _pre_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a tokenizer.json pre-tokenizer of the three kinds _pre_tokenizer builds."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [p.get("type") for p in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT:
        return "llama-bpe"
    return None


def bpe_from_gguf(meta: dict, path: str) -> BPETokenizer:
    """A GGUF `gpt2` vocabulary (tokens, merges, pre) as the equivalent tokenizer.json tokenizer."""
    t = _tokenizers()
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or [1] * len(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    pre = meta.get("tokenizer.ggml.pre", "default")
    model = t.models.BPE({tok: i for i, tok in enumerate(tokens)}, merges, ignore_merges=pre in ("llama-bpe", "llama3"))
    tk = t.Tokenizer(model)
    tk.pre_tokenizer = _pre_tokenizer(pre)
    tk.decoder = t.decoders.ByteLevel()
    # control (3) and user-defined (4) tokens match as whole tokens, as llama.cpp's special-token partition does
    tk.add_special_tokens([t.AddedToken(tok, special=int(k) == 3, normalized=False)
                           for tok, k in zip(tokens, types) if int(k) in (3, 4)])
    bos, eos = meta.get("tokenizer.ggml.bos_token_id", -1), meta.get("tokenizer.ggml.eos_token_id", -1)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos >= 0
    if add_bos:  # transformers adds BOS through the post-processor of tokenizer.json
        tk.post_processor = t.processors.TemplateProcessing(single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B",
                                                            special_tokens=[(tokens[bos], bos)])
    config = {"chat_template": meta["tokenizer.chat_template"]} if "tokenizer.chat_template" in meta else {}
    return BPETokenizer(tk, path, bos, eos, add_bos, config, {"default": "gpt2", "llama3": "llama-bpe"}.get(pre, pre))


def spm_from_gguf(meta: dict, path: str) -> SentencePieceTokenizer:
    tokens = meta["tokenizer.ggml.tokens"]
    proto = spm_proto(tokens, meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens),
                      meta.get("tokenizer.ggml.token_type") or [1] * len(tokens),
                      meta.get("tokenizer.ggml.unknown_token_id", 0), meta.get("tokenizer.ggml.bos_token_id", 1),
                      meta.get("tokenizer.ggml.eos_token_id", 2), meta.get("tokenizer.ggml.add_space_prefix", True))
    return SentencePieceTokenizer(path, proto=proto, add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)))


def tokenizer_from_gguf(meta: dict, path: str) -> Tokenizer:
    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        return bpe_from_gguf(meta, path)
    if kind == "llama":
        return spm_from_gguf(meta, path)
    raise ValueError(f"{path}: GGUF tokenizer model '{kind}' is not supported (gpt2 byte-level BPE and llama "
                     f"SentencePiece are); pass --tokenizer PATH")


# -----------------------------------------------------------------------------
# finding the tokenizer of a checkpoint


def _sentencepiece_add_bos(path: Path) -> bool:
    cfg = _read_json(path.parent / "tokenizer_config.json")
    return bool(cfg.get("add_bos_token", True))  # a LLaMA SentencePiece model adds BOS


def open_tokenizer(path) -> Tokenizer:
    """A tokenizer file: tokenizer.model (SentencePiece) or tokenizer.json (BPE). A GGUF's own tokenizer is built
    from its metadata (tokenizer_from_gguf), which checkpoint.py reads."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"tokenizer {p} does not exist; pass --tokenizer PATH (tokenizer.model or tokenizer.json)")
    if p.suffix == ".json":
        return bpe_from_file(p)
    if p.name == "tokenizer.model" and p.read_bytes()[:1] != b"\n" and looks_like_tiktoken(p):
        raise ValueError(f"{p} is Meta's Llama-3 tiktoken file, which is not supported; use the Hugging Face "
                         f"folder's tokenizer.json (--tokenizer PATH/tokenizer.json or --ckpt the HF folder)")
    return SentencePieceTokenizer(p, add_bos=_sentencepiece_add_bos(p))


def looks_like_tiktoken(p: Path) -> bool:
    """Meta's Llama-3 tokenizer.model: lines of 'base64-token rank', not a SentencePiece protobuf."""
    with open(p, "rb") as f:
        head = f.read(256).split(b"\n")[0].split(b" ")
    return len(head) == 2 and head[1].isdigit()
