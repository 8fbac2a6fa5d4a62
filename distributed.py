"""Scale-out: `torchrun --nproc-per-node N nuteprune.py ...` runs one process per device. FSDP2 (`fully_shard`) shards
the frozen base and LoRA per decoder layer and averages LoRA's gradients; the gates are small and replicated, drawn
alike on every rank (same seed), their gradients averaged here. Each rank takes its share of every batch.
Without torchrun (WORLD_SIZE unset or 1) none of this runs and torch.distributed is never initialised: every function
below is then the identity (or 1, or 0).
"""
from __future__ import annotations

import ctypes
import datetime
import os

import torch
import torch.distributed as dist

import llama


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank_id() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


FORCE = "NUTEPRUNE_FSDP"  # =1 under a one-rank torchrun: shard with FSDP2 all the same (bench/gpu_check.py)
WAIT_TIMEOUT = datetime.timedelta(hours=24)  # how long the other ranks wait for rank 0's export and report
_waiting = None  # the gloo group they wait in (init)


def active() -> bool:
    """True once init has joined a process group: the model is sharded with FSDP2 and the collectives run, on one
    rank too when FORCE is set."""
    return dist.is_initialized()


def init(device: torch.device) -> torch.device:
    """Under torchrun: join the process group (NCCL on GPUs, gloo on CPUs); this rank's device. Also a gloo group
    with a long timeout, for the one wait that may last hours (wait_for_rank0). One rank joins only with FORCE=1,
    which runs the multi-GPU path (NCCL, DTensor, FSDP2, the scaler on DTensors) on a single GPU."""
    global _waiting
    wanted = int(os.environ.get("WORLD_SIZE", "1")) > 1 or os.environ.get(FORCE) == "1"
    if not wanted or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", cuda_ordinal())
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    _waiting = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    if rank_id() == 0:
        print(f"FSDP2 over {world_size()} rank{'s' if world_size() > 1 else ''} ({dist.get_backend()})", flush=True)
    return device


def cuda_ordinal() -> int:
    """This rank's GPU: LOCAL_RANK among the GPUs it sees. Where a scheduler gives each rank one GPU
    (CUDA_VISIBLE_DEVICES per rank), the rank sees one device, ordinal 0, whatever its LOCAL_RANK."""
    return int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1)


def wait_for_rank0():
    """Every rank waits here until rank 0 arrives (after its export and report, which it does alone). Without it the
    other ranks would exit first: their torchrun agents give up after 300 s (exit_barrier_timeout), and one of them
    may host the rendezvous store that rank 0's agent polls, which then kills rank 0 in the middle of a long export.
    A gloo barrier with WAIT_TIMEOUT, not the main group's (NCCL's default is 10 minutes)."""
    if _waiting is not None:
        dist.barrier(group=_waiting)


def finish():
    """Leave the process group, every rank together (a rank that leaves while another still talks to it can abort
    in gloo's teardown)."""
    global _waiting
    if dist.is_initialized():
        dist.destroy_process_group()
    _waiting = None


def check_batch_sizes(**sizes: int):
    """Every global batch splits evenly over the ranks (sizes by flag name, e.g. batch_size=16). Reads torchrun's
    WORLD_SIZE, so it can run before the process group and the load."""
    n = world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    for flag, size in sizes.items():
        if size % n:
            raise ValueError(f"--{flag.replace('_', '-')} {size} does not split evenly over {n} ranks")


def shard_model(model: llama.Llama, device: torch.device, dtype: torch.dtype | None = None, before_layer=None):
    """FSDP2: every decoder layer its own unit, then the root (embeddings, final norm, LM head). dtype: the frozen
    base was loaded as stored (memory-mapped, not converted); each unit's weights are cast to dtype just before it is
    sharded, so a rank holds its shards and at most one converted layer, never a whole converted copy.
    before_layer(i, layer): what must happen to a layer before it is cast and sharded (post fine-tuning's merge)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (world_size(),))
    for i, layer in enumerate(model.model.layers):
        if before_layer is not None:
            before_layer(i, layer)
        cast_frozen_(layer, dtype)
        fully_shard(layer, mesh=mesh)
        release_freed_memory()
    cast_frozen_(model, dtype)  # what is left: the layers' weights are sharded already, in dtype
    fully_shard(model, mesh=mesh)
    release_freed_memory()


def release_freed_memory():
    """Hand memory freed on the heap back to the system (glibc's malloc_trim; elsewhere nothing). glibc keeps freed
    blocks of a few MB for reuse, so without this each layer's converted copy, freed once the layer is sharded, stays
    counted in the process (measured: bench/host_memory.py)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def cast_frozen_(module: torch.nn.Module, dtype: torch.dtype | None):
    """Frozen weights (not LoRA's, not buffers) cast to dtype in place; a weight shared by two modules (tied
    embeddings) stays shared."""
    if dtype is None:
        return
    cast = {}
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is None or p.requires_grad or p.dtype == dtype:
                continue
            if id(p) not in cast:
                cast[id(p)] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)
            mod._parameters[name] = cast[id(p)]


