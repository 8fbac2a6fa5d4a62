"""--round-to N: final masks in widths that quantised kernels and llama.cpp take as they are (not in the paper).
Per layer: FFN channels in blocks of N, the same number of query heads on every surviving K/V head; the hidden width a
multiple of N (or all of it). Units are still ranked by log_alpha, the trained masks' units first; a row narrower than
N stays unrounded (reported). `gates` is nuteprune.Gates (log_alpha per group, deterministic()).
"""
from __future__ import annotations

from dataclasses import replace

import torch

import llama
from llama import Masks


def keep_blocks(score: torch.Tensor, n: int, N: int) -> torch.Tensor:
    """0/1 masks (L, I) keeping about n units in blocks of N per row: a row's units by descending score, cut into
    blocks (score: the block's mean, non-increasing along a row), and the best round(n / N) blocks of all rows."""
    L, I = score.shape
    N = N if I >= N else 1  # a row narrower than N: unit by unit
    s, order = score.sort(dim=-1, descending=True, stable=True)
    nb = I // N
    blocks = s[:, :nb * N].reshape(L, nb, N).mean(-1).flatten()  # (L * nb,), row-major: ties keep a row's order
    chosen = blocks.argsort(descending=True, stable=True)[:min(round(n / N), L * nb)]
    counts = torch.bincount(chosen // nb, minlength=L) * N
    keep = torch.zeros_like(score)
    for row, k in enumerate(counts.tolist()):
        keep[row, order[row, :k]] = 1.0
    return keep


def _widths(D: int, N: int) -> list[int]:
    return sorted({*range(N, D + 1, N), D}) if D >= N else list(range(1, D + 1))  # allowed kept hidden widths


def _keep_hidden(gates, hidden: torch.Tensor, width: int) -> torch.Tensor:
    score = gates.hidden.rank() + 100.0 * hidden  # kept ones first (protected ones before them)
    keep = torch.zeros_like(hidden)
    keep[score.argsort(descending=True, stable=True)[:width]] = 1.0
    return keep


def _equal_groups(log_alpha: torch.Tensor, kept: torch.Tensor, G: int) -> torch.Tensor:
    """One layer's query heads (H,) with the same number g on every surviving K/V head: of every (groups k, g), the
    one that moves fewest heads from `kept` (then: closest in q, k, v, o weights, then more heads); each K/V head's g
    best heads, the k groups whose g best have the largest mean score."""
    score = (log_alpha + 100.0 * kept).view(-1, G)  # (Hkv, G), kept heads first
    s, order = score.sort(dim=-1, descending=True, stable=True)
    n_q, n_kv = int(kept.sum()), int((kept.view(-1, G).sum(-1) > 0).sum())
    best, best_key = torch.zeros_like(kept), None
    if n_q == 0:
        return best
    for g in range(1, G + 1):
        groups = s[:, :g].mean(-1).argsort(descending=True, stable=True)
        for k in range(1, len(groups) + 1):
            cand = torch.zeros_like(score)
            for grp in groups[:k].tolist():
                cand[grp, order[grp, :g]] = 1.0
            key = (int((cand.flatten() != kept).sum()), abs(k * g + k - n_q - n_kv), -k * g)
            if best_key is None or key < best_key:
                best, best_key = cand.flatten(), key
    return best


def rounded_start(gates, cfg: llama.LlamaConfig, N: int) -> Masks:
    """The reference rule's masks, rounded: equal groups per layer, the hidden width the nearest allowed one, each
    layer's FFN in blocks of N (as many channels in all as the rule keeps, to the nearest block)."""
    m = gates.deterministic()
    G = cfg.n_heads // cfg.n_kv_heads
    head = torch.stack([_equal_groups(la, h, G) for la, h in zip(gates.head.log_alpha.detach(), m.head)])
    kept = int(m.hidden.sum())
    width = min(_widths(cfg.dim, N), key=lambda w: (abs(w - kept), -w))
    score = gates.intermediate.log_alpha.detach() + 100.0 * m.intermediate
    return Masks(head, keep_blocks(score, int(m.intermediate.sum()), N), _keep_hidden(gates, m.hidden, width))


def rounded_masks(gates, cfg: llama.LlamaConfig, target: float, tol: float, N: int, sparsity,
                  fit_ffn) -> Masks | None:
    """nuteprune.final_masks in rounded units, or None when none reach the target. sparsity(m): the masks' exported
    sparsity (Eq. 3 on 0/1 masks); fit_ffn(m): m with the FFN blocks solved for the target. From the rounded reference
    rule the FFN blocks are solved for; a block of N channels can be coarser than the tolerance (or the FFN all kept or all
    pruned), so then whole K/V groups (after them hidden blocks) move, one way, the blocks solved again after each
    move (a group shifts the FFN's share by a fraction of a block); then, from the start, the other way."""
    def off(m):
        return sparsity(m) - target

    m = rounded_start(gates, cfg, N)
    if abs(off(m)) <= tol:
        return m
    start = fit_ffn(m)
    for prune in (off(start) < 0, off(start) >= 0):
        m = start
        for _ in range(cfg.n_layers * cfg.n_heads + cfg.dim):
            if abs(off(m)) <= tol:
                return m
            moved = _move_rounded_unit(gates, m, prune, cfg, N)
            if moved is m:  # nothing left to move this way
                break
            m = fit_ffn(moved)
    return None


def _move_rounded_unit(gates, m: Masks, prune: bool, cfg: llama.LlamaConfig, N: int) -> Masks:
    """nuteprune._move_one_unit in rounded units: one whole K/V group (its g query heads; g = all of the group's heads in a
    layer without attention), else the hidden width to the next allowed one."""
    G = cfg.n_heads // cfg.n_kv_heads
    la, kept = gates.head.log_alpha.detach().view(cfg.n_layers, -1, G), m.head.view(cfg.n_layers, -1, G)
    n = kept.sum(-1)  # (L, Hkv) query heads per K/V head
    g = n.max(-1).values.long()
    g = torch.where(g > 0, g, G)  # (L,) heads per surviving group
    if prune:  # the surviving group whose kept heads are least confident
        score = torch.where(n > 0, (la * kept).sum(-1) / n.clamp(min=1), torch.inf)
    else:  # the pruned group whose g best heads are most confident
        best = torch.stack([la[i].sort(-1, descending=True).values[:, :g[i]].mean(-1) for i in range(len(g))])
        score = torch.where(n == 0, -best, torch.inf)
    if torch.isfinite(score).any():
        layer, grp = divmod(int(score.flatten().argmin()), score.shape[1])
        head = m.head.clone().view(cfg.n_layers, -1, G)
        head[layer, grp] = 0.0
        if not prune:
            head[layer, grp, la[layer, grp].argsort(descending=True, stable=True)[:g[layer]]] = 1.0
        return replace(m, head=head.view_as(m.head))
    if gates.hidden.frozen:  # --keep-hidden
        return m
    widths, now = _widths(cfg.dim, N), int(m.hidden.sum())
    nxt = [w for w in widths if w < now][-1:] if prune else [w for w in widths if w > now][:1]
    return replace(m, hidden=_keep_hidden(gates, m.hidden, nxt[0])) if nxt else m


def unmet(m: Masks, cfg: llama.LlamaConfig, N: int) -> list[str]:
    """What of --round-to N the masks do not meet, one phrase each (empty: all met)."""
    unmet = []
    ffn = m.intermediate.sum(-1).long().tolist()
    bad = [(i, f) for i, f in enumerate(ffn) if f % N]
    if bad:
        unmet.append(f"FFN widths not multiples of {N}: " + ", ".join(f"layer {i} {f}" for i, f in bad))
    d = int(m.hidden.sum())
    if d < cfg.dim and d % N:
        unmet.append(f"hidden width {d} not a multiple of {N}")
    per_group = m.head.view(cfg.n_layers, cfg.n_kv_heads, -1).sum(-1)
    uneven = [i for i, row in enumerate(per_group) if len(set(row[row > 0].tolist())) > 1]
    if uneven:
        unmet.append("uneven query groups in layers " + ", ".join(map(str, uneven)))
    return unmet


def report(final: Masks, plain: Masks, cfg: llama.LlamaConfig, c, sparsity, ppl: dict) -> dict:
    """What --round-to N cost, against the final masks `plain` of N = 1 from the same trained gates: units moved per
    group, sparsity (Eq. 5, `sparsity`) and held-out perplexity (`ppl`) of both; and a warning naming what of N the
    final masks do not meet, and why."""
    missed = unmet(final, cfg, c.round_to)
    why = [f"the FFN ({cfg.ffn_dim} channels) is narrower than {c.round_to}"] * (cfg.ffn_dim < c.round_to)
    why += [f"the hidden width ({cfg.dim}) is narrower than {c.round_to}"] * (cfg.dim < c.round_to)
    if missed and not why:
        why = [f"no widths in multiples of {c.round_to} reach the target {c.target} within --tolerance "
               f"{c.tolerance}, so the final masks are not rounded (raise --tolerance or lower --round-to)"]
    return {"round_to": c.round_to,
            "units_moved": {g: int((getattr(final, g) != getattr(plain, g)).sum()) for g in llama.MASK_GROUPS},
            "sparsity_rounded": float(sparsity(final, cfg)), "sparsity_unrounded": float(sparsity(plain, cfg)), **ppl,
            "unmet": missed,
            "warning": f"--round-to {c.round_to} not met: {'; '.join(missed)} ({'; '.join(why)})" if missed else None}
