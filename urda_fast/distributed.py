"""Data-parallel training under ``torchrun``: process-group setup and teardown, the DDP wrapper, and the few
collectives the training loop needs.

``torchrun --nproc_per_node=N ...`` starts N copies of a script with RANK, WORLD_SIZE and LOCAL_RANK set. With
WORLD_SIZE > 1, ``urda_fast.train.fit`` joins the process group (NCCL on CUDA, gloo on CPU), routes the task's
training forward through ``DistributedDataParallel``, and leaves checkpoints, logs and the progress bar to rank 0.
Without those variables (a plain ``python`` run) everything here reads as one process and does nothing.

The batch size of a task is per process: N processes with batch B train like one process with batch N*B (DDP
averages the gradients), except that BatchNorm normalises each process's B samples by their own statistics (its
running statistics are rank 0's on every rank at the start of each step: ``broadcast_buffers``).
"""

from __future__ import annotations

import datetime
import os
import random
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def context() -> Context:
    """This process's place: from the initialised process group, else from torchrun's variables, else one process.

    Readable before the group exists (data streams are built before ``fit`` joins it)."""
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        return Context(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context()
    if "RANK" not in os.environ:
        raise RuntimeError("urda_fast: WORLD_SIZE is set but RANK is not; launch data-parallel runs with torchrun")
    rank = int(os.environ["RANK"])
    return Context(rank, world, int(os.environ.get("LOCAL_RANK", rank)))


_joins = 0  # process groups this process has joined; every rank counts the same (they call fit() in lockstep)


def setup(device: torch.device) -> bool:
    """Join the default process group if this is a torchrun worker and none exists yet; True if this call did it
    (so the caller tears it down), False when single-process or already set up by the caller."""
    global _joins
    ctx = context()
    if ctx.enabled and dist.is_initialized() and device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # the caller's group: NCCL's collectives (broadcast_object) use this GPU
    if not ctx.enabled or dist.is_initialized():
        return False
    if not dist.is_available():
        raise RuntimeError("urda_fast: launched with WORLD_SIZE > 1, but this torch build has no torch.distributed")
    if device.type == "cuda":
        if device.index is None:
            raise ValueError(f"urda_fast: under torchrun each process needs its own GPU; pass cuda:LOCAL_RANK "
                             f"(cuda:{ctx.local_rank} here), not {device}")
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"urda_fast: data-parallel training runs on cuda (NCCL) or cpu (gloo), not {device.type}")
    # env:// rendezvous (torchrun's MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE), under a prefix of its own: a
    # second fit() in the same process (the demo's several runs) joins again, and torch names every new default
    # group alike, so without it a rank could read the address another rank published for the group it has left.
    timeout = collective_timeout()
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    _joins += 1
    dist.init_process_group(backend, store=dist.PrefixStore(f"urda_fast/join{_joins}", store), rank=rank,
                            world_size=world, timeout=timeout)
    return True


TIMEOUT_ENV = "URDA_FAST_DDP_TIMEOUT_MIN"


def collective_timeout() -> datetime.timedelta:
    """How long a rank waits in a collective: 120 minutes, or ``URDA_FAST_DDP_TIMEOUT_MIN``. Rank 0 evaluates while the
    others wait in a broadcast, and a full evaluation (HPT's 15 zero-shot sets, `--eval-max-batches 0`) outlasts
    NCCL's default 10 minutes, which would end the run."""
    text = os.environ.get(TIMEOUT_ENV, "120")
    try:
        minutes = float(text)
    except ValueError:
        minutes = float("nan")
    if not minutes > 0 or minutes == float("inf"):
        raise ValueError(f"urda_fast: {TIMEOUT_ENV} must be a positive number of minutes, got {text!r}")
    return datetime.timedelta(minutes=minutes)


def teardown(initialized_here: bool) -> None:
    if initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def ddp_wrapper(device: torch.device):
    """``wrap(module) -> DistributedDataParallel(module)`` for ``task.wrap_ddp``.

    find_unused_parameters stays off: every trainable parameter must get a gradient each step (DDP says which did
    not), which also lets a task run several forwards of the wrapped module before one backward. Buffers (BatchNorm
    running statistics) are broadcast from rank 0 at each forward, so rank 0's are the ones checkpointed."""
    from torch.nn.parallel import DistributedDataParallel

    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        # DDP's default: buffers synced from rank 0 at each forward (spelled broadcast_buffers or
        # forward_sync_buffers depending on the torch version, so not spelled here)
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=False)

    return wrap


