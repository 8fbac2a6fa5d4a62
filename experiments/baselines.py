"""One-shot structured pruning baselines in NutePrune's own framework (issue 5).

Both prune the same structures as NutePrune (query heads, FFN channels, hidden dims) to the same prunable
sparsity, uniformly: every layer keeps the same fraction of its heads and channels, and the same fraction of hidden
dims is kept, chosen so that the exported model's prunable sparsity hits the target. Only which units are kept
differs:
  - magnitude: L2 norm of every weight that belongs to the unit (its rows and columns);
  - taylor: first-order Taylor importance of removing the unit on calibration data (LLM-Pruner's vector-wise
    criterion): |dL/dz| at z = 1, i.e. |sum_w w * dL/dw| over the unit's output weights, accumulated over batches.
  - minitron: activation importance on calibration data, as Minitron ranks width (Muralidharan et al. 2024, "Compact
    Language Models via Pruning and Knowledge Distillation"; NVIDIA Model Optimizer): a head by the L2 norm of its
    attention output, an FFN channel by |act(gate) * up|, a hidden dim by |RMSNorm output| summed over every norm
    that reads the residual stream, each averaged over the calibration tokens. Massive-activation dims rank first.
`finetune` is the "with tuning" row: LoRA (q, v) for an equal step budget, trained with next-token cross-entropy
(--loss ce) or on the dense model's logits (--loss kd: KL(dense || pruned) per token at temperature 1, Minitron's
logit distillation).

    python experiments/baselines.py --ckpt CKPT --data c4.jsonl --method taylor --target 0.5 --steps 300 \
        --batch-size 4 --block-size 128 --out OUT        # rerun the same command to continue an interrupted run

runs one baseline end to end on nuteprune.py's calibration blocks (the last --heldout-blocks held out) and writes
OUT/pruned/ (the exported model) and OUT/report.json (nuteprune.py's field names: sparsity, params, held-out
perplexity dense / one-shot / after LoRA, steps, tokens).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the project's modules
import llama  # noqa: E402


METHODS = ("magnitude", "taylor", "minitron")


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


SCORE_BLOCKS = 128  # calibration blocks behind the Taylor and activation scores: a fixed sample (seed 0), so the
# scores are too


def unit_scores(model: llama.Llama, method: str, blocks: torch.Tensor) -> llama.Masks:
    """Importance of every head, FFN channel and hidden dim by `method` (one of METHODS)."""
    if method == "magnitude":
        return unit_scores_magnitude(model)
    sample = blocks[torch.randperm(len(blocks), generator=torch.Generator().manual_seed(0))[:SCORE_BLOCKS]]
    if method == "taylor":
        return unit_scores_taylor(model, sample)
    if method == "minitron":  # nuteprune.py's --gate-init activation reads the same scores
        import nuteprune
        return nuteprune.activation_importance(model, sample, 8)
    raise ValueError(f"unknown baseline {method!r}; valid: {', '.join(METHODS)}")


def prune_masks(model: llama.Llama, method: str, target: float, blocks: torch.Tensor) -> llama.Masks:
    """0/1 masks of `method` ("magnitude" or "taylor") whose exported model has `target` prunable sparsity."""
    return masks_for_target(unit_scores(model, method, blocks), model, target)


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


def kept_prunable(masks: llama.Masks, cfg: llama.LlamaConfig) -> int:
    """Prunable weights (q, k, v, o, gate, up, down) of the model llama.prune_model makes from 0/1 masks, counted in
    integers from the masks alone (no pruned copy): a K/V head is kept while any query head of its group is."""
    d = int((masks.hidden != 0).sum())
    total = 0
    for i in range(cfg.n_layers):
        heads = (masks.head[i] != 0).nonzero().flatten().tolist()
        kv = len({cfg.kv_map[i][h] for h in heads})
        total += d * (2 * len(heads) + 2 * kv) * cfg.head_dim + 3 * d * int((masks.intermediate[i] != 0).sum())
    return total


def masks_for_target(scores: llama.Masks, model: llama.Llama, target: float) -> llama.Masks:
    """The uniform keep fraction whose exported model comes closest to `target` prunable sparsity."""
    cfg = model.config
    dense = llama.prunable_params(cfg)

    def sparsity(masks):
        return 1 - kept_prunable(masks, cfg) / dense

    # keep^2 ~ kept fraction (hidden dims times heads/channels); scan a fine grid around it for the closest
    centre = math.sqrt(1 - target)
    grid = [centre + d / 400 for d in range(-40, 41)]
    best = min(grid, key=lambda k: abs(sparsity(uniform_masks(scores, cfg, min(max(k, 0.01), 1.0))) - target))
    return uniform_masks(scores, cfg, min(max(best, 0.01), 1.0))


def kd_loss(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions at temperature 1, averaged over tokens (Minitron)."""
    logp, t_logp = (F.log_softmax(x.float().flatten(0, 1), -1) for x in (logits, teacher_logits))
    return F.kl_div(logp, t_logp, reduction="batchmean", log_target=True)


