"""`python trace_masks.py TRACE_DIR ARGS...`: nuteprune.main(ARGS), under torchrun or not, with every sampled mask
recorded into TRACE_DIR/rank<R>.pt (a list of [head, intermediate, hidden] per step). Used by test_distributed.py."""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nuteprune as npr  # noqa: E402


def recorder(seen: list):
    sample = npr.Gates.sample

    def recording(self, generator=None):
        z = sample(self, generator)
        seen.append([t.detach().cpu().clone() for t in npr.mask_tensors(z)])
        return z
    return recording


if __name__ == "__main__":
    seen = []
    npr.Gates.sample = recorder(seen)
    try:
        npr.main(sys.argv[2:])
    finally:
        torch.save(seen, Path(sys.argv[1]) / f"rank{os.environ.get('RANK', '0')}.pt")
