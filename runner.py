"""The run around the method: read the data, set up what a step computes with, run Algorithm 1 and post fine-tuning
with their checkpoints, export the pruned model and write the report. nuteprune.py (the method) hands itself in as
`m` (m.prune, m.end_pruning, m.finetune, ...), so that it imports nothing that imports it back; the hops from the
command to a step -> runner.run -> nuteprune.prune -> nuteprune.prune_step.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path

import torch

import checkpoint
import cli
import data
import distributed
import evaluate
import llama
import runfolder
import tokenization


def load_base(c, device: torch.device, dtype: torch.dtype,
              as_stored: bool = False) -> tuple[llama.Llama, tokenization.Tokenizer]:
    model, tok = checkpoint.load(c.ckpt, c.tokenizer, device, dtype, as_stored)
    if not model.config.uniform:
        raise ValueError(f"{c.ckpt} is already pruned (per-layer sizes); start from a dense checkpoint")
    if c.block_size > model.config.max_seq_len:
        raise ValueError(f"--block-size {c.block_size} exceeds the model's maximum length {model.config.max_seq_len}")
    model.gradient_checkpointing = device.type == "cuda" if c.grad_ckpt is None else c.grad_ckpt
    return model, tok


def unsharded_base(m, parts, st, ft_lora: dict | None = None, merge: bool = True) -> llama.Llama:
    """Under torchrun: the base reloaded whole on the CPU as stored (memory-mapped), with the pruning LoRA (and a
    fine-tuning LoRA). Only the weights under the pruning LoRA are converted to the run's dtype, for the merge of
    post fine-tuning; shard_model casts the rest layer by layer, the export tensor by tensor. merge=False: the
    pruning LoRA attached, nothing converted or merged (finetune_layer does it layer by layer as they are sharded)."""
    c, dtype = parts.c, cli.device_dtype(parts.c.device, parts.c.dtype)[1]
    model, _ = load_base(c, torch.device("cpu"), dtype, as_stored=True)
    if merge:
        cast_lora_targets(model, c, dtype)
    m.attach_lora(model, c, {"lora": st.prune_lora, "ft_lora": ft_lora if merge else None}, torch.Generator())
    return model


def finetune_layer(m, c, dtype: torch.dtype, generator: torch.Generator | None, ft_lora: dict | None = None):
    """shard_model's before_layer for a model with its pruning LoRA still attached: post fine-tuning's start
    (METHOD.md §7) on one layer, its q / v converted to the run's dtype, the pruning LoRA merged, the fine-tuning
    LoRA added (drawn from generator in start_finetune's order, or ft_lora's values). Each rank then converts and
    merges one layer at a time, not every q / v of the model at once (~12 GB per rank at 70B)."""
    def before(i: int, layer: torch.nn.Module):
        cast_lora_targets(layer, c, dtype)
        m.start_finetune_layer(layer, c, generator)
        if ft_lora is not None:
            prefix = f"model.layers.{i}."
            llama.load_lora_state(layer, {k[len(prefix):]: v for k, v in ft_lora.items() if k.startswith(prefix)})
    return before


def cast_lora_targets(model: llama.Llama, c, dtype: torch.dtype):
    """The frozen weights under the pruning LoRA converted to the run's dtype (the rest stays as stored), so that
    merging the LoRA into them (post fine-tuning) gives what a base loaded in dtype gives."""
    targets = set() if c.no_lora else set(c.lora_targets.split(","))
    for name, mod in model.named_modules():
        if name.rpartition(".")[2] in targets:
            distributed.cast_frozen_(mod, dtype)


def read_data(c, tok: tokenization.Tokenizer) -> tuple[torch.Tensor, torch.Tensor, list]:
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


def setup(m, c, saved: dict | None):
    """(m.Parts, the tokenizer, m.RunState), one model in memory: the frozen base, the gates, the student's LoRA (a
    teacher's is swapped in per step, METHOD.md §6); under torchrun, sharded across the ranks once the checkpoint's
    values are in."""
    device, dtype = cli.device_dtype(c.device, c.dtype)
    device = distributed.init(device)
    runfolder.seed_all(c.seed)
    rng = torch.Generator().manual_seed(c.seed)  # Parts.rng
    sharded = distributed.active()
    # Under torchrun the base stays as stored (memory-mapped) on the CPU: shard_model casts, moves and shards it layer
    # by layer. A run resumed in post fine-tuning merges its pruning LoRA at load: only the weights it merges into
    # are converted first (every rank converting the whole base held a full copy per rank: ~138 GB at 70B).
    model, tok = load_base(c, torch.device("cpu") if sharded else device, dtype, as_stored=sharded)
    if device.type == "cpu":
        cli.cpu_threads(llama.count_params(model))
    gates = m.Gates(model.config, rng, c.keep_hidden, c.lambda_2).to(device)  # initialised from the run's stream before LoRA
    in_finetune = saved is not None and saved["ft_lora"] is not None
    m.attach_lora(model, c, {**saved, "ft_lora": None} if sharded and in_finetune else saved, rng)
    if sharded:  # resumed in post fine-tuning: the merge, layer by layer as each is sharded (finetune_layer)
        distributed.shard_model(model, device, dtype, finetune_layer(m, c, dtype, torch.Generator(), saved["ft_lora"])
                                if in_finetune else None)
    st = m.RunState() if saved is None else m.RunState.from_saved(saved)
    lora_weights = list(llama.lora_state(model).values())
    optimizers = m.prune_optimizer(gates, lora_weights, c.lambda_optim) if st.phase == "prune" else \
        m.finetune_optimizer(lora_weights)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else nullcontext
    parts = m.Parts(model, gates, optimizers, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16), c,
                    autocast, rng)
    if saved is not None:
        runfolder.load_parts(parts, saved)
    return parts, tok, st


PROBE_BLOCKS = 8  # calibration blocks that measure the hidden states' massive dims


def check_activations(m, parts, blocks: torch.Tensor):
    """Before a new run, what reads the intact model's activations: the gates ordered by activation importance
    (--gate-init activation), the hidden dims of largest activation held at z = 1 (--keep-outliers), and one line when
    the model has massive activations while the paper's layer loss, which they dominate, is on (METHOD.md §2, §5)."""
    c = parts.c
    if c.gate_init == "activation":
        m.init_from_importance(parts.gates, m.activation_importance(parts.model, blocks[:PROBE_BLOCKS],
                                                                    c.micro_batch_size, parts.autocast))
    paper_layer_loss = c.layer_loss == "paper" and c.layer_weight > 0
    if not (c.keep_outliers or paper_layer_loss):
        return
    energy = m.hidden_energy(parts.model, blocks[:PROBE_BLOCKS], c.micro_batch_size, parts.autocast)
    k, share = m.massive_activations(energy)
    if paper_layer_loss and share > m.MASSIVE_SHARE and distributed.rank_id() == 0:
        print(f"note: {k} of {len(energy)} hidden dims hold {share:.0%} of the hidden states' squared norm (massive "
              f"activations): they dominate the paper's layer loss (Eq. 8), which then prunes them; --recipe modern "
              f"is made for such models (docs/METHOD.md §5)", flush=True)
    if c.keep_outliers:
        protected = torch.zeros(len(energy), dtype=torch.bool)
        protected[energy.topk(min(c.keep_outliers, len(energy))).indices] = True
        parts.gates.hidden.protect(protected)


