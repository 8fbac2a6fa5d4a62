"""torchrun with FSDP2 on the CPU (gloo): two ranks compute what one process computes, and a killed two-rank run
resumes in one process."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import distributed
import llama
import nuteprune as npr
from conftest import ROOT, args, ft

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")


def torchrun(argv, script=ROOT / "nuteprune.py", **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script), *argv]
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
    ft_loss = [[json.loads(ln)["loss"] for ln in (tmp_path / x / "log.jsonl").read_text().splitlines()
                if '"finetune"' in ln] for x in ("one", "two")]
    assert len(ft_loss[0]) == 2 and ft_loss[1] == pytest.approx(ft_loss[0], rel=1e-6, abs=0)  # the batch's token mean
    assert out.count("of prunable weights") == 1  # the summary (and the export) come from rank 0 alone


def test_sampled_masks_are_the_same_in_one_process_on_two_ranks_and_resumed_on_the_other_world_size(
        files, tmp_path, monkeypatch):
    """The mask noise comes from the run's CPU generator (seeded with --seed, saved in state.pt), never from a
    device's: the masks sampled at each of the first 8 steps are identical in one process, on both ranks of a
    two-rank run, and in a one-process run stopped after step 4 and resumed on two ranks (to the float rounding of
    log_alpha, which two ranks average in another order: z is a function of the noise and log_alpha)."""
    import trace_masks
    flags = ("--max-steps", "8", "--save-every", "4")
    one, stopped = [], []
    monkeypatch.setattr(npr.Gates, "sample", trace_masks.recorder(one))
    npr.main(args(files, tmp_path / "one", *flags))
    assert len(one) == 8

    class Killed(Exception):
        pass
    record = trace_masks.recorder(stopped)

    def killed_at_step_5(self, generator=None):
        if len(stopped) == 4:  # step 4's checkpoint is written
            raise Killed
        return record(self, generator)
    monkeypatch.setattr(npr.Gates, "sample", killed_at_step_5)
    with pytest.raises(Killed):
        npr.main(args(files, tmp_path / "resumed", *flags))
    for name, argv in (("two", args(files, tmp_path / "two", *flags)), ("resumed", ["--resume", str(tmp_path / "resumed")])):
        (tmp_path / f"trace-{name}").mkdir()
        p = torchrun([str(tmp_path / f"trace-{name}"), *argv], script=ROOT / "tests" / "trace_masks.py",
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
    runs = {}
    for r in (0, 1):
        runs[f"two, rank {r}"] = torch.load(tmp_path / "trace-two" / f"rank{r}.pt")
        runs[f"resumed on two, rank {r}"] = stopped + torch.load(tmp_path / "trace-resumed" / f"rank{r}.pt")
    for name in ("two", "resumed on two"):  # the ranks of one run: bit for bit
        assert all(torch.equal(x, y) for a, b in zip(runs[f"{name}, rank 0"], runs[f"{name}, rank 1"])
                   for x, y in zip(a, b)), name
    for name, masks in runs.items():  # and one process's, to the float rounding of log_alpha (the noise is equal)
        assert len(masks) == 8, name
        for step, (a, b) in enumerate(zip(one, masks)):
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, atol=1e-5, rtol=0, msg=f"{name}: step {step + 1}")


def test_lora_and_mask_noise_are_drawn_on_the_cpu_whatever_the_device():
    """One GPU and N GPUs once differed from step 0 (LoRA drawn on the CUDA generator in one case, the CPU's in the
    other). Now both come from a CPU generator, then move: a meta base (no GPU here) draws exactly what a CPU one
    does."""
    lora = [llama.LoRALinear(torch.nn.Linear(8, 4, bias=False, device=d), 2, 2.0, torch.Generator().manual_seed(0))
            for d in ("cpu", "meta")]
    assert torch.equal(lora[0].lora_a, lora[1].lora_a)  # the meta base keeps its LoRA's values on the CPU
    gens = [torch.Generator().manual_seed(1) for _ in range(2)]
    gates = [npr.HardConcrete((3, 5), 1.0, generator=g) for g in gens]
    z = gates[0].sample(gens[0]), gates[1].to("meta").sample(gens[1])
    assert z[1].is_meta and torch.equal(gens[0].get_state(), gens[1].get_state())  # drawn on the CPU, then moved


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


def signal_job(p, line_start: str, ranks_first: bool):
    """At the first stdout line starting with line_start: SIGTERM to every rank, and 0.2 s later to torchrun (which
    forwards it again), as Slurm's scancel or a preemption does; or to torchrun alone."""
    for line in p.stdout:
        if line.startswith(line_start):
            if ranks_first:
                for pid in descendants(p.pid):
                    os.kill(pid, signal.SIGTERM)
                time.sleep(0.2)
            p.send_signal(signal.SIGTERM)
            break
    rest = p.stdout.read()
    p.wait(120)
    return rest