def local_share(batch):
    """This rank's contiguous part of a global batch (all of it in a single process)."""
    n = len(batch) // world_size()
    return batch[rank_id() * n:(rank_id() + 1) * n]


def backend_device() -> torch.device:
    """Where the process group's collectives run: NCCL reduces CUDA tensors only (c10d maps the backend to the cuda
    device type alone: a CPU tensor fails with "No backend type associated with device type cpu"), gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in dist.get_backend() else torch.device("cpu")


def all_reduce_(x: torch.Tensor, op=None) -> torch.Tensor:
    """The one all-reduce of the project (sum unless op says otherwise), in place: through a copy on the backend's
    device when x lives elsewhere (loss values are CPU floats; under NCCL they travel on this rank's GPU)."""
    where = backend_device()
    y = x if x.device == where else x.to(where)
    dist.all_reduce(y, op=dist.ReduceOp.SUM if op is None else op)
    if y is not x:
        x.copy_(y)
    return x


def average_over_ranks(tensors):
    """Mean over ranks, in place, of a tensor or a list of tensors (None entries skipped); returns its input."""
    if active():
        for x in [tensors] if torch.is_tensor(tensors) else tensors:
            if x is not None:
                all_reduce_(x)  # gloo has no AVG: sum, then divide
                x /= world_size()
    return tensors


def average_gate_grads(gates: torch.nn.Module):
    """The gates (log_alpha, lambdas) are replicated, not sharded: FSDP averages LoRA's gradients, this theirs."""
    average_over_ranks([p.grad for p in gates.parameters()])


def average_values(values: dict[str, float]) -> dict[str, float]:
    """The mean over ranks of each value (the loss terms of a step: each rank saw its share of the batch)."""
    return dict(zip(values, average_over_ranks(torch.tensor(list(values.values()), dtype=torch.float64)).tolist()))


def max_over_ranks(value: int) -> int:
    if not active():
        return value
    return int(all_reduce_(torch.tensor([value]), op=dist.ReduceOp.MAX).item())


def all_ranks(flag: bool) -> bool:
    """True when flag is true on every rank."""
    return not max_over_ranks(0 if flag else 1)


def local(x: torch.Tensor) -> torch.Tensor:
    return x.to_local() if hasattr(x, "to_local") else x  # a DTensor's shard on this rank


def full_tensor(x: torch.Tensor) -> torch.Tensor:
    return x.full_tensor() if hasattr(x, "full_tensor") else x  # a DTensor gathered whole (every rank must call)


def cpu_lora(model: llama.Llama, rank0_only: bool = False) -> dict[str, torch.Tensor] | None:
    """Full copies of the student's LoRA on the CPU (gathered from every rank when FSDP shards them). rank0_only:
    every rank takes part in the gather, rank 0 alone keeps a copy (the others get None)."""
    keep = not rank0_only or rank_id() == 0
    lora = {k: full_tensor(v).detach() for k, v in llama.lora_state(model).items()}
    return {k: v.to("cpu", copy=True) for k, v in lora.items()} if keep else None


def full_optimizer_state(optimizers: list[torch.optim.Optimizer]) -> dict | None:
    """The optimizers' states as the one state dict of a single optimizer over all their groups (parameters numbered
    on across them), every sharded moment gathered whole, on the CPU: the layout state.pt has always had."""
    merged, offset = {"state": {}, "param_groups": []}, 0
    keep = rank_id() == 0  # every rank gathers, rank 0 alone keeps the copy on its host (the others get None)
    for opt in optimizers:
        sd = opt.state_dict()
        whole = {i: {k: full_tensor(v) if torch.is_tensor(v) else v for k, v in s.items()}
                 for i, s in sd["state"].items()}
        merged["state"].update({i + offset: {k: v.cpu() if torch.is_tensor(v) else v for k, v in s.items()}
                                for i, s in whole.items()} if keep else {})
        merged["param_groups"] += [{**g, "params": [i + offset for i in g["params"]]} for g in sd["param_groups"]]
        offset += sum(len(g["params"]) for g in sd["param_groups"])
    return merged if keep else None


def load_optimizer_state(optimizers: list[torch.optim.Optimizer], sd: dict):
    """Load a full (single-process layout) state, split over the optimizers by their groups, each moment sharded like
    its parameter."""
    groups, offset = list(sd["param_groups"]), 0
    for opt in optimizers:
        mine, groups = groups[:len(opt.param_groups)], groups[len(opt.param_groups):]
        ids = [i for g in mine for i in g["params"]]
        params = [p for g in opt.param_groups for p in g["params"]]
        assert ids == list(range(offset, offset + len(params))), "the checkpoint's optimizer has other groups"
        state = {i - offset: {k: shard_like(v, params[i - offset]) if torch.is_tensor(v) and
                              v.shape == params[i - offset].shape else v for k, v in s.items()}
                 for i, s in sd["state"].items() if int(i) in ids}
        opt.load_state_dict({"state": state, "param_groups": [{**g, "params": [i - offset for i in g["params"]]}
                                                                for g in mine]})
        offset += len(ids)


def shard_like(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    if not hasattr(p, "device_mesh"):
        return x
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(x.to(local(p).device), p.device_mesh, p.placements)
