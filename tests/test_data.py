import gzip
import json

import pytest
import torch

import data
import tokenization
from conftest import CharTokenizer, need


@pytest.fixture
def tok(tmp_path):
    p = tmp_path / "char.model"
    p.write_bytes(b"char tokenizer v1")
    return CharTokenizer(p, vocab_size=203)  # ids 3 + ord(c) % 200


def write_jsonl(path, texts, gz=False):
    lines = "".join(json.dumps({"text": t, "url": "u"}) + "\n" for t in texts)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        path.write_text(lines)
    return path


DOCS = ["alpha beta", "gamma", "delta epsilon zeta", "eta theta iota kappa", "lambda"]


def expected_stream(tok, docs):
    return [t for d in docs for t in tok.encode(d, bos=True)]


@pytest.mark.parametrize("name", ["c4.jsonl", "c4.json.gz", "c4.json"])
def test_calibration_blocks_one_bos_per_document(tmp_path, tok, name):
    path = write_jsonl(tmp_path / name, DOCS, gz=name.endswith(".gz"))
    blocks = data.calibration_blocks(path, tok, n_docs=4, block_size=8, cache_dir=tmp_path / "cache")
    stream = expected_stream(tok, DOCS[:4])  # the first n_docs documents only
    n = len(stream) // 8  # remainder dropped
    assert blocks.dtype == torch.long and blocks.shape == (n, 8)
    assert blocks.flatten().tolist() == stream[:n * 8]
    assert (blocks == tok.bos_id).sum() == 4 - (stream[n * 8:].count(tok.bos_id))  # no EOS, one BOS per document
    assert (blocks == tok.eos_id).sum() == 0


def test_calibration_json_list_and_txt(tmp_path, tok):
    (tmp_path / "list.json").write_text(json.dumps([{"text": d} for d in DOCS]))
    blocks = data.calibration_blocks(tmp_path / "list.json", tok, block_size=4, cache_dir=tmp_path)
    assert blocks.flatten().tolist() == expected_stream(tok, DOCS)[:blocks.numel()]
    # plain text: documents are the blank-line-separated chunks
    (tmp_path / "c.txt").write_text("one\ntwo lines\n\n\nthree\n  \nfour\n")
    assert data.read_documents(tmp_path / "c.txt") == ["one\ntwo lines", "three", "four"]
    blocks = data.calibration_blocks(tmp_path / "c.txt", tok, n_docs=2, block_size=3, cache_dir=tmp_path)
    assert blocks.flatten().tolist() == expected_stream(tok, ["one\ntwo lines", "three"])[:blocks.numel()]


def test_token_cache_keyed_by_content(tmp_path, tok, monkeypatch):
    path = write_jsonl(tmp_path / "c4.jsonl", DOCS)
    cache = tmp_path / "cache"
    first = data.calibration_blocks(path, tok, n_docs=5, block_size=4, cache_dir=cache)
    assert len(list(cache.glob("tokens-*.npy"))) == 1 and not list(cache.glob("*.tmp"))
    calls = tok.calls
    again = data.calibration_blocks(path, tok, n_docs=5, block_size=8, cache_dir=cache)  # any block size
    assert tok.calls == calls  # served from the cache: nothing re-tokenised
    assert again.flatten().tolist() == first.flatten().tolist()[:again.numel()]
    data.calibration_blocks(path, tok, n_docs=3, block_size=4, cache_dir=cache)  # n_docs is part of the key
    write_jsonl(path, DOCS[::-1])  # new content, same path
    changed = data.calibration_blocks(path, tok, n_docs=5, block_size=4, cache_dir=cache)
    assert changed.flatten().tolist() == expected_stream(tok, DOCS[::-1])[:changed.numel()]
    (tmp_path / "char.model").write_bytes(b"another tokenizer")  # the tokenizer file is part of the key
    data.calibration_blocks(path, tok, n_docs=5, block_size=4, cache_dir=cache)
    assert len(list(cache.glob("tokens-*.npy"))) == 4
    monkeypatch.setenv("NUTEPRUNE_CACHE", str(tmp_path / "env_cache"))  # default location from the environment
    data.calibration_blocks(path, tok, n_docs=5, block_size=4)
    assert len(list((tmp_path / "env_cache").glob("tokens-*.npy"))) == 1