# --------------------------------------------------------------------------------------------------- collectives
# Every function below is a collective: all ranks must call it at the same point, and it returns on all of them.


def broadcast_object(obj, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def mean_metrics(values: dict[str, float]) -> dict[str, float]:
    """Per-key mean of every rank's floats (a rank may lack a key), in rank 0's key order."""
    gathered = gather_objects(values)
    keys = list(dict.fromkeys(k for g in gathered for k in g))
    return {k: sum(g[k] for g in gathered if k in g) / sum(k in g for g in gathered) for k in keys}


@torch.no_grad()
def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum of ``value`` over ranks (a new tensor, no gradient); ``value`` itself in a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total


@torch.no_grad()
def broadcast_modules(modules) -> None:
    """Copy rank 0's parameters and buffers to every rank (what DDP does when it wraps a module)."""
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor, src=0)


@torch.no_grad()
def broadcast_buffers(modules) -> None:
    """Copy rank 0's buffers to every rank, one collective per dtype and device. Each rank's training forward updates
    its own BatchNorm running statistics, and DDP syncs them only at its next forward: an eval-mode forward before
    that (the attack of the next step) would run on rank-local statistics, and a resume, which gives every rank rank
    0's, would then take another path than the uninterrupted run."""
    groups: dict = {}
    for buffer in dict.fromkeys(b for module in modules for b in module.buffers()):  # shared buffers once
        groups.setdefault((buffer.dtype, buffer.device), []).append(buffer)
    for (dtype, _), buffers in groups.items():
        flat = torch.cat([b.reshape(-1) for b in buffers])
        flat = flat.to(torch.uint8) if dtype == torch.bool else flat  # gloo broadcasts no bool
        dist.broadcast(flat, src=0)
        offset = 0
        for b in buffers:
            b.copy_(flat[offset:offset + b.numel()].view(b.shape))
            offset += b.numel()


@torch.no_grad()
def average_gradients(params) -> None:
    """Average ``.grad`` over ranks, for tasks that do not route their forward through DDP. A parameter that got a
    gradient on some rank only counts as zero on the others; one with no gradient anywhere keeps ``grad=None``."""
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    world = dist.get_world_size()
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
    dist.all_reduce(present, op=dist.ReduceOp.MAX)
    for p, anywhere in zip(params, present.tolist()):
        if not anywhere:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world)


def seed_rank(rank: int) -> None:
    """Give rank ``rank`` > 0 its own global RNG streams (random starts, dropout masks), derived from the seed all
    ranks share; rank 0 keeps the stream a single process would have."""
    if rank == 0:
        return
    seed = (torch.initial_seed() + 1_000_003 * rank) % (2 ** 63)
    torch.manual_seed(seed)  # seeds every CUDA device too
    random.seed(seed)


def warn_main(message: str) -> None:
    if context().is_main:
        warnings.warn(message, stacklevel=2)


def check_device(name: str, who: str = "urda_fast") -> None:
    """A device name torch cannot parse ("gpu") is a clear error, not torch's at the first tensor moved; checkable
    before any work (it touches no GPU)."""
    if name == "auto":
        return
    message = f"{who}: device must be auto, cpu, cuda or cuda:N, got {name!r}"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError) as err:
        raise ValueError(message) from err
    if device.type not in ("cpu", "cuda"):  # mps, meta, xpu...: torch parses them; our kernels and loops do not run
        raise ValueError(f"{message} (urda_fast runs on CPUs and CUDA GPUs)")


def pick_device(name: str) -> torch.device:
    """``"auto"`` (a GPU when one is visible, else the CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; under torchrun
    ``cuda`` means this process's GPU: ``LOCAL_RANK``'s, or the one GPU it sees."""
    check_device(name)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"urda_fast: device {name!r} asked for, but no CUDA GPU is visible; use --device cpu")
    ctx = context()
    if device.type == "cuda" and ctx.enabled:  # torchrun: one GPU per process
        visible = torch.cuda.device_count()
        if visible == 1 and device.index in (None, 0):  # each process sees its own GPU alone (set per process)
            return torch.device("cuda", 0)
        if device.index is not None and device.index != ctx.local_rank:
            raise ValueError(f"urda_fast: under torchrun --device {name} would put every process on GPU "
                             f"{device.index}; give --device cuda (each process takes the GPU of its LOCAL_RANK)")
        if ctx.local_rank >= visible:
            raise ValueError(f"urda_fast: process LOCAL_RANK {ctx.local_rank} has no GPU of its own ({visible} "
                             "visible); start at most as many processes per machine as it has GPUs")
        device = torch.device("cuda", ctx.local_rank)
    return device
