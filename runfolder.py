"""The run folder OUT of `python nuteprune.py`: its checkpoint (state.pt, atomic, enough to resume exactly), log.jsonl
(one JSON line per logging step, also printed), report.json, the lock that keeps a second process out, and the
graceful stop on SIGTERM / SIGINT. nuteprune.py calls these at the edges of its loops; what a checkpoint holds is
written here once (METHOD.md §7: LoRA, log_alpha, lambdas, optimizer state, step, snapshots, config, RNG).
"""
from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import signal
import sys
import threading
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import cli
import checkpoint
import distributed
from llama import MASK_GROUPS, Masks

RUN_FILES = ("state.pt", "report.json", "pruned", "log.jsonl")  # what a run writes into --out (--overwrite removes)
# Flags that --resume OUT may change: they alter no result (or, for the step caps, extend or shorten what is left)
RESUMABLE = ("log_every", "save_every", "eval_every", "max_steps", "ft_max_steps", "device", "grad_ckpt", "cache_dir")

# -----------------------------------------------------------------------------
# state.pt: what a checkpoint holds, written and read here only


def masks_record(m: Masks | None) -> dict | None:
    return None if m is None else {g: getattr(m, g).cpu() for g in MASK_GROUPS}


def snapshot_record(s) -> dict:
    """A nuteprune.Snapshot as state.pt stores it; snapshot_fields() reads it back."""
    return {"level": s.level, "sparsity": s.sparsity, "masks": masks_record(s.masks), "lora": s.lora, "step": s.step}


def snapshot_fields(x: dict) -> dict:
    """The keyword arguments of nuteprune.Snapshot from a stored record (older checkpoints have no step)."""
    return {**x, "masks": Masks(**x["masks"]), "step": x.get("step", 0)}


def seed_all(seed: int):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def rng_state(generator: torch.Generator | None) -> dict:
    """Key "torch": the run's generator (nuteprune.Parts.rng; before it existed, torch's default CPU generator, which
    then drew the same stream). No CUDA state: nothing draws on a GPU, so a run resumes on any number of them."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()  # plain types: the checkpoint loads with weights_only
    return {"torch": (generator or torch.default_generator).get_state(), "cuda": [], "python": random.getstate(),
            "numpy": (keys.tolist(), pos, has_gauss, gauss)}


def set_rng_state(s: dict, generator: torch.Generator | None):
    (generator or torch.default_generator).set_state(s["torch"])  # older checkpoints' "cuda" states are ignored: nothing draws from them now
    random.setstate(s["python"])
    keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


def save_state(out: Path, parts, st):
    """The checkpoint of a run: `parts` (a nuteprune.Parts: model, gates, optimizers, scaler, config) and `st` (its
    nuteprune.RunState). Every rank calls it (sharded tensors are gathered); rank 0 writes the single-process layout."""
    current = distributed.cpu_lora(parts.model, rank0_only=True)
    optimizer = distributed.full_optimizer_state(parts.optimizers) if st.phase != "done" else None
    if distributed.rank_id() != 0:
        return
    state = {
        "config": asdict(parts.c), "phase": st.phase, "step": st.step, "ft_step": st.ft_step,
        "stage2_start": st.stage2_start, "gates": parts.gates.state_dict(),
        "optimizer": optimizer,
        "scaler": parts.scaler.state_dict() if parts.scaler.is_enabled() else None,
        "lora": current if st.phase == "prune" else st.prune_lora,
        "ft_lora": current if st.phase != "prune" and parts.c.ft_data else None,
        "snapshots": [snapshot_record(s) for s in st.snapshots],
        "final_masks": masks_record(st.final), "rng": rng_state(parts.rng), "ppl_before": st.ppl_before,
        "wall": st.elapsed(), "fit": st.fit, "resumes": st.resumes,
        "skipped": [st.skipped, st.skipped_in_a_row]}
    # atomic: a kill leaves the previous checkpoint or the new one, never half
    checkpoint.atomic_write(out / "state.pt", lambda p: torch.save(state, p))


STATE_KEYS = ("phase", "step", "ft_step", "stage2_start", "gates", "optimizer", "lora", "ft_lora", "snapshots",
              "final_masks", "rng")


def load_state(out) -> dict:
    path = Path(out) / "state.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a nuteprune output directory")
    try:
        s = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt or not a torch file: whatever torch raises, the user's answer is one
        raise ValueError(f"{path} is not a readable nuteprune checkpoint ({type(e).__name__}); it may be truncated "
                         f"or from another program. Nothing was changed in {out}") from None
    if not isinstance(s, dict) or not all(k in s for k in STATE_KEYS) or not ("config" in s or "args" in s):
        raise ValueError(f"{path} is not a nuteprune checkpoint (keys missing). Nothing was changed in {out}")
    s.setdefault("config", s.get("args"))  # checkpoints written before RunConfig stored the flags as "args"
    return s


def load_parts(parts, saved: dict):
    """A checkpoint's gates, optimizer and scaler states into `parts` (LoRA is attached with the model)."""
    parts.gates.load_state(saved["gates"])
    if saved["optimizer"] is not None:
        distributed.load_optimizer_state(parts.optimizers, saved["optimizer"])
    if saved["scaler"] is not None:
        parts.scaler.load_state_dict(saved["scaler"])
    set_rng_state(saved["rng"], parts.rng)