def test_sigterm_to_every_rank_and_torchrun_saves_and_resumes_exactly(files, tmp_path):
    """The signal twice (each rank's own, then torchrun's forward) is one request: the ranks finish the step, save and
    stop (the second signal once exited at once with no checkpoint). The resumed two-rank run equals an
    uninterrupted one."""
    flags = ("--max-steps", "16", "--log-every", "1", "--save-every", "1000")
    p = torchrun(args(files, tmp_path / "whole", *flags), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    p = torchrun(args(files, tmp_path / "run", *flags), script=ROOT / "tests" / "slow_steps.py", stdout=subprocess.PIPE,
                 stderr=subprocess.STDOUT)
    out = signal_job(p, "phase prune | step 4 ", ranks_first=True)
    assert out.count("stopped by SIGTERM after a checkpoint") == 2, out[-3000:]
    state = load(tmp_path / "run")
    assert 4 <= state["step"] < 16 and not (tmp_path / "run" / "report.json").exists()
    p = torchrun(["--resume", str(tmp_path / "run")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    assert_same_run(load(tmp_path / "whole"), load(tmp_path / "run"))


def test_resume_in_finetuning_keeps_the_base_as_stored_and_equals_the_whole_run(files, tmp_path):
    """A two-rank run stopped during post fine-tuning resumes on two ranks: each rank loads the base as stored (fp32
    here), not converted (~138 GB per rank at 70B), and converts one layer's q, v at a time to merge the pruning LoRA
    into, as the layer is sharded (not every q, v at once: ~12 GB per rank at 70B); the run ends as an uninterrupted
    one does, which merges the same way at the switch to post fine-tuning."""
    flags = ("--max-steps", "12", "--dtype", "bf16", *ft(files), "--ft-max-steps", "12", "--log-every", "1")
    p = torchrun(args(files, tmp_path / "whole", *flags), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    p = torchrun(args(files, tmp_path / "run", *flags), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = signal_job(p, "phase finetune | step 2 ", ranks_first=False)
    state = load(tmp_path / "run")
    assert state["phase"] == "finetune" and 2 <= state["ft_step"] < 12, out[-3000:]
    (tmp_path / "trace").mkdir()
    p = torchrun([str(tmp_path / "trace"), "--resume", str(tmp_path / "run")], script=ROOT / "tests" / "trace_shard.py",
                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    import checkpoint
    model = checkpoint.load_model(files / "model")
    qv = sum(m.weight.numel() for layer in model.model.layers for m in (layer.self_attn.q_proj, layer.self_attn.v_proj))
    total = sum(p.numel() for p in model.parameters())
    one_layer = qv // len(model.model.layers)
    for r in (0, 1):
        (held,) = json.loads((tmp_path / "trace" / f"rank{r}.json").read_text())  # the one shard of this resume
        assert held["at_call"] == {"torch.float32": total} and held["converted_at_once"] == one_layer, (r, held)
    assert_same_run(load(tmp_path / "whole"), load(tmp_path / "run"))


def test_a_locked_run_folder_stops_every_rank_at_once(files, tmp_path):
    """Rank 0 alone opens OUT; its error (here: another process holds the lock) reaches every rank, which all exit
    with the one-line error. The other ranks once sat in the next collective until gloo's 30-minute timeout."""
    import fcntl
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        p = torchrun(args(files, out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        text, _ = p.communicate(timeout=120)
    assert p.returncode != 0 and text.count("another nuteprune process is running") == 1, text[-3000:]
    assert text.count("error: rank 0 could not open") == 1, text[-3000:]  # rank 1, at once


def test_batch_sizes_are_checked_against_torchruns_world_size_before_the_load(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="--batch-size 16 does not split evenly over 3 ranks"):
        distributed.check_batch_sizes(batch_size=16)
    distributed.check_batch_sizes(batch_size=12)


def test_a_rank_that_sees_one_gpu_uses_it_whatever_its_local_rank(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "5")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # CUDA_VISIBLE_DEVICES set per rank
    assert distributed.cuda_ordinal() == 0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert distributed.cuda_ordinal() == 5


def test_fp16_two_ranks_equal_one_process(files, tmp_path):
    """fp16 under FSDP: the GradScaler unscales the gates' (plain) and LoRA's (DTensor) gradients in separate
    optimizers (one optimizer holding both crashed at the first step), and two ranks compute what one process does:
    the same masks, snapshots and scaler. The values agree to fp16's resolution, not fp32's: the CPU's matmul differs
    by one ulp between FSDP's gathered weights and plain tensors (also in fp32, where that is 6e-8), an fp16 ulp is
    5e-4, and --lr-mask 1 with Adam's normalised steps carries it into log_alpha."""
    flags = ("--max-steps", "16", "--dtype", "fp16", *ft(files))  # stored in fp32: every rank casts layer by layer
    npr.main(args(files, tmp_path / "one", *flags))
    p = torchrun(args(files, tmp_path / "two", *flags), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    a, b = load(tmp_path / "one"), load(tmp_path / "two")
    assert a["scaler"] is not None and a["scaler"] == b["scaler"]
    assert a["stage2_start"] is not None and a["ft_lora"] is not None
    assert_same_run(a, b, atol=5e-3)
    # the export: rank 0 reloads the base as stored (fp32) and casts it tensor by tensor to the run's fp16
    import checkpoint
    one, two = (checkpoint.load_model(tmp_path / x / "pruned", dtype=None) for x in ("one", "two"))
    assert one.config == two.config
    for (k, x), (_, y) in zip(one.state_dict().items(), two.state_dict().items()):
        assert x.dtype == y.dtype == torch.float16, k
        torch.testing.assert_close(x.float(), y.float(), atol=2e-2, rtol=0)


def test_cast_frozen_casts_the_base_only_and_keeps_tied_weights_tied():
    model = llama.Llama(llama.LlamaConfig(dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=24, vocab_size=32,
                                          tie_embeddings=True))
    for p in model.parameters():
        p.requires_grad_(False)
    llama.add_lora(model, ["q_proj", "v_proj"], 4, 4.0, torch.Generator().manual_seed(0))
    buffers = {k: v.dtype for k, v in model.named_buffers()}
    distributed.cast_frozen_(model, torch.bfloat16)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for k, p in model.named_parameters():
        assert p.dtype == (torch.float32 if "lora_" in k else torch.bfloat16), k
    assert {k: v.dtype for k, v in model.named_buffers()} == buffers


def test_export_of_a_base_kept_as_stored_equals_the_converted_ones(files, tmp_path):
    """What rank 0 exports under torchrun (the base as stored, cast tensor by tensor, LoRA merged in the run's dtype)
    is byte for byte what a process that loaded the base converted exports."""
    import checkpoint
    masks = llama.Masks(torch.tensor([[1.0, 0, 0.5, 1], [0, 1, 1, 1]]), torch.rand(2, 48, generator=torch.Generator()
                        .manual_seed(1)).round(), torch.ones(32).index_fill(0, torch.tensor([3, 7]), 0.0))
    outs = []
    for as_stored in (False, True):
        model = checkpoint.load_model(files / "model", dtype=torch.bfloat16, as_stored=as_stored)
        llama.add_lora(model, ["q_proj", "v_proj"], 4, 4.0, torch.Generator().manual_seed(0))
        with torch.no_grad():
            for k, p in llama.lora_state(model).items():
                p.normal_(generator=torch.Generator().manual_seed(len(k)))
        checkpoint.export_pruned(model, masks, tmp_path / str(as_stored), dtype=torch.bfloat16)
        outs.append((tmp_path / str(as_stored) / "model.safetensors").read_bytes())
    assert outs[0] == outs[1]


def test_the_switch_to_post_finetuning_frees_the_pruning_models_shards_first(files, tmp_path, monkeypatch):
    """One rank under FSDP2 in this process (NUTEPRUNE_FSDP=1, gloo): when post fine-tuning's model is sharded, the
    pruning model is already gone (a device held both sharded bases: ~2 x 17 GB per GPU at 70B on 8)."""
    import gc
    import socket
    import weakref
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                 "WORLD_SIZE": "1", distributed.FORCE: "1"}.items():
        monkeypatch.setenv(k, v)
    sharded, alive_at_switch = [], []
    shard = distributed.shard_model

    def recording(model, device, dtype=None, before_layer=None):
        if sharded:  # the switch: is the first model still alive?
            gc.collect()
            alive_at_switch.append(sharded[0]() is not None)
        sharded.append(weakref.ref(model))
        return shard(model, device, dtype, before_layer)
    monkeypatch.setattr(distributed, "shard_model", recording)
    try:
        npr.main(args(files, tmp_path / "run", *ft(files)))
    finally:
        distributed.finish()
    assert len(sharded) == 2 and alive_at_switch == [False]
    assert json.loads((tmp_path / "run" / "report.json").read_text())["ft_steps"] == 4
