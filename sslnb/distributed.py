"""Several processes, one run: `torchrun --nproc_per_node=N -m sslnb pretrain ...`.

torchrun starts N copies of the same command and tells each who it is through the environment
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). `process_context` reads it: with
WORLD_SIZE unset or 1 nothing here touches `torch.distributed`, and the loop runs exactly as
it does in one process. Under torchrun the loop (sslnb.train) does what DistributedDataParallel
needs, with these helpers:

- every process holds its shard of the training images on its own GPU (`cuda:LOCAL_RANK`) and
  draws its own views from its own random stream (`rank_seed`);
- `batch_size` in the config is the GLOBAL batch (the thesis's 512 stays 512 on any number of
  GPUs, and so does the lr that goes with it); each process trains on batch_size / N;
- gradients are averaged by DDP; the losses that need the whole batch (SimCLR's negatives,
  Barlow Twins' and VICReg's statistics) gather it (`losses.gather`), MoCo shuffles its keys
  across processes and fills its queue with every process's keys, DirectPred averages its
  correlation matrix (`mean_over_processes`);
- batch norm: methods that the papers train with statistics over the global batch get
  `torch.nn.SyncBatchNorm` on CUDA. torch has no SyncBatchNorm for CPU tensors, so on a CPU
  (gloo) each process normalises with its own batch / N samples: the same method with smaller
  BN groups (MoCo's per-GPU BN is that on purpose, so MoCo is never synchronised).
- rank 0 alone evaluates (the kNN monitor runs once, on the whole training set), writes the run
  directory and shows the progress bar; the others wait for it at a barrier.
"""
from __future__ import annotations

import datetime
import os
import signal
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ProcessContext:
    """Which process this is: rank 0 of 1 unless torchrun started several."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that evaluates, writes the run and talks to the user."""
        return self.rank == 0


SINGLE = ProcessContext()

# A process that waits longer than this for the others gives up with an error instead of hanging
# (rank 0's kNN monitor and checkpoint are the longest waits: seconds to a few minutes).
TIMEOUT = datetime.timedelta(minutes=30)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer; it is set by torchrun") from None


def launched() -> ProcessContext:
    """The process's place as torchrun's environment describes it (SINGLE without torchrun)."""
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return SINGLE
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside [0, WORLD_SIZE={world}); start the processes with torchrun")
    return ProcessContext(rank, world, local)


class ProcessLost(RuntimeError):
    """Another process of the run ended (killed, crashed, out of memory): this one stops too."""


def _stop_on_sigterm(signum, frame):
    # torchrun sends SIGTERM to every process when one of them ends: a message, not a traceback
    raise ProcessLost("another process of the run ended, and torchrun stopped this one (SIGTERM)")


def is_collective_failure(e: BaseException) -> bool:
    """Whether `e` is a collective that failed because a peer went away (gloo: "Connection reset
    by peer", plain RuntimeErrors; nccl and the store: torch.distributed.DistError)."""
    import torch.distributed as dist

    text = str(e)
    return isinstance(e, dist.DistError) or "gloo" in text or "NCCL" in text or "Connection reset" in text


def short_reason(e: BaseException) -> str:
    """gloo's "[.../pair.cc:545] Read error [127.0.0.1]:123: Connection reset by peer. This is
    typically ..." as "Read error [127.0.0.1]:123: Connection reset by peer"."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". ")[0].rstrip(".")


def ignore_sigterm() -> None:
    """A process that is already stopping with a message must not be interrupted by torchrun's SIGTERM."""
    if launched().distributed:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def process_context(device: torch.device) -> ProcessContext:
    """Join the process group torchrun describes (nccl on CUDA, gloo on a CPU); SINGLE, touching
    nothing, in a single process. Idempotent: a script that trains several runs joins once."""
    ctx = launched()
    if not ctx.distributed:
        return SINGLE
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT)
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
    if dist.get_world_size() != ctx.world_size:
        raise ValueError(f"the process group has {dist.get_world_size()} processes but WORLD_SIZE={ctx.world_size}")
    return ctx


def process_device(requested: torch.device, ctx: ProcessContext) -> torch.device:
    """Each process's own device: `cuda:LOCAL_RANK` on a machine with GPUs, else the CPU."""
    if not ctx.distributed:
        return requested
    if requested.type == "cuda":
        if ctx.local_rank >= torch.cuda.device_count():
            raise ValueError(f"process with LOCAL_RANK {ctx.local_rank} has no GPU: this machine has "
                             f"{torch.cuda.device_count()}; use --nproc_per_node={torch.cuda.device_count()} or less")
        torch.cuda.set_device(ctx.local_rank)
        return torch.device("cuda", ctx.local_rank)
    if requested.type == "mps":
        raise ValueError("several processes on Apple MPS are not supported (one GPU per Mac); run one process, "
                         "or use --device cpu")
    return requested


def rank_seed(seed: int, rank: int) -> int:
    """The seed of a process's batch order and views: the run's own seed for rank 0 (a one-process
    run is unchanged), other ranks far from it so the streams never coincide."""
    return seed + 1_000_003 * rank


def wrap(model: torch.nn.Module, device: torch.device, sync_batchnorm: bool) -> torch.nn.Module:
    """DistributedDataParallel around `model`, with SyncBatchNorm first where asked and possible.
    The returned wrapper is only for the training forward; `model` itself stays what every
    other call uses (evaluation, `after_step`, `state_dict`)."""
    from torch.nn.parallel import DistributedDataParallel

    if sync_batchnorm and device.type == "cuda":
        # replaces the BatchNorm layers inside `model` (keeping their state) and returns `model` itself
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def several_processes() -> bool:
    """Whether a process group of more than one process is running (the losses, MoCo and
    DirectPred ask this at every step; without torchrun it is False)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def mean_over_processes(x: torch.Tensor) -> torch.Tensor:
    """The average of `x` over every process (no gradient); `x` itself in one process."""
    import torch.distributed as dist

    if not several_processes():
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


def barrier(ctx: ProcessContext) -> None:
    if ctx.distributed:
        import torch.distributed as dist

        dist.barrier()


def gather_objects(obj, ctx: ProcessContext) -> list:
    """Every process's `obj` (picklable), in rank order; `[obj]` in one process."""
    if not ctx.distributed:
        return [obj]
    import torch.distributed as dist

    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def finish() -> None:
    """Leave the process group, if this process joined one (the command line's last step)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
