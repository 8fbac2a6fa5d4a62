"""A self-contained LLaMA with NutePrune's mask gates, hand-written LoRA, physical pruning and generation.
Reading and writing checkpoints and tokenizers lives in checkpoint.py.

Shape glossary (used in comments throughout the project):
    B batch, T sequence length, V vocabulary, L layers,
    D model width (hidden), H query heads, Hkv key/value heads, Dh head width, I FFN width.

Where the NutePrune gates act (METHOD.md §1, one place each):
    head          [L, H]  multiplies each query head's attention output, before o_proj;
    intermediate  [L, I]  multiplies act(gate_proj(x)) * up_proj(x), before down_proj;
    hidden        [D]     multiplies the token embeddings and every sublayer output (after o_proj, after down_proj).
`masks=None` is exactly vanilla LLaMA. A pruned (exported) model may have different head / FFN sizes per layer;
its config records them and its attention maps each query head to its K/V head explicitly (`kv_map`).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# config


@dataclass
class LlamaConfig:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 0  # 0: dim // n_heads
    ffn_dim: int = 11008
    vocab_size: int = 32000
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    rope_scaling: dict | None = None  # HF `rope_scaling`: {"rope_type": "llama3" | "linear", "factor": ...}
    # Per-layer shapes; empty means uniform (an unpruned model). Filled in __post_init__.
    heads: list[int] = field(default_factory=list)  # query heads kept in each layer
    kv_heads: list[int] = field(default_factory=list)  # K/V heads kept in each layer
    ffn: list[int] = field(default_factory=list)  # FFN channels kept in each layer
    kv_map: list[list[int]] = field(default_factory=list)  # per layer: the K/V head of each query head

    def __post_init__(self):
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}; give head_dim")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        group = self.n_heads // self.n_kv_heads
        self.heads = list(self.heads) or [self.n_heads] * self.n_layers
        self.kv_heads = list(self.kv_heads) or [self.n_kv_heads] * self.n_layers
        self.ffn = list(self.ffn) or [self.ffn_dim] * self.n_layers
        self.kv_map = [list(m) for m in self.kv_map] or [[h // group for h in range(self.n_heads)]] * self.n_layers
        for name in ("heads", "kv_heads", "ffn", "kv_map"):
            if len(getattr(self, name)) != self.n_layers:
                raise ValueError(f"config: '{name}' has {len(getattr(self, name))} entries, expected n_layers={self.n_layers}")
        for i, (h, kv, m) in enumerate(zip(self.heads, self.kv_heads, self.kv_map)):
            if len(m) != h or any(not 0 <= k < kv for k in m):
                raise ValueError(f"config: kv_map of layer {i} does not map {h} query heads onto {kv} K/V heads")

    @property
    def uniform(self) -> bool:
        """True for an unpruned model: masks [L, H], [L, I], [D] can be applied only then."""
        group = self.n_heads // self.n_kv_heads
        return (all(h == self.n_heads for h in self.heads) and all(k == self.n_kv_heads for k in self.kv_heads)
                and all(f == self.ffn_dim for f in self.ffn)
                and all(m == [h // group for h in range(self.n_heads)] for m in self.kv_map))

    @classmethod
    def from_hf(cls, c: dict) -> "LlamaConfig":
        if c.get("attention_bias") or c.get("mlp_bias"):
            raise ValueError("config.json: attention_bias / mlp_bias are not supported (LLaMA has no biases)")
        if c.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json: hidden_act '{c['hidden_act']}' is not supported (LLaMA uses silu)")
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        theta = c.get("rope_theta", rope.get("rope_theta", 10000.0))
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "llama3", "linear"):
            raise ValueError(f"config.json: rope_type '{kind}' is not supported (default, linear, llama3)")
        extra = c.get("nuteprune", {})  # per-layer shapes written by export_pruned
        return cls(dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                   n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
                   head_dim=c.get("head_dim") or 0, ffn_dim=c["intermediate_size"], vocab_size=c["vocab_size"],
                   norm_eps=c.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
                   max_seq_len=c.get("max_position_embeddings", 2048),
                   tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                   rope_scaling=None if kind == "default" else {**rope, "rope_type": kind},
                   heads=extra.get("heads", []), kv_heads=extra.get("kv_heads", []), ffn=extra.get("ffn", []),
                   kv_map=extra.get("kv_map", []))

    def to_hf(self) -> dict:
        c = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.dim,
             "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
             "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim, "intermediate_size": self.ffn_dim,
             "vocab_size": self.vocab_size, "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
             "max_position_embeddings": self.max_seq_len, "tie_word_embeddings": self.tie_embeddings,
             "hidden_act": "silu", "torch_dtype": "float32"}
        if self.rope_scaling:
            c["rope_scaling"] = self.rope_scaling
        if not self.uniform:  # not a plain Llama: transformers runs it with the remote code that save_model copies
            c.update(architectures=["NutePruneLlamaForCausalLM"], model_type="nuteprune_llama",
                     auto_map={"AutoConfig": "configuration_nuteprune.NutePruneLlamaConfig",
                               "AutoModelForCausalLM": "modeling_nuteprune.NutePruneLlamaForCausalLM"})
            c["nuteprune"] = {"heads": self.heads, "kv_heads": self.kv_heads, "ffn": self.ffn, "kv_map": self.kv_map}
        return c


@dataclass
class Masks:
    """NutePrune gate values z (METHOD.md §1). Any group may be None (= all ones)."""
    head: torch.Tensor | None = None  # [L, H] on query heads
    intermediate: torch.Tensor | None = None  # [L, I]
    hidden: torch.Tensor | None = None  # [D]

    def to(self, *args, **kwargs) -> "Masks":
        return Masks(*(None if m is None else m.to(*args, **kwargs) for m in map(self.__getattribute__, MASK_GROUPS)))


MASK_GROUPS = ("head", "intermediate", "hidden")  # the fields of Masks, in order

# -----------------------------------------------------------------------------
# helpers


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)  # (Dh/2,)
    s = cfg.rope_scaling
    if not s:
        return inv_freq
    if s["rope_type"] == "linear":
        return inv_freq / s["factor"]
    # Llama-3.1 frequency-dependent scaling: long wavelengths slowed by `factor`, short ones kept, smooth in between.
    factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def rope_cos_sin(cfg: LlamaConfig, positions: torch.Tensor, dtype: torch.dtype):
    freqs = positions.float()[:, None] * rope_inv_freq(cfg).to(positions.device)[None]  # (T, Dh/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, Dh), HF rotate-half layout
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _gate(x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    return x if z is None else x * z.to(x.dtype)

# -----------------------------------------------------------------------------
# modules


class RMSNorm(nn.Module):
    # Divides the sum of squares by the full width, zeros of pruned hidden dims included (the reference code's
    # choice, METHOD.md §1); export_pruned rescales weight and eps so a standard norm over the kept width matches.
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class LoRALinear(nn.Module):
    """y = x W^T + (alpha / rank) * x A^T B^T. The frozen weight stays at `.weight` so base keys load unchanged.

    Two adapters share the module: the trainable one (lora_a, lora_b) and a frozen teacher slot (teacher_a, teacher_b,
    buffers outside the state dict). `adapter` picks what the forward adds: "student", "teacher" or "off" (the base
    alone). A teacher's forward thus needs no copy into the trainable tensors, which under FSDP are sharded.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # frozen, possibly bf16 / meta-loaded
        self.weight.requires_grad_(False)
        self.rank, self.scale, self.adapter = rank, alpha / rank, "student"
        dev = base.weight.device
        # drawn on the CPU (generator: a CPU one, else torch's default), then moved: the same values on any device,
        # in one process or on every rank; a meta base (sharded loading) keeps them on the CPU until it is filled
        a = nn.init.kaiming_uniform_(torch.empty(rank, self.in_features), a=math.sqrt(5), generator=generator)
        self.lora_a = nn.Parameter(a if dev.type == "meta" else a.to(dev))  # as nn.Linear; B = 0: a no-op adapter
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=self.lora_a.device))
        self.register_buffer("teacher_a", torch.zeros(rank, self.in_features, device=dev), persistent=False)
        self.register_buffer("teacher_b", torch.zeros(self.out_features, rank, device=dev), persistent=False)

    def forward(self, x):
        y = F.linear(x, self.weight)
        if self.adapter == "off":
            return y
        a, b = (self.lora_a, self.lora_b) if self.adapter == "student" else (self.teacher_a, self.teacher_b)
        # LoRA path in fp32 master weights, cast to the activation dtype (autocast handles mixed precision)
        return y + F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype)) * self.scale

    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W + (alpha / rank) B A, in dtype (default: the weight's); a weight stored in another dtype is cast first."""
        dtype = dtype or self.weight.dtype
        return (self.weight.to(dtype).float() + self.scale * self.lora_b.float() @ self.lora_a.float()).to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.n_heads, self.n_kv, self.dh = cfg.heads[layer], cfg.kv_heads[layer], cfg.head_dim
        self.kv_map = cfg.kv_map[layer]
        self.q_proj = nn.Linear(cfg.dim, self.n_heads * self.dh, bias=False)
        self.k_proj = nn.Linear(cfg.dim, self.n_kv * self.dh, bias=False)
        self.v_proj = nn.Linear(cfg.dim, self.n_kv * self.dh, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.dh, cfg.dim, bias=False)
        self._kv_index = None
        # Equal, contiguous groups (MHA, GQA, pruned layers with even groups, e.g. --round-to) can read each K/V head
        # in place (SDPA's enable_gqa) instead of gathering a copy of the cache per query head (kv_index).
        self.even_groups = self.n_kv > 0 and self.n_heads % self.n_kv == 0 and \
            self.kv_map == [h // (self.n_heads // self.n_kv) for h in range(self.n_heads)]

    def kv_index(self, device) -> torch.Tensor:
        if self._kv_index is None or self._kv_index.device != device:
            self._kv_index = torch.tensor(self.kv_map, dtype=torch.long, device=device)
        return self._kv_index

    def forward(self, x, cos, sin, z_head=None, cache=None, start_pos=0):
        B, T, D = x.shape
        if self.n_heads == 0:  # every head of this layer was pruned
            return x.new_zeros(B, T, D)
        q = self.q_proj(x).view(B, T, self.n_heads, self.dh).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k_proj(x).view(B, T, self.n_kv, self.dh).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = self.v_proj(x).view(B, T, self.n_kv, self.dh).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # (k_cache, v_cache), each (B, Hkv, Tmax, Dh)
            cache[0][:, :, start_pos:start_pos + T] = k
            cache[1][:, :, start_pos:start_pos + T] = v
            k, v = cache[0][:, :, :start_pos + T], cache[1][:, :, :start_pos + T]
        # MHA reads in place always. A grouped layer does when nothing is trained (decode, teachers, evaluation) on
        # the CPU, whose kernel gives the gather's forward bits: with gradients the kernel sums a group's K/V
        # gradients in another order, and on CUDA enable_gqa rules out the memory-efficient kernel (fp32: untested).
        in_place = self.even_groups and (self.n_kv == self.n_heads or not torch.is_grad_enabled()
                                         and x.device.type == "cpu")
        if not in_place:  # each query head reads its own K/V head (uneven groups after export)
            idx = self.kv_index(x.device)
            k, v = k.index_select(1, idx), v.index_select(1, idx)  # (B, H, S, Dh)
        gqa = in_place and self.n_kv < self.n_heads  # the kernel maps query head q to K/V head q // group
        if start_pos == 0 or T == 1:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        else:  # chunked prefill after a cached prefix: query t sees keys <= start_pos + t
            S = start_pos + T
            allowed = torch.arange(S, device=x.device)[None] <= torch.arange(start_pos, S, device=x.device)[:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=gqa)
        if z_head is not None:
            y = y * z_head.to(y.dtype)[None, :, None, None]  # head gate, before o_proj (Eq. 1)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.dh))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.ffn = cfg.ffn[layer]
        self.gate_proj = nn.Linear(cfg.dim, self.ffn, bias=False)
        self.up_proj = nn.Linear(cfg.dim, self.ffn, bias=False)
        self.down_proj = nn.Linear(self.ffn, cfg.dim, bias=False)

    def forward(self, x, z_int=None):
        if self.ffn == 0:
            return torch.zeros_like(x)
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)  # (B, T, I)
        return self.down_proj(_gate(h, z_int))  # intermediate gate, before down_proj (Eq. 2)


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg, layer)
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, h, cos, sin, z_head=None, z_int=None, z_hid=None, cache=None, start_pos=0):
        h = h + _gate(self.self_attn(self.input_layernorm(h), cos, sin, z_head, cache, start_pos), z_hid)
        return h + _gate(self.mlp(self.post_attention_layernorm(h), z_int), z_hid)


