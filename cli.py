"""What every command of the project shares on its command line: the argument parser (one-line errors, defaults in
the help), the progress bar, the CPU thread rule, the "auto" device rule (the dtype rule is llama.parse_dtype) and how
recorded results name files.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

import llama

ROOT = Path(__file__).resolve().parent


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`error: <what is wrong> (see PROG --help)` on stderr, exit status 2) instead of
    the usage block, and help that shows each default where there is one. Every command of the project uses it."""

    def __init__(self, **kw):
        super().__init__(formatter_class=_DefaultsHelp, **kw)

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class _DefaultsHelp(argparse.HelpFormatter):
    # like ArgumentDefaultsHelpFormatter, without "(default: None)" on flags that have no default
    def _get_help_string(self, action):
        if action.default in (None, False, [], argparse.SUPPRESS) or "default" in action.help:
            return action.help
        return action.help + " (default: %(default)s)"


SMALL_MODEL = 100_000_000  # parameters: below it, CPU compute runs on one thread on a busy machine (bench/threads.py)
BUSY = 0.5  # cores in use by others above which the machine counts as busy


def busy_cores(seconds: float = 0.25) -> float:
    """Cores in use right now by every process, from /proc/stat's idle time over a short window: the load average
    lags a minute behind (a job that just ended still counts, one that just started does not)."""
    def idle_total():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return v[3] + v[4], sum(v)
    try:
        i0, t0 = idle_total()
        time.sleep(seconds)
        i1, t1 = idle_total()
    except (OSError, ValueError, IndexError):  # no /proc (macOS): the 1-minute load average instead
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return (os.cpu_count() or 1) * (1 - (i1 - i0) / max(t1 - t0, 1))


def cpu_threads(n_params: int) -> int:
    """Torch threads for CPU compute on a model of n_params, set and returned. On an idle machine torch's default
    (every core) is kept. Beside another busy process a small model gets one thread: it gains little from a second and loses much (every
    op waits for a descheduled thread); a larger one keeps torch's default. The machine is looked at once, at start.
    NUTEPRUNE_THREADS=N overrides; so does an explicit OMP_NUM_THREADS."""
    if os.environ.get("NUTEPRUNE_THREADS"):
        n = int(os.environ["NUTEPRUNE_THREADS"])
    elif os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    elif n_params < SMALL_MODEL and busy_cores() > BUSY:
        n = 1
    else:
        n = torch.get_num_threads()  # torch's default: every (physical) core
    torch.set_num_threads(max(n, 1))
    return torch.get_num_threads()


def hms(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def recorded_path(path) -> str:
    """How a result names a file (STYLE.md 16): relative to the repository when the file lies in it or beside it
    (runs/..., ../shared/...), else by its name alone: a scratch folder of the machine that ran it is nowhere else."""
    p = Path(path).resolve()
    r = os.path.relpath(p, ROOT)
    return p.name if r.startswith(os.path.join(os.pardir, os.pardir)) else r


class Progress:
    """`desc [####    ] n/total 0:01:02 ETA 0:03:10 4.20 it/s` on stderr: redrawn in place on a terminal, a whole
    line every 30 s (and at the end) when stderr is a log file. The one progress bar of every command."""

    def __init__(self, desc: str, total: int, start: int = 0, enabled: bool = True):
        self.desc, self.total, self.start, self.n, self.enabled = desc, total, start, start, enabled
        self.t0, self.shown, self.tty = time.time(), 0.0, sys.stderr.isatty()

    def update(self, n: int):
        self.n, now = n, time.time()
        if not self.enabled or (now - self.shown < (0.5 if self.tty else 30) and n < self.total):
            return
        self.shown = now
        rate = (n - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - n) / rate if rate > 0 else float("inf")
        bar = "#" * (24 * n // max(self.total, 1))
        line = f"{self.desc} [{bar:<24}] {n}/{self.total} {hms(now - self.t0)} ETA {hms(eta)} {rate:.2f} it/s"
        sys.stderr.write(f"\r{line}\x1b[K" if self.tty else line + "\n")
        sys.stderr.flush()

    def advance(self, k: int = 1):
        self.update(self.n + k)

    def close(self):
        if self.enabled and self.tty:
            sys.stderr.write("\n")


def device(name: str) -> torch.device:
    """--device of every command: auto is cuda when available, else cpu; anything else is a torch device name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_dtype(device_name: str, dtype_name: str) -> tuple[torch.device, torch.dtype]:
    """--device and --dtype together: the dtype's auto (llama.parse_dtype) depends on the device."""
    d = device(device_name)
    return d, llama.parse_dtype(dtype_name, d.type)
