"""`python slow_steps.py ARGS...`: nuteprune.main(ARGS) with every optimizer step 0.5 s longer (a step of a 70B run
takes seconds), so that signals sent 0.2 s apart land inside one step. Used by test_distributed.py."""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nuteprune as npr  # noqa: E402
import runfolder  # noqa: E402

if __name__ == "__main__":
    step_done = runfolder.Checkpointer.step_done

    def slow(self, parts, step, total):
        time.sleep(0.5)
        return step_done(self, parts, step, total)
    runfolder.Checkpointer.step_done = slow
    npr.main(sys.argv[1:])
