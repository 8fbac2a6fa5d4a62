"""NutePrune: structured pruning of LLaMA by progressive distillation from numerous teachers (Li, Han, Bai 2024,
arXiv 2402.09773). Equation numbers are the paper's; section numbers (§) are those of docs/METHOD.md.

    python nuteprune.py --ckpt PATH --target 0.5 --data c4.jsonl --out OUT     # prune (+ --ft-data alpaca.json)
    python nuteprune.py --resume OUT                                            # continue a killed run

One frozen base model lives in memory. The student is (sampled masks z, trainable LoRA); a teacher is (deterministic
masks, LoRA) of an earlier snapshot of the student, swapped into the same weights under no_grad (METHOD.md §6).
OUT holds state.pt (the atomic checkpoint), log.jsonl, report.json and pruned/ (the physically smaller model).

Reading order: gates and expected sparsity (Eq. 3-5), losses (Eq. 7-9), teachers (Eq. 10-11), the recipe (RunConfig),
one pruning step, the two training loops and the final masks. The harness sits beside this file and is called at the
edges: runner.py (the base model, data, checkpoints, export and report, in the order of the paper's algorithm),
flags.py (the command line), runfolder.py (checkpoint, log, lock, signals), distributed.py (torchrun / FSDP),
memory_plan.py (--plan), cli.py (progress bar, device and thread rules).
"""
from __future__ import annotations

import math
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields, replace
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
import cli
import data
import distributed
import evaluate
import flags
import llama
import rounding
import runfolder
import runner
import tokenization
from llama import MASK_GROUPS, PROJECTIONS, Masks

# -----------------------------------------------------------------------------
# hard-concrete gates (METHOD.md §2, Eq. 4)

BETA, STRETCH = 2 / 3, (-0.1, 1.1)  # temperature and stretch interval (l, r) of the hard-concrete (Louizos et al. 2018)
EPS = 1e-6  # u ~ U(EPS, 1 - EPS)
LOG_ALPHA_MIN, LOG_ALPHA_MAX = math.log(1e-2), math.log(1e2)  # clamp after every step (reference)


class HardConcrete(nn.Module):
    """Gates z in [0, 1] of one mask group, any shape; the last dimension is a row (one layer, or all of hidden)."""

    def __init__(self, shape, init_mean: float, init_std: float = 0.01, generator: torch.Generator | None = None,
                 frozen: bool = False):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.empty(shape).normal_(init_mean, init_std, generator=generator),
                                      requires_grad=not frozen)
        self.frozen = frozen  # a group kept whole (--keep-hidden): z = 1 always, log_alpha never trained
        self.register_buffer("protected", None)  # units held at z = 1 (--keep-outliers): in the state dict once set

    def protect(self, units: torch.Tensor):
        """Hold these units (bool, the group's shape) at z = 1: sampled 1, P(z != 0) = 1, first in every ranking."""
        self.protected = units.to(torch.bool).to(self.log_alpha.device)

    def _held(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.protected is None else torch.where(self.protected, torch.ones_like(x), x)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.frozen:
            return torch.ones_like(self.log_alpha.detach())
        # the noise is drawn on the CPU (the run's generator) and moved: the same u on any device and every rank
        lo, hi = STRETCH
        u = torch.rand(self.log_alpha.shape, generator=generator).clamp(EPS, 1 - EPS).to(self.log_alpha.device)
        s = torch.sigmoid((u.log() - (1 - u).log() + self.log_alpha) / BETA)
        return self._held((s * (hi - lo) + lo).clamp(0, 1))  # stretched to (l, r), then hard-clipped: exact 0s and 1s

    def prob_nonzero(self) -> torch.Tensor:
        if self.frozen:
            return torch.ones_like(self.log_alpha.detach())
        lo, hi = STRETCH
        return self._held(1 - torch.sigmoid(BETA * math.log(-lo / hi) - self.log_alpha))  # P(z != 0)

    def rank(self) -> torch.Tensor:
        """What orders units for keeping: log_alpha, protected units first."""
        la = self.log_alpha.detach()
        return la if self.protected is None else la + 1000.0 * self.protected

    @torch.no_grad()
    def deterministic(self) -> torch.Tensor:
        # Reference rule (FLOP/CoFi): per row keep round(sum P(z != 0)) units, those with the largest log_alpha
        # (the reference ranks by sigmoid(log_alpha / BETA * 0.8), a monotone function of it). Kept units are 1.
        keep = torch.round(self.prob_nonzero().sum(-1, keepdim=True))  # (..., 1); all of a frozen group
        order = self.rank().argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # 0 = most confident
        return (order < keep).float()

    @torch.no_grad()
    def clamp_(self):
        if not self.frozen:
            self.log_alpha.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)


