"""The pruned model outside nuteprune: transformers (remote code) and llama.cpp (GGUF, export.py)."""
import json

import numpy as np
import pytest
import torch

import checkpoint
import export
import llama
import tokenization
from conftest import DATA, ROOT, need, tiny_llama

TOKENIZER = DATA / "stories260K" / "tok512.model"  # vocabulary 512, as the tiny models below
MHA = dict(dim=32, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=40, vocab_size=512, max_seq_len=64)
GQA = dict(dim=32, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=40, vocab_size=512, max_seq_len=64,
           tie_embeddings=True)
PROMPT = [1, 45, 310, 7, 99, 12, 401, 3]


def corner_masks(kind: str, seed=0) -> llama.Masks:
    """Random 0/1 masks forced into every corner the export must express."""
    g = torch.Generator().manual_seed(seed)
    cfg = llama.LlamaConfig(**(MHA if kind == "mha" else GQA))
    head = (torch.rand(cfg.n_layers, cfg.n_heads, generator=g) > 0.3).float()
    inter = (torch.rand(cfg.n_layers, cfg.ffn_dim, generator=g) > 0.5).float()
    hidden = (torch.rand(cfg.dim, generator=g) > 0.25).float()  # 0/1 gates: a tied head stays tied
    if kind == "mha":
        head[0], head[2] = torch.tensor([0, 1, 0, 1.]), torch.tensor([1, 1, 0, 1.])
        head[1] = inter[1] = 0  # an empty layer in the middle
        head[3] = inter[3] = 0  # and an empty last layer
    else:  # groups of 4 query heads on each of 2 K/V heads
        head[0] = 0  # layer 0 without attention
        head[1] = torch.tensor([0, 0, 0, 0, 1, 0, 1, 0.])  # a whole GQA group removed
        head[2] = torch.tensor([1, 1, 1, 0, 1, 0, 0, 0.])  # uneven groups (3 and 1)
        inter[2] = 0  # attention without an FFN
        head[3] = torch.tensor([1, 0, 0, 1, 1, 1, 1, 1.])
    return llama.Masks(head, inter, hidden)


@pytest.fixture(scope="module", params=["mha", "gqa"])
def pruned(request, tmp_path_factory):
    """An exported pruned model (its folder) and llama.py's reload of it."""
    kind = request.param
    out = tmp_path_factory.mktemp(kind) / "pruned"
    cfg = checkpoint.export_pruned(tiny_llama(**(MHA if kind == "mha" else GQA)), corner_masks(kind), out,
                              TOKENIZER if TOKENIZER.exists() else None)
    assert cfg.dim < 32 and not cfg.uniform
    return out, checkpoint.load_model(out)


