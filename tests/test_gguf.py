"""GGUF checkpoints and the tokenizers people bring: SmolLM2-135M (GGUF Q4_1, byte-level BPE, no BOS) against
transformers and llama.cpp, a tiny GGUF written here for the SentencePiece kind and for every bad input."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoint
import llama
import tokenization
from conftest import DATA, ROOT, tiny_llama

SHARED = DATA.parent
SMOL = SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "In 1887, the  quick brown fox 42"]


def need_smol():
    if not SMOL.is_file():
        pytest.skip("../shared/models/smollm2-135m-instruct is absent")
    pytest.importorskip("gguf")
    pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def smol():
    need_smol()
    return checkpoint.load(SMOL)


def test_smollm2_equals_transformers(smol):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model, tok = smol
    hf = transformers.AutoModelForCausalLM.from_pretrained(SMOL.parent, gguf_file=SMOL.name, dtype=torch.float32).eval()
    assert model.config.tie_embeddings and model.config.n_kv_heads == 3 and not tok.add_bos
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            ours, theirs = model(ids), hf(ids).logits
        assert (ours - theirs).abs().max() / (theirs.max() - theirs.min()) < 1e-4
    ids = torch.tensor([tok.encode(PROMPTS[2])])  # 64 greedy tokens, no EOS on the way
    greedy = llama.generate(model, ids, 64, eos_id=tok.eos_id)
    assert greedy.shape[1] == ids.shape[1] + 64
    assert torch.equal(greedy, hf.generate(ids, max_new_tokens=64, do_sample=False))


def _task_strings() -> list[str]:
    out = []
    for task, keys in (("piqa", ("goal", "sol1", "sol2")), ("hellaswag", ("ctx", "endings")),
                       ("boolq", ("question", "passage"))):
        for line in (SHARED / "data" / "tasks" / f"{task}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            for k in keys:
                v = rec[k]
                out += v if isinstance(v, list) else [v]
    return out


EDGE = ["", " ", "  ", "a", " a", "a ", "a  b", "\t", "\n", "\n\n", " \n ", "x\ty", "1", "12345", "a 1", "a  1",
        "a   12", "  3", "x\n\n 7", "café", "naïve Ωmega", "日本語のテキスト", "😀 emoji 👍🏽", "don't", "I'M", "  leading",
        "trailing  ", "mixed \t\n 42  x", "<|im_start|>user\nhi<|im_end|>", "<s> hi </s>", "<|endoftext|>"]


def test_smollm2_tokenizes_as_llama_cpp(smol):
    """llama.cpp implements SmolLM2's `smollm` pre-tokenizer as its original tokenizer.json does (digits one by one,
    then byte-level BPE); transformers' tokenizer built from the GGUF splits whitespace runs before a digit otherwise,
    so llama.cpp is the reference. special=False: a literal special token in the text is text."""
    llama_cpp = pytest.importorskip("llama_cpp")
    _, tok = smol
    ref = llama_cpp.Llama(model_path=str(SMOL), vocab_only=True, verbose=False)
    strings = _task_strings()[:3000] + EDGE
    assert len(strings) >= 3000
    differ = [s for s in strings if tok.encode(s) != ref.tokenize(s.encode(), add_bos=False, special=False)]
    assert differ == []
    assert tok.encode("<|im_start|>") != [1]  # spelled out, not the control token
    assert tok.decode(tok.encode("a  1 <|im_end|> é")) == "a  1 <|im_end|> é"


def test_smollm2_hf_folder_round_trip(smol, tmp_path):
    model, tok = smol
    checkpoint.save_model(model, tmp_path, tok)
    assert (tmp_path / "tokenizer.json").is_file() and not (tmp_path / "tokenizer.model").exists()
    model2, tok2 = checkpoint.load(tmp_path)
    ids = torch.tensor([tok.encode(PROMPTS[0])])
    with torch.no_grad():
        assert torch.equal(model(ids), model2(ids))
    strings = EDGE + _task_strings()[:300]
    assert all(tok2.encode(s) == tok.encode(s) for s in strings) and tok2.add_bos == tok.add_bos
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert [hf_tok(s, add_special_tokens=True)["input_ids"] for s in strings] == [tok.encode(s) for s in strings]


def test_evaluate_reads_gguf(smol, capsys):
    import evaluate
    code = evaluate.main(["--ckpt", str(SMOL), "--tasks", "piqa", "--data-dir", str(SHARED / "data"), "--limit", "8",
                          "--batch-size", "8"])
    assert code == 0 and "PIQA" in capsys.readouterr().out

# -- a tiny GGUF of our own, for the SentencePiece kind and for bad input ------------------------------------------


@pytest.fixture
def tiny_gguf(files, tmp_path):
    """conftest's tiny GQA model (SentencePiece tokenizer) written as f32 GGUF by export.py."""
    pytest.importorskip("gguf")
    import export
    path = tmp_path / "tiny.gguf"
    export.write_gguf(files / "model", path, "f32")
    return path


