import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch

import checkpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)  # tiny models: one thread is fastest, and immune to a busy machine

# Real public data (../shared/data beside the checkout, or $NUTEPRUNE_DATA); tests that need it skip without it.
DATA = Path(os.environ.get("NUTEPRUNE_DATA", ROOT.parent / "shared" / "data"))


def need(*parts) -> Path:
    p = DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not available")
    return p


@pytest.fixture
def data_dir():
    return DATA


# -- tiny models and a character tokenizer shared by the test files ---------------------------------------------------

MHA = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=48, vocab_size=64, max_seq_len=64)
GQA = dict(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=40, vocab_size=64, max_seq_len=64)


def tiny_llama(seed=0, **cfg):
    """A seeded random LLaMA in eval mode, norms away from 1 so that norm folding is exercised."""
    import llama
    torch.manual_seed(seed)
    model = llama.Llama(llama.LlamaConfig(**cfg))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model.eval()


class CharTokenizer:
    """Stand-in for tokenization.Tokenizer: one id per character (3 + ord(c) mod (vocab_size - 3)), BOS 1, EOS 2. .path is a
    file whose bytes key data.py's token cache; .calls counts encode calls."""

    bos_id, eos_id = 1, 2

    def __init__(self, path="chars", vocab_size=100, add_bos=True):
        self.path, self.vocab_size, self.calls, self.add_bos = str(path), vocab_size, 0, add_bos

    def fingerprint(self):
        import hashlib
        return hashlib.sha256(open(self.path, "rb").read()).hexdigest()

    def encode(self, text, bos=False, eos=False):
        self.calls += 1
        return [self.bos_id] * bos + [3 + ord(c) % (self.vocab_size - 3) for c in text] + [self.eos_id] * eos


# -- a tiny GQA model on disk with its own tokenizer, corpus and Alpaca file, and the flags of a fast whole run -------

WORDS = ("the a little big red blue cat dog bird tree house sun moon ran jumped sat saw found happy sad and then "
         "with to in on was it she he they played day night friend home ball park").split()


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    """A tiny GQA model with its own SentencePiece tokenizer, a text corpus and an Alpaca file."""
    import llama
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("tiny")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 40))) + "." for _ in range(150)]
    (d / "corpus.txt").write_text("\n\n".join(docs))
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "tok"), vocab_size=64,
                                   model_type="bpe", character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0,
                                   pad_id=-1, minloglevel=2)
    torch.manual_seed(0)
    model = llama.Llama(llama.LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, vocab_size=64,
                                          max_seq_len=256))
    checkpoint.save_model(model, d / "model", tokenizer=d / "tok.model")
    alpaca = [{"instruction": f"Tell me about the {rng.choice(WORDS)}.", "input": rng.choice(["", "a dog"]),
               "output": " ".join(rng.choice(WORDS) for _ in range(8))} for _ in range(12)]
    (d / "alpaca.json").write_text(json.dumps(alpaca))
    return d


def args(files, out, *extra):
    return ["--ckpt", str(files / "model"), "--data", str(files / "corpus.txt"), "--target", "0.5", "--out", str(out),
            "--block-size", "32", "--batch-size", "4", "--micro-batch-size", "2", "--heldout-blocks", "4",
            "--max-steps", "12", "--log-every", "2", "--save-every", "2", "--warmup-epochs", "3", "--lr-mask", "1",
            "--lr-lambda", "1", "--gap", "0.04", "--interval", "0.02", "--cache-dir", str(files / "cache"),
            "--device", "cpu", *extra]  # fast masks: 12 steps cross every snapshot level and reach stage 2


FT = ("--ft-data", "alpaca.json", "--ft-max-steps", "4", "--ft-batch-size", "4", "--ft-max-len", "256")


def ft(files):
    return [str(files / a) if a == "alpaca.json" else a for a in FT]


# -- the suite leaves the repository as it found it ----------------------------------------------------------------

def _git_status():
    import subprocess
    try:
        r = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT, capture_output=True,
                           text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


@pytest.fixture(scope="session", autouse=True)
def repository_left_clean():
    """Tests write only under pytest's temporary directories: git status is the same after the suite as before."""
    before = _git_status()
    yield
    after = _git_status()
    if before is not None and after is not None:
        new = sorted(set(after.splitlines()) - set(before.splitlines()))
        assert not new, f"the tests left files in the repository: {new}"
