import json

import pytest
import torch

import checkpoint
import llama
from conftest import GQA, MHA, need, tiny_llama

tiny = tiny_llama


def hf_model(cfg: dict, seed=0, **extra):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    c = transformers.LlamaConfig(hidden_size=cfg["dim"], num_hidden_layers=cfg["n_layers"],
                                 num_attention_heads=cfg["n_heads"], num_key_value_heads=cfg["n_kv_heads"],
                                 intermediate_size=cfg["ffn_dim"], vocab_size=cfg["vocab_size"],
                                 max_position_embeddings=cfg["max_seq_len"], rms_norm_eps=1e-5, **extra)
    m = transformers.LlamaForCausalLM(c).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return m


def random_masks(cfg: llama.LlamaConfig, seed=0, soft=False) -> llama.Masks:
    g = torch.Generator().manual_seed(seed)
    head = (torch.rand(cfg.n_layers, cfg.n_heads, generator=g) > 0.4).float()
    head[0, :cfg.n_heads // cfg.n_kv_heads] = 0  # an entire GQA group of layer 0 (a whole head under MHA)
    head[-1] = 0  # a layer without attention
    inter = (torch.rand(cfg.n_layers, cfg.ffn_dim, generator=g) > 0.5).float()
    hidden = (torch.rand(cfg.dim, generator=g) > 0.3).float()
    if soft:  # kept units keep soft values, like the reference's deterministic masks (~0.996)
        head, inter, hidden = (m * torch.empty_like(m).uniform_(0.8, 1.0, generator=g) for m in (head, inter, hidden))
    return llama.Masks(head, inter, hidden)


# -- parity with transformers, through every HF checkpoint layout ------------------------------------------------

@pytest.mark.parametrize("cfg", [MHA, GQA], ids=["mha", "gqa"])
@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin"])
def test_hf_parity(tmp_path, cfg, layout):
    ref = hf_model(cfg)
    if layout == "bin":  # the classic pytorch_model.bin layout
        ref.config.save_pretrained(tmp_path)
        torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    else:
        ref.save_pretrained(tmp_path, max_shard_size="20KB" if layout == "sharded" else "5GB")
    if layout == "sharded":
        assert (tmp_path / "model.safetensors.index.json").exists()
    model = checkpoint.load_model(tmp_path)
    idx = torch.randint(0, cfg["vocab_size"], (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref(idx).logits, atol=1e-4, rtol=0)


def test_hf_parity_llama3_rope(tmp_path):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16, "rope_theta": 500000.0}
    ref = hf_model(GQA, rope_parameters=rope)
    ref.save_pretrained(tmp_path)
    model = checkpoint.load_model(tmp_path)
    assert model.config.rope_scaling["rope_type"] == "llama3" and model.config.rope_theta == 500000.0
    idx = torch.randint(0, 64, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref(idx).logits, atol=1e-4, rtol=0)


def test_hidden_states_match_hf(tmp_path):
    ref = hf_model(GQA)
    ref.save_pretrained(tmp_path)
    model = checkpoint.load_model(tmp_path)
    idx = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        _, hidden = model(idx, output_hidden=True)
        hf = ref(idx, output_hidden_states=True).hidden_states[1:]
    assert len(hidden) == GQA["n_layers"]
    for a, b in zip(hidden, hf):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_meta_sharded_checkpoint(tmp_path):
    """A Meta directory with two model-parallel shards loads to the same model."""
    model = tiny(**GQA)
    cfg = model.config
    sd = model.state_dict()

    def unpermute(w, n):  # HF rotate-half rows -> Meta interleaved rows (inverse of the loader's permutation)
        out, inp = w.shape
        return w.view(n, 2, out // n // 2, inp).transpose(1, 2).reshape(out, inp)

    meta = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
            "output.weight": sd["lm_head.weight"]}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        meta |= {f"layers.{i}.attention.wq.weight": unpermute(sd[p + "self_attn.q_proj.weight"], cfg.n_heads),
                 f"layers.{i}.attention.wk.weight": unpermute(sd[p + "self_attn.k_proj.weight"], cfg.n_kv_heads),
                 f"layers.{i}.attention.wv.weight": sd[p + "self_attn.v_proj.weight"],
                 f"layers.{i}.attention.wo.weight": sd[p + "self_attn.o_proj.weight"],
                 f"layers.{i}.feed_forward.w1.weight": sd[p + "mlp.gate_proj.weight"],
                 f"layers.{i}.feed_forward.w2.weight": sd[p + "mlp.down_proj.weight"],
                 f"layers.{i}.feed_forward.w3.weight": sd[p + "mlp.up_proj.weight"],
                 f"layers.{i}.attention_norm.weight": sd[p + "input_layernorm.weight"],
                 f"layers.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"]}
    split = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}
    for s in range(2):
        shard = {k: (v.chunk(2, dim=split[k.split(".")[-2]])[s] if k.split(".")[-2] in split else v).clone()
                 for k, v in meta.items()}
        torch.save(shard, tmp_path / f"consolidated.0{s}.pth")
    (tmp_path / "params.json").write_text(json.dumps({"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
                                                      "n_kv_heads": cfg.n_kv_heads, "vocab_size": -1,
                                                      "norm_eps": cfg.norm_eps, "multiple_of": 8}))
    loaded = checkpoint.load_model(tmp_path)
    idx = torch.randint(0, 64, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), model(idx), atol=1e-5, rtol=0)