def resume_changes(saved: dict, c) -> dict:
    return {k: [saved["config"].get(k), getattr(c, k)] for k in RESUMABLE if saved["config"].get(k) != getattr(c, k)}

# -----------------------------------------------------------------------------
# one process per output folder, and a graceful stop on SIGTERM / SIGINT


class Stopped(Exception):
    """A stop signal arrived; the run saved its checkpoint after the step it was in."""

    def __init__(self, signum: int, out: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name} after a checkpoint; continue with "
                         f"python nuteprune.py --resume {out}")
        self.exit_code = 128 + signum


class StopSignals:
    """SIGTERM (preemption) and SIGINT (Ctrl-C) ask the run to stop after the current optimizer step; in a single
    process a second one exits at once, under torchrun it is the same request again. Installed only in the main
    thread (signal handlers cannot be set elsewhere)."""

    def __init__(self):
        self.requested, self.old = None, {}

    def _handle(self, signum, frame):
        if self.requested is not None:
            if distributed.active():
                # Under torchrun a second signal is the same request: Slurm's scancel or preemption signals every
                # process of the step, the ranks included, and torchrun forwards it to them again. torchrun's own
                # SIGKILL ends a rank that is still saving after its grace (--shutdown-timeout, default 30 s).
                return
            os._exit(128 + signum)  # the second signal: now, without a checkpoint
        self.requested = signum
        again = "" if distributed.active() else " (send it again to exit at once)"
        if distributed.rank_id() == 0:
            print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint{again}",
                  file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)


@dataclass
class Checkpointer:
    """After every optimizer step: save every --save-every steps, and save and stop when a signal asked for it."""
    out: Path
    st: object  # the run's nuteprune.RunState
    signals: StopSignals

    def save(self, parts):
        save_state(self.out, parts, self.st)

    def step_done(self, parts, step: int, total: int):
        signum = distributed.max_over_ranks(self.signals.requested or 0)  # every rank stops after the same step
        if signum:
            self.save(parts)
            raise Stopped(signum, self.out)
        if step % parts.c.save_every == 0 and step < total:
            self.save(parts)


@contextmanager
def out_lock(out: Path):
    """An exclusive lock on OUT/.lock for the whole run: a second process on the same folder fails at once. The
    kernel releases it when the process dies, so a killed run never leaves it stuck."""
    f = open(out / ".lock", "a")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ValueError(f"another nuteprune process is running in {out}; wait for it or use another --out") \
                from None
        yield
    finally:
        f.close()  # releases the lock


