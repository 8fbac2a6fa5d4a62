"""`python nuteprune.py --plan`: a run's size and the memory of one device, from the checkpoint's config alone (no
weights read). memory_plan() counts, tensor by tensor, what nuteprune.py keeps alive at the moments where a pruning
step peaks (bench/README.md derives each term; bench/memory_model.py and bench/fsdp_memory.py check it against
measurements, bench/plan_table.py prints it for public models).
"""
from __future__ import annotations

from typing import Callable

import torch

import cli
import checkpoint
import data
import llama

GB = 1e9


def lora_param_count(cfg: llama.LlamaConfig, targets, lora_rank: int) -> int:
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    io = {"q_proj": (cfg.dim, q), "k_proj": (cfg.dim, kv), "v_proj": (cfg.dim, kv), "o_proj": (q, cfg.dim),
          "gate_proj": (cfg.dim, cfg.ffn_dim), "up_proj": (cfg.dim, cfg.ffn_dim), "down_proj": (cfg.ffn_dim, cfg.dim)}
    return cfg.n_layers * sum(lora_rank * (io[t][0] + io[t][1]) for t in targets)  # A (r, in) + B (out, r)


def gate_param_count(cfg: llama.LlamaConfig) -> int:
    return cfg.n_layers * cfg.n_heads + cfg.n_layers * cfg.ffn_dim + cfg.dim  # log_alpha of head, intermediate, hidden


def snapshot_bytes(cfg: llama.LlamaConfig, targets, lora_rank: int) -> int:
    """One teacher: fp32 deterministic masks [L, H], [L, I], [D] and fp32 copies of the LoRA tensors."""
    return 4 * (gate_param_count(cfg) + lora_param_count(cfg, targets, lora_rank))


