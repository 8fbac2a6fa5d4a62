"""NutePrune: structured pruning of LLaMA by progressive distillation from numerous teachers (Li, Han, Bai 2024,
arXiv 2402.09773). Equation numbers are the paper's; section numbers (§) are those of docs/METHOD.md.

    python nuteprune.py --ckpt PATH --target 0.5 --data c4.jsonl --out OUT     # prune (+ --ft-data alpaca.json)
    python nuteprune.py --resume OUT                                            # continue a killed run

One frozen base model lives in memory. The student is (sampled masks z, trainable LoRA); a teacher is (deterministic
masks, LoRA) of an earlier snapshot of the student, swapped into the same weights under no_grad (METHOD.md §6).
OUT holds state.pt (the atomic checkpoint), log.jsonl, report.json and pruned/ (the physically smaller model).

Reading order: gates and expected sparsity (Eq. 3-5), losses (Eq. 7-9), teachers (Eq. 10-11), the run's
configuration and state, one pruning step, the two training loops, export and report, and `run()`, which wires them
in the order of the paper's algorithm.
"""
from __future__ import annotations

import argparse
import copy
import fcntl
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
import data
import evaluate
import hub
import llama
import tokenization
from llama import Masks

# -----------------------------------------------------------------------------
# hard-concrete gates (METHOD.md §2, Eq. 4)

BETA, L, R = 2 / 3, -0.1, 1.1  # temperature and stretch interval of the hard-concrete (Louizos et al. 2018)
EPS = 1e-6  # u ~ U(EPS, 1 - EPS)
LOG_ALPHA_MIN, LOG_ALPHA_MAX = math.log(1e-2), math.log(1e2)  # clamp after every step (reference)


class HardConcrete(nn.Module):
    """Gates z in [0, 1] of one mask group, any shape; the last dimension is a row (one layer, or all of hidden)."""

    def __init__(self, shape, init_mean: float, init_std: float = 0.01):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.empty(shape).normal_(init_mean, init_std))

    def sample(self) -> torch.Tensor:
        u = torch.rand_like(self.log_alpha).clamp(EPS, 1 - EPS)
        s = torch.sigmoid((u.log() - (1 - u).log() + self.log_alpha) / BETA)
        return (s * (R - L) + L).clamp(0, 1)  # stretched to (L, R), then hard-clipped: exact 0s and 1s

    def prob_nonzero(self) -> torch.Tensor:
        return 1 - torch.sigmoid(BETA * math.log(-L / R) - self.log_alpha)  # P(z != 0)

    @torch.no_grad()
    def deterministic(self) -> torch.Tensor:
        # Reference rule (FLOP/CoFi): per row keep round(sum P(z != 0)) units, those with the largest log_alpha
        # (the reference ranks by sigmoid(log_alpha / BETA * 0.8), a monotone function of it). Kept units are 1.
        keep = torch.round(self.prob_nonzero().sum(-1, keepdim=True))  # (..., 1)
        rank = self.log_alpha.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # 0 = most confident
        return (rank < keep).float()

    @torch.no_grad()
    def clamp_(self):
        self.log_alpha.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)


class Gates(nn.Module):
    """The three mask groups (METHOD.md §1) and the two Lagrange multipliers of Eq. 5."""

    def __init__(self, cfg: llama.LlamaConfig):
        super().__init__()
        self.head = HardConcrete((cfg.n_layers, cfg.n_heads), init_mean=10.0)  # [L, H]
        self.intermediate = HardConcrete((cfg.n_layers, cfg.ffn_dim), init_mean=math.log(0.99 / 0.01))  # [L, I]
        self.hidden = HardConcrete((cfg.dim,), init_mean=10.0)  # [D]
        self.lambda_1 = nn.Parameter(torch.zeros(()))
        self.lambda_2 = nn.Parameter(torch.zeros(()))

    def _each(self, fn) -> Masks:
        return Masks(*(fn(g) for g in (self.head, self.intermediate, self.hidden)))

    def sample(self) -> Masks:
        return self._each(HardConcrete.sample)

    def prob_nonzero(self) -> Masks:
        return self._each(HardConcrete.prob_nonzero)

    def deterministic(self) -> Masks:
        return self._each(HardConcrete.deterministic)

    def clamp_(self):
        self._each(HardConcrete.clamp_)


def mask_tensors(m: Masks) -> tuple:
    return m.head, m.intermediate, m.hidden

# -----------------------------------------------------------------------------
# expected sparsity (METHOD.md §3, Eq. 3), Lagrangian and target schedule (§4, Eq. 5)