def test_gguf_sentencepiece_round_trip(files, tiny_gguf):
    """Weights through GGUF give the same logits; the tokenizer comes back as a SentencePiece model with BOS."""
    model, tok = checkpoint.load(files / "model")
    model2, tok2 = checkpoint.load(tiny_gguf)
    assert isinstance(tok2, tokenization.SentencePieceTokenizer) and tok2.add_bos and tok2.bos_id == tok.bos_id
    assert tok2.encode("the cat sat") == tok.encode("the cat sat")
    ids = torch.tensor([tok.encode((files / "corpus.txt").read_text()[:200], bos=True)[:32]])
    with torch.no_grad():
        torch.testing.assert_close(model2(ids), model(ids), atol=1e-5, rtol=1e-5)


def test_llama_sentencepiece_survives_gguf_metadata():
    """LLaMA's tokenizer.model as GGUF stores it (pieces, scores, types) and rebuilt: the same tokens as the original."""
    sp = tokenization.SentencePieceTokenizer(DATA / "llama_tokenizer" / "tokenizer.model") \
        if (DATA / "llama_tokenizer" / "tokenizer.model").is_file() else pytest.skip("no LLaMA tokenizer")
    n = sp.vocab_size
    types = [2 if sp.sp.IsUnknown(i) else 3 if sp.sp.IsControl(i) else 6 if sp.sp.IsByte(i) else 1 for i in range(n)]
    proto = tokenization.spm_proto([sp.sp.IdToPiece(i) for i in range(n)], [sp.sp.GetScore(i) for i in range(n)],
                                   types, sp.sp.unk_id(), sp.bos_id, sp.eos_id)
    rebuilt = tokenization.SentencePieceTokenizer("gguf", proto=proto)
    strings = EDGE + _task_strings()[:1000] if (DATA / "tasks").is_dir() else EDGE
    assert [rebuilt.encode(s) for s in strings] == [sp.encode(s) for s in strings]