def layer_params(cfg: llama.LlamaConfig) -> tuple[int, int]:
    """Weights of one decoder layer, and of the root (embeddings, LM head unless tied, final norm)."""
    D, qkv = cfg.dim, (2 * cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
    return D * qkv + 3 * D * cfg.ffn_dim + 2 * D, cfg.vocab_size * D * (1 if cfg.tie_embeddings else 2) + D


def static_bytes(cfg: llama.LlamaConfig, b: int, targets, lora_rank: int, distill: str, world: int) -> dict[str, float]:
    """What lives on a device for the whole step. Under FSDP the base and LoRA (with its gradient and moments) are
    sharded over the ranks, and the unit being computed is gathered whole: one decoder layer, the next one
    prefetched, and the root (embeddings, final norm, LM head), held through the forward."""
    n_lora, n_gate = lora_param_count(cfg, targets, lora_rank), gate_param_count(cfg)
    out = {"base weights": llama.count_params(cfg) * b / world,
           "LoRA (+grad, AdamW)": 16 * n_lora / world,  # fp32 param, grad, exp_avg, exp_avg_sq
           # fp32 log_alpha, grad, 2 moments; the step's z sample, its leaf copy and that copy's grad (replicated)
           "log_alpha (+grad, AdamW, z)": 28 * n_gate,
           # each LoRA module's frozen teacher slot (fp32, whole on every rank); pkd: the teacher's masks
           "teacher slot": 4 * n_lora + (4 * n_gate if distill == "pkd" else 0)}
    if world > 1:
        layer, root = layer_params(cfg)
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


def memory_plan(cfg: llama.LlamaConfig, dtype_bytes: int = 2, lora_targets=("q_proj", "v_proj"), lora_rank: int = 8,
                n_snapshots: int = 40, micro_batch: int = 4, seq_len: int = 512, grad_ckpt: bool = True,
                layer_loss: bool = True, distill: str = "pkd", world: int = 1) -> dict:
    """Peak memory of one device in one pruning step, by component, in GB (1e9 bytes): what this code keeps alive,
    tensor by tensor. 'device total' is the sum at the peak moment; 'snapshots (CPU)' lives apart from it."""
    if distill not in ("none", "kd", "pkd"):
        raise ValueError(f"distill must be none, kd or pkd, got {distill!r}")
    static = static_bytes(cfg, dtype_bytes, lora_targets, lora_rank, distill, world)
    moments = activation_moments(cfg, dtype_bytes, micro_batch, seq_len, grad_ckpt, layer_loss, distill)
    peak = max(moments, key=lambda k: sum(moments[k].values()))
    out = {k: v / GB for k, v in {**static, **moments[peak]}.items()}
    out["device total"] = sum(out.values())
    out["snapshots (CPU)"] = n_snapshots * snapshot_bytes(cfg, lora_targets, lora_rank) / GB if distill == "pkd" else 0.0
    out["peak moment"] = peak
    return out


def merge_bytes(cfg: llama.LlamaConfig, dtype_bytes: int, lora_targets) -> float:
    """The weights under the pruning LoRA, converted to the run's dtype to merge it (runner.cast_lora_targets)."""
    io = {"q_proj": cfg.n_heads * cfg.head_dim, "k_proj": cfg.n_kv_heads * cfg.head_dim,
          "v_proj": cfg.n_kv_heads * cfg.head_dim, "o_proj": cfg.dim, "gate_proj": cfg.ffn_dim,
          "up_proj": cfg.ffn_dim, "down_proj": cfg.dim}
    return cfg.n_layers * cfg.dim * sum(io[t] for t in lora_targets) * dtype_bytes


def host_plan(cfg: llama.LlamaConfig, dtype_bytes: int, world: int, lora_targets=("q_proj", "v_proj"),
              lora_rank: int = 8, n_snapshots: int = 40, distill: str = "pkd", device: str = "cuda",
              ranks_per_node: int = 8, shard_bytes: int = checkpoint.SHARD_BYTES) -> dict[str, float]:
    """Host RAM of one node, GB, in the three phases that hold the most, counting tensors only (not each process's
    runtime, e.g. ~0.1 GB for torch on the CPU, more with CUDA; not the checkpoint's page cache, which is shared and
    reclaimable). The base is read as stored (memory-mapped) and converted piece by piece (docs/scaling.md, host
    memory):
      load, per rank: one converted layer and the root converted whole before they are sharded (in one process the
        weights go straight to the device), and with --device cpu the rank's shards themselves;
      train, per rank: the snapshot teachers (CPU), and with --device cpu the step's memory (the device plan);
      export, rank 0: the weights under the pruning LoRA converted to merge it, one layer's weights in fp32 twice
        (read, then pruned) and a safetensors shard held and serialised (2 x at most shard_bytes)."""
    layer, root = layer_params(cfg)
    on_node = min(world, ranks_per_node)
    shards = llama.count_params(cfg) * dtype_bytes / world if device == "cpu" else 0.0
    load = (layer + root) * dtype_bytes if world > 1 else 0.0
    snaps = n_snapshots * snapshot_bytes(cfg, lora_targets, lora_rank) if distill == "pkd" else 0.0
    merged = merge_bytes(cfg, dtype_bytes, lora_targets) if world > 1 else 0.0
    pruned_bytes = llama.count_params(cfg) * dtype_bytes  # at most the dense size
    return {"load": on_node * (load + shards) / GB, "train (snapshots)": on_node * (snaps + shards) / GB,
            "export (rank 0)": (merged + 8 * layer + 2 * min(shard_bytes, pruned_bytes)) / GB}


def phase_plan(cfg: llama.LlamaConfig, b: int, world: int, c, grad_ckpt: bool, pruning: dict,
               host: dict) -> dict[str, tuple[float, float]]:
    """(GB per device, host GB per node) in each phase of a run, from the first load to report.json. pruning: the
    step's plan (memory_plan), host: host_plan's. What each phase holds on the device:
      load: the base (its shard per rank); pruning: the step's peak (memory_plan), the snapshot teachers on the host;
      switch to post fine-tuning (--ft-data): the pruning model's static memory until its shards are freed, before
        the reloaded base is sharded; on the host each rank converts one layer's q/v at a time to merge the pruning
        LoRA, as the layer is sharded;
      post fine-tuning: the plan of a step with LoRA on --ft-lora-targets, the LM loss alone; resumed there, the
        load's host memory and one layer's merge per rank (bench/host_memory.py measures it);
      export (rank 0): on the CPU, the shards freed first; the device holds the gates alone (one process: its model);
      report (rank 0): the run's model freed, the pruned model whole on rank 0's device for the held-out perplexity,
        and its logits."""
    gb = 1 / GB
    base = llama.count_params(cfg) * b / world * gb
    targets = tuple(c.lora_targets.split(",")) if not c.no_lora else ()
    out = {"load": (base, host["load"]), "pruning": (pruning["device total"], host["train (snapshots)"])}
    on_node = min(world, 8)
    static = sum(v for k, v in pruning.items() if not k.startswith("activations") and k not in
                 ("device total", "snapshots (CPU)", "peak moment"))
    if c.ft_data:  # one process merges in place, on the device; ranks one layer at a time (runner.finetune_layer)
        # + the fine-tuning LoRA (fp32), made whole on each rank's host before its layer is sharded
        ft_lora = 4 * lora_param_count(cfg, c.ft_lora_targets.split(","), c.lora_rank)
        merged = (merge_bytes(cfg, b, targets) / cfg.n_layers + ft_lora) * gb if world > 1 else 0.0
        out["switch to post fine-tuning"] = (static, host["train (snapshots)"] + on_node * merged)
        ft = memory_plan(cfg, b, tuple(c.ft_lora_targets.split(",")), c.lora_rank, 0, min(c.micro_batch_size,
                         max(c.ft_batch_size // world, 1)), c.ft_max_len, grad_ckpt, False, "none", world)
        out["post fine-tuning"] = (ft["device total"], host["train (snapshots)"])
        # a run resumed in post fine-tuning: the load, and each rank's q/v converted to merge the pruning LoRA
        out["resume in post fine-tuning"] = (ft["device total"], host["load"] + on_node * merged)
    held = 4 * gate_param_count(cfg) * gb if world > 1 else static  # one process exports its own model
    out["export (rank 0)"] = (held, host["export (rank 0)"])
    _, root = layer_params(cfg)
    kept = (llama.count_params(cfg) - root) * (1 - c.target) + root  # the pruned model, at most
    logits = min(c.micro_batch_size, c.batch_size) * c.block_size * cfg.vocab_size * (b + 8)  # + fp32 log_softmax
    out["report (rank 0)"] = ((4 * gate_param_count(cfg) + kept * b + logits) * gb, 0.0)  # the run's model freed
    return out


def plan(c, schedule: Callable[[int], object], worlds=(1, 2, 4, 8)) -> dict:
    """`--plan`: the run's steps and snapshots, and memory per device for each world size, from the config alone.
    c is the run's nuteprune.RunConfig, schedule(n_blocks) its nuteprune.Schedule for that many training blocks."""
    cfg = checkpoint.check_checkpoint(c.ckpt, weights=False)
    if cfg is None:
        raise ValueError(f"--plan needs a config.json (HF layout); {c.ckpt} has none")
    device, dtype = cli.device_dtype(c.device, c.dtype)
    b = torch.finfo(dtype).bits // 8
    with torch.device("meta"):
        model = llama.Llama(cfg)  # the meta model: its parameter count is the plan's
    n_blocks = PLAN_BLOCKS if c.data is None else len(data.calibration_blocks(c.data, checkpoint.find_tokenizer(
        c.ckpt, c.tokenizer), c.n_docs, c.block_size, c.cache_dir))
    sched = schedule(n_blocks - (0 if c.heldout else c.heldout_blocks))
    grad_ckpt = device.type == "cuda" if c.grad_ckpt is None else c.grad_ckpt
    rows = {w: memory_plan(cfg, b, tuple(c.lora_targets.split(",")) if not c.no_lora else (), c.lora_rank,
                           sched.n_levels, min(c.micro_batch_size, c.batch_size // w), c.block_size, grad_ckpt,
                           c.layer_weight > 0, c.distill, w) for w in worlds}
    host = {w: host_plan(cfg, b, w, tuple(c.lora_targets.split(",")) if not c.no_lora else (), c.lora_rank,
                         sched.n_levels, c.distill, "cpu" if c.device == "cpu" else "cuda") for w in worlds}
    phases = {w: phase_plan(cfg, b, w, c, grad_ckpt, rows[w], host[w]) for w in worlds}
    report = {"params": llama.count_params(model), "steps": sched.total_steps, "blocks": n_blocks,
              "blocks_assumed": c.data is None, "snapshots": sched.n_levels if c.distill == "pkd" else 0,
              "dtype": str(dtype).removeprefix("torch."), "grad_ckpt": grad_ckpt, "per_device_gb": rows,
              "host_gb_per_node": host, "phases": phases,
              "peak_per_device_gb": {w: max(d for d, _ in phases[w].values()) for w in worlds}}
    print_plan(c, report)
    return report


PLAN_BLOCKS = 17_500  # without --data: 20,000 C4 documents are ~9M LLaMA tokens, ~17,500 blocks of 512


def print_plan(c, r: dict):
    note = f" (assumed: {PLAN_BLOCKS} blocks; give --data to count)" if r["blocks_assumed"] else ""
    print(f"{c.ckpt}: {r['params'] / 1e9:.2f}B parameters; {r['steps']} pruning steps of {c.batch_size} x "
          f"{c.block_size} tokens over {r['blocks']} blocks{note}; {r['snapshots']} snapshot teachers; "
          f"{r['dtype']} base, gradient checkpointing {'on' if r['grad_ckpt'] else 'off'}")
    rows = r["per_device_gb"]
    comps = [k for k in dict.fromkeys(k for row in reversed(rows.values()) for k in row) if k != "peak moment"]
    print(f"{'GB per device':<40}" + "".join(f"{f'{w} GPU' + ('s' if w > 1 else ''):>10}" for w in rows))
    for k in comps:
        print(f"{k:<40}" + "".join(f"{row.get(k, 0.0):10.2f}" for row in rows.values()))
    host = r["host_gb_per_node"]
    print(f"{'host RAM per node, GB (tensors; 8 ranks a node' + (', CPU ranks' if c.device == 'cpu' else '') + ')':<40}")
    for k in next(iter(host.values())):
        print(f"  {k:<38}" + "".join(f"{row[k]:10.2f}" for row in host.values()))
    phases = r["phases"]
    print(f"{'by phase: GB per device / host GB per node':<40}")
    for k in next(iter(phases.values())):
        print(f"  {k:<38}" + "".join(f"{f'{row[k][0]:.1f} / {row[k][1]:.1f}':>14}" for row in phases.values()))
    peak = r["peak_per_device_gb"]
    print(f"{'peak per device, any phase':<40}" + "".join(f"{peak[w]:10.2f}" for w in peak))
    print("fits " + "; ".join(f"{card} GB: " + (", ".join(f"{w}" for w in peak if peak[w] <= card * 0.95) or "none")
                             for card in (80, 40, 24)) + " (GPUs, every phase; 5% kept free)")
