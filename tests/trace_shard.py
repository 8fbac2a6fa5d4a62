"""`python trace_shard.py TRACE_DIR ARGS...`: nuteprune.main(ARGS) under torchrun, with the dtypes of the frozen
base recorded each time a rank shards a model (the number of elements per dtype, LoRA left out) into
TRACE_DIR/rank<R>.json. What a rank holds on its host before sharding is what this shows. Used by
test_distributed.py."""
import json
import os
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import distributed  # noqa: E402
import nuteprune as npr  # noqa: E402

if __name__ == "__main__":
    seen, shard = [], distributed.shard_model

    def recording(model, device, dtype=None):
        count = Counter()
        for name, p in model.named_parameters():
            if "lora_" not in name:
                count[str(p.dtype)] += p.numel()
        seen.append(dict(count))
        return shard(model, device, dtype)
    distributed.shard_model = recording
    try:
        npr.main(sys.argv[2:])
    finally:
        (Path(sys.argv[1]) / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(seen))