def _write(path, arch="llama", bad_tensor=False):
    import gguf
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_feed_forward_length(16)
    w.add_context_length(32)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "c", "ab"])
    w.add_token_merges(["a b"])
    shapes = {"token_embd.weight": (4, 8), "output_norm.weight": (8,), "blk.0.attn_norm.weight": (8,),
              "blk.0.ffn_norm.weight": (8,), "blk.0.attn_q.weight": (8, 8), "blk.0.attn_k.weight": (8, 8),
              "blk.0.attn_v.weight": (8, 8), "blk.0.attn_output.weight": (8, 8), "blk.0.ffn_gate.weight": (16, 8),
              "blk.0.ffn_up.weight": (16, 8), "blk.0.ffn_down.weight": (8, 16)}
    for name, shape in shapes.items():
        if bad_tensor and name == "blk.0.ffn_up.weight":
            w.add_tensor(name, np.zeros(shape, dtype=np.int32), raw_dtype=gguf.GGMLQuantizationType.I32)
        else:
            w.add_tensor(name, np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_bpe_gguf_loads(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("tokenizers")
    model, tok = checkpoint.load(_write(tmp_path / "ok.gguf"))
    assert model.config.tie_embeddings and tok.encode("ab") == [3] and not tok.add_bos


def _one_line_error(argv) -> str:
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *argv], capture_output=True, text=True,
                       cwd=ROOT, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def test_bad_input_gets_one_line(tmp_path):
    pytest.importorskip("gguf")
    tasks = ["--tasks", "piqa", "--path", f"piqa={tmp_path / 'piqa.jsonl'}"]
    (tmp_path / "piqa.jsonl").write_text(json.dumps({"goal": "g", "sol1": "a", "sol2": "b", "label": 0}) + "\n")
    assert "architecture 'gpt2'" in _one_line_error(["--ckpt", str(_write(tmp_path / "g.gguf", "gpt2"))] + tasks)
    bad = _write(tmp_path / "bad.gguf", bad_tensor=True)
    assert "type I32" in _one_line_error(["--ckpt", str(bad)] + tasks)
    whole = _write(tmp_path / "whole.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(whole[:len(whole) // 2])
    assert "cut.gguf" in _one_line_error(["--ckpt", str(tmp_path / "cut.gguf")] + tasks)
    unigram = {"version": "1.0", "model": {"type": "Unigram", "unk_id": 0, "vocab": [["<unk>", 0.0], ["a", -1.0]]}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(unigram))
    assert "Unigram" in _one_line_error(["--ckpt", str(_write(tmp_path / "ok.gguf")), "--tokenizer",
                                         str(tmp_path / "tokenizer.json")] + tasks)
    (tmp_path / "meta3").mkdir()
    (tmp_path / "meta3" / "tokenizer.model").write_text("IQ== 0\nIg== 1\nIw== 2\n")  # Meta's Llama-3 tiktoken ranks
    assert "tiktoken" in _one_line_error(["--ckpt", str(_write(tmp_path / "ok2.gguf")), "--tokenizer",
                                          str(tmp_path / "meta3" / "tokenizer.model")] + tasks)
    err = _one_line_error(["--ckpt", "nobody-here/not-cached"] + tasks)
    assert "nobody-here/not-cached" in err and "--ckpt" in err


def test_prune_cli_resolves_a_short_name_and_default_data(files, tmp_path, monkeypatch):
    """--ckpt smollm2-135m from a Hugging Face cache folder; without --data, C4 shard 00000 from the same cache."""
    import shutil

    import flags
    import nuteprune
    cache = tmp_path / "hub"
    snap = cache / "models--HuggingFaceTB--SmolLM2-135M" / "snapshots" / "abc"
    snap.parent.mkdir(parents=True)
    shutil.copytree(files / "model", snap)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="c4-train.00000-of-01024.json.gz.*--data"):
        flags.parse_args(["--ckpt", "smollm2-135m", "--target", "0.5", "--out", str(tmp_path / "o")], nuteprune.RunConfig)
    c4 = cache / "datasets--allenai--c4" / "snapshots" / "def" / "en" / "c4-train.00000-of-01024.json.gz"
    c4.parent.mkdir(parents=True)
    shutil.copyfile(files / "corpus.txt", c4)
    c, _ = flags.parse_args(["--ckpt", "smollm2-135m", "--target", "0.5", "--out", str(tmp_path / "o")], nuteprune.RunConfig)
    assert c.ckpt == str(snap) and c.data == str(c4)



def test_pruned_smollm2_in_transformers_and_llama_cpp(smol, tmp_path):
    """SmolLM2 with random 50% FFN, uneven GQA head and 4-dim hidden masks, exported: transformers (remote code)
    within 1e-4 of llama.py, and export.py's f32 GGUF (gpt2 vocabulary) in llama.cpp within 1e-3."""
    transformers = pytest.importorskip("transformers")
    llama_cpp = pytest.importorskip("llama_cpp")
    import export
    model, tok = smol
    cfg, g = model.config, torch.Generator().manual_seed(0)
    head = (torch.rand(cfg.n_layers, cfg.n_heads, generator=g) > 0.3).float()
    inter = (torch.rand(cfg.n_layers, cfg.ffn_dim, generator=g) > 0.5).float()
    hidden = torch.ones(cfg.dim)
    hidden[:4] = 0
    checkpoint.export_pruned(model, llama.Masks(head, inter, hidden), tmp_path / "pruned", tok)
    pruned, tok2 = checkpoint.load(tmp_path / "pruned")
    ids = tok.encode(PROMPTS[1])
    with torch.no_grad():
        ours = pruned(torch.tensor([ids]))[0]
    scale = (ours.max() - ours.min()).item()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", trust_remote_code=True).eval()
    with torch.no_grad():
        assert (hf(torch.tensor([ids])).logits[0] - ours).abs().max() / scale < 1e-4
    export.write_gguf(tmp_path / "pruned", tmp_path / "p.gguf", "f32")
    cpp = llama_cpp.Llama(model_path=str(tmp_path / "p.gguf"), n_ctx=64, n_threads=1, verbose=False, logits_all=True,
                          type_k=0, type_v=0)
    assert cpp.tokenize(PROMPTS[1].encode(), add_bos=False, special=False) == ids
    cpp.eval(ids)
    assert (torch.tensor(np.array(cpp.scores[:len(ids)])) - ours).abs().max() / scale < 1e-3

# -- a Llama-3-style checkpoint: byte-level BPE tokenizer.json with <|begin_of_text|>, llama3 RoPE scaling ------------


@pytest.fixture
def llama3_folder(files, tmp_path):
    t = pytest.importorskip("tokenizers")
    tk = t.Tokenizer(t.models.BPE())
    tk.pre_tokenizer = t.pre_tokenizers.Sequence([
        t.pre_tokenizers.Split(t.Regex(tokenization.LLAMA3_SPLIT), behavior="isolated"),
        t.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = t.decoders.ByteLevel()
    trainer = t.trainers.BpeTrainer(vocab_size=320, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                    initial_alphabet=t.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train([str(files / "corpus.txt")], trainer)
    tk.post_processor = t.processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                        special_tokens=[("<|begin_of_text|>", 0)])
    d = tmp_path / "llama3"
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    model = tiny_llama(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=tk.get_vocab_size(),
                       max_seq_len=128, rope_theta=500000.0, rope_scaling=rope)
    checkpoint.save_model(model, d)
    tk.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                                                         "tokenizer_class": "PreTrainedTokenizerFast"}))
    return d