def run(m, c, start: str = "new") -> dict | None:
    """start: new (OUT must not hold a run), resume (continue OUT's run from state.pt) or overwrite (start over).
    Under torchrun every rank runs this; rank 0 alone writes OUT and returns the report."""
    out = Path(c.out)
    saved = runfolder.load_state(out) if start == "resume" else None
    distributed.check_batch_sizes(batch_size=c.batch_size, ft_batch_size=c.ft_batch_size)  # before minutes of loading
    parts, tok, st = setup(m, c, saved)
    blocks, heldout, examples = read_data(c, tok)
    sched = m.Schedule.of(c, len(blocks), len(examples))
    with runfolder.open_run(out, st, saved, start, c) as (log, ckpt):
        if saved is None:
            st.ppl_before = evaluate.heldout_ppl(parts.model, heldout, c.micro_batch_size, autocast=parts.autocast)
            check_activations(m, parts, blocks)
        if st.phase == "prune":
            m.prune(parts, st, blocks, heldout, sched, log, ckpt)
            m.end_pruning(parts, st, heldout)
            parts = to_finetune(m, parts, st) if c.ft_data else parts
            ckpt.save(parts)
        if st.phase == "finetune":
            m.finetune(parts, st, examples, sched, max(tok.eos_id, 0), log, ckpt)
            st.phase = "done"
            ckpt.save(parts)
        model = model_to_export(m, parts, st)
        # Under torchrun rank 0 drops its shards and optimizer states here (export_and_report hands the memory back
        # before the report loads the whole pruned model onto its device). In one process `model` is the run's own.
        parts = replace(parts, model=model, optimizers=[])
        report = export_and_report(m, parts, st, out, tok, heldout) if model is not None else None
    distributed.wait_for_rank0()  # the other ranks stay alive while rank 0 exports (distributed.wait_for_rank0)
    return report