# -- the real pretrained stories260K through the llama2.c loader ------------------------------------------------

def test_stories260k_greedy_reference():
    ref = json.loads(need("stories260K", "greedy_reference_256steps.json").read_text())
    model, tok = checkpoint.load(need("stories260K", "stories260K.bin"), need("stories260K", "tok512.model"))
    assert model.config.n_kv_heads == 4 and model.config.tie_embeddings
    ids = torch.tensor([ref["token_ids"]])
    with torch.no_grad():
        logits = model(ids[:, :2])[0]
    torch.testing.assert_close(logits[0], torch.tensor(ref["logits_pos0_after_BOS"]), atol=1e-4, rtol=0)
    torch.testing.assert_close(logits[1], torch.tensor(ref["logits_pos1_after_BOS_then_token_403"]), atol=1e-4, rtol=0)
    out = llama.generate(model, ids[:, :1], 256)
    assert out[0].tolist() == ref["token_ids"]
    assert tok.decode(out[0, 1:].tolist()) == ref["text"]


def test_kv_cache_generation_matches_full_forward():
    model = tiny(**GQA)
    prompt = torch.randint(0, 64, (2, 5))
    out = llama.generate(model, prompt, 20)
    seq = prompt
    with torch.no_grad():
        for _ in range(20):
            seq = torch.cat([seq, model(seq)[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, seq)


def test_grouped_attention_reads_the_cache_in_place_with_the_gather_s_bits():
    model = tiny(**GQA)
    assert all(layer.self_attn.even_groups for layer in model.model.layers)
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        in_place = model(prompt), llama.generate(model, prompt, 12)
        for layer in model.model.layers:  # what every layer did before: a K/V copy per query head
            layer.self_attn.even_groups = False
        gathered = model(prompt), llama.generate(model, prompt, 12)
    assert torch.equal(in_place[0], gathered[0]) and torch.equal(in_place[1], gathered[1])
    uneven = llama.prune_model(tiny(**GQA), llama.Masks(head=torch.tensor([[1, 1, 1, 0.]] * 3)))
    assert not any(layer.self_attn.even_groups for layer in uneven.model.layers)  # groups of 2 and 1: gathered


# -- masks and physical pruning --------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [MHA, GQA], ids=["mha", "gqa"])
def test_all_ones_masks_equal_no_masks(cfg):
    model = tiny(**cfg)
    c = model.config
    ones = llama.Masks(torch.ones(c.n_layers, c.n_heads), torch.ones(c.n_layers, c.ffn_dim), torch.ones(c.dim))
    idx = torch.randint(0, 64, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(model(idx, ones), model(idx), atol=0, rtol=0)


@pytest.mark.parametrize("soft", [False, True], ids=["binary", "soft"])
@pytest.mark.parametrize("cfg", [MHA, GQA, dict(GQA, tie_embeddings=True)], ids=["mha", "gqa", "gqa-tied"])
def test_export_equals_masked_model(tmp_path, cfg, soft):
    model = llama.add_lora(tiny(**cfg), targets=("q_proj", "v_proj", "down_proj"))
    for p in llama.lora_state(model).values():  # a trained-looking adapter, so merging is exercised
        torch.nn.init.normal_(p, std=0.05)
    masks = random_masks(model.config, soft=soft)
    new_cfg = checkpoint.export_pruned(model, masks, tmp_path)
    pruned = checkpoint.load_model(tmp_path)
    idx = torch.randint(0, 64, (2, 15))
    with torch.no_grad():
        torch.testing.assert_close(pruned(idx), model(idx, masks), atol=1e-4, rtol=0)
    # parameter count is what the masks imply: kept heads, kept K/V groups, kept channels, kept hidden dims
    c = model.config
    keep_h = (masks.head != 0).sum(1)
    keep_kv = torch.stack([(masks.head[i] != 0).view(c.n_kv_heads, -1).any(1).sum() for i in range(c.n_layers)])
    keep_i, keep_d = (masks.intermediate != 0).sum(1), int((masks.hidden != 0).sum())
    implied = sum(keep_d * c.head_dim * (2 * h + 2 * kv) + 3 * keep_d * f for h, kv, f in zip(keep_h, keep_kv, keep_i))
    assert llama.prunable_params(new_cfg) == int(implied)
    assert new_cfg.kv_heads[0] <= c.n_kv_heads - 1 and new_cfg.heads[-1] == new_cfg.kv_heads[-1] == 0
    assert llama.count_params(pruned) == llama.count_params(new_cfg)


def test_sharded_export_loads_in_transformers_and_here_with_the_unsharded_exports_logits(tmp_path):
    """export_pruned streams layer by layer into shards of at most shard_bytes (tiny here; 5 GB by default) and the
    index, as transformers writes them; a second export into the same folder leaves no stale shard."""
    import json
    transformers = pytest.importorskip("transformers")
    model = tiny(**GQA).to(torch.bfloat16)
    masks = random_masks(model.config)
    checkpoint.export_pruned(model, masks, tmp_path / "one")
    checkpoint.export_pruned(model, masks, tmp_path / "sharded", shard_bytes=4000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    assert not (tmp_path / "sharded" / "model.safetensors").exists() and not list((tmp_path / "sharded").glob(".*"))
    assert all(p.stat().st_size <= 4000 + 1000 for p in (tmp_path / "sharded").glob("model-*"))  # + header
    idx = torch.randint(0, 64, (2, 15))
    with torch.no_grad():
        ours = [checkpoint.load_model(tmp_path / d, dtype=torch.bfloat16)(idx) for d in ("one", "sharded")]
        hf = [transformers.AutoModelForCausalLM.from_pretrained(tmp_path / d, trust_remote_code=True,
                                                                 dtype=torch.bfloat16).eval()(idx).logits
              for d in ("one", "sharded")]
    assert torch.equal(ours[0], ours[1]) and torch.equal(hf[0], hf[1])
    assert next(iter(checkpoint._hf_state(tmp_path / "sharded").values())).dtype == torch.bfloat16  # the base dtype
    checkpoint.export_pruned(model, masks, tmp_path / "sharded")  # again, unsharded: the shards and index go
    assert sorted(p.name for p in (tmp_path / "sharded").glob("model*.safetensors*")) == ["model.safetensors"]


def test_pruned_model_generates(tmp_path):
    model = tiny(**GQA)
    masks = random_masks(model.config)
    pruned = llama.prune_model(model, masks)
    prompt = torch.randint(0, 64, (1, 4))
    out = llama.generate(pruned, prompt, 8)
    seq = prompt
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat([seq, model(seq, masks)[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, seq)


# -- LoRA ------------------------------------------------------------------------------------------------------

def test_lora_zero_b_is_noop_and_merge_equals_unmerged():
    model = tiny(**GQA)
    idx = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        base = model(idx)
        llama.add_lora(model, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
        torch.testing.assert_close(model(idx), base, atol=0, rtol=0)  # B = 0
        for k, p in llama.lora_state(model).items():
            if k.endswith("lora_b"):
                p.normal_(std=0.1)
        adapted = model(idx)
        assert (adapted - base).abs().max() > 1e-3
        llama.merge_lora(model)
        assert not llama.lora_modules(model)
        torch.testing.assert_close(model(idx), adapted, atol=1e-5, rtol=0)


def test_lora_state_roundtrip_and_zero():
    model = llama.add_lora(tiny(**MHA))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    state = {k: torch.randn_like(v) for k, v in llama.lora_state(model).items()}
    llama.load_lora_state(model, state)
    assert all(torch.equal(llama.lora_state(model)[k], v) for k, v in state.items())
    llama.zero_lora(model)
    idx = torch.randint(0, 64, (1, 7))
    with torch.no_grad():
        base = llama.merge_lora(llama.add_lora(tiny(**MHA)))(idx)
        torch.testing.assert_close(model(idx), base, atol=0, rtol=0)
    with pytest.raises(ValueError, match="LoRA state"):
        llama.load_lora_state(model, {"nope": torch.zeros(1)})


# -- user errors are ValueErrors that name the problem ------------------------------------------------------------

def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        checkpoint.load_model(tmp_path / "missing")
    (tmp_path / "weights.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        checkpoint.load_model(tmp_path / "weights.pt")
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x00" * 40)
    with pytest.raises(ValueError, match="not a llama2.c checkpoint"):
        checkpoint.load_model(bad)
    hf = hf_model(MHA)
    hf.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg | {"intermediate_size": 50}))
    with pytest.raises(ValueError, match="mlp.gate_proj.weight' has shape"):
        checkpoint.load_model(tmp_path / "hf")
    # truncated safetensors
    hf.save_pretrained(tmp_path / "cut")
    st = tmp_path / "cut" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="beyond the end of the file"):
        checkpoint.load_model(tmp_path / "cut")
    with pytest.raises(ValueError, match="no tokenizer .tokenizer.json, tokenizer.model"):
        checkpoint.find_tokenizer(tmp_path / "hf")


def test_wrong_tokenizer_is_rejected():
    tok = need("llama_tokenizer", "tokenizer.model")  # 32k pieces for a 512-token model
    with pytest.raises(ValueError, match="wrong tokenizer"):
        checkpoint.load(need("stories260K", "stories260K.bin"), tok)