def hf_load(path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()


def gguf_file(pruned, ftype="f32"):
    pytest.importorskip("gguf")
    need("stories260K", "tok512.model")
    path, _ = pruned
    out = path.parent / f"model-{ftype}.gguf"
    if not out.exists():
        export.write_gguf(path, out, ftype)
    return out


# -- transformers ----------------------------------------------------------------------------------------------

def test_export_config_claims_its_own_model_type(pruned):
    path, model = pruned
    c = json.loads((path / "config.json").read_text())
    assert c["model_type"] == "nuteprune_llama" and c["architectures"] == ["NutePruneLlamaForCausalLM"]
    assert set(c["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    assert c["nuteprune"]["kv_map"] == model.config.kv_map
    for name in ("configuration_nuteprune.py", "modeling_nuteprune.py"):  # verbatim copies of hf/
        assert (path / name).read_bytes() == (ROOT / "hf" / name).read_bytes()


def test_transformers_logits_and_greedy_generate_match(pruned):
    path, model = pruned
    hf = hf_load(path)
    idx = torch.randint(0, 512, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-4, rtol=0)
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == model.config.tie_embeddings
    prompt = torch.tensor([PROMPT])
    out = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)  # with its KV cache
    assert out.tolist() == llama.generate(model, prompt, 12).tolist()


def test_transformers_left_padded_batch(pruned):
    path, model = pruned
    hf = hf_load(path)
    ids, mask = torch.tensor([PROMPT, [0, 0, 0] + PROMPT[:5]]), torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out[0].tolist() == llama.generate(model, ids[:1], 6)[0].tolist()
    assert out[1, 3:].tolist() == llama.generate(model, ids[1:, 3:], 6)[0].tolist()


def test_transformers_tokenizer(pruned):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf")  # transformers needs it to read a SentencePiece model
    path, _ = pruned
    need("stories260K", "tok512.model")
    tok = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    text = "Once upon a time, Lily saw a big dog."
    assert tok(text).input_ids == tokenization.SentencePieceTokenizer(TOKENIZER).encode(text, bos=True)


def test_transformers_save_pretrained_roundtrips(pruned, tmp_path):
    path, model = pruned
    hf_load(path).save_pretrained(tmp_path)  # e.g. after fine-tuning with transformers: the code is copied again
    assert (tmp_path / "modeling_nuteprune.py").exists()
    idx = torch.tensor([PROMPT])
    with torch.no_grad():
        torch.testing.assert_close(checkpoint.load_model(tmp_path)(idx), model(idx), atol=0, rtol=0)
        torch.testing.assert_close(hf_load(tmp_path)(idx).logits, model(idx), atol=1e-4, rtol=0)


def test_scaled_rope_in_every_runtime(tmp_path):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}
    checkpoint.export_pruned(tiny_llama(**GQA, rope_scaling=rope, rope_theta=500000.0), corner_masks("gqa"), tmp_path,
                        TOKENIZER if TOKENIZER.exists() else None)
    model, idx = checkpoint.load_model(tmp_path), torch.arange(1, 60)[None]  # positions beyond the original 16
    with torch.no_grad():
        ref = model(idx)
        torch.testing.assert_close(hf_load(tmp_path)(idx).logits, ref, atol=1e-4, rtol=0)
    llama_cpp = pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    need("stories260K", "tok512.model")
    export.write_gguf(tmp_path, tmp_path / "m.gguf")
    cpp = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=64, n_threads=1, verbose=False, logits_all=True,
                          type_k=0, type_v=0)
    cpp.eval(idx[0].tolist())
    np.testing.assert_allclose(cpp.scores[:59], ref[0].numpy(), atol=1e-3, rtol=0)


def test_uniform_export_stays_plain_llama(tmp_path):
    model = tiny_llama(**MHA)
    checkpoint.save_model(model, tmp_path)
    c = json.loads((tmp_path / "config.json").read_text())
    assert c["model_type"] == "llama" and "auto_map" not in c and not (tmp_path / "modeling_nuteprune.py").exists()
    assert export.padding_report(model.config, export.plan_gguf(model.config))["added_params"] == 0
    gguf, llama_cpp = pytest.importorskip("gguf"), pytest.importorskip("llama_cpp")
    export.write_gguf(tmp_path, tmp_path / "m.gguf", tokenizer=need("stories260K", "tok512.model"))
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["general.architecture"].contents() == "llama"
    cpp = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=64, n_threads=1, verbose=False, logits_all=True,
                          type_k=0, type_v=0)
    cpp.eval(PROMPT)
    with torch.no_grad():
        np.testing.assert_allclose(cpp.scores[:len(PROMPT)], model(torch.tensor([PROMPT]))[0], atol=1e-3, rtol=0)


# -- GGUF ------------------------------------------------------------------------------------------------------

