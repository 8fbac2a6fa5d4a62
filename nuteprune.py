"""NutePrune: structured pruning of LLaMA by progressive distillation from numerous teachers (Li, Han, Bai 2024,
arXiv 2402.09773). Equation numbers are the paper's; section numbers (§) are SPEC.md's.

    python nuteprune.py --ckpt PATH --target 0.5 --data c4.jsonl --out OUT     # prune (+ --ft-data alpaca.json)
    python nuteprune.py --resume OUT                                            # continue a killed run

One frozen base model lives in memory. The student is (sampled masks z, trainable LoRA); a teacher is (deterministic
masks, LoRA) of an earlier snapshot of the student, swapped into the same weights under no_grad (§6).
OUT holds state.pt (the atomic checkpoint), log.jsonl, report.json and pruned/ (the physically smaller model).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import llama
from llama import Masks

# -----------------------------------------------------------------------------
# hard-concrete gates (§2, Eq. 4)

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
    """The three mask groups (§1) and the two Lagrange multipliers of Eq. 5."""

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
# expected sparsity (§3, Eq. 3), Lagrangian and target schedule (§4, Eq. 5)


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
    return target * min(1.0, step / warmup_steps) if warmup_steps > 0 else target  # linear warm-up (§4)


@torch.no_grad()
def final_masks(gates: Gates, cfg: llama.LlamaConfig, target: float, tol: float = 0.005) -> Masks:
    """Deterministic masks whose exported sparsity lies within tol of the target (§2).

    The reference rule (round(sum P) per row) can land away from the target (CoFi #55). When it does, its head and
    hidden masks are kept and the number n of FFN channels kept (over all layers) is re-chosen: with head and hidden
    fixed the sparsity is linear in n, each channel costing 3 D' weights (Eq. 3), so n is solved for directly; the
    channels are dropped from the reference's kept ones by increasing log_alpha, or added from its pruned ones by
    decreasing log_alpha. Only if every FFN channel is then pruned (kept) and the target is still out of reach is one
    head (else one hidden unit) moved, by log_alpha, and n solved again.
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
# losses (§5, Eq. 7-9)


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

# -----------------------------------------------------------------------------
# teachers (§6)


@dataclass
class Snapshot:
    level: int  # taken when the student's expected sparsity first crossed level * interval
    sparsity: float  # exact sparsity of its deterministic masks
    masks: Masks  # deterministic, on the CPU
    lora: dict[str, torch.Tensor]  # copies of the student's LoRA, on the CPU ({} without LoRA)


def pick_teacher(step: int, snapshots: list[Snapshot], stage2_start: int | None, total_steps: int,
                 gap: int) -> Snapshot | None:
    """The teacher of a step; None is the intact model. snapshots[k - 1] has level k; gap is in levels.

    Stage 1 (before the target is reached): with k snapshots the teacher is snapshot k - gap + 1 (the reference's
    recorded[-gap]), the intact model until it exists. Stage 2: the remaining steps are split into k + 1 equal parts;
    part p is taught by snapshot k - gap + 1 - p, stepping down to level 1, and the intact model teaches the parts
    after it (the reference skips the gap - 1 snapshots nearest the target, so the intact model's share is
    gap / (k + 1)).
    """
    k = len(snapshots)
    level = k - gap + 1
    if stage2_start is not None and step >= stage2_start:
        level -= min(k, (step - stage2_start) * (k + 1) // max(total_steps - stage2_start, 1))
    return snapshots[level - 1] if level >= 1 else None


@contextmanager
def teacher_lora(model: llama.Llama, lora: dict[str, torch.Tensor] | None):
    """Swap a teacher's LoRA into the model in place (None: zeros, the intact model); the student's always returns.

    In place, so it must wrap only forwards that build no graph (the teacher's, under no_grad), before the student's.
    """
    student = {k: v.detach().clone() for k, v in llama.lora_state(model).items()}
    try:
        if lora is None:
            llama.zero_lora(model)
        else:
            llama.load_lora_state(model, lora)
        yield
    finally:
        llama.load_lora_state(model, student)


def cpu_lora(model: llama.Llama) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in llama.lora_state(model).items()}

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


@torch.no_grad()
def heldout_ppl(model: llama.Llama, blocks: torch.Tensor, masks: Masks | None = None, batch_size: int = 8,
                autocast=nullcontext) -> float:
    """exp(mean next-token cross-entropy) over held-out blocks (N, T)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        idx = blocks[i:i + batch_size].to(device)
        with autocast():
            logits = model(idx, masks)
        total += float(lm_loss(logits, idx)) * idx[:, 1:].numel()
        count += idx[:, 1:].numel()
    return math.exp(total / max(count, 1))

# -----------------------------------------------------------------------------
# checkpoints (everything training changes, enough to resume exactly) and loading a finished run


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


def save_state(out: Path, state: dict):
    tmp = out / "state.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, out / "state.pt")  # atomic: a kill leaves the previous checkpoint or the new one, never half


def load_state(out) -> dict:
    path = Path(out) / "state.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a nuteprune output directory")
    return torch.load(path, map_location="cpu", weights_only=True)


def attach_lora(model: llama.Llama, a: argparse.Namespace, state: dict | None = None):
    """The run's adapters on the base model: the pruning LoRA (§7: q, v), and once post fine-tuning has begun that
    LoRA merged into the weights and the fine-tuning LoRA on top. Values come from the checkpoint when given one."""
    if not a.no_lora:
        llama.add_lora(model, a.lora_targets.split(","), a.lora_rank, a.lora_alpha)
    if state is None:
        return
    if not a.no_lora:
        llama.load_lora_state(model, state["lora"])
    if state["ft_lora"] is not None:
        start_finetune(model, a)
        llama.load_lora_state(model, state["ft_lora"])


def start_finetune(model: llama.Llama, a: argparse.Namespace):
    llama.merge_lora(model)  # the pruning LoRA becomes part of the (still frozen) weights
    llama.add_lora(model, a.ft_lora_targets.split(","), a.lora_rank, a.lora_alpha)  # §7: every projection


def load_run(out_dir, device="cpu", dtype=torch.float32) -> tuple[llama.Llama, Masks, llama.Tokenizer]:
    """The base model with a finished run's final LoRA and its final deterministic masks: model(idx, masks) gives
    what OUT/pruned/ gives."""
    state = load_state(out_dir)
    if state["final_masks"] is None:
        raise ValueError(f"{out_dir}: the run has not finished pruning; continue it with --resume {out_dir}")
    a = argparse.Namespace(**state["args"])
    model, tok = llama.load(a.ckpt, a.tokenizer, device, dtype)
    attach_lora(model, a, state)
    return model.eval(), Masks(**state["final_masks"]).to(device), tok

# -----------------------------------------------------------------------------
# console: a progress bar with ETA on stderr, one greppable line per logging step on stdout


def _hms(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    def __init__(self, desc: str, total: int, start: int = 0):
        self.desc, self.total, self.start, self.t0, self.shown = desc, total, start, time.time(), 0.0
        self.tty = sys.stderr.isatty()  # a terminal redraws one line; a log file gets a line every 30 s

    def update(self, n: int):
        now = time.time()
        if now - self.shown < (0.5 if self.tty else 30) and n < self.total:
            return
        self.shown = now
        rate = (n - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - n) / rate if rate > 0 else float("inf")
        bar = "#" * (24 * n // max(self.total, 1))
        line = f"{self.desc} [{bar:<24}] {n}/{self.total} {_hms(now - self.t0)}<{_hms(eta)} {rate:.2f} it/s"
        sys.stderr.write(f"\r{line}\x1b[K" if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self):
        if self.tty:
            sys.stderr.write("\n")


def log_line(log, rec: dict):
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
            if ln and json.loads(ln)["step"] <= (step if json.loads(ln)["phase"] == "prune" else ft_step)]
    path.write_text("".join(ln + "\n" for ln in keep))

# -----------------------------------------------------------------------------
# command line


class _DefaultsHelp(argparse.HelpFormatter):
    # like ArgumentDefaultsHelpFormatter, without "(default: None)" on flags that have no default
    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "default" in action.help:
            return action.help
        return action.help + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="NutePrune: prune a LLaMA checkpoint to a target sparsity by "
                                "progressive distillation (defaults: the paper's recipe).",
                                formatter_class=_DefaultsHelp)
    g = p.add_argument_group("run")
    g.add_argument("--ckpt", help="base model: HF directory, Meta directory, llama2.c .bin, or demo (built by demo.py)")
    g.add_argument("--target", type=float, help="fraction of prunable weights (q,k,v,o,gate,up,down) to remove")
    g.add_argument("--tokenizer", help="SentencePiece model (default: beside --ckpt)")
    g.add_argument("--data", help="calibration text: C4 .json(l)(.gz) with a 'text' field, or plain text")
    g.add_argument("--out", default="out", help="output directory: state.pt, log.jsonl, report.json, pruned/")
    g.add_argument("--resume", metavar="OUT", help="continue the run in OUT from its checkpoint (other flags ignored)")
    g.add_argument("--max-steps", type=int, help="cap the pruning steps; every schedule scales to the cap")
    g.add_argument("--seed", type=int, default=0, help="seed of initialisation, mask samples and data order")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    g.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="frozen base weights and autocast (auto: bf16 on GPU, fp32 on CPU); gates and LoRA stay fp32")
    g.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=None,
                   help="per-layer gradient checkpointing (default: on for GPU)")
    g.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    g.add_argument("--save-every", type=int, default=500, help="steps between checkpoints")
    g.add_argument("--tolerance", type=float, default=0.005, help="largest |final sparsity - target| accepted")
    g.add_argument("--cache-dir", help="token cache (default: $NUTEPRUNE_CACHE or ~/.cache/nuteprune)")
    g = p.add_argument_group("data and schedule (§7)")
    g.add_argument("--n-docs", type=int, default=20000, help="documents read from --data")
    g.add_argument("--block-size", type=int, default=512, help="tokens per training block")
    g.add_argument("--heldout", help="held-out text for perplexity before/after (default: the last blocks of --data)")
    g.add_argument("--heldout-blocks", type=int, default=16, help="blocks of held-out text for perplexity")
    g.add_argument("--epochs", type=int, default=7, help="pruning epochs")
    g.add_argument("--batch-size", type=int, default=16, help="blocks per optimizer step")
    g.add_argument("--micro-batch-size", type=int, default=4, help="blocks (Alpaca examples) per forward; gradients accumulate")
    g.add_argument("--warmup-epochs", type=float, help="target warm-up (default: 4 for targets <= 0.25, else 1)")
    g.add_argument("--lr-lora", type=float, default=1e-3, help="LoRA learning rate, decays linearly to 0")
    g.add_argument("--lr-mask", type=float, default=0.1, help="log_alpha learning rate (constant)")
    g.add_argument("--lr-lambda", type=float, default=0.1, help="lambda_1, lambda_2 learning rate (ascent)")
    g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping of the LoRA parameters")
    g = p.add_argument_group("LoRA and distillation (§5-§7)")
    g.add_argument("--no-lora", action="store_true", help="ablation: train masks only, without LoRA")
    g.add_argument("--lora-targets", default="q_proj,v_proj", help="projections with LoRA while pruning")
    g.add_argument("--lora-rank", type=int, default=8, help="LoRA rank")
    g.add_argument("--lora-alpha", type=float, default=8.0, help="LoRA alpha (scale alpha / rank)")
    g.add_argument("--distill", choices=["pkd", "kd", "none"], default="pkd",
                   help="pkd: progressive teachers; kd: the intact model teaches; none: next-token cross-entropy")
    g.add_argument("--kd-temp", type=float, default=2 / 3, help="distillation temperature T (Eq. 7)")
    g.add_argument("--kd-weight", type=float, default=0.1, help="weight of the logit KL (Eq. 9)")
    g.add_argument("--layer-weight", type=float, default=0.9, help="weight of the layer MSE (Eq. 9)")
    g.add_argument("--gap", type=float, default=0.10, help="sparsity gap between student and teacher (pkd)")
    g.add_argument("--interval", type=float, default=0.01, help="sparsity between two snapshots (pkd)")
    g = p.add_argument_group("post fine-tuning (§7)")
    g.add_argument("--ft-data", help="Stanford-Alpaca JSON; enables post fine-tuning with the masks fixed")
    g.add_argument("--ft-epochs", type=int, default=2, help="post fine-tuning epochs")
    g.add_argument("--ft-max-steps", type=int, help="cap the post fine-tuning steps")
    g.add_argument("--ft-lr", type=float, default=1e-4, help="post fine-tuning LoRA learning rate, decays to 0")
    g.add_argument("--ft-batch-size", type=int, default=16, help="examples per post fine-tuning step")
    g.add_argument("--ft-max-len", type=int, default=512, help="tokens per Alpaca example")
    g.add_argument("--ft-lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   help="projections with LoRA in post fine-tuning")
    return p


# `--ckpt demo`: the small LLaMA that demo.py trains from nothing but code (cached after the first run), its own
# story text for calibration and held-out perplexity, and a step budget that fits a few minutes on two CPU cores.
# Explicit flags still win; everything else is the paper's recipe.
DEMO_DEFAULTS = dict(max_steps=240, block_size=256, batch_size=8, micro_batch_size=8, lr_lambda=2.0,
                     heldout_blocks=64, log_every=20, save_every=100)


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.resume:
        return a
    if a.ckpt == "demo":
        import demo  # only here: building the demo model needs nothing else
        parser.set_defaults(**DEMO_DEFAULTS)
        a = parser.parse_args(argv)
        paths = demo.ensure_demo(Path(a.cache_dir) / "demo" if a.cache_dir else None)
        a.ckpt, a.tokenizer = paths["ckpt"], a.tokenizer or paths["tokenizer"]
        a.data, a.heldout = a.data or paths["train_text"], a.heldout or paths["heldout_text"]
    for name in ("ckpt", "target", "data"):
        if getattr(a, name) is None:
            raise ValueError(f"--{name} is required (or --resume OUT)")
    if not 0 < a.target < 1:
        raise ValueError(f"--target must lie in (0, 1), got {a.target}")
    if not 0 < a.interval < a.target or a.gap < a.interval:
        raise ValueError(f"need 0 < --interval < --target and --gap >= --interval, got {a.interval}, {a.gap}")
    for name in ("epochs", "batch_size", "micro_batch_size", "log_every", "save_every", "ft_batch_size"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    if a.warmup_epochs is None:
        a.warmup_epochs = 4.0 if a.target <= 0.25 else 1.0  # paper §4.1
    return a


# -----------------------------------------------------------------------------
# the method

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def prunable_tensors(model: llama.Llama) -> int:
    # counted on the tensors themselves (not the config): the sparsity the report states is the one on disk
    return sum(p.numel() for n, p in model.named_parameters()
               if n.endswith(".weight") and n.split(".")[-2] in PROJECTIONS)


def prune_optimizer(gates: Gates, lora_params: list) -> torch.optim.AdamW:
    # AdamW without weight decay (§7); the lambdas ascend (Eq. 5). Learning rates are set by name every step.
    groups = [{"name": "log_alpha", "params": [g.log_alpha for g in (gates.head, gates.intermediate, gates.hidden)]},
              {"name": "lambda", "params": [gates.lambda_1, gates.lambda_2], "maximize": True}]
    return torch.optim.AdamW(groups + ([{"name": "lora", "params": lora_params}] if lora_params else []),
                             weight_decay=0.0)


def finetune_optimizer(lora_params: list) -> torch.optim.AdamW:
    return torch.optim.AdamW([{"name": "lora", "params": lora_params}], weight_decay=0.0)


def run(a: argparse.Namespace) -> dict:
    t_start = time.time()
    state = None
    if a.resume:
        state = load_state(a.resume)
        a = argparse.Namespace(**{**state["args"], "out": a.resume, "resume": None})
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
             "auto": torch.bfloat16 if cuda else torch.float32}[a.dtype]
    autocast = (lambda: torch.autocast("cuda", dtype=dtype)) if cuda and dtype != torch.float32 else nullcontext
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    np.random.seed(a.seed)

    # one model in memory: the frozen base, the student's LoRA, and per step a teacher's swapped in (§6)
    model, tok = llama.load(a.ckpt, a.tokenizer, device, dtype)
    cfg = model.config
    if not cfg.uniform:
        raise ValueError(f"{a.ckpt} is already pruned (per-layer sizes); start from a dense checkpoint")
    if a.block_size > cfg.max_seq_len:
        raise ValueError(f"--block-size {a.block_size} exceeds the model's maximum length {cfg.max_seq_len}")
    model.gradient_checkpointing = cuda if a.grad_ckpt is None else a.grad_ckpt
    gates = Gates(cfg).to(device)
    attach_lora(model, a, state)
    blocks = data.calibration_blocks(a.data, tok, a.n_docs, a.block_size, a.cache_dir)  # (N, block_size)
    if a.heldout:  # a separate file: every block of --data trains
        heldout = data.calibration_blocks(a.heldout, tok, a.n_docs, a.block_size, a.cache_dir)[:a.heldout_blocks]
    else:  # the last blocks of --data, never trained on
        heldout, blocks = blocks[len(blocks) - a.heldout_blocks:], blocks[:len(blocks) - a.heldout_blocks]
    if len(blocks) < a.batch_size:
        raise ValueError(f"{a.data}: {len(blocks)} training blocks of {a.block_size} tokens after holding out "
                         f"{a.heldout_blocks}, fewer than --batch-size {a.batch_size}")
    examples = data.alpaca_examples(a.ft_data, tok, a.ft_max_len) if a.ft_data else []  # read now: fail early
    if a.ft_data and len(examples) < a.ft_batch_size:
        raise ValueError(f"{a.ft_data}: {len(examples)} examples, fewer than --ft-batch-size {a.ft_batch_size}")
    total_steps = a.epochs * (len(blocks) // a.batch_size)
    total_steps = min(total_steps, a.max_steps) if a.max_steps else total_steps
    warmup_steps = round(a.warmup_epochs / a.epochs * total_steps)  # every schedule scales with --max-steps
    ft_total = a.ft_epochs * (len(examples) // a.ft_batch_size)
    ft_total = min(ft_total, a.ft_max_steps) if a.ft_max_steps else ft_total
    gap, n_levels = round(a.gap / a.interval), math.ceil(a.target / a.interval - 1e-9) - 1  # snapshot levels < target

    phase, step, ft_step, stage2_start, snapshots, final, prune_lora = "prune", 0, 0, None, [], None, None
    ppl_before, wall = None, 0.0
    if state is not None:
        phase, step, ft_step, stage2_start = state["phase"], state["step"], state["ft_step"], state["stage2_start"]
        gates.load_state_dict(state["gates"])
        snapshots = [Snapshot(s["level"], s["sparsity"], Masks(**s["masks"]), s["lora"]) for s in state["snapshots"]]
        final = None if state["final_masks"] is None else Masks(**state["final_masks"]).to(device)
        prune_lora, ppl_before, wall = state["lora"], state["ppl_before"], state["wall"]
    lora_params = list(llama.lora_state(model).values())
    optimizer = prune_optimizer(gates, lora_params) if phase == "prune" else finetune_optimizer(lora_params)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and dtype == torch.float16)
    if state is not None:
        if state["optimizer"] is not None:
            optimizer.load_state_dict(state["optimizer"])
        if state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        truncate_log(out / "log.jsonl", step, ft_step)
    else:
        (out / "log.jsonl").unlink(missing_ok=True)
        ppl_before = heldout_ppl(model, heldout, None, a.micro_batch_size, autocast) if len(heldout) else None
    log = open(out / "log.jsonl", "a")

    def checkpoint():
        current = cpu_lora(model)
        save_state(out, {
            "args": vars(a), "phase": phase, "step": step, "ft_step": ft_step, "stage2_start": stage2_start,
            "gates": gates.state_dict(), "optimizer": optimizer.state_dict() if phase != "done" else None,
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "lora": current if phase == "prune" else prune_lora,
            "ft_lora": current if phase != "prune" and a.ft_data else None,
            "snapshots": [{"level": s.level, "sparsity": s.sparsity, "masks": masks_dict(s.masks), "lora": s.lora}
                          for s in snapshots],
            "final_masks": masks_dict(final), "rng": rng_state(), "ppl_before": ppl_before,
            "wall": wall + time.time() - t_start})

    # -- pruning: masks (Eq. 4) and LoRA learn from the teachers (Eq. 7-9) under the sparsity Lagrangian (Eq. 5)
    model.train()  # LLaMA has no dropout: this only lets gradient checkpointing act
    bar = Progress("prune", total_steps, step)
    while phase == "prune" and step < total_steps:
        teacher = pick_teacher(step, snapshots, stage2_start, total_steps, gap) if a.distill == "pkd" else None
        target = target_at(step, a.target, warmup_steps)
        lrs = {"log_alpha": a.lr_mask, "lambda": a.lr_lambda, "lora": linear_decay(step, a.lr_lora, total_steps)}
        for group in optimizer.param_groups:
            group["lr"] = lrs[group["name"]]

        # one mask sample per step, shared by the batch; each micro-batch's gradient w.r.t. z gathers on leaf copies
        z = gates.sample()
        z_leaf = Masks(*(t.detach().requires_grad_() for t in mask_tensors(z)))
        batch = blocks[batch_indices(step, len(blocks), a.batch_size, a.seed)]  # (B, T)
        terms = {"kd": 0.0, "layer": 0.0, "lm": 0.0}
        for idx in batch.split(a.micro_batch_size):
            idx, frac = idx.to(device), len(idx) / len(batch)
            with autocast():
                if a.distill == "none":
                    parts = {"lm": lm_loss(model(idx, z_leaf), idx)}
                else:
                    # the teacher first: its in-place LoRA swap must not touch a live student graph (§6)
                    layers = a.layer_weight > 0  # without the layer loss, keep no hidden states (memory)
                    with torch.no_grad(), teacher_lora(model, None if teacher is None else teacher.lora):
                        t_out = model(idx, None if teacher is None else teacher.masks.to(device), output_hidden=layers)
                    out_s = model(idx, z_leaf, output_hidden=layers)
                    (logits, hidden), (t_logits, t_hidden) = (out_s, t_out) if layers else ((out_s, []), (t_out, []))
                    parts = {"kd": a.kd_weight * kd_loss(logits, t_logits, a.kd_temp)}  # Eq. 9
                    if layers:
                        parts["layer"] = a.layer_weight * layer_loss(hidden, t_hidden)
                    del t_out, t_logits, t_hidden  # the teacher's tensors are not needed by backward
            scaler.scale(sum(parts.values()) * frac).backward()
            for k, v in parts.items():
                terms[k] += float(v.detach()) * frac

        expected = expected_sparsity(gates.prob_nonzero(), cfg)  # Eq. 3
        l0 = lagrangian(expected, target, gates.lambda_1, gates.lambda_2)  # Eq. 5
        terms["l0"] = float(l0.detach())
        # the chain rule from the leaf masks through the sampler (Eq. 4) to log_alpha, plus the Lagrangian's gradient
        surrogate = sum((t * t_leaf.grad).sum() for t, t_leaf in zip(mask_tensors(z), mask_tensors(z_leaf)))
        (surrogate + scaler.scale(l0)).backward()
        scaler.unscale_(optimizer)
        if lora_params:
            nn.utils.clip_grad_norm_(lora_params, a.clip)
        scaler.step(optimizer)  # descent on LoRA and log_alpha, ascent on lambda_1 and lambda_2
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        gates.clamp_()
        step += 1

        # snapshots: the student's (deterministic masks, LoRA) at each interval crossed below the target (§6)
        with torch.no_grad():
            now = float(expected_sparsity(gates.prob_nonzero(), cfg))
        if a.distill == "pkd" and stage2_start is None:
            if len(snapshots) < n_levels and now >= (len(snapshots) + 1) * a.interval:
                masks = gates.deterministic()
                snap = Snapshot(0, float(expected_sparsity(masks, cfg)), masks.to("cpu"), cpu_lora(model))
                while len(snapshots) < n_levels and now >= (len(snapshots) + 1) * a.interval:  # maybe several
                    snapshots.append(replace(snap, level=len(snapshots) + 1))
            if now >= a.target:  # stage 2 from the first time the student reaches the target (reference)
                stage2_start = step
        if step % a.log_every == 0 or step == total_steps:
            log_line(log, {"phase": "prune", "step": step, "loss": sum(terms.values()), **terms,
                           "expected_sparsity": float(expected.detach()), "target": target,
                           "lambda_1": gates.lambda_1.item(), "lambda_2": gates.lambda_2.item(),
                           "teacher_sparsity": 0.0 if teacher is None else teacher.sparsity,
                           "lr_lora": lrs["lora"] if lora_params else 0.0, "lr_mask": lrs["log_alpha"],
                           "lr_lambda": lrs["lambda"]})
        if step % a.save_every == 0 and step < total_steps:
            checkpoint()
        bar.update(step)
    bar.close()

    if phase == "prune":  # final deterministic masks, within tolerance of the target (§2)
        final = final_masks(gates, cfg, a.target, a.tolerance)
        prune_lora = cpu_lora(model)
        phase = "finetune" if a.ft_data else "done"
        if a.ft_data:
            start_finetune(model, a)
            lora_params = list(llama.lora_state(model).values())
            optimizer = finetune_optimizer(lora_params)
        checkpoint()

    # -- post fine-tuning (§7): masks fixed, LoRA on every projection, cross-entropy on the responses only
    bar = Progress("finetune", ft_total, ft_step)
    pad_id = max(tok.eos_id, 0)
    while phase == "finetune" and ft_step < ft_total:
        optimizer.param_groups[0]["lr"] = lr = linear_decay(ft_step, a.ft_lr, ft_total)
        batch = [examples[i] for i in batch_indices(ft_step, len(examples), a.ft_batch_size, a.seed + 1)]
        loss_value = 0.0
        for i in range(0, len(batch), a.micro_batch_size):
            ids, labels = data.pad_batch(batch[i:i + a.micro_batch_size], pad_id)  # (b, T) each
            frac = len(ids) / len(batch)
            with autocast():
                loss = lm_loss(model(ids.to(device), final), labels.to(device))
            scaler.scale(loss * frac).backward()
            loss_value += loss.item() * frac
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(lora_params, a.clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        ft_step += 1
        if ft_step % a.log_every == 0 or ft_step == ft_total:
            log_line(log, {"phase": "finetune", "step": ft_step, "loss": loss_value, "lr_lora": lr})
        if ft_step % a.save_every == 0 and ft_step < ft_total:
            checkpoint()
        bar.update(ft_step)
    bar.close()
    if phase == "finetune":
        phase = "done"
        checkpoint()
    log.close()

    # -- export (§8) and report
    model.eval()
    cfg_pruned = llama.export_pruned(model, final, out / "pruned", tok.path)
    pruned = llama.load_model(out / "pruned", device, dtype)
    report = {
        "target": a.target,
        "sparsity": 1 - prunable_tensors(pruned) / prunable_tensors(model),
        "sparsity_total": 1 - llama.count_params(pruned) / llama.count_params(model),
        "expected_sparsity": expected_sparsity(gates.prob_nonzero(), cfg).item(),
        "params_dense": llama.count_params(model), "params_pruned": llama.count_params(pruned),
        "prunable_dense": prunable_tensors(model), "prunable_pruned": prunable_tensors(pruned),
        "hidden": cfg_pruned.dim,  # kept hidden width, and per layer (the paper's Tables 11-12):
        "layers": [{"heads": h, "kv_heads": kv, "ffn": f}
                   for h, kv, f in zip(cfg_pruned.heads, cfg_pruned.kv_heads, cfg_pruned.ffn)],
        "heldout_tokens": heldout.numel(), "ppl_before": ppl_before,
        "ppl_after": heldout_ppl(pruned, heldout, None, a.micro_batch_size, autocast) if len(heldout) else None,
        "steps": step, "ft_steps": ft_step, "snapshots": len(snapshots), "stage2_start": stage2_start,
        "lambda_1": gates.lambda_1.item(), "lambda_2": gates.lambda_2.item(),
        "wall_time_s": wall + time.time() - t_start, "args": vars(a)}
    (out / "report.json.tmp").write_text(json.dumps(report, indent=2))
    os.replace(out / "report.json.tmp", out / "report.json")
    ppl = lambda v: "-" if v is None else f"{v:.2f}"
    print(f"\n{'':8}{'params':>10}{'prunable':>10}{'held-out ppl':>14}\n"
          f"{'dense':8}{report['params_dense'] / 1e6:9.3f}M{report['prunable_dense'] / 1e6:9.3f}M{ppl(ppl_before):>14}\n"
          f"{'pruned':8}{report['params_pruned'] / 1e6:9.3f}M{report['prunable_pruned'] / 1e6:9.3f}M"
          f"{ppl(report['ppl_after']):>14}\n"
          f"sparsity {report['sparsity']:.4f} of prunable weights (target {a.target}), {report['sparsity_total']:.4f} "
          f"of all; {_hms(report['wall_time_s'])}; model in {out / 'pruned'}, report in {out / 'report.json'}")
    return report


def main(argv=None):
    try:
        run(parse_args(argv))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