def test_calibration_errors(tmp_path, tok):
    with pytest.raises(ValueError, match="does not exist"):
        data.calibration_blocks(tmp_path / "nope.jsonl", tok, cache_dir=tmp_path)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        data.calibration_blocks(tmp_path / "empty.jsonl", tok, cache_dir=tmp_path)
    write_jsonl(tmp_path / "short.jsonl", ["tiny"])
    with pytest.raises(ValueError, match="too few for one block"):
        data.calibration_blocks(tmp_path / "short.jsonl", tok, block_size=512, cache_dir=tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"title": "no text"}\n')
    with pytest.raises(ValueError, match="record 1 has no string 'text'"):
        data.calibration_blocks(tmp_path / "bad.jsonl", tok, cache_dir=tmp_path)
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match="broken.jsonl:2"):
        data.calibration_blocks(tmp_path / "broken.jsonl", tok, cache_dir=tmp_path)


def test_calibration_real_c4(tmp_path):
    tok = tokenization.SentencePieceTokenizer(need("llama_tokenizer", "tokenizer.model"))
    blocks = data.calibration_blocks(need("c4", "c4_en_train00000_first1000.jsonl"), tok, n_docs=50, block_size=512,
                                     cache_dir=tmp_path)
    docs = data.read_documents(need("c4", "c4_en_train00000_first1000.jsonl"), 50)
    assert docs[0].startswith("Beginners BBQ Class Taking Place in Missoula!")
    stream = [t for d in docs for t in tok.encode(d, bos=True)]
    assert blocks.shape == (len(stream) // 512, 512)
    assert blocks.flatten().tolist() == stream[:blocks.numel()]

# -- Alpaca -----------------------------------------------------------------------------------------------------------


ALPACA = [{"instruction": "Give three tips.", "input": "", "output": "Eat well."},
          {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"}]


def test_alpaca_template_masking_eos(tmp_path, tok):
    (tmp_path / "a.json").write_text(json.dumps(ALPACA))
    ex = data.alpaca_examples(tmp_path / "a.json", tok, max_len=512)
    prompts = [  # stanford_alpaca train.py PROMPT_DICT, written out by hand
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nGive three tips.\n\n### Response:",
        "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
        "response that appropriately completes the request.\n\n### Instruction:\nTranslate.\n\n### Input:\nBonjour"
        "\n\n### Response:"]
    for (ids, labels), prompt, rec in zip(ex, prompts, ALPACA):
        assert ids == [1] + tok.encode(prompt + rec["output"]) + [2]  # BOS ... output EOS
        n = 1 + len(prompt)
        assert labels == [-100] * n + ids[n:]  # the loss sees the output and EOS only
    # truncation keeps the first max_len tokens; the second prompt is longer than that, so no output token of it
    # survives and the example, which would carry no loss, is dropped
    short = 1 + len(prompts[0]) + 3
    assert len(prompts[1]) > short
    (ids, labels), = data.alpaca_examples(tmp_path / "a.json", tok, max_len=short)
    assert len(ids) == len(labels) == short and labels[-1] == ids[-1] != tok.eos_id


def test_pad_batch():
    ids, labels = data.pad_batch([([1, 5, 6], [-100, 5, 6]), ([1, 7], [-100, 7])], pad_id=0)
    assert ids.tolist() == [[1, 5, 6], [1, 7, 0]]
    assert labels.tolist() == [[-100, 5, 6], [-100, 7, -100]]


def test_alpaca_real_llama_tokenizer():
    tok = tokenization.SentencePieceTokenizer(need("llama_tokenizer", "tokenizer.model"))
    ex = data.alpaca_examples(need("alpaca", "alpaca_data_first200.json"), tok)
    assert len(ex) == 200
    ids, labels = ex[0]
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode([t for t in labels if t != -100]).startswith("1.Eat a balanced diet")
    assert all(len(i) <= 512 for i, _ in ex)

# -- perplexity corpora -----------------------------------------------------------------------------------------------


def test_wikitext2_and_ptb_joining(tmp_path):
    (tmp_path / "w.raw").write_text(" \n = Title = \n \n Text line . \n")
    # rows "", " = Title = \n", "", " Text line . \n"
    assert data.wikitext2_text(tmp_path / "w.raw") == "\n\n = Title = \n" + "\n\n" + "\n\n" + " Text line . \n"
    (tmp_path / "p.txt").write_text(" a b c \n d e \n")
    assert data.ptb_text(tmp_path / "p.txt") == "a b c\n\nd e"


def test_wikitext2_documented_length():
    text = data.wikitext2_text(need("wikitext2", "wiki.test.raw"))
    assert len(text) == 1_294_336  # shared/data/wikitext2/PROVENANCE.md: "\n\n".join of the 4,358 HF rows
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")
    ptb = data.ptb_text(need("ptb", "ptb.valid.txt"))
    assert ptb.count("\n\n") == 3369 and not ptb.startswith(" ")  # 3,370 stripped rows