def test_plan_evens_groups_at_least_cost():
    cfg = llama.LlamaConfig(dim=16, n_layers=2, n_heads=8, n_kv_heads=4, ffn_dim=8, heads=[0, 6], kv_heads=[0, 3],
                            ffn=[8, 0], kv_map=[[], [0, 1, 2, 2, 2, 2]])
    p0, p1 = export.plan_gguf(cfg)
    assert (p0.q_src, p0.kv_src, p0.ffn) == ([None], [None], 8)  # layer 0 needs a head
    # groups of 1, 1, 4: pairs (2 K/V copies of head 2, a zero head beside 0 and 1) add 3 heads; 4s would add 6
    assert p1.q_src == [0, None, 1, None, 2, 3, 4, 5] and p1.kv_src == [0, 1, 2, 2]
    assert p1.ffn == 1  # attention without FFN
    dh = cfg.head_dim
    assert p0.added == 4 * dh * 16 and p1.added == 3 * 2 * dh * 16 + 3 * 16


def test_gguf_reads_back(pruned):
    gguf = pytest.importorskip("gguf")
    path, model = pruned
    cfg, plans = model.config, export.plan_gguf(model.config)
    r = gguf.GGUFReader(gguf_file(pruned))
    field = lambda key: r.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "deci"
    assert field("deci.attention.head_count") == [len(p.q_src) for p in plans]
    assert field("deci.attention.head_count_kv") == [len(p.kv_src) for p in plans]
    assert field("deci.feed_forward_length") == [p.ffn for p in plans]
    assert field("deci.embedding_length") == cfg.dim and field("deci.attention.key_length") == cfg.head_dim
    assert len(field("tokenizer.ggml.tokens")) == 512 and field("tokenizer.ggml.bos_token_id") == 1
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in r.tensors}  # GGUF lists ne: (in, out)
    for i, p in enumerate(plans):
        assert shapes.get(f"blk.{i}.attn_q.weight") == ((len(p.q_src) * cfg.head_dim, cfg.dim) if p.q_src else None)
        assert shapes.get(f"blk.{i}.attn_k.weight") == ((len(p.kv_src) * cfg.head_dim, cfg.dim) if p.q_src else None)
        assert shapes.get(f"blk.{i}.ffn_down.weight") == ((cfg.dim, p.ffn) if p.ffn else None)
    assert ("output.weight" in shapes) == (not cfg.tie_embeddings)
    # the padding report counts exactly the parameters GGUF holds beyond ours (less the norms of empty sublayers)
    unused_norms = cfg.dim * sum((not p.q_src) + (not p.ffn) for p in plans)
    ours = llama.count_params(model) - unused_norms
    assert sum(t.n_elements for t in r.tensors) - ours == export.padding_report(cfg, plans)["added_params"] > 0


def test_gguf_weight_types(pruned):
    gguf = pytest.importorskip("gguf")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(gguf_file(pruned, "q8_0")).tensors}
    assert types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.F16  # rows of the pruned width: not 32-blocks


def test_llama_cpp_logits_and_greedy_match(pruned):
    llama_cpp = pytest.importorskip("llama_cpp")
    path, model = pruned
    f32 = 0  # GGML_TYPE_F32: an fp32 KV cache (the default f16 one alone differs by ~2e-3)
    kw = dict(model_path=str(gguf_file(pruned)), n_ctx=64, n_threads=1, verbose=False, type_k=f32, type_v=f32)
    with torch.no_grad():
        ref = model(torch.tensor([PROMPT]))[0].numpy()
    cpp = llama_cpp.Llama(logits_all=True, **kw)
    cpp.eval(PROMPT)
    np.testing.assert_allclose(cpp.scores[:len(PROMPT)], ref, atol=1e-3, rtol=0)
    cpp = llama_cpp.Llama(**kw)  # only the last position's logits: llama.cpp selects its rows in the last layer
    cpp.eval(PROMPT)
    np.testing.assert_allclose(np.ctypeslib.as_array(cpp._ctx.get_logits(), shape=(512,)), ref[-1], atol=1e-3, rtol=0)
    toks = []
    for t in cpp.generate(PROMPT, top_k=1, temp=0.0, reset=True):
        toks.append(t)
        if len(toks) == 12:
            break
    assert PROMPT + toks == llama.generate(model, torch.tensor([PROMPT]), 12)[0].tolist()