def release_device_memory(device: torch.device):
    """What Python has freed handed back by the CUDA caching allocator (the CPU's heap: malloc_trim)."""
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    distributed.release_freed_memory()


def to_finetune(m, parts, st):
    """Post fine-tuning's LoRA and optimizer (METHOD.md §7). The pruning LoRA is merged on whole tensors: under
    torchrun into the base reloaded on the CPU as stored (unsharded_base), layer by layer as each is cast and
    sharded (finetune_layer)."""
    if not distributed.active():
        m.start_finetune(parts.model, parts.c, parts.rng)
        return replace(parts, optimizers=m.finetune_optimizer(parts.lora_weights))
    model = unsharded_base(m, parts, st, merge=False)
    # The pruning model is not read again (its LoRA is in st.prune_lora): its shards and optimizer states go before
    # the new model is sharded, so a device never holds two sharded bases. parts is the caller's object.
    parts.model, parts.optimizers = None, []
    device, dtype = parts.gates.lambda_1.device, cli.device_dtype(parts.c.device, parts.c.dtype)[1]
    release_device_memory(device)
    distributed.shard_model(model, device, dtype, finetune_layer(m, parts.c, dtype, parts.rng))
    parts = replace(parts, model=model)
    return replace(parts, optimizers=m.finetune_optimizer(parts.lora_weights))


def model_to_export(m, parts, st) -> llama.Llama | None:
    """The model export prunes: the run's own, or under torchrun a whole copy on rank 0's CPU (the base reloaded,
    the run's LoRA gathered from the ranks into it); None on the other ranks."""
    if not distributed.active():
        return parts.model
    current = distributed.cpu_lora(parts.model, rank0_only=True)  # every rank takes part in the gather
    if distributed.rank_id() != 0:
        return None
    return unsharded_base(m, parts, st, ft_lora=current if parts.c.ft_data else None)


def export_and_report(m, parts, st, out: Path, tok: tokenization.Tokenizer,
                      heldout: torch.Tensor) -> dict:
    model, c = parts.model.eval(), parts.c
    device, dtype = cli.device_dtype(c.device, c.dtype)
    cfg_pruned = checkpoint.export_pruned(model, st.final, out / "pruned", tok, dtype=dtype)  # under torchrun: as stored
    params, prunable = llama.count_params(model), llama.prunable_tensors(model)
    model.to("meta")  # the dense model's memory goes before the pruned one loads (memory_plan.phase_plan: report)
    release_device_memory(device)
    pruned = checkpoint.load_model(out / "pruned", device, dtype)
    report = {
        "target": c.target,
        "sparsity": 1 - llama.prunable_tensors(pruned) / prunable,
        "sparsity_total": 1 - llama.count_params(pruned) / params,
        "expected_sparsity": m.expected_sparsity(parts.gates.prob_nonzero(), model.config).item(),
        "params_dense": params, "params_pruned": llama.count_params(pruned),
        "prunable_dense": prunable, "prunable_pruned": llama.prunable_tensors(pruned),
        "hidden": cfg_pruned.dim,  # kept hidden width, and per layer (the paper's Tables 11-12):
        "layers": [{"heads": h, "kv_heads": kv, "ffn": f}
                   for h, kv, f in zip(cfg_pruned.heads, cfg_pruned.kv_heads, cfg_pruned.ffn)],
        "heldout_tokens": heldout.numel(), "ppl_before": st.ppl_before,
        "ppl_after": evaluate.heldout_ppl(pruned, heldout, c.micro_batch_size, autocast=parts.autocast),
        "steps": st.step, "ft_steps": st.ft_step, "snapshots": len(st.snapshots), "stage2_start": st.stage2_start,
        "lambda_1": parts.gates.lambda_1.item(), "lambda_2": parts.gates.lambda_2.item(),
        **(st.fit or {}), "skipped_steps": st.skipped, "resumes": st.resumes, "wall_time_s": st.elapsed(),
        "args": asdict(c)}
    runfolder.write_report(out, report)
    return report