@contextmanager
def open_run(out: Path, st, saved: dict | None, start: str, c):
    """OUT made ready for the run: locked, stop signals caught, and either the saved run's log cut back to its
    checkpoint (resume) or an earlier run removed (overwrite). Yields (log file, Checkpointer). Under
    torchrun only rank 0 touches OUT; the other ranks log to /dev/null."""
    main = distributed.rank_id() == 0
    with ExitStack() as stack:
        error = None
        if main:
            try:
                out.mkdir(parents=True, exist_ok=True)  # only now: a failed start leaves no folder behind
                stack.enter_context(out_lock(out))
                if saved is not None:
                    truncate_log(out / "log.jsonl", st.step, st.ft_step)
                else:
                    remove_run(out, overwrite=start == "overwrite")
            except (ValueError, OSError) as e:
                error = e
        if not distributed.all_ranks(error is None):  # rank 0's error stops every rank, not only rank 0
            raise ValueError(str(error) if error else f"rank 0 could not open {out} (its error is above)") from None
        if saved is not None:
            st.resumes.append({"step": st.step, "ft_step": st.ft_step, "changed": resume_changes(saved, c)})
        signals = stack.enter_context(StopSignals())
        log = stack.enter_context(open(out / "log.jsonl" if main else os.devnull, "a"))
        yield log, Checkpointer(out, st, signals)


def remove_run(out: Path, overwrite: bool):
    """A new run never overwrites another silently: OUT must hold no run, unless --overwrite removes it."""
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not overwrite:  # checked in parse_args already; again here, under the lock
        raise ValueError(f"{out} already holds a run ({', '.join(found)}); continue it with --resume {out}, or start "
                         f"over with --overwrite")
    for name in found:
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()

# -----------------------------------------------------------------------------
# log.jsonl and the console: one greppable line per logging step on stdout (the progress bar, on stderr, is
# cli.Progress); report.json and its summary


def log_line(log, rec: dict):
    if distributed.rank_id() != 0:
        return
    log.write(json.dumps(rec) + "\n")
    log.flush()
    if sys.stderr.isatty():
        sys.stderr.write("\r\x1b[K")
    print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()), flush=True)


def truncate_log(path: Path, step: int, ft_step: int):
    """Drop the lines a killed run wrote after its last checkpoint: the resumed run writes them again."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines()
            if ln and json.loads(ln)["step"] <= (ft_step if json.loads(ln)["phase"] == "finetune" else step)]
    path.write_text("".join(ln + "\n" for ln in keep))


MAX_NONFINITE = 10  # skipped steps in a row before the run stops


def count_nonfinite(st, stepped: bool, step: int):
    st.skipped_in_a_row = 0 if stepped else st.skipped_in_a_row + 1
    st.skipped += not stepped
    if st.skipped_in_a_row >= MAX_NONFINITE:
        raise ValueError(f"{MAX_NONFINITE} steps in a row up to step {step + 1} had a non-finite loss or gradient and "
                         f"were skipped; stopping. The last checkpoint is intact: check the data and --dtype (fp16 "
                         f"overflows; bf16 does not), lower the learning rates, then --resume")


def write_report(out: Path, report: dict):
    checkpoint.atomic_write(out / "report.json", lambda p: p.write_text(json.dumps(report, indent=2)))
    print_summary(report, out)


def print_summary(r: dict, out: Path):
    ppl = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    print(f"\n{'':8}{'params':>10}{'prunable':>10}{'held-out ppl':>14}\n"
          f"{'dense':8}{r['params_dense'] / 1e6:9.3f}M{r['prunable_dense'] / 1e6:9.3f}M{ppl(r['ppl_before']):>14}\n"
          f"{'pruned':8}{r['params_pruned'] / 1e6:9.3f}M{r['prunable_pruned'] / 1e6:9.3f}M{ppl(r['ppl_after']):>14}\n"
          f"sparsity {r['sparsity']:.4f} of prunable weights (target {r['target']}), {r['sparsity_total']:.4f} "
          f"of all; {cli.hms(r['wall_time_s'])}; model in {out / 'pruned'}, report in {out / 'report.json'}")
    if r.get("warning"):
        print(f"warning: {r['warning']}")
