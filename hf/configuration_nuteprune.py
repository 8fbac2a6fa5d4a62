"""Configuration of a NutePrune-pruned LLaMA (transformers remote code, copied beside config.json on export).

A pruned model keeps LLaMA's modules but each layer has its own sizes, recorded under `nuteprune`:
    heads[i]     query heads of layer i (0: the layer has no attention)
    kv_heads[i]  K/V heads of layer i
    ffn[i]       FFN channels of layer i (0: the layer has no FFN)
    kv_map[i]    for each query head, the K/V head it reads (groups may be uneven)
`hidden_size` is the kept hidden width; `head_dim` is explicit because it no longer equals hidden_size / heads.
"""
from transformers import PretrainedConfig


class NutePruneLlamaConfig(PretrainedConfig):
    model_type = "nuteprune_llama"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=None, head_dim=None, max_position_embeddings=2048,
                 rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None, hidden_act="silu",
                 tie_word_embeddings=False, initializer_range=0.02, use_cache=True, nuteprune=None, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        # transformers 5 turns `rope_scaling` into a property over `rope_parameters`; keep ours under its own name
        self.nuteprune_rope = dict(rope_scaling or kwargs.pop("rope_parameters", None) or {})
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        L, H, Hkv = num_hidden_layers, num_attention_heads, self.num_key_value_heads
        shapes = dict(nuteprune or {})  # empty: every layer has the unpruned sizes
        shapes.setdefault("heads", [H] * L)
        shapes.setdefault("kv_heads", [Hkv] * L)
        shapes.setdefault("ffn", [intermediate_size] * L)
        shapes.setdefault("kv_map", [[h * Hkv // H for h in range(H)]] * L)
        self.nuteprune = shapes
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def to_dict(self):
        d = super().to_dict()
        rope = d.pop("nuteprune_rope", None)
        if rope:  # saved under the key llama.py and older transformers read
            d["rope_scaling"] = rope
        return d
