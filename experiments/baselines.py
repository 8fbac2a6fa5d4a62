"""One-shot structured pruning baselines in NutePrune's own framework (issue 5).

Both prune the same structures as NutePrune (query heads, FFN channels, hidden dims) to the same prunable
sparsity, uniformly: every layer keeps the same fraction of its heads and channels, and the same fraction of hidden
dims is kept, chosen so that the exported model's prunable sparsity hits the target. Only which units are kept
differs:
  - magnitude: L2 norm of every weight that belongs to the unit (its rows and columns);
  - taylor: first-order Taylor importance of removing the unit on calibration data (LLM-Pruner's vector-wise
    criterion): |dL/dz| at z = 1, i.e. |sum_w w * dL/dw| over the unit's output weights, accumulated over batches.
`finetune` is the "with tuning" row: LoRA (q, v) trained with next-token cross-entropy for an equal step budget.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import llama


def unit_scores_magnitude(model: llama.Llama) -> llama.Masks:
    cfg = model.config
    dh = cfg.head_dim
    head = torch.zeros(cfg.n_layers, cfg.n_heads)
    inter = torch.zeros(cfg.n_layers, cfg.ffn_dim)
    hidden = model.model.embed_tokens.weight.float().pow(2).sum(0)  # (D,)
    for i, layer in enumerate(model.model.layers):
        a, m = layer.self_attn, layer.mlp
        q = a.q_proj.weight.float().view(cfg.n_heads, dh, cfg.dim).pow(2).sum((1, 2))
        o = a.o_proj.weight.float().view(cfg.dim, cfg.n_heads, dh).pow(2).sum((0, 2))
        head[i] = (q + o).sqrt()
        inter[i] = (m.gate_proj.weight.float().pow(2).sum(1) + m.up_proj.weight.float().pow(2).sum(1)
                    + m.down_proj.weight.float().pow(2).sum(0)).sqrt()
        for lin in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):  # columns read hidden dims
            hidden += lin.weight.float().pow(2).sum(0)
        for lin in (a.o_proj, m.down_proj):  # rows write hidden dims
            hidden += lin.weight.float().pow(2).sum(1)
    return llama.Masks(head, inter, hidden.sqrt())


def unit_scores_taylor(model: llama.Llama, blocks: torch.Tensor, batch_size: int = 8) -> llama.Masks:
    """|dL/dz| at z = 1 for every gate, with L the next-token cross-entropy summed over calibration batches."""
    cfg = model.config
    z = llama.Masks(torch.ones(cfg.n_layers, cfg.n_heads, requires_grad=True),
                    torch.ones(cfg.n_layers, cfg.ffn_dim, requires_grad=True),
                    torch.ones(cfg.dim, requires_grad=True))
    grads = [torch.zeros_like(t) for t in (z.head, z.intermediate, z.hidden)]
    for b in range(0, len(blocks), batch_size):
        x = blocks[b:b + batch_size]
        logits = model(x[:, :-1], z)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
        g = torch.autograd.grad(loss, [z.head, z.intermediate, z.hidden])
        for acc, gi in zip(grads, g):
            acc += gi
    return llama.Masks(*(g.abs() for g in grads))


TAYLOR_BLOCKS = 128  # calibration blocks behind the Taylor scores: a fixed sample (seed 0), so the scores are too


def prune_masks(model: llama.Llama, method: str, target: float, blocks: torch.Tensor) -> llama.Masks:
    """0/1 masks of `method` ("magnitude" or "taylor") whose exported model has `target` prunable sparsity."""
    if method == "magnitude":
        scores = unit_scores_magnitude(model)
    elif method == "taylor":
        sample = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(0))[:TAYLOR_BLOCKS]
        scores = unit_scores_taylor(model, blocks[sample])
    else:
        raise ValueError(f"unknown baseline {method!r}; valid: magnitude, taylor")
    return masks_for_target(scores, model, target)


def _keep_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros_like(scores)
    mask[scores.topk(k).indices] = 1.0
    return mask


def uniform_masks(scores: llama.Masks, cfg: llama.LlamaConfig, keep: float) -> llama.Masks:
    """Keep the top `keep` fraction of heads and channels in every layer and of hidden dims."""
    kh = max(1, round(keep * cfg.n_heads))
    ki = max(1, round(keep * cfg.ffn_dim))
    kd = max(1, round(keep * cfg.dim))
    return llama.Masks(torch.stack([_keep_top(s, kh) for s in scores.head]),
                       torch.stack([_keep_top(s, ki) for s in scores.intermediate]),
                       _keep_top(scores.hidden, kd))


def masks_for_target(scores: llama.Masks, model: llama.Llama, target: float) -> llama.Masks:
    """The uniform keep fraction whose exported model comes closest to `target` prunable sparsity."""
    cfg = model.config
    dense = llama.prunable_params(cfg)

    def sparsity(masks):
        return 1 - llama.prunable_params(llama.prune_model(model, masks).config) / dense

    # keep^2 ~ kept fraction (hidden dims times heads/channels); scan a fine grid around it for the closest
    centre = math.sqrt(1 - target)
    grid = [centre + d / 400 for d in range(-40, 41)]
    best = min(grid, key=lambda k: abs(sparsity(uniform_masks(scores, cfg, min(max(k, 0.01), 1.0))) - target))
    return uniform_masks(scores, cfg, min(max(best, 0.01), 1.0))


def finetune(model: llama.Llama, blocks: torch.Tensor, steps: int, batch_size: int = 16, lr: float = 1e-3,
             seed: int = 0, targets=("q_proj", "v_proj"), rank: int = 8) -> llama.Llama:
    """Equal-budget LoRA recovery: next-token cross-entropy, lr decaying linearly to 0; returns the merged model.

    Seeded by its own generator (LoRA init and data order), not the global one: runs in parallel threads stay
    reproducible."""
    g = torch.Generator().manual_seed(seed)
    llama.add_lora(model, targets=targets, rank=rank, alpha=float(rank))
    for m in llama.lora_modules(model).values():  # re-draw A as nn.Linear's init does, from g
        bound = 1 / math.sqrt(m.in_features)
        with torch.no_grad():
            m.lora_a.copy_(torch.rand(m.lora_a.shape, generator=g) * 2 * bound - bound)
    params = list(llama.lora_state(model).values())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    model.train()
    for _ in range(steps):
        x = blocks[torch.randint(len(blocks), (batch_size,), generator=g)]
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1).float(), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    return llama.merge_lora(model.eval())