def test_hf_export_brings_an_old_export_up_to_date(pruned, tmp_path):
    path, model = pruned
    need("stories260K", "tok512.model")
    old = tmp_path / "old"  # as exported before the remote code existed
    old.mkdir()
    for name in ("model.safetensors", "tokenizer.model"):
        (old / name).write_bytes((path / name).read_bytes())
    c = json.loads((path / "config.json").read_text())
    c.update(model_type="llama", architectures=["LlamaForCausalLM"])
    del c["auto_map"]
    (old / "config.json").write_text(json.dumps(c))
    assert export.main([str(old), "--hf", str(tmp_path / "new")]) == 0
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == sorted(p.name for p in path.iterdir())
    assert json.loads((tmp_path / "new" / "config.json").read_text()) == json.loads((path / "config.json").read_text())


def test_cli_errors_are_one_line(tmp_path, capsys):
    for argv in ([str(tmp_path / "missing"), "--gguf", str(tmp_path / "m.gguf")],  # no such checkpoint
                 [str(tmp_path), "--gguf", str(tmp_path / "m.gguf")],  # a folder without config.json
                 [str(tmp_path), "--gguf", str(tmp_path / "nowhere" / "m.gguf")]):  # no output folder
        assert export.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
    for argv in ([str(tmp_path), "--gguf", "m.gguf", "--type", "q4"], [str(tmp_path)]):  # flag errors
        with pytest.raises(SystemExit) as e:
            export.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err


# -- quantised GGUF by llama.cpp's own quantizer ---------------------------------------------------------------------

STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her dog."


@pytest.fixture(scope="module")
def quantizable(tmp_path_factory):
    """stories260K (a trained model: quantisation error shows as it would) pruned to rows of whole 32-blocks: hidden
    64, one query head per K/V head (4 x Dh 8 = 32), FFN 128 of 172; its folder, llama.py logits of STORY, the ids."""
    pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")
    ckpt, tok_path = need("stories260K", "stories260K.bin"), need("stories260K", "tok512.model")
    model = checkpoint.load_model(ckpt)
    cfg = model.config
    head, inter = torch.zeros(cfg.n_layers, cfg.n_heads), torch.zeros(cfg.n_layers, cfg.ffn_dim)
    head[:, ::2], inter[:, :128] = 1, 1
    out = tmp_path_factory.mktemp("s260") / "pruned"
    tok = tokenization.SentencePieceTokenizer(tok_path)
    checkpoint.export_pruned(model, llama.Masks(head, inter, None), out, tok)
    ids = tok.encode(STORY, bos=True)
    with torch.no_grad():
        ref = checkpoint.load_model(out)(torch.tensor([ids]))[0].numpy()
    return out, ref, ids


def cpp_logits(path, ids):
    import llama_cpp
    cpp = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, verbose=False, logits_all=True, type_k=0,
                          type_v=0)
    cpp.eval(ids)
    return np.array(cpp.scores[:len(ids)])


