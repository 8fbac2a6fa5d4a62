import os
import sys
from pathlib import Path

import pytest
import torch

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
    """Stand-in for llama.Tokenizer: one id per character (3 + ord(c) mod (vocab_size - 3)), BOS 1, EOS 2. .path is a
    file whose bytes key data.py's token cache; .calls counts encode calls."""

    bos_id, eos_id = 1, 2

    def __init__(self, path="chars", vocab_size=100):
        self.path, self.vocab_size, self.calls = str(path), vocab_size, 0

    def encode(self, text, bos=False, eos=False):
        self.calls += 1
        return [self.bos_id] * bos + [3 + ord(c) % (self.vocab_size - 3) for c in text] + [self.eos_id] * eos
