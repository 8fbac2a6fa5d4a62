"""torchrun with FSDP2 on the CPU (gloo): two ranks compute what one process computes, and a killed two-rank run
resumes in one process."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import distributed
import nuteprune as npr
from conftest import ROOT, args, ft

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")


def torchrun(argv, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "nuteprune.py"), *argv]
    return subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True, **kw)


def descendants(pid: int, parent: dict | None = None) -> list[int]:
    """pid's child processes and theirs (torchrun starts each rank in a session of its own)."""
    if parent is None:
        parent = {}
        for d in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    kids = [p for p, pp in parent.items() if pp == pid]
    return kids + [k for c in kids for k in descendants(c, parent)]


def load(out):
    return torch.load(out / "state.pt", weights_only=True)


def assert_same_run(a, b, atol=1e-5):
    for group in ("head", "intermediate", "hidden"):
        assert torch.equal(a["final_masks"][group], b["final_masks"][group]), group
    for key in ("gates", "lora", "ft_lora"):
        if a[key] is None:
            assert b[key] is None
            continue
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            torch.testing.assert_close(a[key][k], b[key][k], atol=atol, rtol=0)
    assert [s["level"] for s in a["snapshots"]] == [s["level"] for s in b["snapshots"]]
    assert a["stage2_start"] == b["stage2_start"]


class Reached(Exception):
    pass


def test_every_collective_gets_its_tensor_on_the_backends_device(monkeypatch):
    """Under NCCL a CPU tensor cannot be all-reduced: every collective of distributed.py must hand the backend a tensor
    on backend_device(). No GPU here: the backend is faked and "meta" stands for the GPU."""
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert distributed.backend_device() == torch.device("cuda", 3)
    monkeypatch.setattr(distributed, "backend_device", lambda: torch.device("meta"))
    seen = []

    def all_reduce(t, op=None):
        seen.append(t.device)
        raise Reached  # meta holds no data to copy back; where the tensor went is what is checked

    monkeypatch.setattr(distributed.dist, "all_reduce", all_reduce)
    calls = [lambda: distributed.average_values({"kd": 1.0, "layer": 2.0}),  # the step's loss terms (CPU floats)
             lambda: distributed.max_over_ranks(1), lambda: distributed.all_ranks(True),
             lambda: distributed.average_over_ranks([torch.ones(2)])]
    for call in calls:
        with pytest.raises(Reached):
            call()
    assert seen == [torch.device("meta")] * len(calls)


def test_two_ranks_equal_one_process(files, tmp_path):
    flags = ("--max-steps", "16", *ft(files))  # pruning, then post fine-tuning (the model is rebuilt and re-sharded)
    npr.main(args(files, tmp_path / "one", *flags))
    p = torchrun(args(files, tmp_path / "two", *flags), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    a, b = load(tmp_path / "one"), load(tmp_path / "two")
    assert a["stage2_start"] is not None and a["ft_lora"] is not None
    assert_same_run(a, b)
    ra, rb = (json.loads((tmp_path / x / "report.json").read_text()) for x in ("one", "two"))
    assert ra["sparsity"] == rb["sparsity"] and ra["layers"] == rb["layers"]
    assert rb["ppl_after"] == pytest.approx(ra["ppl_after"], rel=1e-4)
    assert out.count("of prunable weights") == 1  # the summary (and the export) come from rank 0 alone


def test_killed_two_rank_run_resumes_in_one_process(files, tmp_path):
    flags = ("--max-steps", "16", "--save-every", "4", "--log-every", "1")
    npr.main(args(files, tmp_path / "one", *flags))
    p = torchrun(args(files, tmp_path / "two", *flags), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    for line in p.stdout:
        if line.startswith("phase prune | step 10 "):  # the checkpoint of step 8 is written
            for pid in [p.pid] + descendants(p.pid):  # the whole job, every rank at once
                os.kill(pid, signal.SIGKILL)
            break
    p.wait(60)
    step = load(tmp_path / "two")["step"]  # step 8's checkpoint, or 12's if the job got there before the kill
    assert not (tmp_path / "two" / "report.json").exists() and step in (8, 12)
    npr.main(["--resume", str(tmp_path / "two")])  # one process continues the two-rank run
    assert_same_run(load(tmp_path / "one"), load(tmp_path / "two"))


def test_sigterm_to_torchrun_stops_every_rank_after_the_same_step(files, tmp_path):
    p = torchrun(args(files, tmp_path / "run", "--max-steps", "300", "--log-every", "1", "--save-every", "1000"),
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in p.stdout:
        if line.startswith("phase prune | step 6 "):
            p.send_signal(signal.SIGTERM)  # torchrun forwards it to every rank
            break
    p.stdout.read()
    err = p.stderr.read()
    p.wait(120)
    assert err.count("stopped by SIGTERM after a checkpoint") == 2, err[-2000:]  # both ranks, one checkpoint
    state = load(tmp_path / "run")
    assert 6 <= state["step"] < 300 and not (tmp_path / "run" / "report.json").exists()
    npr.main(["--resume", str(tmp_path / "run"), "--max-steps", str(state["step"] + 2)])
    assert json.loads((tmp_path / "run" / "report.json").read_text())["steps"] == state["step"] + 2


def test_fp16_two_ranks_equal_one_process(files, tmp_path):
    """fp16 under FSDP: the GradScaler unscales the gates' (plain) and LoRA's (DTensor) gradients in separate
    optimizers (one optimizer holding both crashed at the first step), and two ranks compute what one process does:
    the same masks, snapshots and scaler. The values agree to fp16's resolution, not fp32's: the CPU's matmul differs
    by one ulp between FSDP's gathered weights and plain tensors (also in fp32, where that is 6e-8), an fp16 ulp is
    5e-4, and --lr-mask 1 with Adam's normalised steps carries it into log_alpha."""
    flags = ("--max-steps", "16", "--dtype", "fp16")
    npr.main(args(files, tmp_path / "one", *flags))
    p = torchrun(args(files, tmp_path / "two", *flags), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    a, b = load(tmp_path / "one"), load(tmp_path / "two")
    assert a["scaler"] is not None and a["scaler"] == b["scaler"]
    assert a["stage2_start"] is not None
    assert_same_run(a, b, atol=5e-3)