class _Trunk(nn.Module):  # named `model` in Llama so that state-dict keys are exactly HF's
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = _Trunk(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False

    def forward(self, idx: torch.Tensor, masks: Masks | None = None, output_hidden: bool = False,
                cache: list | None = None, start_pos: int = 0):
        cfg = self.config
        B, T = idx.shape
        z_head = z_int = z_hid = None
        if masks is not None:
            if not cfg.uniform:
                raise ValueError("masks can only be applied to an unpruned model (this one has per-layer sizes)")
            z_head, z_int, z_hid = masks.head, masks.intermediate, masks.hidden
        h = _gate(self.model.embed_tokens(idx), z_hid)  # (B, T, D), hidden gate on the embeddings
        cos, sin = rope_cos_sin(cfg, torch.arange(start_pos, start_pos + T, device=idx.device), h.dtype)
        hidden = []
        for i, layer in enumerate(self.model.layers):
            args = (h, cos, sin, None if z_head is None else z_head[i], None if z_int is None else z_int[i], z_hid,
                    None if cache is None else cache[i], start_pos)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
            else:
                h = layer(*args)
            if output_hidden and i < cfg.n_layers - 1:
                hidden.append(h)
        h = self.model.norm(h)
        logits = self.lm_head(h)  # (B, T, V)
        if output_hidden:
            return logits, hidden + [h]  # outputs of layers 1..L-1 and the final normed output
        return logits

# -----------------------------------------------------------------------------
# LoRA (hand-written; torchtune's shape)


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # prunable, LoRA targets


def add_lora(model: Llama, targets=("q_proj", "v_proj"), rank: int = 8, alpha: float = 8.0,
             generator: torch.Generator | None = None) -> Llama:
    valid = set(PROJECTIONS)
    if not set(targets) <= valid:
        raise ValueError(f"LoRA targets {sorted(set(targets) - valid)} are not projections; valid: {sorted(valid)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.model.layers:
        add_lora_to_layer(layer, targets, rank, alpha, generator)
    return model


def add_lora_to_layer(layer: nn.Module, targets, rank: int, alpha: float, generator: torch.Generator | None = None):
    """add_lora on one decoder layer (its values drawn in the order add_lora draws them for the whole model)."""
    for parent in (layer.self_attn, layer.mlp):
        for name in targets:
            base = getattr(parent, name, None)
            if isinstance(base, nn.Linear) and base.weight.shape.numel() > 0:
                setattr(parent, name, LoRALinear(base, rank, alpha, generator))


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """References (not copies) to every LoRA tensor, keyed like the state dict."""
    return {f"{n}.{k}": getattr(m, k) for n, m in lora_modules(model).items() for k in ("lora_a", "lora_b")}


@torch.no_grad()
def load_lora_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    mine = lora_state(model)
    if mine.keys() != state.keys():
        missing, extra = sorted(mine.keys() - state.keys()), sorted(state.keys() - mine.keys())
        raise ValueError(f"LoRA state does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, t in mine.items():
        t.copy_(state[k])


def set_adapter(model: nn.Module, adapter: str) -> None:
    """Which adapter every LoRA module adds: "student" (trainable), "teacher" (the frozen slot) or "off"."""
    if adapter not in ("student", "teacher", "off"):
        raise ValueError(f"adapter must be student, teacher or off, got {adapter!r}")
    for m in lora_modules(model).values():
        m.adapter = adapter


@torch.no_grad()
def load_teacher_lora(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy full LoRA tensors (keyed like lora_state) into every module's frozen teacher slot."""
    modules = lora_modules(model)
    if {f"{n}.{k}" for n in modules for k in ("lora_a", "lora_b")} != state.keys():
        raise ValueError("teacher LoRA state does not match the model's LoRA modules")
    for n, m in modules.items():
        m.teacher_a.copy_(state[f"{n}.lora_a"])
        m.teacher_b.copy_(state[f"{n}.lora_b"])


@torch.no_grad()
def zero_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.lora_b.zero_()


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    for name, m in lora_modules(model).items():
        parent_name, _, attr = name.rpartition(".")
        lin = nn.Linear(m.in_features, m.out_features, bias=False, device="meta")  # no throwaway random init
        lin.weight = nn.Parameter(m.merged_weight(), requires_grad=False)
        setattr(model.get_submodule(parent_name), attr, lin)
    return model

# -----------------------------------------------------------------------------
# parameter counts (METHOD.md §3)


def prunable_params(cfg: LlamaConfig) -> int:
    """Weights of q, k, v, o, gate, up, down in every layer: the M of Eq. 3."""
    return sum(cfg.dim * (2 * h + 2 * kv) * cfg.head_dim + 3 * cfg.dim * f
               for h, kv, f in zip(cfg.heads, cfg.kv_heads, cfg.ffn))


def prunable_tensors(model: Llama) -> int:
    """Prunable weights counted on the tensors themselves (not the config): the sparsity a report states is the one
    on disk."""
    return sum(p.numel() for n, p in model.named_parameters()
               if n.endswith(".weight") and n.split(".")[-2] in PROJECTIONS)


def count_params(model_or_cfg) -> int:
    if isinstance(model_or_cfg, LlamaConfig):
        cfg = model_or_cfg
        embed = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)
        return prunable_params(cfg) + embed + cfg.dim * (2 * cfg.n_layers + 1)
    seen = {id(p): p.numel() for n, p in model_or_cfg.named_parameters() if "lora_" not in n}
    return sum(seen.values())
# -----------------------------------------------------------------------------
# building and precision


def meta_model(cfg: LlamaConfig) -> Llama:
    # No memory for a random init: the weights arrive later by load_state_dict(assign=True).
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")  # fully pruned layers
        return Llama(cfg)


DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # every command's --dtype


def parse_dtype(name: str, device_type: str) -> torch.dtype:
    """A --dtype value: auto is bf16 on a GPU and fp32 elsewhere."""
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name] or (torch.bfloat16 if device_type == "cuda" else torch.float32)


# -----------------------------------------------------------------------------
# physical pruning (METHOD.md §8)


def _weight(mod, dtype: torch.dtype | None = None) -> torch.Tensor:  # effective fp32 weight: LoRA merged, in dtype
    w = mod.merged_weight(dtype) if isinstance(mod, LoRALinear) else mod.weight
    return w.detach().to(dtype or w.dtype).float().cpu()


def _prune_layer(layer, kv_map: list[int], z_head, z_int, keep_d, zd, norm_scale: float, dh: int,
                 dtype: torch.dtype | None = None):
    """One decoder layer's tensors with pruned heads, K/V heads, FFN channels and hidden dims removed and the kept
    gate values folded in; and its kept K/V heads (in order). dtype: each weight is read as if stored in it."""
    a, m = layer.self_attn, layer.mlp
    kh = z_head.nonzero().squeeze(1).tolist()  # kept query heads
    kkv = sorted({kv_map[h] for h in kh})  # a K/V head survives if any head of its group does
    rows = lambda hs: torch.cat([torch.arange(h * dh, (h + 1) * dh) for h in hs]) if hs else torch.zeros(0, dtype=torch.long)  # noqa: E731
    q_rows, kv_rows = rows(kh), rows(kkv)
    head_scale = z_head.repeat_interleave(dh)[q_rows]  # soft head gates fold into o_proj's columns
    ki = z_int.nonzero().squeeze(1)
    norm = lambda mod: _weight(mod, dtype)[keep_d] * norm_scale  # noqa: E731
    w = lambda mod: _weight(mod, dtype)  # noqa: E731
    return {
        "self_attn.q_proj.weight": w(a.q_proj)[q_rows][:, keep_d],
        "self_attn.k_proj.weight": w(a.k_proj)[kv_rows][:, keep_d],
        "self_attn.v_proj.weight": w(a.v_proj)[kv_rows][:, keep_d],
        "self_attn.o_proj.weight": (w(a.o_proj)[keep_d][:, q_rows] * head_scale) * zd[:, None],
        "mlp.gate_proj.weight": w(m.gate_proj)[ki][:, keep_d],
        "mlp.up_proj.weight": w(m.up_proj)[ki][:, keep_d],
        "mlp.down_proj.weight": (w(m.down_proj)[keep_d][:, ki] * z_int[ki]) * zd[:, None],
        "input_layernorm.weight": norm(layer.input_layernorm),
        "post_attention_layernorm.weight": norm(layer.post_attention_layernorm),
    }, kkv


def _fp32_masks(cfg: LlamaConfig, masks: Masks) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    f32 = dict(dtype=torch.float32, device="cpu")
    z_head = torch.ones(cfg.n_layers, cfg.n_heads, **f32) if masks.head is None else masks.head.detach().to(**f32)
    z_int = torch.ones(cfg.n_layers, cfg.ffn_dim, **f32) if masks.intermediate is None else masks.intermediate.detach().to(**f32)
    z_hid = torch.ones(cfg.dim, **f32) if masks.hidden is None else masks.hidden.detach().to(**f32)
    return z_head, z_int, z_hid


def pruned_config(cfg: LlamaConfig, masks: Masks) -> LlamaConfig:
    """The config of prune_model's result, from the masks alone (no weight is read)."""
    if not cfg.uniform:
        raise ValueError("model is already pruned")
    z_head, z_int, z_hid = _fp32_masks(cfg, masks)
    Dp = int((z_hid != 0).sum())
    if Dp == 0:
        raise ValueError("the hidden mask prunes every dimension")
    heads, kv_heads, ffn, kv_map = [], [], [], []
    for i in range(cfg.n_layers):
        kh = z_head[i].nonzero().squeeze(1).tolist()
        kept_kv = sorted({cfg.kv_map[i][h] for h in kh})  # a K/V head survives if any head of its group does
        heads.append(len(kh))
        kv_heads.append(len(kept_kv))
        ffn.append(int((z_int[i] != 0).sum()))
        kv_map.append([kept_kv.index(cfg.kv_map[i][h]) for h in kh])
    # A tied lm_head reads the unscaled embeddings: it stays tied only when the kept hidden gates are exactly 1.
    tie = cfg.tie_embeddings and bool((z_hid[z_hid != 0] == 1).all())
    return LlamaConfig(dim=Dp, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                       head_dim=cfg.head_dim, ffn_dim=cfg.ffn_dim, vocab_size=cfg.vocab_size,
                       norm_eps=cfg.norm_eps * cfg.dim / Dp, rope_theta=cfg.rope_theta, max_seq_len=cfg.max_seq_len,
                       tie_embeddings=tie, rope_scaling=cfg.rope_scaling, heads=heads, kv_heads=kv_heads, ffn=ffn,
                       kv_map=kv_map)


@torch.no_grad()
def pruned_state(model: Llama, masks: Masks, dtype: torch.dtype | None = None):
    """prune_model's tensors, yielded as (name, tensor) one group at a time (the embeddings, final norm and LM head,
    then each decoder layer), in dtype (default: the base's) on the CPU: one layer is in fp32 at a time, never the whole
    model. A base kept in another dtype (as stored) is read tensor by tensor as if converted to dtype."""
    cfg = model.config
    new = pruned_config(cfg, masks)
    z_head, z_int, z_hid = _fp32_masks(cfg, masks)
    keep_d = z_hid.nonzero().squeeze(1)  # kept hidden dims, (D',)
    zd = z_hid[keep_d]
    dtype = dtype or model.model.embed_tokens.weight.dtype
    # A standard RMSNorm over D' kept dims reproduces the masked one (mean over D): weight * sqrt(D/D'), eps * D/D'.
    norm_scale = math.sqrt(cfg.dim / keep_d.numel())
    emb = _weight(model.model.embed_tokens, dtype)
    yield "model.embed_tokens.weight", ((emb * z_hid)[:, keep_d]).to(dtype)
    del emb
    yield "model.norm.weight", (_weight(model.model.norm, dtype)[keep_d] * norm_scale).to(dtype)
    if not new.tie_embeddings:
        yield "lm_head.weight", _weight(model.lm_head, dtype)[:, keep_d].to(dtype)
    for i, layer in enumerate(model.model.layers):
        layer_state, _ = _prune_layer(layer, cfg.kv_map[i], z_head[i], z_int[i], keep_d, zd, norm_scale, cfg.head_dim,
                                      dtype)
        for k, v in layer_state.items():
            yield f"model.layers.{i}.{k}", v.to(dtype)


@torch.no_grad()
def prune_model(model: Llama, masks: Masks) -> Llama:
    """Physically remove what the masks zero, folding the kept (possibly soft) gate values into the weights.

    Exact: the returned model's logits equal model(idx, masks) (up to float rounding) for any gate values.
    """
    new = pruned_config(model.config, masks)
    pruned = meta_model(new)
    pruned.load_state_dict(dict(pruned_state(model, masks)), strict=not new.tie_embeddings, assign=True)
    if new.tie_embeddings:
        pruned.lm_head.weight = pruned.model.embed_tokens.weight
    return pruned.to(model.model.embed_tokens.weight.device).eval()


# -----------------------------------------------------------------------------
# generation with a KV cache


def new_kv_cache(model: Llama, batch: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    cfg, w = model.config, model.lm_head.weight
    return [(w.new_zeros(batch, kv, length, cfg.head_dim), w.new_zeros(batch, kv, length, cfg.head_dim))
            for kv in cfg.kv_heads]  # per layer (k, v), each (B, Hkv, T, Dh)


@torch.no_grad()
def generate(model: Llama, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             masks: Masks | None = None, eos_id: int | None = None, generator: torch.Generator | None = None):
    """idx (B, T0) -> (B, T0 + new). Greedy when temperature == 0, else nucleus sampling."""
    cfg = model.config
    B, T0 = idx.shape
    total = T0 + max_new_tokens
    if total > cfg.max_seq_len:
        raise ValueError(f"{total} tokens exceed the model's maximum length {cfg.max_seq_len}")
    cache = new_kv_cache(model, B, total)
    logits = model(idx, masks, cache=cache, start_pos=0)[:, -1]
    out = [idx]
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    for pos in range(T0, total):
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(logits.float() / temperature, -1)
            sp, si = probs.sort(-1, descending=True)
            sp[(sp.cumsum(-1) - sp) > top_p] = 0  # keep the smallest prefix with mass >= top_p
            nxt = si.gather(-1, torch.multinomial(sp, 1, generator=generator)).squeeze(-1)
        out.append(nxt[:, None])
        if eos_id is not None:
            done |= nxt == eos_id
            if done.all():
                break
        if pos + 1 < total:
            logits = model(nxt[:, None], masks, cache=cache, start_pos=pos)[:, -1]
    return torch.cat(out, dim=1)