def test_llama3_style_prune_export_transformers(files, llama3_folder, tmp_path):
    import nuteprune
    transformers = pytest.importorskip("transformers")
    tok = checkpoint.find_tokenizer(llama3_folder)
    assert isinstance(tok, tokenization.BPETokenizer) and tok.add_bos and tok.bos_id == 0 and tok.pre == "llama-bpe"
    out = tmp_path / "run"
    argv = ["--ckpt", str(llama3_folder), "--data", str(files / "corpus.txt"), "--target", "0.5", "--out", str(out),
            "--block-size", "32", "--batch-size", "4", "--micro-batch-size", "2", "--heldout-blocks", "4",
            "--max-steps", "4", "--lr-mask", "1", "--lr-lambda", "1", "--cache-dir", str(tmp_path / "cache"),
            "--device", "cpu"]
    nuteprune.main(argv)
    pruned, tok2 = checkpoint.load(out / "pruned")
    text = (files / "corpus.txt").read_text()[:400]
    ids = tok2.encode(text, bos=tok2.add_bos)[:48]
    assert ids[0] == 0 and tok2.encode(text) == tok.encode(text)
    with torch.no_grad():
        ours = pruned(torch.tensor([ids]))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "pruned", trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(torch.tensor([ids])).logits, ours, atol=1e-4, rtol=0)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out / "pruned", trust_remote_code=True)
    for s in [text, " a  1 2345", "<|begin_of_text|> literal", "émoji 😀\n\n x"]:
        assert hf_tok(s)["input_ids"] == tok.encode(s, bos=True)
