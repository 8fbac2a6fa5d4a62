"""A NutePrune-pruned LLaMA for transformers (remote code, copied beside config.json on export).

LLaMA with per-layer sizes: each layer builds its own attention (`heads[i]` query heads reading `kv_heads[i]` K/V
heads through the explicit `kv_map[i]`, groups may be uneven) and FFN (`ffn[i]` channels); a layer with no heads or
no FFN channels adds nothing there. Module and weight names are LlamaForCausalLM's, so the checkpoint is the plain
safetensors file that nuteprune writes. Works with transformers 4.45+ and 5.x, `generate()` and its KV cache included.

Shapes: B batch, T new tokens, S cached + new tokens, D hidden width, H query heads, Hkv K/V heads, Dh head width.
"""
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_nuteprune import NutePruneLlamaConfig

# transformers 5.2x renamed the KV cache `past_key_values` -> `cache` (argument and output field); accept both
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def rope_inv_freq(config, device=None) -> torch.Tensor:
    """Inverse RoPE frequencies (Dh/2,): default, "linear" or Llama-3.1 ("llama3") scaling."""
    dh = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, dh, 2, dtype=torch.float32, device=device) / dh)
    s = config.nuteprune_rope
    kind = s.get("rope_type", s.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / s["factor"]
    if kind != "llama3":
        raise ValueError(f"rope_type {kind!r} is not supported (default, linear, llama3)")
    # long wavelengths slowed by `factor`, short ones kept, a smooth blend in between
    factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class NutePruneRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(x.dtype)


class NutePruneAttention(nn.Module):
    def __init__(self, config, layer_idx: int, cache_slot):
        super().__init__()
        shapes = config.nuteprune
        self.num_heads, self.num_kv = shapes["heads"][layer_idx], shapes["kv_heads"][layer_idx]
        self.head_dim = config.head_dim
        # The KV cache holds only layers with attention, densely numbered: a cache's sequence length is read from
        # its slot 0, which must not be a layer without heads.
        self.cache_slot = cache_slot
        D = config.hidden_size
        self.q_proj = nn.Linear(D, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(D, self.num_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(D, self.num_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, D, bias=False)
        self.kv_map = shapes["kv_map"][layer_idx]  # a list, not a buffer: nothing for from_pretrained to initialise
        self._kv_index = None

    def kv_index(self, device):
        if self._kv_index is None or self._kv_index.device != device:
            self._kv_index = torch.tensor(self.kv_map, dtype=torch.long, device=device)
        return self._kv_index

    def forward(self, x, cos, sin, mask, cache=None):
        B, T, D = x.shape
        if self.num_heads == 0:  # every head of this layer was pruned
            return torch.zeros_like(x)
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k_proj(x).view(B, T, self.num_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = self.v_proj(x).view(B, T, self.num_kv, self.head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.cache_slot)  # (B, Hkv, S, Dh)
        # each query head reads its own K/V head (GQA, and uneven groups after pruning)
        idx = self.kv_index(x.device)
        k, v = k.index_select(1, idx), v.index_select(1, idx)  # (B, H, S, Dh)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, Dh)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class NutePruneMLP(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.width = config.nuteprune["ffn"][layer_idx]
        self.gate_proj = nn.Linear(config.hidden_size, self.width, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, self.width, bias=False)
        self.down_proj = nn.Linear(self.width, config.hidden_size, bias=False)

    def forward(self, x):
        if self.width == 0:  # every FFN channel of this layer was pruned
            return torch.zeros_like(x)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class NutePruneDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, cache_slot):
        super().__init__()
        self.self_attn = NutePruneAttention(config, layer_idx, cache_slot)
        self.mlp = NutePruneMLP(config, layer_idx)
        self.input_layernorm = NutePruneRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = NutePruneRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h, cos, sin, mask, cache=None):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class NutePruneLlamaPreTrainedModel(PreTrainedModel):
    config_class = NutePruneLlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["NutePruneDecoderLayer"]
    _supports_cache_class = True  # transformers 4.x: generate() passes a DynamicCache
    _supports_sdpa = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, NutePruneRMSNorm):
            nn.init.ones_(module.weight)


class NutePruneLlamaModel(NutePruneLlamaPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        heads = config.nuteprune["heads"]
        slots = [sum(h > 0 for h in heads[:i]) if heads[i] else None for i in range(config.num_hidden_layers)]
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        with warnings.catch_warnings():  # a layer without heads or FFN channels has zero-size weights
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            self.layers = nn.ModuleList(NutePruneDecoderLayer(config, i, slots[i])
                                        for i in range(config.num_hidden_layers))
        self.norm = NutePruneRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, output_hidden_states=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values  # `past_key_values` before transformers 5.2x
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        B, T, _ = h.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        if cache is not None and not isinstance(cache, Cache):
            raise ValueError("the KV cache must be a transformers Cache (legacy tuples are not supported)")
        past = cache.get_seq_length() if cache is not None else 0
        S = past + T
        query_pos = torch.arange(past, S, device=h.device)  # (T,)
        if position_ids is None:
            position_ids = query_pos[None].expand(B, T)

        # RoPE in HF's rotate-half layout, per batch row (left-padded batches have their own positions)
        freqs = position_ids[..., None].float() * rope_inv_freq(self.config, h.device)  # (B, T, Dh/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(h.dtype)[:, None], emb.sin().to(h.dtype)[:, None]  # (B, 1, T, Dh)

        # Causal mask over the S cached + new keys, AND the padding mask; a query always sees itself, so rows
        # of padding tokens stay finite
        key_pos = torch.arange(S, device=h.device)
        mask = key_pos[None, :] <= query_pos[:, None]  # (T, S)
        mask = mask[None, None].expand(B, 1, T, S)
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, :S].bool()
        mask = mask | (key_pos[None, :] == query_pos[:, None])[None, None]

        hidden_states = (h,) if output_hidden_states else None
        for layer in self.layers:
            h = layer(h, cos, sin, mask, cache)
            if output_hidden_states:
                hidden_states += (h,)
        h = self.norm(h)
        if output_hidden_states:
            hidden_states = hidden_states[:-1] + (h,)
        return BaseModelOutputWithPast(last_hidden_state=h, hidden_states=hidden_states,
                                       **{CACHE_FIELD: cache if use_cache else None})


class NutePruneLlamaForCausalLM(NutePruneLlamaPreTrainedModel, GenerationMixin):
    # transformers 5 reads the {target: source} mapping; transformers 4 iterates the target names
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = NutePruneLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        try:  # transformers' generic version (4.46+)
            return super().prepare_inputs_for_generation(input_ids, **kwargs)
        except NotImplementedError:  # transformers 4.45: only the new tokens, positions from the padding mask
            cache, mask = kwargs.get("past_key_values"), kwargs.get("attention_mask")
            past = cache.get_seq_length() if cache is not None else 0
            positions = None if mask is None else (mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:input_ids.shape[1]]
            return {"input_ids": input_ids[:, past:], "past_key_values": cache, "position_ids": positions,
                    "attention_mask": mask, "use_cache": kwargs.get("use_cache")}

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, output_hidden_states=None, logits_to_keep=0, past_key_values=None,
                **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds,
                         use_cache=use_cache, output_hidden_states=output_hidden_states)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(out.last_hidden_state[:, keep])  # (B, T or logits_to_keep, V)
        loss = None
        if labels is not None:  # next-token loss, -100 ignored
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device))
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                      **{CACHE_FIELD: getattr(out, CACHE_FIELD)})


# save_pretrained() then copies this code beside the weights again (transformers 4.x does not record it on loading)
NutePruneLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