def expected_sparsity(p: Masks, cfg: llama.LlamaConfig) -> torch.Tensor:
    """1 - E[kept prunable weights] / M, from P(z != 0) of each unit; exact for 0/1 masks (what export removes).

    Factorised: every kept weight of q, k, v, o, gate, up, down is one hidden unit times one head / channel, so the
    expectation is (sum P_hidden) * (weights per hidden unit): no D x (L*H) outer product.
    """
    H, Hkv, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    # (L, Hkv): a K/V head survives while any query head of its group does
    p_kv = 1 - (1 - p.head.view(cfg.n_layers, Hkv, H // Hkv)).prod(-1)
    per_hidden = 2 * Dh * p.head.sum() + 2 * Dh * p_kv.sum() + 3 * p.intermediate.sum()  # q,o + k,v + gate,up,down
    return 1 - p.hidden.sum() * per_hidden / llama.prunable_params(cfg)


def lagrangian(expected: torch.Tensor, target: float, lambda_1, lambda_2) -> torch.Tensor:
    return lambda_1 * (expected - target) + lambda_2 * (expected - target) ** 2  # Eq. 5


def target_at(step: int, target: float, warmup_steps: int) -> float:
    return target * min(1.0, step / warmup_steps) if warmup_steps > 0 else target  # linear warm-up (METHOD.md §4)


@torch.no_grad()
def final_masks(gates: Gates, cfg: llama.LlamaConfig, target: float, tol: float = 0.005) -> Masks:
    """Deterministic masks whose exported sparsity lies within tol of the target (METHOD.md §2).

    The reference rule (round(sum P) per row) can land away from the target. When it does, its head and hidden masks
    are kept and the number n of FFN channels kept (over all layers) is re-chosen: with head and hidden fixed the
    sparsity is linear in n, each channel costing 3 D' weights (Eq. 3), so n is solved for directly; the channels
    are dropped from the reference's kept ones by increasing log_alpha, or added from its pruned ones by decreasing
    log_alpha. Only if every FFN channel is then pruned (kept) and the target is still out of reach is one head
    (else one hidden unit) moved, by log_alpha, and n solved again.
    """
    m = gates.deterministic()
    for _ in range(cfg.n_layers * cfg.n_heads + cfg.dim):
        if abs(float(expected_sparsity(m, cfg)) - target) <= tol:
            return m
        m = _fit_intermediate(gates, m, cfg, target)
        s = float(expected_sparsity(m, cfg))
        if abs(s - target) <= tol:
            return m
        m = _move_one_unit(gates, m, prune=s < target)
    warnings.warn(f"final sparsity {float(expected_sparsity(m, cfg)):.4f} is off the target {target} by > {tol}")
    return m


def _fit_intermediate(gates: Gates, m: Masks, cfg: llama.LlamaConfig, target: float) -> Masks:
    M, d_kept = llama.prunable_params(cfg), max(float(m.hidden.sum()), 1.0)
    no_ffn = Masks(m.head, torch.zeros_like(m.intermediate), m.hidden)
    attention = (1 - float(expected_sparsity(no_ffn, cfg))) * M / d_kept  # q, k, v, o weights per kept hidden unit
    n = min(max(round(((1 - target) * M / d_kept - attention) / 3), 0), m.intermediate.numel())
    score = gates.intermediate.log_alpha.detach().flatten() + 100.0 * m.intermediate.flatten()  # kept ones first
    inter = torch.zeros_like(score)
    inter[score.argsort(descending=True, stable=True)[:n]] = 1.0
    return Masks(m.head, inter.view_as(m.intermediate), m.hidden)


def _move_one_unit(gates: Gates, m: Masks, prune: bool) -> Masks:
    for name in ("head", "hidden"):  # the next-coarsest groups after FFN channels
        mask, log_alpha = getattr(m, name).clone(), getattr(gates, name).log_alpha.detach()
        movable = mask == (1.0 if prune else 0.0)
        if movable.sum() > (1 if prune and name == "hidden" else 0):  # never the last hidden unit
            score = torch.where(movable, log_alpha if prune else -log_alpha, torch.inf)
            mask.view(-1)[score.view(-1).argmin()] = 0.0 if prune else 1.0  # least (most) confident first
            return replace(m, **{name: mask})
    return m

# -----------------------------------------------------------------------------
# losses (METHOD.md §5, Eq. 7-9)


def kd_loss(student_logits, teacher_logits, temperature: float) -> torch.Tensor:
    # Eq. 7: T^2 KL(teacher || student) of softmax(logits / T), summed over tokens and divided by B ("batchmean")
    s = F.log_softmax(student_logits.float() / temperature, -1)  # (B, T, V)
    t = F.log_softmax(teacher_logits.float() / temperature, -1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature ** 2


def layer_loss(student_hidden, teacher_hidden) -> torch.Tensor:
    # Eq. 8: per layer, MSE over the elements where the student state is non-zero (pruned hidden dims are exactly 0),
    # in fp32; summed over the outputs of layers 1..L-1 and the final normed output (each (B, T, D)).
    total = 0.0
    for s, t in zip(student_hidden, teacher_hidden):
        s, t = s.float(), t.float()
        keep = (s != 0).float()
        total = total + ((s - t) ** 2 * keep).sum() / keep.sum().clamp(min=1)
    return total


def lm_loss(logits, labels) -> torch.Tensor:
    # next-token cross-entropy; labels (B, T), -100 ignored
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=data.IGNORE)


def student_loss(model: llama.Llama, idx: torch.Tensor, z: Masks, teacher: Snapshot | None, c: RunConfig,
                 mark: Callable[[str], None] = lambda phase: None) -> dict[str, torch.Tensor]:
    """The terms of Eq. 9 for one micro-batch, each already weighted:

        L = kd_weight * L_kd (Eq. 7) + layer_weight * L_layer (Eq. 8) + L0 (Eq. 5, added once per step by prune_step)

    or, for the no-distillation ablation, the next-token cross-entropy alone.
    """
    if c.distill == "none":
        loss = {"lm": lm_loss(model(idx, z), idx)}
        mark("student")
        return loss
    # the teacher first: its in-place LoRA swap must not touch a live student graph (METHOD.md §6)
    layers = c.layer_weight > 0  # without the layer loss, keep no hidden states (memory)
    with torch.no_grad(), teacher_lora(model, None if teacher is None else teacher.lora):
        t_out = model(idx, None if teacher is None else teacher.masks.to(idx.device), output_hidden=layers)
    mark("teacher")
    out = model(idx, z, output_hidden=layers)
    mark("student")
    (logits, hidden), (t_logits, t_hidden) = (out, t_out) if layers else ((out, []), (t_out, []))
    loss = {"kd": c.kd_weight * kd_loss(logits, t_logits, c.kd_temp)}
    if layers:
        loss["layer"] = c.layer_weight * layer_loss(hidden, t_hidden)
    return loss

# -----------------------------------------------------------------------------
# teachers (METHOD.md §6, Eq. 10-11)


@dataclass
class Snapshot:
    level: int  # the student's expected sparsity first crossed level * interval at the step this was taken
    sparsity: float  # exact sparsity of its deterministic masks
    masks: Masks  # deterministic, on the CPU
    lora: dict[str, torch.Tensor]  # copies of the student's LoRA, on the CPU ({} without LoRA)
    step: int = 0  # the pruning step after which it was taken


def pick_teacher(step: int, snapshots: list[Snapshot], stage2_start: int | None, total_steps: int,
                 gap: int, top: int) -> Snapshot | None:
    """The teacher of a step (Eq. 10-11); None is the intact model. gap = g / i and top = floor((target - g) / i), in
    snapshot levels (METHOD.md §6).

    Stage 1 (before the target is reached): the student has crossed level k (its newest snapshot); the teacher is the
    newest snapshot at level <= k - gap, so between g and g + i sparser than the student, and the intact model while
    there is none (a student below g + i). Stage 2: the snapshots at levels <= top, newest first, then the intact
    model, each teach an equal share of the remaining steps.
    """
    if stage2_start is None or step < stage2_start:
        want = snapshots[-1].level - gap if snapshots else 0
        return next((s for s in reversed(snapshots) if s.level <= want), None)
    teachers = [s for s in reversed(snapshots) if s.level <= top] + [None]
    part = (step - stage2_start) * len(teachers) // max(total_steps - stage2_start, 1)
    return teachers[min(part, len(teachers) - 1)]


@contextmanager
def teacher_lora(model: llama.Llama, lora: dict[str, torch.Tensor] | None):
    """The teacher's LoRA for the forwards inside (None: no LoRA, the intact model); the student's returns after,
    even on error. The teacher's tensors go into each module's frozen teacher slot, copied only when the teacher
    changes; the student's trainable (possibly sharded) tensors are never touched."""
    if lora is not None and getattr(model, "_teacher", None) is not lora:
        llama.load_teacher_lora(model, lora)
        model._teacher = lora  # the snapshot whose tensors the slot holds
    llama.set_adapter(model, "off" if lora is None else "teacher")
    try:
        yield
    finally:
        llama.set_adapter(model, "student")


def cpu_lora(model: llama.Llama) -> dict[str, torch.Tensor]:
    """Full copies of the student's LoRA on the CPU (gathered from every rank when FSDP shards them)."""
    return {k: full_tensor(v).detach().to("cpu", copy=True) for k, v in llama.lora_state(model).items()}


def take_snapshots(snapshots: list[Snapshot], gates: Gates, model: llama.Llama, cfg: llama.LlamaConfig,
                   now: float, interval: float, n_levels: int, step: int = 0) -> Snapshot | None:
    """A snapshot of the student (deterministic masks, LoRA) when `now` has crossed a new level k * interval below the
    target; one per step, at the highest level crossed (levels jumped over in one step have none). Returns it."""
    level = min(math.floor(now / interval + 1e-9), n_levels)
    if level <= (snapshots[-1].level if snapshots else 0):
        return None
    masks = gates.deterministic()
    snapshots.append(Snapshot(level, float(expected_sparsity(masks, cfg)), masks.to("cpu"), cpu_lora(model), step))
    return snapshots[-1]


# -----------------------------------------------------------------------------
# the run's configuration: every flag of the command (defaults: the paper's recipe, METHOD.md §7)


@dataclass
class RunConfig:
    ckpt: str
    target: float
    data: str | None = None  # required, but for --ckpt demo (which brings its own text)
    tokenizer: str | None = None
    out: str = "out"
    max_steps: int | None = None
    seed: int = 0
    device: str = "auto"  # auto: cuda when available
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    grad_ckpt: bool | None = None  # None: on for GPU
    log_every: int = 10
    save_every: int = 500
    eval_every: int = 0  # 0: never; else held-out perplexity of the student's deterministic masks every N steps
    tolerance: float = 0.005
    cache_dir: str | None = None
    n_docs: int = 20000
    block_size: int = 512
    heldout: str | None = None
    heldout_blocks: int = 16
    epochs: int = 7
    batch_size: int = 16
    micro_batch_size: int = 4
    warmup_epochs: float | None = None  # None: 4 for targets <= 0.25, else 1 (METHOD.md §4)
    lr_lora: float = 1e-3
    lr_mask: float = 0.1
    lr_lambda: float = 0.1
    clip: float = 1.0
    no_lora: bool = False
    lora_targets: str = "q_proj,v_proj"
    lora_rank: int = 8
    lora_alpha: float = 8.0
    distill: str = "pkd"
    kd_temp: float = 2 / 3
    kd_weight: float = 0.1
    layer_weight: float = 0.9
    gap: float = 0.10
    interval: float = 0.01
    ft_data: str | None = None
    ft_epochs: int = 2
    ft_max_steps: int | None = None
    ft_lr: float = 1e-4
    ft_batch_size: int = 16
    ft_max_len: int = 512
    ft_lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"

    def __post_init__(self):  # every check that needs no file: before any work (loading, building the demo)
        if not 0 < self.target < 1:
            raise ValueError(f"--target must lie in (0, 1), got {self.target}")
        if not 0 < self.interval < self.target or self.gap < self.interval:
            raise ValueError(f"need 0 < --interval < --target and --gap >= --interval, got {self.interval}, {self.gap}")
        for name in ("epochs", "batch_size", "micro_batch_size", "log_every", "save_every", "ft_batch_size",
                     "block_size", "n_docs", "ft_epochs", "ft_max_len", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "ft_max_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.heldout_blocks < 0 or self.eval_every < 0:
            raise ValueError(f"--heldout-blocks and --eval-every must be at least 0, got {self.heldout_blocks}, "
                             f"{self.eval_every}")
        if self.distill not in ("pkd", "kd", "none"):
            raise ValueError(f"--distill must be pkd, kd or none, got {self.distill!r}")
        llama.parse_dtype(self.dtype, "cpu")  # names the valid values
        if self.warmup_epochs is None:
            self.warmup_epochs = 4.0 if self.target <= 0.25 else 1.0  # METHOD.md §4

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Schedule:
    """Step counts derived from the config and the data: every schedule scales with --max-steps."""
    total_steps: int
    warmup_steps: int
    ft_total: int
    gap: int  # g / i, in snapshot levels
    n_levels: int  # snapshot levels below the target
    stage2_top: int  # floor((target - g) / i): the first stage-2 teacher's level (Eq. 10-11 at the target)

    @classmethod
    def of(cls, c: RunConfig, n_blocks: int, n_examples: int) -> "Schedule":
        total = c.epochs * (n_blocks // c.batch_size)
        total = min(total, c.max_steps) if c.max_steps else total
        ft_total = c.ft_epochs * (n_examples // c.ft_batch_size)
        ft_total = min(ft_total, c.ft_max_steps) if c.ft_max_steps else ft_total
        return cls(total, round(c.warmup_epochs / c.epochs * total), ft_total, round(c.gap / c.interval),
                   math.ceil(c.target / c.interval - 1e-9) - 1, math.floor((c.target - c.gap) / c.interval + 1e-9))

# -----------------------------------------------------------------------------
# what a run computes with, and the state that a checkpoint saves


@dataclass
class Trainer:
    """What one optimizer step touches: the model (frozen base + LoRA), the gates, the optimizer and the scaler."""
    model: llama.Llama
    gates: Gates
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    c: RunConfig
    autocast: Callable = nullcontext

    @property
    def lora_params(self) -> list:
        return list(llama.lora_state(self.model).values())


def prune_optimizer(gates: Gates, lora_params: list) -> torch.optim.AdamW:
    # AdamW without weight decay (METHOD.md §7); the lambdas ascend (Eq. 5). Learning rates are set by name every step.
    groups = [{"name": "log_alpha", "params": [g.log_alpha for g in (gates.head, gates.intermediate, gates.hidden)]},
              {"name": "lambda", "params": [gates.lambda_1, gates.lambda_2], "maximize": True}]
    return torch.optim.AdamW(groups + ([{"name": "lora", "params": lora_params}] if lora_params else []),
                             weight_decay=0.0)


def finetune_optimizer(lora_params: list) -> torch.optim.AdamW:
    return torch.optim.AdamW([{"name": "lora", "params": lora_params}], weight_decay=0.0)


def masks_dict(m: Masks | None) -> dict | None:
    return None if m is None else {"head": m.head.cpu(), "intermediate": m.intermediate.cpu(), "hidden": m.hidden.cpu()}


def rng_state() -> dict:
    _, keys, pos, has_gauss, gauss = np.random.get_state()  # plain types: the checkpoint loads with weights_only
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(), "numpy": (keys.tolist(), pos, has_gauss, gauss)}


def set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    random.setstate(s["python"])
    keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


@dataclass
class RunState:
    """Where a run is: everything that is not the frozen model and that training changes, but the tensors of the
    Trainer (LoRA, gates, optimizer), which save() gathers. A killed run resumes from state.pt exactly."""
    phase: str = "prune"  # prune -> finetune -> done
    step: int = 0
    ft_step: int = 0
    stage2_start: int | None = None  # the step the student first reached the target
    snapshots: list[Snapshot] = field(default_factory=list)
    final: Masks | None = None  # the final deterministic masks, once pruning has ended
    prune_lora: dict | None = None  # the pruning LoRA, once pruning has ended
    ppl_before: float | None = None
    wall: float = 0.0  # seconds spent by earlier processes of this run
    fit: dict | None = None  # how far the trained masks were from the target when pruning ended (end_pruning)
    skipped: int = 0  # optimizer steps skipped because a loss or gradient was not finite
    skipped_in_a_row: int = 0
    resumes: list[dict] = field(default_factory=list)  # each --resume: where, and the flags it changed
    t_start: float = field(default_factory=time.time)  # this process

    def elapsed(self) -> float:
        return self.wall + time.time() - self.t_start

    def save(self, out: Path, t: Trainer):
        """Every rank calls it (sharded tensors are gathered); rank 0 writes the single-process layout."""
        current = cpu_lora(t.model)
        optimizer = full_optimizer_state(t.optimizer) if self.phase != "done" else None
        if rank() != 0:
            return
        state = {
            "config": asdict(t.c), "phase": self.phase, "step": self.step, "ft_step": self.ft_step,
            "stage2_start": self.stage2_start, "gates": t.gates.state_dict(),
            "optimizer": optimizer,
            "scaler": t.scaler.state_dict() if t.scaler.is_enabled() else None,
            "lora": current if self.phase == "prune" else self.prune_lora,
            "ft_lora": current if self.phase != "prune" and t.c.ft_data else None,
            "snapshots": [{"level": s.level, "sparsity": s.sparsity, "masks": masks_dict(s.masks), "lora": s.lora,
                           "step": s.step} for s in self.snapshots],
            "final_masks": masks_dict(self.final), "rng": rng_state(), "ppl_before": self.ppl_before,
            "wall": self.elapsed(), "fit": self.fit, "resumes": self.resumes,
            "skipped": [self.skipped, self.skipped_in_a_row]}
        # atomic: a kill leaves the previous checkpoint or the new one, never half
        checkpoint.atomic_write(out / "state.pt", lambda p: torch.save(state, p))

    @classmethod
    def from_saved(cls, s: dict) -> "RunState":
        snapshots = [Snapshot(x["level"], x["sparsity"], Masks(**x["masks"]), x["lora"], x.get("step", 0))
                     for x in s["snapshots"]]
        final = None if s["final_masks"] is None else Masks(**s["final_masks"])
        return cls(s["phase"], s["step"], s["ft_step"], s["stage2_start"], snapshots, final, s["lora"],
                   s["ppl_before"], s["wall"], s.get("fit"), *s.get("skipped", (0, 0)), s.get("resumes", []))


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


def attach_lora(model: llama.Llama, c: RunConfig, state: dict | None = None):
    """The run's adapters on the base model: the pruning LoRA (METHOD.md §7: q, v), and once post fine-tuning has begun that
    LoRA merged into the weights and the fine-tuning LoRA on top. Values come from the checkpoint when given one."""
    if not c.no_lora:
        llama.add_lora(model, c.lora_targets.split(","), c.lora_rank, c.lora_alpha)
    if state is None:
        return
    if not c.no_lora:
        llama.load_lora_state(model, state["lora"])
    if state["ft_lora"] is not None:
        start_finetune(model, c)
        llama.load_lora_state(model, state["ft_lora"])


def start_finetune(model: llama.Llama, c: RunConfig):
    llama.merge_lora(model)  # the pruning LoRA becomes part of the (still frozen) weights
    llama.add_lora(model, c.ft_lora_targets.split(","), c.lora_rank, c.lora_alpha)  # METHOD.md §7: every projection


def load_run(out_dir, device="cpu", dtype=torch.float32) -> tuple[llama.Llama, Masks, tokenization.Tokenizer]:
    """The base model with a finished run's final LoRA and its final deterministic masks: model(idx, masks) gives
    what OUT/pruned/ gives."""
    state = load_state(out_dir)
    if state["final_masks"] is None:
        raise ValueError(f"{out_dir}: the run has not finished pruning; continue it with --resume {out_dir}")
    c = RunConfig.from_dict(state["config"])
    model, tok = checkpoint.load(c.ckpt, c.tokenizer, device, dtype)
    attach_lora(model, c, state)
    return model.eval(), Masks(**state["final_masks"]).to(device), tok

# -----------------------------------------------------------------------------
# one optimizer step of pruning, and the pruning loop (Algorithm 1, stage 1 and stage 2)


def prune_step(t: Trainer, batch: torch.Tensor, teacher: Snapshot | None, target: float,
               mark: Callable[[str], None] = lambda phase: None) -> dict[str, float]:
    """One optimizer step on a batch (B, T): sample z (Eq. 4), teacher and student forwards, Eq. 9, backward, a
    descent step on LoRA and log_alpha and an ascent step on the lambdas, clamp. Returns the loss terms and the
    expected sparsity before the step. `mark(phase)` is called as each phase ends (benchmarks time them)."""
    c, device = t.c, t.gates.lambda_1.device
    batch = local_share(batch)  # under torchrun: this rank's part; the mean over ranks is the global batch's
    # one mask sample per step, shared by the batch (and by every rank: the same seed and draws); each micro-batch's
    # gradient w.r.t. z gathers on leaf copies
    z = t.gates.sample()
    z_leaf = Masks(*(m.detach().requires_grad_() for m in mask_tensors(z)))
    terms = {"kd": 0.0, "layer": 0.0, "lm": 0.0}
    for idx in batch.split(c.micro_batch_size):
        idx, frac = idx.to(device), len(idx) / len(batch)
        with t.autocast():
            parts = student_loss(t.model, idx, z_leaf, teacher, c, mark)
        mark("loss")
        t.scaler.scale(sum(parts.values()) * frac).backward()
        for k, v in parts.items():
            terms[k] += float(v.detach()) * frac
        mark("backward")

    expected = expected_sparsity(t.gates.prob_nonzero(), t.model.config)  # Eq. 3
    l0 = lagrangian(expected, target, t.gates.lambda_1, t.gates.lambda_2)  # Eq. 5, the last term of Eq. 9
    terms["l0"] = float(l0.detach())
    # the chain rule from the leaf masks through the sampler (Eq. 4) to log_alpha, plus the Lagrangian's gradient
    surrogate = sum((m * m_leaf.grad).sum() for m, m_leaf in zip(mask_tensors(z), mask_tensors(z_leaf)))
    (surrogate + t.scaler.scale(l0)).backward()
    average_over_ranks([p.grad for p in t.gates.parameters()])  # FSDP averages LoRA's gradients; gates are replicated
    terms = dict(zip(terms, average_over_ranks(torch.tensor(list(terms.values()), dtype=torch.float64)).tolist()))
    # descent on LoRA and log_alpha, ascent on lambda_1 and lambda_2; nothing changes when a value is not finite
    stepped = optimizer_step(t, t.lora_params, terms.values())
    if stepped:
        t.gates.clamp_()
    mark("optimizer")
    return {**terms, "expected_sparsity": float(expected.detach()), "stepped": stepped}


def optimizer_step(t: Trainer, clip_params: list, losses) -> bool:
    """Unscale, clip, step, on every rank alike. A step whose loss or gradients are not finite changes nothing (no
    parameter, lambda or optimizer state; with fp16 the scaler lowers its scale) and returns False."""
    t.scaler.unscale_(t.optimizer)
    grads = [p.grad for g in t.optimizer.param_groups for p in g["params"] if p.grad is not None]
    finite = all(math.isfinite(v) for v in losses)
    if finite and grads:  # one device sync for all the gradients, not one per tensor: this runs every step
        finite = bool(torch.stack([local(g).isfinite().all() for g in grads]).all())
    if not all_ranks(finite):
        t.optimizer.zero_grad(set_to_none=True)
        t.scaler.update()  # records the inf for fp16 (smaller scale next step); a no-op otherwise
        return False
    if clip_params:
        nn.utils.clip_grad_norm_(clip_params, t.c.clip)
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.optimizer.zero_grad(set_to_none=True)
    return True


MAX_NONFINITE = 10  # skipped steps in a row before the run stops


def count_nonfinite(st: RunState, stepped: bool, step: int):
    st.skipped_in_a_row = 0 if stepped else st.skipped_in_a_row + 1
    st.skipped += not stepped
    if st.skipped_in_a_row >= MAX_NONFINITE:
        raise ValueError(f"{MAX_NONFINITE} steps in a row up to step {step + 1} had a non-finite loss or gradient and "
                         f"were skipped; stopping. The last checkpoint is intact: check the data and --dtype (fp16 "
                         f"overflows; bf16 does not), lower the learning rates, then --resume")


def set_learning_rates(optimizer: torch.optim.Optimizer, lrs: dict[str, float]):
    for group in optimizer.param_groups:
        group["lr"] = lrs[group["name"]]


def prune(t: Trainer, st: RunState, blocks: torch.Tensor, heldout: torch.Tensor, sched: Schedule, log,
          ckpt: Checkpointer):
    """Masks (Eq. 4) and LoRA learn from the teachers (Eq. 7-11) under the sparsity Lagrangian (Eq. 5)."""
    c, gates, cfg = t.c, t.gates, t.model.config
    t.model.train()  # LLaMA has no dropout: this only lets gradient checkpointing act
    bar = evaluate.Progress("prune", sched.total_steps, st.step, enabled=rank() == 0)
    while st.step < sched.total_steps:
        teacher = pick_teacher(st.step, st.snapshots, st.stage2_start, sched.total_steps, sched.gap,
                               sched.stage2_top) if c.distill == "pkd" else None
        target = target_at(st.step, c.target, sched.warmup_steps)
        lrs = {"log_alpha": c.lr_mask, "lambda": c.lr_lambda, "lora": linear_decay(st.step, c.lr_lora, sched.total_steps)}
        set_learning_rates(t.optimizer, lrs)
        batch = blocks[batch_indices(st.step, len(blocks), c.batch_size, c.seed)]  # (B, T)
        terms = prune_step(t, batch, teacher, target)
        expected = terms.pop("expected_sparsity")
        count_nonfinite(st, terms.pop("stepped"), st.step)
        st.step += 1

        # snapshots: the student's (deterministic masks, LoRA) at each interval crossed below the target (METHOD.md §6)
        with torch.no_grad():
            now = float(expected_sparsity(gates.prob_nonzero(), cfg))
        if c.distill == "pkd" and st.stage2_start is None:
            snap = take_snapshots(st.snapshots, gates, t.model, cfg, now, c.interval, sched.n_levels, st.step)
            if snap is not None:  # its perplexity is the student's now (the same masks and LoRA)
                ppl = {"ppl": student_ppl(t, heldout, snap.masks)} if c.eval_every and len(heldout) else {}
                log_line(log, {"phase": "snapshot", "step": st.step, "level": snap.level, "sparsity": snap.sparsity,
                               **ppl})
            if now >= c.target:  # stage 2 from the first time the student reaches the target (reference)
                st.stage2_start = st.step
        if st.step % c.log_every == 0 or st.step == sched.total_steps:
            log_line(log, {"phase": "prune", "step": st.step, "loss": sum(terms.values()), **terms,
                           "expected_sparsity": expected, "target": target,
                           "lambda_1": gates.lambda_1.item(), "lambda_2": gates.lambda_2.item(),
                           "teacher_sparsity": 0.0 if teacher is None else teacher.sparsity,
                           "teacher_level": 0 if teacher is None else teacher.level,
                           "skipped_steps": st.skipped, "lr_lora": lrs["lora"] if t.lora_params else 0.0, "lr_mask": lrs["log_alpha"],
                           "lr_lambda": lrs["lambda"]})
        if c.eval_every and st.step % c.eval_every == 0 and len(heldout):
            log_line(log, {"phase": "eval", "step": st.step, "expected_sparsity": now,
                           "student_ppl": student_ppl(t, heldout, gates.deterministic())})
        bar.update(st.step)
        ckpt.step_done(t, st.step, sched.total_steps)
    bar.close()


def student_ppl(t: Trainer, heldout: torch.Tensor, masks: Masks) -> float:
    """Held-out perplexity of the model with the student's LoRA and the given (deterministic) masks."""
    t.model.eval()
    ppl = heldout_ppl(t.model, heldout, t.c, t.autocast, masks.to(t.gates.lambda_1.device))
    t.model.train()
    return ppl


def end_pruning(t: Trainer, st: RunState) -> Trainer:
    """Final deterministic masks within tolerance of the target (METHOD.md §2); with post fine-tuning, its LoRA and optimizer."""
    st.final = final_masks(t.gates, t.model.config, t.c.target, t.c.tolerance)
    st.fit = mask_fit(t.gates, st.final, t.model.config, t.c)
    st.prune_lora = cpu_lora(t.model)
    st.phase = "finetune" if t.c.ft_data else "done"
    if t.c.ft_data:
        t = replace(t, model=t.model if world() == 1 else unsharded_base(t, st))
        start_finetune(t.model, t.c)  # merges the pruning LoRA: on whole tensors, so before FSDP shards again
        if world() > 1:
            shard_model(t.model, t.gates.lambda_1.device)
        t = replace(t, optimizer=finetune_optimizer(t.lora_params))
    return t


def unsharded_base(t: Trainer, st: RunState) -> llama.Llama:
    """Under torchrun: the base reloaded whole on the CPU with the pruning LoRA, the RNG as the run left it (so that
    the fine-tuning LoRA starts as in a single process)."""
    rng = torch.get_rng_state()
    model, _ = load_base(t.c, torch.device("cpu"), device_dtype(t.c)[1])
    attach_lora(model, t.c, {"lora": st.prune_lora, "ft_lora": None})
    torch.set_rng_state(rng)
    return model

def mask_fit(gates: Gates, final: Masks, cfg: llama.LlamaConfig, c: RunConfig) -> dict:
    """Whether the masks learned the target: the expected sparsity at the end, the sparsity of the trained
    deterministic masks, how many units the final masks moved away from those, and a warning when either sparsity is
    more than FIT_WARN from the target (the final masks then forced the target, e.g. after too few steps)."""
    with torch.no_grad():
        at_end = float(expected_sparsity(gates.prob_nonzero(), cfg))
        trained = gates.deterministic()
        s_trained = float(expected_sparsity(trained, cfg))
    moved = {g: int((getattr(final, g) != getattr(trained, g)).sum()) for g in ("head", "intermediate", "hidden")}
    warning = None
    if max(abs(at_end - c.target), abs(s_trained - c.target)) > FIT_WARN:
        warning = (f"the masks did not learn the target {c.target}: expected sparsity at the end {at_end:.4f}, trained "
                   f"deterministic masks {s_trained:.4f}; the final masks moved {sum(moved.values())} units "
                   f"({moved['head']} heads, {moved['intermediate']} FFN channels, {moved['hidden']} hidden dims) to "
                   f"reach it. Prune longer (--epochs, --max-steps) or raise --lr-lambda")
    return {"expected_sparsity_at_end": at_end, "trained_masks_sparsity": s_trained, "final_masks_moved": moved,
            "warning": warning}


FIT_WARN = 0.02  # 2 percentage points

# -----------------------------------------------------------------------------
# post fine-tuning (METHOD.md §7): masks fixed, LoRA on every projection, cross-entropy on the responses only


def finetune(t: Trainer, st: RunState, examples: list, sched: Schedule, pad_id: int, log, ckpt: Checkpointer):
    c, device = t.c, t.gates.lambda_1.device
    lora_params = t.lora_params
    final = st.final.to(device)
    bar = evaluate.Progress("finetune", sched.ft_total, st.ft_step, enabled=rank() == 0)
    while st.ft_step < sched.ft_total:
        t.optimizer.param_groups[0]["lr"] = lr = linear_decay(st.ft_step, c.ft_lr, sched.ft_total)
        batch = local_share([examples[i] for i in batch_indices(st.ft_step, len(examples), c.ft_batch_size,
                                                                 c.seed + 1)])
        loss_value = 0.0
        for i in range(0, len(batch), c.micro_batch_size):
            ids, labels = data.pad_batch(batch[i:i + c.micro_batch_size], pad_id)  # (b, T) each
            frac = len(ids) / len(batch)
            with t.autocast():
                loss = lm_loss(t.model(ids.to(device), final), labels.to(device))
            t.scaler.scale(loss * frac).backward()
            loss_value += loss.item() * frac
        loss_value = float(average_over_ranks(torch.tensor([loss_value], dtype=torch.float64)))
        count_nonfinite(st, optimizer_step(t, lora_params, [loss_value]), st.ft_step)
        st.ft_step += 1
        if st.ft_step % c.log_every == 0 or st.ft_step == sched.ft_total:
            log_line(log, {"phase": "finetune", "step": st.ft_step, "loss": loss_value, "lr_lora": lr})
        bar.update(st.ft_step)
        ckpt.step_done(t, st.ft_step, sched.ft_total)
    bar.close()

# -----------------------------------------------------------------------------
# schedules and data order


def linear_decay(step: int, lr: float, total_steps: int) -> float:
    return lr * max(0.0, 1 - step / total_steps)


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """Examples of optimizer step `step`: each epoch is a permutation seeded by (seed, epoch), the tail dropped, so the
    data order is a pure function of the step (a resumed run sees what an uninterrupted one saw)."""
    epoch, i = divmod(step, n // batch_size)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[i * batch_size:(i + 1) * batch_size]

# -----------------------------------------------------------------------------
# export (METHOD.md §8) and report


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def prunable_tensors(model: llama.Llama) -> int:
    # counted on the tensors themselves (not the config): the sparsity the report states is the one on disk
    return sum(p.numel() for n, p in model.named_parameters()
               if n.endswith(".weight") and n.split(".")[-2] in PROJECTIONS)


def heldout_ppl(model: llama.Llama, blocks: torch.Tensor, c: RunConfig, autocast=nullcontext,
                masks: Masks | None = None) -> float | None:
    """exp(mean next-token cross-entropy) over the held-out blocks (N, T); None without any."""
    if not len(blocks):
        return None
    return math.exp(evaluate.mean_nll(model, blocks, c.micro_batch_size, masks, autocast=autocast))


def export_and_report(t: Trainer, st: RunState, out: Path, tok: tokenization.Tokenizer, heldout: torch.Tensor) -> dict:
    model, c = t.model.eval(), t.c
    cfg_pruned = checkpoint.export_pruned(model, st.final, out / "pruned", tok)
    pruned = checkpoint.load_model(out / "pruned", *device_dtype(c))
    report = {
        "target": c.target,
        "sparsity": 1 - prunable_tensors(pruned) / prunable_tensors(model),
        "sparsity_total": 1 - llama.count_params(pruned) / llama.count_params(model),
        "expected_sparsity": expected_sparsity(t.gates.prob_nonzero(), model.config).item(),
        "params_dense": llama.count_params(model), "params_pruned": llama.count_params(pruned),
        "prunable_dense": prunable_tensors(model), "prunable_pruned": prunable_tensors(pruned),
        "hidden": cfg_pruned.dim,  # kept hidden width, and per layer (the paper's Tables 11-12):
        "layers": [{"heads": h, "kv_heads": kv, "ffn": f}
                   for h, kv, f in zip(cfg_pruned.heads, cfg_pruned.kv_heads, cfg_pruned.ffn)],
        "heldout_tokens": heldout.numel(), "ppl_before": st.ppl_before,
        "ppl_after": heldout_ppl(pruned, heldout, c, t.autocast),
        "steps": st.step, "ft_steps": st.ft_step, "snapshots": len(st.snapshots), "stage2_start": st.stage2_start,
        "lambda_1": t.gates.lambda_1.item(), "lambda_2": t.gates.lambda_2.item(),
        **(st.fit or {}), "skipped_steps": st.skipped, "resumes": st.resumes, "wall_time_s": st.elapsed(), "args": asdict(c)}
    checkpoint.atomic_write(out / "report.json", lambda p: p.write_text(json.dumps(report, indent=2)))
    print_summary(report, out)
    return report


def print_summary(r: dict, out: Path):
    ppl = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    print(f"\n{'':8}{'params':>10}{'prunable':>10}{'held-out ppl':>14}\n"
          f"{'dense':8}{r['params_dense'] / 1e6:9.3f}M{r['prunable_dense'] / 1e6:9.3f}M{ppl(r['ppl_before']):>14}\n"
          f"{'pruned':8}{r['params_pruned'] / 1e6:9.3f}M{r['prunable_pruned'] / 1e6:9.3f}M{ppl(r['ppl_after']):>14}\n"
          f"sparsity {r['sparsity']:.4f} of prunable weights (target {r['target']}), {r['sparsity_total']:.4f} "
          f"of all; {evaluate.hms(r['wall_time_s'])}; model in {out / 'pruned'}, report in {out / 'report.json'}")
    if r.get("warning"):
        print(f"warning: {r['warning']}")

# -----------------------------------------------------------------------------
# --plan: the run's size and the memory of one device, from the checkpoint's config alone (no weights read)

GB = 1e9


def lora_params(cfg: llama.LlamaConfig, targets, rank: int) -> int:
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    io = {"q_proj": (cfg.dim, q), "k_proj": (cfg.dim, kv), "v_proj": (cfg.dim, kv), "o_proj": (q, cfg.dim),
          "gate_proj": (cfg.dim, cfg.ffn_dim), "up_proj": (cfg.dim, cfg.ffn_dim), "down_proj": (cfg.ffn_dim, cfg.dim)}
    return cfg.n_layers * sum(rank * (io[t][0] + io[t][1]) for t in targets)  # A (r, in) + B (out, r)


def gate_params(cfg: llama.LlamaConfig) -> int:
    return cfg.n_layers * cfg.n_heads + cfg.n_layers * cfg.ffn_dim + cfg.dim  # log_alpha of head, intermediate, hidden


def snapshot_bytes(cfg: llama.LlamaConfig, targets, rank: int) -> int:
    """One teacher: fp32 deterministic masks [L, H], [L, I], [D] and fp32 copies of the LoRA tensors."""
    return 4 * (gate_params(cfg) + lora_params(cfg, targets, rank))


def static_bytes(cfg: llama.LlamaConfig, b: int, targets, rank: int, distill: str, world: int) -> dict[str, float]:
    """What lives on a device for the whole step. Under FSDP the base and LoRA (with its gradient and moments) are
    sharded over the ranks, and the unit being computed is gathered whole: one decoder layer, the next one
    prefetched, and the root (embeddings, final norm, LM head), held through the forward."""
    n_lora, n_gate = lora_params(cfg, targets, rank), gate_params(cfg)
    out = {"base weights": llama.count_params(cfg) * b / world,
           "LoRA (+grad, AdamW)": 16 * n_lora / world,  # fp32 param, grad, exp_avg, exp_avg_sq
           # fp32 log_alpha, grad, 2 moments; the step's z sample, its leaf copy and that copy's grad (replicated)
           "log_alpha (+grad, AdamW, z)": 28 * n_gate,
           # each LoRA module's frozen teacher slot (fp32, whole on every rank); pkd: the teacher's masks
           "teacher slot": 4 * n_lora + (4 * n_gate if distill == "pkd" else 0)}
    if world > 1:
        D, qkv = cfg.dim, (2 * cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
        layer, root = D * qkv + 3 * D * cfg.ffn_dim + 2 * D, cfg.vocab_size * D * (1 if cfg.tie_embeddings else 2) + D
        out["FSDP gathered (2 layers + root)"] = (2 * layer + root) * b
    return out


def activation_moments(cfg: llama.LlamaConfig, b: int, micro_batch: int, seq_len: int, grad_ckpt: bool,
                       layer_loss: bool, distill: str) -> dict[str, dict[str, float]]:
    """Bytes held at the moments where the step peaks (bench/README.md derives each term from the code)."""
    L, N = cfg.n_layers, micro_batch * seq_len
    ND, NI, NV = N * cfg.dim, N * cfg.ffn_dim, N * cfg.vocab_size
    layer_loss = layer_loss and distill != "none"
    per_layer = (8 + 7 * b) * ND + 4 * b * NI  # saved for backward by one layer without checkpointing
    saved = L * (b * ND if grad_ckpt else per_layer) + (b + 4) * ND  # + the gated embeddings, the final norm's input
    if distill == "none":  # logits, a shifted copy, fp32 copy, log_softmax; backward: three fp32 buffers
        head_fwd = (b + (b if micro_batch > 1 else 0) + (4 if b < 4 else 0) + 4) * NV
        head_after, head_bwd, head_held = 4 * NV, (12 + (b if b < 4 else 0)) * NV, 0
    else:  # Eq. 7 inside kd_loss: both logits, both log_softmax, exp(teacher), the difference and the product
        head_fwd, head_after, head_held = (2 * b + 20) * NV, (2 * b + 8) * NV, 2 * b * NV
        head_bwd = head_after + 8 * NV
    hidden = (L * b * ND if layer_loss else 0) + (L * b * ND if layer_loss and not grad_ckpt and b < 4 else 0)
    mse, pending = (8 * L * ND, L * b * ND) if layer_loss else (0, 0)
    recompute = (per_layer + 2 * b * ND + 2 * b * NI) if grad_ckpt else 0

    def moment(head, layer, recomputed=0):
        return {"activations: layers": saved, "activations: logits and loss": head,
                "activations: layer loss": layer, "activations: recompute (1 layer)": recomputed}
    moments = {"inside the loss (end of forward)": moment(head_fwd, hidden),
               "after the losses (start of backward)": moment(head_after, hidden + mse),
               "logit-loss backward": moment(head_bwd, hidden + pending)}
    if grad_ckpt:
        moments["layer recompute (inside backward)"] = moment(head_held, hidden + pending, recompute)
    return moments


def memory_plan(cfg: llama.LlamaConfig, dtype_bytes: int = 2, lora_targets=("q_proj", "v_proj"), rank: int = 8,
                n_snapshots: int = 40, micro_batch: int = 4, seq_len: int = 512, grad_ckpt: bool = True,
                layer_loss: bool = True, distill: str = "pkd", world: int = 1) -> dict:
    """Peak memory of one device in one pruning step, by component, in GB (1e9 bytes): what this code keeps alive,
    tensor by tensor. 'device total' is the sum at the peak moment; 'snapshots (CPU)' lives apart from it."""
    if distill not in ("none", "kd", "pkd"):
        raise ValueError(f"distill must be none, kd or pkd, got {distill!r}")
    static = static_bytes(cfg, dtype_bytes, lora_targets, rank, distill, world)
    moments = activation_moments(cfg, dtype_bytes, micro_batch, seq_len, grad_ckpt, layer_loss, distill)
    peak = max(moments, key=lambda k: sum(moments[k].values()))
    out = {k: v / GB for k, v in {**static, **moments[peak]}.items()}
    out["device total"] = sum(out.values())
    out["snapshots (CPU)"] = n_snapshots * snapshot_bytes(cfg, lora_targets, rank) / GB if distill == "pkd" else 0.0
    out["peak moment"] = peak
    return out


def plan(c: RunConfig, worlds=(1, 2, 4, 8)) -> dict:
    """`--plan`: the run's steps and snapshots, and memory per device for each world size, from the config alone."""
    cfg = checkpoint.check_checkpoint(c.ckpt, weights=False)
    if cfg is None:
        raise ValueError(f"--plan needs a config.json (HF layout); {c.ckpt} has none")
    device, dtype = device_dtype(c)
    b = torch.finfo(dtype).bits // 8
    with torch.device("meta"):
        model = llama.Llama(cfg)  # the meta model: its parameter count is the plan's
    n_blocks = PLAN_BLOCKS if c.data is None else len(data.calibration_blocks(c.data, tokenization.find_tokenizer(
        c.ckpt, c.tokenizer), c.n_docs, c.block_size, c.cache_dir))
    sched = Schedule.of(c, n_blocks - (0 if c.heldout else c.heldout_blocks), 0)
    grad_ckpt = device.type == "cuda" if c.grad_ckpt is None else c.grad_ckpt
    rows = {w: memory_plan(cfg, b, tuple(c.lora_targets.split(",")) if not c.no_lora else (), c.lora_rank,
                           sched.n_levels, min(c.micro_batch_size, c.batch_size // w), c.block_size, grad_ckpt,
                           c.layer_weight > 0, c.distill, w) for w in worlds}
    report = {"params": llama.count_params(model), "steps": sched.total_steps, "blocks": n_blocks,
              "blocks_assumed": c.data is None, "snapshots": sched.n_levels if c.distill == "pkd" else 0,
              "dtype": str(dtype).removeprefix("torch."), "grad_ckpt": grad_ckpt, "per_device_gb": rows}
    print_plan(c, report)
    return report


PLAN_BLOCKS = 17_500  # without --data: 20,000 C4 documents are ~9M LLaMA tokens, ~17,500 blocks of 512


def print_plan(c: RunConfig, r: dict):
    note = f" (assumed: {PLAN_BLOCKS} blocks; give --data to count)" if r["blocks_assumed"] else ""
    print(f"{c.ckpt}: {r['params'] / 1e9:.2f}B parameters; {r['steps']} pruning steps of {c.batch_size} x "
          f"{c.block_size} tokens over {r['blocks']} blocks{note}; {r['snapshots']} snapshot teachers; "
          f"{r['dtype']} base, gradient checkpointing {'on' if r['grad_ckpt'] else 'off'}")
    rows = r["per_device_gb"]
    comps = [k for k in dict.fromkeys(k for row in reversed(rows.values()) for k in row) if k != "peak moment"]
    print(f"{'GB per device':<40}" + "".join(f"{f'{w} GPU' + ('s' if w > 1 else ''):>10}" for w in rows))
    for k in comps:
        print(f"{k:<40}" + "".join(f"{row.get(k, 0.0):10.2f}" for row in rows.values()))
    print("fits " + "; ".join(f"{card} GB: " + (", ".join(f"{w}" for w, row in rows.items()
                                                      if row["device total"] <= card * 0.95) or "none")
                             for card in (80, 40, 24)) + " (GPUs; 5% kept free)")


# -----------------------------------------------------------------------------
# scale-out: `torchrun --nproc-per-node N nuteprune.py ...` runs one process per device. FSDP2 (`fully_shard`) shards
# the frozen base and LoRA per decoder layer and averages LoRA's gradients; the gates are small and replicated, drawn
# alike on every rank (same seed), their gradients averaged here. Each rank takes its share of every batch.
# Without torchrun (WORLD_SIZE unset or 1) none of this runs and torch.distributed is never initialised.


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def init_distributed(device: torch.device) -> torch.device:
    """Under torchrun: join the process group (NCCL on GPUs, gloo on CPUs); this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def shard_model(model: llama.Llama, device: torch.device):
    """FSDP2: every decoder layer its own unit, then the root (embeddings, final norm, LM head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (world(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def local_share(batch):
    """This rank's contiguous part of a global batch (all of it in a single process)."""
    n = len(batch) // world()
    return batch[rank() * n:(rank() + 1) * n]


def average_over_ranks(tensors):
    """Mean over ranks, in place, of a tensor or a list of tensors (None entries skipped); returns its input."""
    if world() > 1:
        for x in [tensors] if torch.is_tensor(tensors) else tensors:
            if x is not None:
                dist.all_reduce(x)  # gloo has no AVG: sum, then divide
                x /= world()
    return tensors


def max_over_ranks(value: int) -> int:
    if world() == 1:
        return value
    t = torch.tensor([value], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_ranks(flag: bool) -> bool:
    """True when flag is true on every rank."""
    return not max_over_ranks(0 if flag else 1)


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor's shard on this rank


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # a DTensor gathered whole (every rank must call)


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state dict with every sharded moment gathered whole, on the CPU: what a single process saves."""
    sd = optimizer.state_dict()
    sd["state"] = {i: {k: full_tensor(v).cpu() if torch.is_tensor(v) else v for k, v in s.items()}
                   for i, s in sd["state"].items()}
    return sd


def load_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict):
    """Load a full (single-process layout) optimizer state, sharding each moment like its parameter."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for i, s in sd["state"].items():
        p = params[int(i)]
        state[i] = {k: shard_like(v, p) if torch.is_tensor(v) and v.shape == p.shape else v for k, v in s.items()}
    optimizer.load_state_dict({**sd, "state": state})


def shard_like(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    if not hasattr(p, "device_mesh"):
        return t
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(t.to(local(p).device), p.device_mesh, p.placements)


# -----------------------------------------------------------------------------
# run safety: one process per output folder, checkpoints, and a graceful stop on SIGTERM / SIGINT

RUN_FILES = ("state.pt", "report.json", "pruned", "log.jsonl")  # what a run writes into --out (--overwrite removes)


class Stopped(Exception):
    """A stop signal arrived; the run saved its checkpoint after the step it was in."""

    def __init__(self, signum: int, out: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name} after a checkpoint; continue with "
                         f"python nuteprune.py --resume {out}")
        self.exit_code = 128 + signum


class StopSignals:
    """SIGTERM (preemption) and SIGINT (Ctrl-C) ask the run to stop after the current optimizer step; a second one
    exits at once. Installed only in the main thread (signal handlers cannot be set elsewhere)."""

    def __init__(self):
        self.requested, self.old = None, {}

    def _handle(self, signum, frame):
        if self.requested is not None:
            os._exit(128 + signum)  # the second signal: now, without a checkpoint
        self.requested = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
              f"(send it again to exit at once)", file=sys.stderr, flush=True)

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
    st: RunState
    signals: StopSignals

    def save(self, t: Trainer):
        self.st.save(self.out, t)

    def step_done(self, t: Trainer, step: int, total: int):
        signum = max_over_ranks(self.signals.requested or 0)  # every rank stops after the same step
        if signum:
            self.save(t)
            raise Stopped(signum, self.out)
        if step % t.c.save_every == 0 and step < total:
            self.save(t)


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


# -----------------------------------------------------------------------------
# the run: setup, then Algorithm 1 (pruning with progressive teachers), post fine-tuning, export


def device_dtype(c: RunConfig) -> tuple[torch.device, torch.dtype]:
    device = torch.device("cuda" if c.device == "auto" and torch.cuda.is_available() else
                          "cpu" if c.device == "auto" else c.device)
    return device, llama.parse_dtype(c.dtype, device.type)


def read_data(c: RunConfig, tok: tokenization.Tokenizer) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Calibration blocks (N, block_size), held-out blocks, and the Alpaca examples of post fine-tuning."""
    blocks = data.calibration_blocks(c.data, tok, c.n_docs, c.block_size, c.cache_dir)
    if c.heldout:  # a separate file: every block of --data trains
        heldout = data.calibration_blocks(c.heldout, tok, c.n_docs, c.block_size, c.cache_dir)[:c.heldout_blocks]
    else:  # the last blocks of --data, never trained on
        heldout, blocks = blocks[len(blocks) - c.heldout_blocks:], blocks[:len(blocks) - c.heldout_blocks]
    if len(blocks) < c.batch_size:
        raise ValueError(f"{c.data}: {len(blocks)} training blocks of {c.block_size} tokens after holding out "
                         f"{c.heldout_blocks}, fewer than --batch-size {c.batch_size}")
    examples = data.alpaca_examples(c.ft_data, tok, c.ft_max_len) if c.ft_data else []
    if c.ft_data and len(examples) < c.ft_batch_size:
        raise ValueError(f"{c.ft_data}: {len(examples)} examples, fewer than --ft-batch-size {c.ft_batch_size}")
    return blocks, heldout, examples


def setup(c: RunConfig, saved: dict | None) -> tuple[Trainer, tokenization.Tokenizer, RunState]:
    """One model in memory: the frozen base, the gates, the student's LoRA (a teacher's is swapped in per step,
    METHOD.md §6); under torchrun, sharded across the ranks once the checkpoint's values are in."""
    device, dtype = device_dtype(c)
    device = init_distributed(device)
    torch.manual_seed(c.seed)
    random.seed(c.seed)
    np.random.seed(c.seed)
    model, tok = load_base(c, device if world() == 1 else torch.device("cpu"), dtype)  # FSDP moves the shards
    if device.type == "cpu":
        evaluate.cpu_threads(llama.count_params(model))
    gates = Gates(model.config).to(device)  # its initialisation draws from the seeded RNG before LoRA's
    attach_lora(model, c, saved)
    if world() > 1:
        shard_model(model, device)
    st = RunState() if saved is None else RunState.from_saved(saved)
    lora_params = list(llama.lora_state(model).values())
    optimizer = prune_optimizer(gates, lora_params) if st.phase == "prune" else finetune_optimizer(lora_params)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else nullcontext
    t = Trainer(model, gates, optimizer, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16), c,
                autocast)
    if saved is not None:
        gates.load_state_dict(saved["gates"])
        if saved["optimizer"] is not None:
            load_optimizer_state(optimizer, saved["optimizer"])
        if saved["scaler"] is not None:
            t.scaler.load_state_dict(saved["scaler"])
    return t, tok, st


def load_base(c: RunConfig, device: torch.device, dtype: torch.dtype) -> tuple[llama.Llama, tokenization.Tokenizer]:
    model, tok = checkpoint.load(c.ckpt, c.tokenizer, device, dtype)
    if not model.config.uniform:
        raise ValueError(f"{c.ckpt} is already pruned (per-layer sizes); start from a dense checkpoint")
    if c.block_size > model.config.max_seq_len:
        raise ValueError(f"--block-size {c.block_size} exceeds the model's maximum length {model.config.max_seq_len}")
    model.gradient_checkpointing = device.type == "cuda" if c.grad_ckpt is None else c.grad_ckpt
    return model, tok


def run(c: RunConfig, start: str = "new") -> dict | None:
    """start: new (OUT must not hold a run), resume (continue OUT's run from state.pt) or overwrite (start over).
    Under torchrun every rank runs this; rank 0 alone writes OUT and returns the report."""
    out = Path(c.out)
    saved = load_state(out) if start == "resume" else None
    t, tok, st = setup(c, saved)
    for flag, size in (("--batch-size", c.batch_size), ("--ft-batch-size", c.ft_batch_size)):
        if size % world():
            raise ValueError(f"{flag} {size} does not split evenly over {world()} ranks")
    blocks, heldout, examples = read_data(c, tok)
    sched = Schedule.of(c, len(blocks), len(examples))
    main = rank() == 0
    if main:
        out.mkdir(parents=True, exist_ok=True)  # only now: a failed start leaves no folder behind
    with out_lock(out) if main else nullcontext(), StopSignals() as signals:
        if saved is not None:
            set_rng_state(saved["rng"])
            st.resumes.append({"step": st.step, "ft_step": st.ft_step, "changed": resume_changes(saved, c)})
            if main:
                truncate_log(out / "log.jsonl", st.step, st.ft_step)
        else:
            if main:
                remove_run(out, c, overwrite=start == "overwrite")
            st.ppl_before = heldout_ppl(t.model, heldout, c, t.autocast)
        ckpt = Checkpointer(out, st, signals)
        with open(out / "log.jsonl" if main else os.devnull, "a") as log:
            if st.phase == "prune":
                prune(t, st, blocks, heldout, sched, log, ckpt)
                t = end_pruning(t, st)
                ckpt.save(t)
            if st.phase == "finetune":
                finetune(t, st, examples, sched, max(tok.eos_id, 0), log, ckpt)
                st.phase = "done"
                ckpt.save(t)
        model = model_to_export(t, st)
        return export_and_report(replace(t, model=model), st, out, tok, heldout) if main else None


def model_to_export(t: Trainer, st: RunState) -> llama.Llama | None:
    """The model export prunes: the run's own, or under torchrun a whole copy on rank 0's CPU (the base reloaded,
    the run's LoRA gathered from the ranks into it)."""
    if world() == 1:
        return t.model
    current = cpu_lora(t.model)  # every rank takes part in the gather
    if rank() != 0:
        return None
    model, _ = load_base(t.c, torch.device("cpu"), device_dtype(t.c)[1])
    attach_lora(model, t.c, {"lora": st.prune_lora, "ft_lora": current if t.c.ft_data else None})
    return model


def remove_run(out: Path, c: RunConfig, overwrite: bool):
    """A new run never overwrites another silently: OUT must hold no run, unless --overwrite removes it."""
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not overwrite:  # checked in parse_args already; again here, under the lock
        raise ValueError(f"{out} already holds a run ({', '.join(found)}); continue it with --resume {out}, or start "
                         f"over with --overwrite")
    for name in found:
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()


# -----------------------------------------------------------------------------
# console: one greppable line per logging step on stdout (the progress bar is evaluate.Progress, on stderr)


def log_line(log, rec: dict):
    if rank() != 0:
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

# -----------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = evaluate.Parser(description="NutePrune: prune a LLaMA checkpoint to a target sparsity by "
                                "progressive distillation (defaults: the paper's recipe).")
    d = {f.name: f.default for f in fields(RunConfig)}  # one source of defaults: RunConfig
    for add in (_run_flags, _schedule_flags, _distill_flags, _finetune_flags):
        add(p, d)
    return p


def _run_flags(p: argparse.ArgumentParser, d: dict):
    g = p.add_argument_group("run")
    g.add_argument("--ckpt", help="base model: HF directory, Meta directory, llama2.c .bin, .gguf, hub id (org/name), "
                                  "short name (llama-7b, README), or demo (built by demo.py)")
    g.add_argument("--target", type=float, help="fraction of prunable weights (q,k,v,o,gate,up,down) to remove")
    g.add_argument("--tokenizer", help="tokenizer.model, tokenizer.json or .gguf (default: beside --ckpt, or inside it)")
    g.add_argument("--data", help="calibration text: C4 .json(l)(.gz) with a 'text' field, or plain text (default: C4 en "
                                  "shard 00000 from the Hugging Face cache)")
    g.add_argument("--out", default=d["out"], help="output directory: state.pt, log.jsonl, report.json, pruned/")
    g.add_argument("--resume", metavar="OUT", help="continue the run in OUT from its checkpoint; flags given with it "
                   "must match the run's, except --log-every, --save-every, --max-steps, --ft-max-steps, --device, "
                   "--grad-ckpt, --cache-dir, which change")
    g.add_argument("--plan", action="store_true",
                   help="print the run's steps, snapshots and memory per GPU for 1/2/4/8 GPUs from --ckpt's "
                   "config.json alone (no weights read), then exit")
    g.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --out that holds one, removing its state.pt, log.jsonl, report.json, "
                   "pruned/")
    g.add_argument("--max-steps", type=int, help="cap the pruning steps; every schedule scales to the cap")
    g.add_argument("--seed", type=int, default=d["seed"], help="seed of initialisation, mask samples and data order")
    g.add_argument("--device", default=d["device"], help="torch device (auto: cuda when available, else cpu)")
    g.add_argument("--dtype", choices=list(llama.DTYPES), default=d["dtype"],
                   help="frozen base weights and autocast (auto: bf16 on GPU, fp32 on CPU); gates and LoRA stay fp32")
    g.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=None,
                   help="per-layer gradient checkpointing (default: on for GPU)")
    g.add_argument("--log-every", type=int, default=d["log_every"], help="steps between log lines")
    g.add_argument("--save-every", type=int, default=d["save_every"], help="steps between checkpoints")
    g.add_argument("--eval-every", type=int, default=d["eval_every"],
                   help="steps between held-out perplexities of the student's deterministic masks in log.jsonl; also "
                   "each snapshot teacher's (0: never)")
    g.add_argument("--tolerance", type=float, default=d["tolerance"], help="largest |final sparsity - target| accepted")
    g.add_argument("--cache-dir", help="token cache (default: $NUTEPRUNE_CACHE or ~/.cache/nuteprune)")


def _schedule_flags(p: argparse.ArgumentParser, d: dict):
    g = p.add_argument_group("data and schedule (METHOD.md §7)")
    g.add_argument("--n-docs", type=int, default=d["n_docs"], help="documents read from --data")
    g.add_argument("--block-size", type=int, default=d["block_size"], help="tokens per training block")
    g.add_argument("--heldout", help="held-out text for perplexity before/after (default: the last blocks of --data)")
    g.add_argument("--heldout-blocks", type=int, default=d["heldout_blocks"], help="blocks of held-out text for perplexity")
    g.add_argument("--epochs", type=int, default=d["epochs"], help="pruning epochs")
    g.add_argument("--batch-size", type=int, default=d["batch_size"], help="blocks per optimizer step")
    g.add_argument("--micro-batch-size", type=int, default=d["micro_batch_size"],
                   help="blocks (Alpaca examples) per forward; gradients accumulate")
    g.add_argument("--warmup-epochs", type=float, help="target warm-up (default: 4 for targets <= 0.25, else 1)")
    g.add_argument("--lr-lora", type=float, default=d["lr_lora"], help="LoRA learning rate, decays linearly to 0")
    g.add_argument("--lr-mask", type=float, default=d["lr_mask"], help="log_alpha learning rate (constant)")
    g.add_argument("--lr-lambda", type=float, default=d["lr_lambda"], help="lambda_1, lambda_2 learning rate (ascent)")
    g.add_argument("--clip", type=float, default=d["clip"], help="gradient-norm clipping of the LoRA parameters")


def _distill_flags(p: argparse.ArgumentParser, d: dict):
    g = p.add_argument_group("LoRA and distillation (METHOD.md §5-§7)")
    g.add_argument("--no-lora", action="store_true", help="ablation: train masks only, without LoRA")
    g.add_argument("--lora-targets", default=d["lora_targets"], help="projections with LoRA while pruning")
    g.add_argument("--lora-rank", type=int, default=d["lora_rank"], help="LoRA rank")
    g.add_argument("--lora-alpha", type=float, default=d["lora_alpha"], help="LoRA alpha (scale alpha / rank)")
    g.add_argument("--distill", choices=["pkd", "kd", "none"], default=d["distill"],
                   help="pkd: progressive teachers; kd: the intact model teaches; none: next-token cross-entropy")
    g.add_argument("--kd-temp", type=float, default=d["kd_temp"], help="distillation temperature T (Eq. 7; default: 2/3)")
    g.add_argument("--kd-weight", type=float, default=d["kd_weight"], help="weight of the logit KL (Eq. 9)")
    g.add_argument("--layer-weight", type=float, default=d["layer_weight"], help="weight of the layer MSE (Eq. 9)")
    g.add_argument("--gap", type=float, default=d["gap"], help="sparsity gap between student and teacher (pkd)")
    g.add_argument("--interval", type=float, default=d["interval"], help="sparsity between two snapshots (pkd)")


def _finetune_flags(p: argparse.ArgumentParser, d: dict):
    g = p.add_argument_group("post fine-tuning (METHOD.md §7)")
    g.add_argument("--ft-data", help="Stanford-Alpaca JSON; enables post fine-tuning with the masks fixed")
    g.add_argument("--ft-epochs", type=int, default=d["ft_epochs"], help="post fine-tuning epochs")
    g.add_argument("--ft-max-steps", type=int, help="cap the post fine-tuning steps")
    g.add_argument("--ft-lr", type=float, default=d["ft_lr"], help="post fine-tuning LoRA learning rate, decays to 0")
    g.add_argument("--ft-batch-size", type=int, default=d["ft_batch_size"], help="examples per post fine-tuning step")
    g.add_argument("--ft-max-len", type=int, default=d["ft_max_len"], help="tokens per Alpaca example")
    g.add_argument("--ft-lora-targets", default=d["ft_lora_targets"], help="projections with LoRA in post fine-tuning")


# `--ckpt demo`: the small LLaMA that demo.py trains from nothing but code (cached after the first run), its own
# story text for calibration and held-out perplexity, and a step budget that fits a few minutes on two CPU cores.
# Explicit flags still win; everything else is the paper's recipe.
DEMO_DEFAULTS = dict(max_steps=240, block_size=256, batch_size=8, micro_batch_size=8, lr_mask=1.0, lr_lambda=2.0,
                     heldout_blocks=64, log_every=20, save_every=100)  # mask rates that reach the target in 240 steps


def check_paths(c: RunConfig, start: str):
    """Every file and folder a run reads or writes, checked before any is loaded (--ckpt demo is built after it)."""
    if c.ckpt != "demo":
        checkpoint.check_checkpoint(c.ckpt)
    for flag, path in (("--tokenizer", c.tokenizer), ("--data", c.data), ("--heldout", c.heldout),
                       ("--ft-data", c.ft_data)):
        if path is not None:
            data.check_file(path, flag)
    out = Path(c.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory")
    found = [name for name in RUN_FILES[:3] if (out / name).exists()]
    if found and start == "new":
        raise ValueError(f"{out} already holds a run ({', '.join(found)}); continue it with --resume {out}, or start "
                         f"over with --overwrite")


# Flags that --resume OUT may change: they alter no result (or, for the step caps, extend or shorten what is left)
RESUMABLE = ("log_every", "save_every", "eval_every", "max_steps", "ft_max_steps", "device", "grad_ckpt", "cache_dir")
PATH_FLAGS = ("ckpt", "tokenizer", "data", "heldout", "ft_data")


def given_flags(parser: argparse.ArgumentParser, argv) -> dict:
    """The flags written on the command line (not their defaults), by RunConfig field name."""
    quiet = copy.deepcopy(parser)
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    return vars(quiet.parse_args(argv))


def resume_config(parser, argv, out: str) -> RunConfig:
    """The saved run's configuration with the flags given beside --resume applied: RESUMABLE ones change, any other
    must equal the saved value (a one-line error otherwise)."""
    s = load_state(out)
    saved = RunConfig.from_dict({**s["config"], "out": out})
    given = {k: v for k, v in given_flags(parser, argv).items() if k not in ("resume", "out")}
    changes = {}
    for k, v in given.items():
        old = getattr(saved, k)
        same = (v is not None and old is not None and Path(v).resolve() == Path(old).resolve()) \
            if k in PATH_FLAGS else v == old
        if same:
            continue
        if k not in RESUMABLE:
            raise ValueError(f"--{k.replace('_', '-')} {v} differs from the run's {old}: it cannot change on --resume "
                             f"(these can: {', '.join('--' + r.replace('_', '-') for r in RESUMABLE)})")
        changes[k] = v
    if "max_steps" in changes and (s["phase"] != "prune" or (changes["max_steps"] or 0) < s["step"]):
        raise ValueError(f"--max-steps {changes['max_steps']}: pruning is at step {s['step']} ({s['phase']}); a new "
                         f"cap must lie beyond it and pruning must not have ended")
    if "ft_max_steps" in changes and (changes["ft_max_steps"] or 0) < s["ft_step"]:
        raise ValueError(f"--ft-max-steps {changes['ft_max_steps']} lies before post fine-tuning step {s['ft_step']}")
    return replace(saved, **changes)


def resume_changes(saved: dict, c: RunConfig) -> dict:
    return {k: [saved["config"].get(k), getattr(c, k)] for k in RESUMABLE if saved["config"].get(k) != getattr(c, k)}


def parse_args(argv=None) -> tuple[RunConfig, str]:
    """(the run's configuration, how it starts: new, resume or overwrite): every flag and path checked before any
    work."""
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.resume:
        if a.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        return resume_config(parser, argv, a.resume), "resume"
    if a.ckpt == "demo":
        parser.set_defaults(**DEMO_DEFAULTS)
        a = parser.parse_args(argv)
    for name in ("ckpt", "target"):
        if getattr(a, name) is None:
            raise ValueError(f"--{name} is required (or --resume OUT)")
    if a.ckpt != "demo":
        a.ckpt = hub.resolve_checkpoint(a.ckpt)  # a hub id or a short name: its folder in the Hugging Face cache
        if a.data is None and not a.plan:
            a.data = hub.default_data()  # the paper's calibration set, C4 en shard 00000, from the same cache
    c = RunConfig(**{f.name: getattr(a, f.name) for f in fields(RunConfig)})  # checks every value
    if a.plan:
        return c, "plan"
    if c.ft_data is None and c.ft_max_steps is not None:
        raise ValueError("--ft-max-steps needs --ft-data (post fine-tuning runs only with an Alpaca file)")
    start = "overwrite" if a.overwrite else "new"
    check_paths(c, start)
    if c.ckpt == "demo":
        import demo  # only here: building the demo model needs nothing else
        paths = demo.ensure_demo(Path(c.cache_dir) / "demo" if c.cache_dir else None)
        c = replace(c, ckpt=paths["ckpt"], tokenizer=c.tokenizer or paths["tokenizer"],
                    data=c.data or paths["train_text"], heldout=c.heldout or paths["heldout_text"])
    return c, start


def main(argv=None):
    try:
        c, start = parse_args(argv)
        plan(c) if start == "plan" else run(c, start)
        if dist.is_initialized():
            dist.destroy_process_group()
    except Stopped as e:
        print(str(e), file=sys.stderr)
        sys.exit(e.exit_code)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