def finetune(model: llama.Llama, blocks: torch.Tensor, steps: int, batch_size: int = 16, lr: float = 1e-3,
             seed: int = 0, targets=("q_proj", "v_proj"), rank: int = 8, saved: dict | None = None,
             after_step: Callable[[int, Callable[[], dict]], bool] | None = None, teacher: llama.Llama | None = None,
             autocast: Callable = contextlib.nullcontext) -> llama.Llama | None:
    """Equal-budget LoRA recovery, lr decaying linearly to 0; returns the merged model. The loss: next-token
    cross-entropy, or with a teacher (the dense model) the KL of kd_loss on its logits.

    Seeded by its own generator (LoRA init and data order), not the global one: runs in parallel threads stay
    reproducible. Resumable: after every step `after_step(step, state)` may save `state()` (LoRA, optimizer,
    scheduler, generator, step) and return True to stop (finetune then returns None); `saved` continues from one."""
    g = torch.Generator().manual_seed(seed)
    llama.add_lora(model, targets=targets, rank=rank, alpha=float(rank))
    for m in llama.lora_modules(model).values():  # re-draw A as nn.Linear's init does, from g
        bound = 1 / math.sqrt(m.in_features)
        with torch.no_grad():
            m.lora_a.copy_(torch.rand(m.lora_a.shape, generator=g) * 2 * bound - bound)
    params = list(llama.lora_state(model).values())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    if saved is not None:
        llama.load_lora_state(model, saved["lora"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        g.set_state(saved["generator"])
    model.train()
    for step in range(0 if saved is None else saved["step"], steps):
        x = blocks[torch.randint(len(blocks), (batch_size,), generator=g)]
        with autocast():
            if teacher is None:
                loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1).float(), x[:, 1:].flatten())
            else:
                with torch.no_grad():
                    t_logits = teacher(x)
                loss = kd_loss(model(x), t_logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        state = lambda: {"step": step + 1, "loss": loss.item(), "optimizer": opt.state_dict(),  # noqa: B023, E731
                         "scheduler": sched.state_dict(), "generator": g.get_state(),
                         "lora": {k: v.detach().clone() for k, v in llama.lora_state(model).items()}}
        if after_step is not None and after_step(step + 1, state):
            return None
    return llama.merge_lora(model.eval())

# -----------------------------------------------------------------------------
# the command: one baseline end to end (scores, masks, LoRA recovery, export, report), resumable. experiments/
# smollm2.py runs it as a subprocess beside `nuteprune.py`, on the same calibration blocks and step budget.


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="One-shot structured pruning (magnitude or first-order Taylor) to a "
                                "target sparsity, then LoRA recovery on the calibration blocks. Rerun the same "
                                "command to continue an interrupted run (SIGTERM / Ctrl-C save a checkpoint).")
    p.add_argument("--ckpt", required=True, help="dense checkpoint (anything checkpoint.load reads, .gguf too)")
    p.add_argument("--tokenizer", help="default: beside --ckpt, or inside a .gguf")
    p.add_argument("--data", required=True, help="calibration text, read as nuteprune.py reads --data")
    p.add_argument("--out", required=True, help="state.pt, log.jsonl, report.json and pruned/ go here")
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--target", type=float, required=True, help="prunable sparsity of the exported model")
    p.add_argument("--seed", type=int, default=0, help="LoRA initialisation and data order")
    p.add_argument("--steps", type=int, required=True, help="LoRA optimizer steps (0: one-shot, no tuning)")
    p.add_argument("--batch-size", type=int, default=16, help="blocks per LoRA step")
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--n-docs", type=int, default=20000)
    p.add_argument("--heldout-blocks", type=int, default=16, help="the last blocks of --data, never trained on")
    p.add_argument("--lr", type=float, default=1e-3, help="LoRA learning rate, decays linearly to 0")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-targets", default="q_proj,v_proj")
    p.add_argument("--loss", choices=("ce", "kd"), default="ce", help="LoRA loss: next-token cross-entropy, or KL on "
                   "the dense model's logits (Minitron's distillation)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="base weights and autocast (as "
                   "nuteprune.py --dtype; LoRA stays fp32); bf16 is ~2x faster on CPUs with AMX")
    p.add_argument("--save-every", type=int, default=50, help="LoRA steps between checkpoints")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--cache-dir", help="token cache (as nuteprune.py's)")
    p.add_argument("--scores", help="cache file of the unit scores (shared by the targets of one method)")
    return p


RESULT_FREE = ("out", "save_every", "log_every", "cache_dir", "scores")  # flags that do not change the result


def read_blocks(a: argparse.Namespace, tok) -> tuple[torch.Tensor, torch.Tensor]:
    """(training blocks, held-out blocks) as nuteprune.py splits --data without --heldout."""
    import data
    blocks = data.calibration_blocks(a.data, tok, a.n_docs, a.block_size, a.cache_dir)
    n = len(blocks) - a.heldout_blocks
    if n < a.batch_size:
        raise ValueError(f"{a.data}: {n} training blocks of {a.block_size} tokens, fewer than --batch-size "
                         f"{a.batch_size}")
    return blocks[:n], blocks[n:]


def cached_scores(a: argparse.Namespace, model: llama.Llama, blocks: torch.Tensor) -> llama.Masks:
    key = {k: getattr(a, k) for k in ("method", "ckpt", "data", "n_docs", "block_size", "heldout_blocks")}
    path = Path(a.scores) if a.scores else None
    if path is not None and path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved["key"] == key:
            return llama.Masks(**saved["scores"])
    scores = unit_scores(model, a.method, blocks)
    if path is not None:
        import checkpoint
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"key": key, "scores": {g: getattr(scores, g) for g in llama.MASK_GROUPS}}
        checkpoint.atomic_write(path, lambda p: torch.save(record, p))
    return scores


def heldout_ppl(model: llama.Llama, heldout: torch.Tensor) -> float | None:
    import evaluate
    return evaluate.heldout_ppl(model, heldout, 4)


def one_shot(a: argparse.Namespace, model: llama.Llama, blocks, heldout) -> tuple[dict, llama.Llama]:
    """The one-shot part of a run, what state.pt keeps beside the LoRA (masks, perplexities), and the pruned model."""
    t0 = time.time()
    ppl_before = heldout_ppl(model, heldout)
    masks = masks_for_target(cached_scores(a, model, blocks), model, a.target)
    pruned = llama.prune_model(model, masks)
    return {"masks": {g: getattr(masks, g) for g in llama.MASK_GROUPS}, "ppl_before": ppl_before,
            "ppl_oneshot": heldout_ppl(pruned, heldout), "wall": time.time() - t0,
            "score_tokens": 0 if a.method == "magnitude" else min(SCORE_BLOCKS, len(blocks)) * blocks.shape[1]}, pruned


def checkpointer(a: argparse.Namespace, out: Path, config: dict, one: dict, signals, log, t0: float):
    """finetune's after_step: a log line every --log-every steps, state.pt every --save-every steps and when a
    signal asked to stop (then True: stop)."""
    def after_step(step: int, state) -> bool:
        stop = signals.requested is not None
        if step % a.log_every == 0 or step == a.steps or stop:
            s = state()
            log.write(json.dumps({"phase": "lora", "step": step, "loss": s["loss"]}) + "\n")
            log.flush()
        if stop or (step % a.save_every == 0 and step < a.steps):
            import checkpoint
            record = {"config": config, "oneshot": one, "lora": state(), "wall": one["wall"] + time.time() - t0}
            checkpoint.atomic_write(out / "state.pt", lambda p: torch.save(record, p))
        return stop
    return after_step


def run_report(a: argparse.Namespace, dense: llama.LlamaConfig, pruned: llama.LlamaConfig, one: dict,
               heldout: torch.Tensor, ppl_after: float | None, wall: float) -> dict:
    """report.json, with nuteprune.py's field names where they mean the same thing."""
    m, mp = llama.prunable_params(dense), llama.prunable_params(pruned)
    return {"method": a.method, "target": a.target, "seed": a.seed, "sparsity": 1 - mp / m,
            "sparsity_total": 1 - llama.count_params(pruned) / llama.count_params(dense),
            "params_dense": llama.count_params(dense), "params_pruned": llama.count_params(pruned),
            "prunable_dense": m, "prunable_pruned": mp, "hidden": pruned.dim,
            "layers": [{"heads": h, "kv_heads": kv, "ffn": f} for h, kv, f in
                       zip(pruned.heads, pruned.kv_heads, pruned.ffn)],
            "heldout_tokens": heldout.numel(), "ppl_before": one["ppl_before"], "ppl_oneshot": one["ppl_oneshot"],
            "ppl_after": ppl_after, "steps": a.steps, "tokens": a.steps * a.batch_size * a.block_size,
            "score_tokens": one["score_tokens"], "wall_time_s": wall, "args": vars(a)}


def run(a: argparse.Namespace) -> dict | None:
    """The run in --out, started or continued; its report, or None if a signal stopped it (state.pt saved)."""
    import checkpoint
    import cli
    import runfolder
    out = Path(a.out)
    if (out / "report.json").is_file():
        return json.loads((out / "report.json").read_text())
    t0 = time.time()
    config = {k: v for k, v in vars(a).items() if k not in RESULT_FREE}
    saved = torch.load(out / "state.pt", weights_only=True) if (out / "state.pt").is_file() else None
    if saved is not None and saved["config"] != config:
        diff = {k: (saved["config"].get(k), v) for k, v in config.items() if saved["config"].get(k) != v}
        raise ValueError(f"{out} holds a run made with other flags ({diff}: saved, given); use another --out")
    dtype = llama.parse_dtype(a.dtype, "cpu")
    model, tok = checkpoint.load(a.ckpt, a.tokenizer, dtype=dtype)
    autocast = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype != torch.float32 else contextlib.nullcontext
    cli.cpu_threads(llama.count_params(model))  # nuteprune.py's rule: one thread below 100M parameters
    blocks, heldout = read_blocks(a, tok)
    with autocast():
        if saved is None:
            one, pruned = one_shot(a, model, blocks, heldout)
        else:
            one, pruned = saved["oneshot"], llama.prune_model(model, llama.Masks(**saved["oneshot"]["masks"]))
    dense, teacher = model.config, (model.eval() if a.loss == "kd" else None)
    model = None
    out.mkdir(parents=True, exist_ok=True)
    runfolder.truncate_log(out / "log.jsonl", saved["lora"]["step"] if saved else 0, 0)
    with runfolder.StopSignals() as signals, open(out / "log.jsonl", "a") as log:
        after = checkpointer(a, out, config, one, signals, log, t0 - (saved["wall"] - one["wall"] if saved else 0))
        merged = pruned if a.steps == 0 else finetune(
            pruned, blocks, a.steps, a.batch_size, a.lr, a.seed, a.lora_targets.split(","), a.lora_rank,
            saved=saved["lora"] if saved else None, after_step=after, teacher=teacher, autocast=autocast)
    if merged is None:
        return None
    checkpoint.save_model(merged, out / "pruned", tok)
    wall = one["wall"] + time.time() - t0 + (saved["wall"] - one["wall"] if saved else 0)
    with autocast():
        rep = run_report(a, dense, merged.config, one, heldout, heldout_ppl(merged.eval(), heldout), wall)
    checkpoint.atomic_write(out / "report.json", lambda p: p.write_text(json.dumps(rep, indent=2)))
    return rep


def main(argv=None):
    a = build_parser().parse_args(argv)
    try:
        if not 0 < a.target < 1 or a.steps < 0:
            raise ValueError(f"--target must lie in (0, 1) and --steps be at least 0, got {a.target}, {a.steps}")
        rep = run(a)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if rep is None:
        print(f"stopped after a checkpoint; rerun the same command to continue ({a.out}/state.pt)", file=sys.stderr)
        sys.exit(130)
    print(f"{a.method} {a.target}: sparsity {rep['sparsity']:.4f}; held-out PPL dense {rep['ppl_before']}, "
          f"one-shot {rep['ppl_oneshot']}, after {rep['steps']} LoRA steps {rep['ppl_after']}")


if __name__ == "__main__":
    main()
