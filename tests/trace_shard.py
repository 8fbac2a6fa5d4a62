"""`python trace_shard.py TRACE_DIR ARGS...`: nuteprune.main(ARGS) under torchrun, recording what a rank holds on its
host each time it shards a model, into TRACE_DIR/rank<R>.json: the frozen base's elements per dtype when
shard_model is called (LoRA left out), and, layer by layer after shard_model's before_layer ran, the most elements of
plain (not yet sharded) frozen weights converted to the run's dtype at once. Used by test_distributed.py."""
import json
import os
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import distributed  # noqa: E402
import nuteprune as npr  # noqa: E402


def frozen(model):
    return [(n, p) for n, p in model.named_parameters() if "lora_" not in n]


if __name__ == "__main__":
    seen, shard = [], distributed.shard_model

    def recording(model, device, dtype=None, before_layer=None):
        rec = {"at_call": sum_by_dtype(model), "converted_at_once": 0}

        def before(i, layer):
            if before_layer is not None:
                before_layer(i, layer)
            plain = sum(p.numel() for _, p in frozen(model) if not hasattr(p, "device_mesh") and p.dtype == dtype)
            rec["converted_at_once"] = max(rec["converted_at_once"], plain)
        seen.append(rec)
        return shard(model, device, dtype, before)

    def sum_by_dtype(model):
        count = Counter()
        for _, p in frozen(model):
            count[str(p.dtype)] += p.numel()
        return dict(count)
    distributed.shard_model = recording
    try:
        npr.main(sys.argv[2:])
    finally:
        (Path(sys.argv[1]) / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(seen))