class Gates(nn.Module):
    """The three mask groups (METHOD.md §1) and the two Lagrange multipliers of Eq. 5."""

    def __init__(self, cfg: llama.LlamaConfig, generator: torch.Generator | None = None, keep_hidden: bool = False,
                 lambda_2: float | None = None):
        super().__init__()
        self.head = HardConcrete((cfg.n_layers, cfg.n_heads), 10.0, generator=generator)  # [L, H]
        self.intermediate = HardConcrete((cfg.n_layers, cfg.ffn_dim), math.log(0.99 / 0.01), generator=generator)  # [L, I]
        self.hidden = HardConcrete((cfg.dim,), 10.0, generator=generator, frozen=keep_hidden)  # [D]
        self.lambda_1 = nn.Parameter(torch.zeros(()))
        # --lambda-2 K: lambda_2 held at K, a fixed proportional gain (dL0/ds = lambda_1 + 2K (s - t)), not trained
        self.lambda_2 = nn.Parameter(torch.tensor(float(lambda_2 or 0.0)), requires_grad=lambda_2 is None)

    def _each(self, fn) -> Masks:
        return Masks(*(fn(getattr(self, g)) for g in MASK_GROUPS))

    def sample(self, generator: torch.Generator | None = None) -> Masks:
        return self._each(lambda g: g.sample(generator))

    def prob_nonzero(self) -> Masks:
        return self._each(HardConcrete.prob_nonzero)

    def deterministic(self) -> Masks:
        return self._each(HardConcrete.deterministic)

    def clamp_(self):
        self._each(HardConcrete.clamp_)

    def load_state(self, state: dict):
        """load_state_dict for a checkpoint's gates, their protected units (a buffer only where set) included."""
        for g in MASK_GROUPS:
            if f"{g}.protected" in state:
                getattr(self, g).protect(state[f"{g}.protected"])
        self.load_state_dict(state)


@torch.no_grad()
def hidden_energy(model: llama.Llama, blocks: torch.Tensor, micro_batch_size: int, autocast=nullcontext) -> torch.Tensor:
    """(D,): each hidden dim's share of the squared norm of the states Eq. 8 compares (outputs of layers 1..L-1 and
    the final normed output) on calibration blocks, the intact model. Massive activations (Sun et al. 2024) put
    most of it in a handful of dims."""
    sq = 0.0
    with teacher_lora(model, None):
        for idx in blocks.split(micro_batch_size):
            with autocast():
                _, hidden = model(idx.to(model.lm_head.weight.device), output_hidden=True)
            sq = sq + sum(h.float().pow(2).sum((0, 1)) for h in hidden)
    return distributed.local(sq / sq.sum()).cpu()


@torch.no_grad()
def activation_importance(model: llama.Llama, blocks: torch.Tensor, micro_batch_size: int,
                          autocast=nullcontext) -> Masks:
    """Minitron's activation importance of every unit (Muralidharan et al. 2024), averaged over the calibration
    tokens, the intact model: per head the L2 norm of its attention output (the input of o_proj, (B, T, H, Dh) ->
    (H,)), per FFN channel |silu(gate) * up| (the input of down_proj), per hidden dim |RMSNorm output| summed over
    every norm that reads the residual stream (two per layer and the final one). Massive dims rank first."""
    cfg = model.config
    head = torch.zeros(cfg.n_layers, cfg.n_heads)
    inter = torch.zeros(cfg.n_layers, cfg.ffn_dim)
    hidden = torch.zeros(cfg.dim)
    hooks = []
    for i, layer in enumerate(model.model.layers):
        def heads_in(mod, args, i=i):
            x = args[0].float()  # (B, T, H * Dh)
            head[i] += x.view(*x.shape[:2], cfg.n_heads, cfg.head_dim).norm(dim=-1).sum((0, 1)).cpu()

        def ffn_in(mod, args, i=i):
            inter[i] += args[0].float().abs().sum((0, 1)).cpu()
        hooks += [layer.self_attn.o_proj.register_forward_pre_hook(heads_in),
                  layer.mlp.down_proj.register_forward_pre_hook(ffn_in)]

    def norm_out(mod, args, out):  # returns None: the output is unchanged
        hidden.add_(out.float().abs().sum((0, 1)).cpu())
    norms = [m for layer in model.model.layers for m in (layer.input_layernorm, layer.post_attention_layernorm)]
    hooks += [norm.register_forward_hook(norm_out) for norm in norms + [model.model.norm]]
    try:
        with teacher_lora(model, None):
            for idx in blocks.split(micro_batch_size):
                with autocast():
                    model(idx.to(model.lm_head.weight.device))
    finally:
        for h in hooks:
            h.remove()
    n = blocks.numel()
    return Masks(head / n, inter / n, hidden / n)


GATE_INIT_SPREAD = 3.0  # --gate-init activation: log_alpha from LOG_ALPHA_MAX (most important) down by this much


def init_from_importance(gates: Gates, scores: Masks):
    """--gate-init activation: per row (a layer's heads or FFN channels; the hidden dims) log_alpha falls linearly with
    the unit's importance rank, from LOG_ALPHA_MAX for the most important to LOG_ALPHA_MAX - GATE_INIT_SPREAD for the
    least: every unit still starts kept (P(z != 0) from 0.96 to 0.998), but under the sparsity pressure the least
    important go first, and the gradients decide from there (METHOD.md §2)."""
    with torch.no_grad():
        for g in MASK_GROUPS:
            gate, score = getattr(gates, g), getattr(scores, g).to(gates.lambda_1.device)
            if gate.frozen:
                continue
            n = score.shape[-1]
            rank = score.argsort(dim=-1, stable=True).argsort(dim=-1).float() / max(n - 1, 1)  # 0 least, 1 most important
            gate.log_alpha.copy_(LOG_ALPHA_MAX - GATE_INIT_SPREAD * (1 - rank))


MASSIVE_SHARE = 0.5  # the top 1% of hidden dims holding more than this share of the squared norm: massive activations