# measured: q8_0 0.015, q4_0 0.13 (mean |logit difference| / std of the f32 logits, 6.75); top-1 agreement 1.0 / 0.64
@pytest.mark.parametrize("ftype, rel_tol, top1", [("q8_0", 0.03, 0.95), ("q4_0", 0.25, 0.5)])
def test_quantised_gguf_by_llama_cpp_runs_close_to_f32(quantizable, tmp_path, ftype, rel_tol, top1):
    import gguf
    path, ref, ids = quantizable
    report = export.write_gguf(path, tmp_path / f"m-{ftype}.gguf", ftype)
    assert report["quantizer"] in ("llama_cpp", "llama-quantize")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / f"m-{ftype}.gguf").tensors}
    assert all(types[f"blk.{i}.{n}.weight"] == ftype.upper() for i in range(5)
               for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"))
    # every row is whole 32-blocks; only q4_0's tied output (token_embd, Q6_K in llama.cpp's mixture) needs 256
    assert report["fallbacks"] == ([] if ftype == "q8_0" else
                                   [{"tensor": "token_embd.weight", "type": "Q8_0", "row": 64, "block": 256}])
    got = cpp_logits(tmp_path / f"m-{ftype}.gguf", ids)
    assert np.abs(got - ref).mean() / ref.std() <= rel_tol
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= top1
    export.write_gguf(path, tmp_path / "f32.gguf")  # the same model unquantised: exact
    np.testing.assert_allclose(cpp_logits(tmp_path / "f32.gguf", ids), ref, atol=1e-3, rtol=0)


def test_k_quant_fallbacks_are_reported(quantizable, tmp_path, capsys):
    path, _, _ = quantizable
    report = export.write_gguf(path, tmp_path / "m.gguf", "q4_k_m")
    found = {f["tensor"]: f for f in report["fallbacks"]}
    down = found["blk.0.ffn_down.weight"]  # rows of 128 channels: not whole blocks of 256
    assert down["row"] == 128 and down["block"] == 256 and down["type"] in ("Q5_0", "Q5_1", "Q8_0")
    assert all(f["row"] % 256 for f in report["fallbacks"])  # every row here is shorter than 256
    assert "blk.0.ffn_down.weight" in capsys.readouterr().out


def test_padding_to_the_block_is_exact(pruned, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    gguf = pytest.importorskip("gguf")
    need("stories260K", "tok512.model")
    path, model = pruned
    report = export.write_gguf(path, tmp_path / "padded.gguf", "f32", pad=32)  # f32, to see that padding is exact
    cfg, plans = model.config, export.plan_gguf(model.config, 32)
    assert report["added_params"] == export.padding_report(cfg, plans, 32)["added_params"] > \
        export.padding_report(cfg, export.plan_gguf(cfg))["added_params"]
    r = gguf.GGUFReader(tmp_path / "padded.gguf")
    shapes = {t.name: [int(n) for n in t.shape] for t in r.tensors}
    # the hidden width (every row of q, k, v, gate, up and the embeddings) is whole blocks too: 0 < ours < 32 here
    assert report["hidden"] == [cfg.dim, 32] and shapes["token_embd.weight"][0] == 32
    assert r.fields["deci.embedding_length"].contents() == 32
    unused_norms = cfg.dim * sum((not p.q_src) + (not p.ffn) for p in plans)  # the report counts what GGUF holds
    assert sum(t.n_elements for t in r.tensors) - (llama.count_params(model) - unused_norms) == report["added_params"]
    for i, p in enumerate(plans):  # rows of ffn_down and attn_output: whole blocks of 32
        assert p.ffn % 32 == 0 and shapes.get(f"blk.{i}.ffn_down.weight", [0])[0] == p.ffn
        assert not p.q_src or shapes[f"blk.{i}.attn_output.weight"][0] == len(p.q_src) * cfg.head_dim
        assert not p.q_src or len(p.q_src) * cfg.head_dim % 32 == 0
    cpp = llama_cpp.Llama(model_path=str(tmp_path / "padded.gguf"), n_ctx=64, n_threads=1, verbose=False,
                          logits_all=True, type_k=0, type_v=0)
    cpp.eval(PROMPT)
    with torch.no_grad():
        np.testing.assert_allclose(cpp.scores[:len(PROMPT)], model(torch.tensor([PROMPT]))[0], atol=1e-3, rtol=0)


def test_quantised_types_need_llama_cpp(pruned, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "quantizer", lambda: None)
    with pytest.raises(ValueError, match="llama-cpp-python"):
        export.write_gguf(pruned[0], tmp_path / "m.gguf", "q4_k_m")
