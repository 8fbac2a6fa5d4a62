"""A SentencePiece model exported for transformers: tokenizer.json carries the model's own normaliser, so
transformers tokenises every string exactly as SentencePiece does."""
import json

import pytest

import tokenization
from conftest import DATA

EDGE = ["", " ", "  a  b  ", "\tx\n\ny", " \tx", "x \t y", "x\n", "<s> literal </s>", "ünï 42", "日本", "😀", "a\u00a0 b"]


def _strings() -> list[str]:
    out = list(EDGE)
    if (DATA / "tasks" / "piqa.jsonl").is_file():
        for line in (DATA / "tasks" / "piqa.jsonl").read_text().splitlines()[:150]:
            rec = json.loads(line)
            out += [rec["goal"], rec["sol1"], rec["sol2"]]
    return out


def _check(tok, tmp_path, skip=()):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    for name, content in tok.files(512).items():
        (tmp_path / name).write_bytes(content)
    assert (tmp_path / "tokenizer.json").is_file()
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    strings = [s for s in _strings() if s not in skip]
    assert [hf(s)["input_ids"] for s in strings] == [tok.encode(s, bos=True) for s in strings]
    known = [ids for ids in map(tok.encode, strings) if tok.sp.unk_id() not in ids]  # SentencePiece shows unk as ⁇
    assert [hf.decode(ids) for ids in known] == [tok.decode(ids) for ids in known]


@pytest.mark.parametrize("name", ["stories260K/tok512.model", "llama_tokenizer/tokenizer.model"])
def test_sentencepiece_export_tokenizes_as_sentencepiece(name, tmp_path):
    """tok512 strips leading, trailing and repeated spaces (remove_extra_whitespaces); LLaMA's does not."""
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not available")
    tok = tokenization.SentencePieceTokenizer(path)
    assert tokenization.spm_spec(tok.model_bytes())["remove_extra_whitespaces"] == name.startswith("stories")
    _check(tok, tmp_path)


def test_unigram_with_nfkc_export(files, tmp_path):
    """SentencePiece's defaults: a unigram model with the nmt_nfkc character map. A literal "<s>" is left out: a
    `tokenizers` Unigram model can match its control pieces as text, which SentencePiece never does (LLaMA-family
    models are BPE)."""
    spm = pytest.importorskip("sentencepiece")
    spm.SentencePieceTrainer.train(input=str(files / "corpus.txt"), model_prefix=str(tmp_path / "uni"), vocab_size=60,
                                   model_type="unigram", minloglevel=2)
    tok = tokenization.SentencePieceTokenizer(tmp_path / "uni.model")
    spec = tokenization.spm_spec(tok.model_bytes())
    assert spec["model_type"] == 1 and spec["charsmap"]
    out = tmp_path / "export"
    out.mkdir()
    _check(tok, out, skip=("<s> literal </s>",))