def massive_activations(energy: torch.Tensor) -> tuple[int, float]:
    """(k, share): the top 1% of the hidden dims (at least one) and the share of the squared norm they hold."""
    k = max(1, len(energy) // 100)
    return k, float(energy.topk(k).values.sum())


def mask_tensors(m: Masks) -> tuple:
    return tuple(getattr(m, g) for g in MASK_GROUPS)

# -----------------------------------------------------------------------------
# expected sparsity (METHOD.md §3, Eq. 3), Lagrangian and target schedule (§4, Eq. 5)


def expected_sparsity(p: Masks, cfg: llama.LlamaConfig) -> torch.Tensor:
    """1 - E[kept prunable weights] / M, from P(z != 0) of each unit; exact for 0/1 masks (what export removes).
    Factorised (METHOD.md §3): (sum P_hidden) * (weights per hidden unit), no D x (L*H) outer product."""
    H, Hkv, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    # (L, Hkv): a K/V head survives while any query head of its group does
    p_kv = 1 - (1 - p.head.view(cfg.n_layers, Hkv, H // Hkv)).prod(-1)
    per_hidden = 2 * Dh * p.head.sum() + 2 * Dh * p_kv.sum() + 3 * p.intermediate.sum()  # q,o + k,v + gate,up,down
    return 1 - p.hidden.sum() * per_hidden / llama.prunable_params(cfg)


def lagrangian(expected: torch.Tensor, target: float, lambda_1, lambda_2) -> torch.Tensor:
    return lambda_1 * (expected - target) + lambda_2 * (expected - target) ** 2  # Eq. 5


def prune_optimizer(gates: Gates, lora_weights: list, lambda_optim: str = "adam") -> list[torch.optim.Optimizer]:
    # Eq. 5 is a saddle point: log_alpha (and LoRA) descend on the loss while the lambdas *ascend* on it, which is
    # what `maximize=True` on their group does (the reference uses a negative learning rate). AdamW without weight
    # decay (METHOD.md §7); learning rates are set by group name every step. Two optimizers, the gates' and LoRA's
    # (elementwise, so the same steps as one): under FSDP LoRA is DTensors and the gates plain tensors, and the fp16
    # GradScaler unscales one optimizer's gradients in one kernel, which refuses the mix. Adam moves each lambda by
    # about its learning rate every step whatever the size of the gap (a bang-bang integrator: the expected sparsity
    # swings about the target); --lambda-optim sgd moves it by lr x gap instead (METHOD.md §4).
    groups = [{"name": "log_alpha", "params": [getattr(gates, g).log_alpha for g in MASK_GROUPS]},
              {"name": "lambda", "params": [p for p in (gates.lambda_1, gates.lambda_2) if p.requires_grad],
               "maximize": True}]
    lora = finetune_optimizer(lora_weights) if lora_weights else []
    if lambda_optim == "sgd":  # plain ascent: lambda moves by lr x its gradient, i.e. in proportion to the gap
        return [torch.optim.AdamW(groups[:1], weight_decay=0.0), torch.optim.SGD(groups[1:], lr=0.0)] + lora
    return [torch.optim.AdamW(groups, weight_decay=0.0)] + lora


def target_at(step: int, target: float, warmup_steps: int) -> float:
    return target * min(1.0, step / warmup_steps) if warmup_steps > 0 else target  # linear warm-up (METHOD.md §4)


@torch.no_grad()
def final_masks(gates: Gates, cfg: llama.LlamaConfig, target: float, tol: float = 0.005, round_to: int = 1) -> Masks:
    """Deterministic masks whose exported sparsity lies within tol of the target (METHOD.md §2, "Final masks"): the
    reference rule's head and hidden masks, and the number of FFN channels solved for (sparsity is linear in it);
    only if the FFN alone cannot reach the target is one head (else one hidden unit) moved, and the number solved
    again. round_to N > 1 (--round-to): the same in hardware-friendly units (rounding.py); when no rounded widths
    reach the target, the masks of N = 1 (rounding.unmet names what is not rounded)."""
    if round_to > 1:
        m = rounding.rounded_masks(gates, cfg, target, tol, round_to, lambda m: float(expected_sparsity(m, cfg)),
                                   lambda m: _fit_intermediate(gates, m, cfg, target, round_to))
        if m is not None:
            return m
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


def _fit_intermediate(gates: Gates, m: Masks, cfg: llama.LlamaConfig, target: float, round_to: int = 1) -> Masks:
    M, d_kept = llama.prunable_params(cfg), max(float(m.hidden.sum()), 1.0)
    no_ffn = Masks(m.head, torch.zeros_like(m.intermediate), m.hidden)
    attention = (1 - float(expected_sparsity(no_ffn, cfg))) * M / d_kept  # q, k, v, o weights per kept hidden unit
    n = min(max(round(((1 - target) * M / d_kept - attention) / 3), 0), m.intermediate.numel())
    score = gates.intermediate.log_alpha.detach().flatten() + 100.0 * m.intermediate.flatten()  # kept ones first
    if round_to > 1:
        return Masks(m.head, rounding.keep_blocks(score.view_as(m.intermediate), n, round_to), m.hidden)
    inter = torch.zeros_like(score)
    inter[score.argsort(descending=True, stable=True)[:n]] = 1.0
    return Masks(m.head, inter.view_as(m.intermediate), m.hidden)


def _move_one_unit(gates: Gates, m: Masks, prune: bool) -> Masks:
    for name in ("head", "hidden"):  # the next-coarsest groups after FFN channels
        group = getattr(gates, name)
        if group.frozen:
            continue
        mask, log_alpha = getattr(m, name).clone(), group.log_alpha.detach()
        movable = mask == (1.0 if prune else 0.0)
        if group.protected is not None:
            movable &= ~group.protected
        if movable.sum() > (1 if prune and name == "hidden" else 0):  # never the last hidden unit
            score = torch.where(movable, log_alpha if prune else -log_alpha, torch.inf)
            mask.view(-1)[score.view(-1).argmin()] = 0.0 if prune else 1.0  # least (most) confident first
            return replace(m, **{name: mask})
    return m

# -----------------------------------------------------------------------------
# losses (METHOD.md §5, Eq. 7-9)


def kd_loss(student_logits, teacher_logits, temperature: float) -> torch.Tensor:
    # Eq. 7: T^2 KL(teacher || student) of softmax(logits / T), summed over tokens and divided by B ("batchmean")
    student_logp = F.log_softmax(student_logits.float() / temperature, -1)  # (B, T, V)
    teacher_logp = F.log_softmax(teacher_logits.float() / temperature, -1)
    return F.kl_div(student_logp, teacher_logp, reduction="batchmean", log_target=True) * temperature ** 2


def layer_loss(student_hidden, teacher_hidden, kind: str = "paper") -> torch.Tensor:
    """Eq. 8 and its variants for massive activations, in fp32, summed over the outputs of layers 1..L-1 and the
    final normed output (each (B, T, D)); METHOD.md §5:
      paper:  MSE over the elements where the student state is non-zero (pruned hidden dims are exactly 0, so their
              error drops out of the loss);
      all:    MSE over every element: a pruned dim's error (0 - t)^2 stays in the loss;
      scaled: MSE over every element, each dim divided by the teacher's mean square in it over the batch (B, T):
              scale-free, no dim outweighs another for being large;
      cosine: 1 - cos(student, teacher) per token, averaged (scale-free; Minitron's intermediate-state loss)."""
    total = 0.0
    for s, t in zip(student_hidden, teacher_hidden):
        s, t = s.float(), t.float()
        if kind == "paper":  # flags.LAYER_LOSSES names the kinds
            keep = (s != 0).float()
            total = total + ((s - t) ** 2 * keep).sum() / keep.sum().clamp(min=1)
        elif kind == "all":
            total = total + (s - t).pow(2).mean()
        elif kind == "scaled":
            total = total + ((s - t).pow(2) / t.pow(2).mean((0, 1)).clamp(min=1e-6)).mean()  # (D,) scale per dim
        else:
            total = total + (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    return total


def lm_loss(logits, labels, reduction: str = "mean") -> torch.Tensor:
    # next-token cross-entropy; labels (B, T), -100 ignored
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=data.IGNORE,
                           reduction=reduction)


def student_loss(model: llama.Llama, idx: torch.Tensor, z: Masks, teacher: Snapshot | None,
                 c: RunConfig) -> dict[str, torch.Tensor]:
    """The distillation terms of Eq. 9 for one micro-batch (B, T), each already weighted: kd_weight * L_kd (Eq. 7)
    and layer_weight * L_layer (Eq. 8); or, for the no-distillation ablation, the next-token cross-entropy alone."""
    if c.distill == "none":
        return {"lm": lm_loss(model(idx, z), idx)}
    # the teacher first: its in-place LoRA swap must not touch a live student graph (METHOD.md §6)
    layers = c.layer_weight > 0  # without the layer loss, keep no hidden states (memory)
    with torch.no_grad(), teacher_lora(model, None if teacher is None else teacher.lora):
        teacher_out = model(idx, None if teacher is None else teacher.masks.to(idx.device), output_hidden=layers)
    out = model(idx, z, output_hidden=layers)
    (logits, hidden), (t_logits, t_hidden) = (out, teacher_out) if layers else ((out, []), (teacher_out, []))
    loss = {"kd": c.kd_weight * kd_loss(logits, t_logits, c.kd_temp)}
    if layers:
        layer = layer_loss(hidden, t_hidden, c.layer_loss)
        # --layer-balance (Minitron): the weight rescaled every micro-batch so that the layer term is layer_weight
        # times the weighted KL term; the gradient ratio of the two stays fixed whatever the scale of the states
        weight = c.layer_weight * (loss["kd"].detach() / layer.detach().clamp(min=1e-12)) if c.layer_balance \
            else c.layer_weight
        loss["layer"] = weight * layer
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
    """The teacher of a step (Eq. 10-11, METHOD.md §6); None is the intact model. gap = g / i and top =
    floor((target - g) / i), in snapshot levels. Stage 1: the newest snapshot at level <= k - gap for a student that
    has crossed level k (the intact model while there is none). Stage 2: the snapshots at levels <= top, newest
    first, then the intact model, each for an equal share of the remaining steps."""
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


def take_snapshots(snapshots: list[Snapshot], gates: Gates, model: llama.Llama, cfg: llama.LlamaConfig,
                   now: float, interval: float, n_levels: int, step: int = 0) -> Snapshot | None:
    """A snapshot of the student (deterministic masks, LoRA) when `now` has crossed a new level k * interval below the
    target; one per step, at the highest level crossed (levels jumped over in one step have none). Returns it."""
    level = min(math.floor(now / interval + 1e-9), n_levels)
    if level <= (snapshots[-1].level if snapshots else 0):
        return None
    masks = gates.deterministic()
    snapshots.append(Snapshot(level, float(expected_sparsity(masks, cfg)), masks.to("cpu"),
                              distributed.cpu_lora(model), step))
    return snapshots[-1]


# -----------------------------------------------------------------------------
# the recipe: every flag of the command (defaults: the paper's recipe, METHOD.md §7), and the step counts it implies


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
    round_to: int = 1  # --round-to N: hardware-friendly widths in the final masks (1: the paper's)
    keep_hidden: bool = False  # --keep-hidden: prune heads and FFN channels only (off: all three groups, the paper)
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
    recipe: str = "paper"  # --recipe: which defaults the flags below started from (flags.RECIPES)
    distill: str = "pkd"
    kd_temp: float = 2 / 3
    kd_weight: float = 0.1
    layer_weight: float = 0.9
    layer_loss: str = "paper"  # --layer-loss: Eq. 8 as published, or a variant for massive activations (METHOD.md §5)
    layer_balance: bool = False  # --layer-balance: the layer term rescaled to layer_weight x the KL term every step
    keep_outliers: int = 0  # --keep-outliers N: the N hidden dims of largest activation never pruned (METHOD.md §2)
    lambda_optim: str = "adam"  # --lambda-optim: adam (the reference) or sgd, plain gradient ascent (METHOD.md §4)
    lambda_2: float | None = None  # --lambda-2 K: lambda_2 held at K instead of trained (METHOD.md §4)
    gate_init: str = "paper"  # --gate-init: the reference's log_alpha init, or ordered by activation importance (§2)
    settle: float = 0.0  # --settle F: the last F of the pruning steps train LoRA under the final masks (METHOD.md §4)
    gap: float = 0.10
    interval: float = 0.01
    ft_data: str | None = None
    ft_epochs: int = 2
    ft_max_steps: int | None = None
    ft_lr: float = 1e-4
    ft_batch_size: int = 16
    ft_max_len: int = 512
    ft_lora_targets: str = ",".join(PROJECTIONS)

    def __post_init__(self):
        flags.check_config(self)  # every check that needs no file: before any work (loading, building the demo)
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
    settle_start: int | None = None  # --settle: the first step with the final masks fixed (None: the last + 1)

    @classmethod
    def of(cls, c: RunConfig, n_blocks: int, n_examples: int) -> "Schedule":
        total = c.epochs * (n_blocks // c.batch_size)
        total = min(total, c.max_steps) if c.max_steps else total
        ft_total = c.ft_epochs * (n_examples // c.ft_batch_size)
        ft_total = min(ft_total, c.ft_max_steps) if c.ft_max_steps else ft_total
        return cls(total, round(c.warmup_epochs / c.epochs * total), ft_total, round(c.gap / c.interval),
                   math.ceil(c.target / c.interval - 1e-9) - 1, math.floor((c.target - c.gap) / c.interval + 1e-9),
                   total - round(c.settle * total))

# -----------------------------------------------------------------------------
# what a step computes with, and where the run is (runfolder.py checkpoints both)


@dataclass
class Parts:
    """What one optimizer step touches: the model (frozen base + LoRA), the gates, the optimizers and the scaler."""
    model: llama.Llama
    gates: Gates
    optimizers: list[torch.optim.Optimizer]  # pruning: the gates' and LoRA's; post fine-tuning: LoRA's
    scaler: torch.amp.GradScaler
    c: RunConfig
    autocast: Callable = nullcontext
    # The run's random stream, a CPU generator seeded with --seed: the gates' and LoRA's initial values, each step's
    # mask noise (head, intermediate, hidden), then the fine-tuning LoRA's, in that order. The same on every device,
    # rank and world size; state.pt keeps its state. None: torch's default CPU generator.
    rng: torch.Generator | None = None

    @property
    def lora_weights(self) -> list:
        return list(llama.lora_state(self.model).values())


def finetune_optimizer(lora_weights: list) -> list[torch.optim.AdamW]:
    return [torch.optim.AdamW([{"name": "lora", "params": lora_weights}], weight_decay=0.0)]


@dataclass
class RunState:
    """Where a run is: everything that is not the frozen model and that training changes, but the tensors of Parts
    (LoRA, gates, optimizer). runfolder.save_state writes both; a killed run resumes from state.pt exactly."""
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

    @classmethod
    def from_saved(cls, s: dict) -> "RunState":
        snapshots = [Snapshot(**runfolder.snapshot_fields(x)) for x in s["snapshots"]]
        final = None if s["final_masks"] is None else Masks(**s["final_masks"])
        return cls(s["phase"], s["step"], s["ft_step"], s["stage2_start"], snapshots, final, s["lora"],
                   s["ppl_before"], s["wall"], s.get("fit"), *s.get("skipped", (0, 0)), s.get("resumes", []))


def attach_lora(model: llama.Llama, c: RunConfig, state: dict | None = None, generator: torch.Generator | None = None):
    """The run's adapters on the base model: the pruning LoRA (METHOD.md §7: q, v), and once post fine-tuning has
    begun that LoRA merged into the weights and the fine-tuning LoRA on top. Values come from a checkpoint if given,
    else from the generator."""
    if not c.no_lora:
        llama.add_lora(model, c.lora_targets.split(","), c.lora_rank, c.lora_alpha, generator)
    if state is None:
        return
    if not c.no_lora:
        llama.load_lora_state(model, state["lora"])
    if state["ft_lora"] is not None:
        start_finetune(model, c, torch.Generator())  # values overwritten below
        llama.load_lora_state(model, state["ft_lora"])


def start_finetune(model: llama.Llama, c: RunConfig, generator: torch.Generator | None = None):
    for layer in model.model.layers:
        start_finetune_layer(layer, c, generator)


def start_finetune_layer(layer: torch.nn.Module, c: RunConfig, generator: torch.Generator | None = None):
    """start_finetune on one decoder layer (under torchrun each layer just before it is sharded)."""
    llama.merge_lora(layer)  # the pruning LoRA becomes part of the (still frozen) weights
    llama.add_lora_to_layer(layer, c.ft_lora_targets.split(","), c.lora_rank, c.lora_alpha, generator)  # §7: all


def load_run(out_dir, device="cpu", dtype=torch.float32) -> tuple[llama.Llama, Masks, tokenization.Tokenizer]:
    """The base model with a finished run's final LoRA and its final deterministic masks: model(idx, masks) gives
    what OUT/pruned/ gives."""
    state = runfolder.load_state(out_dir)
    if state["final_masks"] is None:
        raise ValueError(f"{out_dir}: the run has not finished pruning; continue it with --resume {out_dir}")
    c = RunConfig.from_dict(state["config"])
    model, tok = checkpoint.load(c.ckpt, c.tokenizer, device, dtype)
    attach_lora(model, c, state)
    return model.eval(), Masks(**state["final_masks"]).to(device), tok

# -----------------------------------------------------------------------------
# one optimizer step of pruning, and the pruning loop (Algorithm 1, stage 1 and stage 2)


def prune_step(parts: Parts, batch: torch.Tensor, teacher: Snapshot | None, target: float) -> dict[str, float]:
    """One optimizer step on a batch (B, T): sample z (Eq. 4), teacher and student forwards, Eq. 9, backward, a
    descent step on LoRA and log_alpha and an ascent step on the lambdas, clamp. Returns the loss terms, the
    expected sparsity the step's L0 saw (before the step) and whether the optimizer stepped."""
    gates = parts.gates
    batch = distributed.local_share(batch)  # under torchrun: this rank's part; the mean over ranks is the global batch's
    # One mask sample per step, shared by the batch (and by every rank: the same seed and draws). Why leaf copies:
    # the forwards see z detached, so no micro-batch's graph reaches back through the sampler to log_alpha (each is
    # freed by its own backward); dL/dz accumulates on the leaves' .grad over the micro-batches, and the surrogate
    # sum(z * dL/dz) below carries it through the sampler once: the chain rule, with one small graph for Eq. 4.
    z = gates.sample(parts.rng)
    z_leaf = Masks(*(m.detach().requires_grad_() for m in mask_tensors(z)))
    # Eq. 9, L = kd_weight * L_kd + layer_weight * L_layer + L0: the distillation terms (distill_backward); L0 below.
    terms = distill_backward(parts, batch, z_leaf, teacher)

    expected = expected_sparsity(gates.prob_nonzero(), parts.model.config)  # Eq. 3
    l0 = lagrangian(expected, target, gates.lambda_1, gates.lambda_2)  # Eq. 5, the last term of Eq. 9
    terms["l0"] = float(l0.detach())
    surrogate = sum((m * m_leaf.grad).sum() for m, m_leaf in zip(mask_tensors(z), mask_tensors(z_leaf)))
    (surrogate + parts.scaler.scale(l0)).backward()
    distributed.average_gate_grads(gates)  # under torchrun; FSDP averages LoRA's
    terms = distributed.average_values(terms)
    # descent on LoRA and log_alpha, ascent on lambda_1 and lambda_2; nothing changes when a value is not finite
    stepped = optimizer_step(parts, parts.lora_weights, terms.values())
    if stepped:
        gates.clamp_()
    return {**terms, "expected_sparsity": float(expected.detach()), "stepped": stepped}


def distill_backward(parts: Parts, batch: torch.Tensor, masks: Masks, teacher: Snapshot | None) -> dict[str, float]:
    """The distillation terms of Eq. 9 on this rank's batch under `masks`, back-propagated per micro-batch, each
    weighted by its share of the batch (one micro-batch's activations alive at a time). Returns their values."""
    c, device = parts.c, parts.gates.lambda_1.device
    terms = {"kd": 0.0, "layer": 0.0, "lm": 0.0}
    for idx in batch.split(c.micro_batch_size):
        idx, frac = idx.to(device), len(idx) / len(batch)
        with parts.autocast():
            loss = student_loss(parts.model, idx, masks, teacher, c)  # weighted L_kd, L_layer (or L_lm alone)
        parts.scaler.scale(sum(loss.values()) * frac).backward()
        for k, v in loss.items():
            terms[k] += float(v.detach()) * frac
    return terms


def settle_step(parts: Parts, batch: torch.Tensor, teacher: Snapshot | None, masks: Masks) -> dict[str, float]:
    """One step of --settle (METHOD.md §4): the distillation terms of Eq. 9 with the student under the final masks
    (fixed, deterministic), a descent step on LoRA alone; the gates and lambdas no longer move, nothing is sampled."""
    batch = distributed.local_share(batch)
    terms = distill_backward(parts, batch, masks.to(parts.gates.lambda_1.device), teacher)
    terms = distributed.average_values({**terms, "l0": 0.0})
    stepped = optimizer_step(parts, parts.lora_weights, terms.values())  # the gates have no gradient: unchanged
    with torch.no_grad():
        expected = float(expected_sparsity(parts.gates.prob_nonzero(), parts.model.config))
    return {**terms, "expected_sparsity": expected, "stepped": stepped}


def optimizer_step(parts: Parts, clip_params: list, losses) -> bool:
    """Unscale, clip, step, on every rank alike. A step whose loss or gradients are not finite changes nothing (no
    parameter, lambda or optimizer state; with fp16 the scaler lowers its scale) and returns False."""
    for opt in parts.optimizers:  # one scaler, each optimizer unscaled on its own (torch's multi-optimizer recipe)
        parts.scaler.unscale_(opt)
    grads = [p.grad for opt in parts.optimizers for g in opt.param_groups for p in g["params"] if p.grad is not None]
    finite = all(math.isfinite(v) for v in losses)
    if finite and grads:  # one device sync for all the gradients, not one per tensor: this runs every step
        finite = bool(torch.stack([distributed.local(g).isfinite().all() for g in grads]).all())
    if not distributed.all_ranks(finite):
        for opt in parts.optimizers:
            opt.zero_grad(set_to_none=True)
        parts.scaler.update()  # records the inf for fp16 (smaller scale next step); a no-op otherwise
        return False
    if clip_params:
        nn.utils.clip_grad_norm_(clip_params, parts.c.clip)
    for opt in parts.optimizers:
        parts.scaler.step(opt)
        opt.zero_grad(set_to_none=True)
    parts.scaler.update()
    return True


def set_learning_rates(optimizers: list[torch.optim.Optimizer], lrs: dict[str, float]):
    for group in (g for opt in optimizers for g in opt.param_groups):
        group["lr"] = lrs[group["name"]]


def prune(parts: Parts, st: RunState, blocks: torch.Tensor, heldout: torch.Tensor, sched: Schedule, log,
          ckpt: runfolder.Checkpointer):
    """Masks (Eq. 4) and LoRA learn from the teachers (Eq. 7-11) under the sparsity Lagrangian (Eq. 5)."""
    c, gates = parts.c, parts.gates
    parts.model.train()  # LLaMA has no dropout: this only lets gradient checkpointing act
    bar = cli.Progress("prune", sched.total_steps, st.step, enabled=distributed.rank_id() == 0)
    settled = None  # --settle: the final masks, fixed from sched.settle_start on (a function of the gates, which then
    # no longer move: a resumed run computes the same ones)
    while st.step < sched.total_steps:
        teacher = pick_teacher(st.step, st.snapshots, st.stage2_start, sched.total_steps, sched.gap,
                               sched.stage2_top) if c.distill == "pkd" else None
        target = target_at(st.step, c.target, sched.warmup_steps)
        lrs = {"log_alpha": c.lr_mask, "lambda": c.lr_lambda, "lora": linear_decay(st.step, c.lr_lora, sched.total_steps)}
        set_learning_rates(parts.optimizers, lrs)
        batch = blocks[batch_indices(st.step, len(blocks), c.batch_size, c.seed)]  # (B, T)
        settling = sched.settle_start is not None and st.step >= sched.settle_start  # --settle: structure decided
        if settling:
            if settled is None:
                settled = final_masks(gates, parts.model.config, c.target, c.tolerance, c.round_to)
            terms = settle_step(parts, batch, teacher, settled)
        else:
            terms = prune_step(parts, batch, teacher, target)
        expected = terms.pop("expected_sparsity")
        runfolder.count_nonfinite(st, terms.pop("stepped"), st.step)
        st.step += 1

        # Two sparsities per step, on purpose: `expected` is the one the step's L0 was computed with (logged beside
        # that loss); `now` is after the optimizer moved the gates, i.e. of the masks a snapshot taken now stores.
        with torch.no_grad():
            now = float(expected_sparsity(gates.prob_nonzero(), parts.model.config))
        if c.distill == "pkd" and st.stage2_start is None:  # stage 1 (Eq. 10): snapshots, until the target
            snapshot_or_stage2(parts, st, now, heldout, sched, log)
        if st.step % c.log_every == 0 or st.step == sched.total_steps:
            runfolder.log_line(log, {"phase": "prune", "step": st.step, "loss": sum(terms.values()), **terms,
                                     "expected_sparsity": expected, "target": target,
                                     "lambda_1": gates.lambda_1.item(), "lambda_2": gates.lambda_2.item(),
                                     "teacher_sparsity": 0.0 if teacher is None else teacher.sparsity,
                                     "teacher_level": 0 if teacher is None else teacher.level,
                                     "skipped_steps": st.skipped, "lr_lora": lrs["lora"] if parts.lora_weights else 0.0,
                                     "lr_mask": lrs["log_alpha"], "lr_lambda": lrs["lambda"],
                                     **({"settled": True} if settling else {})})
        if c.eval_every and st.step % c.eval_every == 0 and len(heldout):
            runfolder.log_line(log, {"phase": "eval", "step": st.step, "expected_sparsity": now,
                                     "student_ppl": student_ppl(parts, heldout, gates.deterministic())})
        bar.update(st.step)
        ckpt.step_done(parts, st.step, sched.total_steps)
    bar.close()


def snapshot_or_stage2(parts: Parts, st: RunState, now: float, heldout: torch.Tensor, sched: Schedule, log):
    """After a stage-1 step: a snapshot teacher at each new interval level the student crossed (METHOD.md §6), and
    the switch to stage 2 the first time it reaches the target (reference). The one place the stage changes."""
    c = parts.c
    snap = take_snapshots(st.snapshots, parts.gates, parts.model, parts.model.config, now, c.interval, sched.n_levels,
                          st.step)
    if snap is not None:  # its perplexity is the student's now (the same masks and LoRA)
        ppl = {"ppl": student_ppl(parts, heldout, snap.masks)} if c.eval_every and len(heldout) else {}
        runfolder.log_line(log, {"phase": "snapshot", "step": st.step, "level": snap.level,
                                 "sparsity": snap.sparsity, **ppl})
    if now >= c.target:
        st.stage2_start = st.step


def student_ppl(parts: Parts, heldout: torch.Tensor, masks: Masks) -> float:
    """Held-out perplexity of the model with the student's LoRA and the given (deterministic) masks."""
    parts.model.eval()
    ppl = evaluate.heldout_ppl(parts.model, heldout, parts.c.micro_batch_size, masks.to(parts.gates.lambda_1.device),
                               parts.autocast)
    parts.model.train()
    return ppl


def end_pruning(parts: Parts, st: RunState, heldout: torch.Tensor | None = None):
    """Final deterministic masks within tolerance of the target (METHOD.md §2), rounded with --round-to (and what
    that cost), and the pruning LoRA kept."""
    c = parts.c
    st.final = final_masks(parts.gates, parts.model.config, c.target, c.tolerance, c.round_to)
    st.fit = mask_fit(parts.gates, st.final, parts.model.config, c)
    if c.round_to > 1:
        plain = final_masks(parts.gates, parts.model.config, c.target, c.tolerance)  # the same gates, N = 1
        ppl = {} if heldout is None or not len(heldout) else {
            "ppl_rounded": student_ppl(parts, heldout, st.final), "ppl_unrounded": student_ppl(parts, heldout, plain)}
        st.fit["rounding"] = rounding.report(st.final, plain, parts.model.config, c, expected_sparsity, ppl)
        if st.fit["rounding"]["warning"] and distributed.rank_id() == 0:
            print(f"warning: {st.fit['rounding']['warning']}", flush=True)
    st.prune_lora = distributed.cpu_lora(parts.model)
    st.phase = "finetune" if c.ft_data else "done"


FIT_WARN = 0.02  # 2 percentage points


def mask_fit(gates: Gates, final: Masks, cfg: llama.LlamaConfig, c: RunConfig) -> dict:
    """Whether the masks learned the target: the expected sparsity at the end, the sparsity of the trained
    deterministic masks, how many units the final masks moved away from those, and a warning when either sparsity is
    more than FIT_WARN from the target (the final masks then forced the target, e.g. after too few steps)."""
    with torch.no_grad():
        at_end = float(expected_sparsity(gates.prob_nonzero(), cfg))
        trained = gates.deterministic()
        s_trained = float(expected_sparsity(trained, cfg))
    moved = {g: int((getattr(final, g) != getattr(trained, g)).sum()) for g in MASK_GROUPS}
    warning = None
    if max(abs(at_end - c.target), abs(s_trained - c.target)) > FIT_WARN:
        warning = (f"the masks did not learn the target {c.target}: expected sparsity at the end {at_end:.4f}, trained "
                   f"deterministic masks {s_trained:.4f}; the final masks moved {sum(moved.values())} units "
                   f"({moved['head']} heads, {moved['intermediate']} FFN channels, {moved['hidden']} hidden dims) to "
                   f"reach it. Prune longer (--epochs, --max-steps) or raise --lr-lambda")
    return {"expected_sparsity_at_end": at_end, "trained_masks_sparsity": s_trained, "final_masks_moved": moved,
            "warning": warning}

# -----------------------------------------------------------------------------
# post fine-tuning (METHOD.md §7): masks fixed, LoRA on every projection, cross-entropy on the responses only


def finetune(parts: Parts, st: RunState, examples: list, sched: Schedule, pad_id: int, log,
             ckpt: runfolder.Checkpointer):
    c, device = parts.c, parts.gates.lambda_1.device
    lora_weights = parts.lora_weights
    final = st.final.to(device)
    bar = cli.Progress("finetune", sched.ft_total, st.ft_step, enabled=distributed.rank_id() == 0)
    while st.ft_step < sched.ft_total:
        set_learning_rates(parts.optimizers, {"lora": (lr := linear_decay(st.ft_step, c.ft_lr, sched.ft_total))})
        batch = [examples[i] for i in batch_indices(st.ft_step, len(examples), c.ft_batch_size, c.seed + 1)]
        loss_value = finetune_backward(parts, batch, final, pad_id)
        runfolder.count_nonfinite(st, optimizer_step(parts, lora_weights, [loss_value]), st.ft_step)
        st.ft_step += 1
        if st.ft_step % c.log_every == 0 or st.ft_step == sched.ft_total:
            runfolder.log_line(log, {"phase": "finetune", "step": st.ft_step, "loss": loss_value, "lr_lora": lr})
        bar.update(st.ft_step)
        ckpt.step_done(parts, st.ft_step, sched.ft_total)
    bar.close()

def finetune_backward(parts: Parts, batch: list, final: Masks, pad_id: int) -> float:
    """The gradient of one post fine-tuning batch (every rank's share of it) and its loss: the sum of the token
    losses over the number of labelled tokens in the whole batch, so that neither --micro-batch-size nor the number
    of ranks changes it (a mean of per-micro-batch means would weigh a short micro-batch's tokens more)."""
    device, world = parts.gates.lambda_1.device, distributed.world_size()
    n_labelled = max(sum(int((torch.tensor(y[1:]) != data.IGNORE).sum()) for _, y in batch), 1)
    mine, loss_value = distributed.local_share(batch), 0.0
    for i in range(0, len(mine), parts.c.micro_batch_size):
        ids, labels = data.pad_batch(mine[i:i + parts.c.micro_batch_size], pad_id)  # (b, T) each
        with parts.autocast():
            loss = lm_loss(parts.model(ids.to(device), final), labels.to(device), reduction="sum") / n_labelled
        parts.scaler.scale(loss * world).backward()  # FSDP averages the ranks' gradients: the sum is the batch's
        loss_value += loss.item()
    return distributed.average_values({"loss": loss_value})["loss"] * world

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
# the command (runner.py loads the base, runs Algorithm 1 and post fine-tuning with their checkpoints, and exports)


def main(argv=None):
    try:
        c, start = flags.parse_args(argv, RunConfig)
        if start == "plan":
            import memory_plan  # only --plan reads it
            memory_plan.plan(c, lambda n_blocks: Schedule.of(c, n_blocks, 0))
        else:
            runner.run(sys.modules[__name__], c, start)  # hands this file in: runner.py imports no method back
        distributed.finish()
    except runfolder.Stopped as e:
        distributed.finish()  # every rank stops at the same step
        print(str(e), file=sys.stderr)
        sys.exit(e.exit_code)
    except (ValueError, FileNotFoundError) as e:
        distributed.finish()  # user errors are raised on every rank; anything else exits without it (a rank still
        print(f"error: {e}", file=sys.stderr)  # in a collective would hang the others' destroy)
        sys.exit(2)


if __name__ == "__main__":
    main()
