"""train-sparse on several processes under ``torchrun``: DDP, or FSDP2 with ``--fsdp``.

Started by ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` in the environment), ``train``
joins the process group (gloo on CPU, nccl on CUDA; every collective has ``--dist-timeout``) and
each rank uses ``LOCAL_RANK``'s device. Without torchrun nothing here does anything.

The same global batch means the same training. ``--batch-size`` is the per-process micro-batch;
the global micro-batch is ``batch_size x world`` examples, cut from the epoch's order exactly as
one process with ``--batch-size batch_size x world`` would cut it, and rank ``r`` takes the
``r``-th share of it (``share``). The loss is the sum over the whole global step divided by the
step's global target count (``all_sum``), so 2 processes with ``--batch-size 4`` follow 1 process
with ``--batch-size 8`` to float tolerance. Worked example: 10 examples, world 2, ``--batch-size
2``: global micro-batches of 4, 4 and 2 examples; rank 1 takes examples 2-3, 6-7 and 9 of the
epoch's order.

Any example count trains on any world size. The last global micro-batch of an epoch holds
``examples mod (batch_size x world)`` examples; ``share`` cuts it into contiguous shares whose
sizes differ by at most one (7 examples on 2 ranks: 4 and 3; 1 example on 3 ranks: 1, 0, 0).
Unequal shares change nothing in the arithmetic (the loss is normalised by the global count), but
a rank with an empty share must still run a forward and a backward, because the collectives
inside them (DDP's gradient all-reduce, FSDP2's all-gathers and reduce-scatters) need every rank.
It runs ``steps.placeholder``: the global micro-batch's first example with every label ignored,
so its loss and gradients are exactly 0 and it adds no tokens or targets to the step's counts.
No example is dropped or repeated: every rank's shares of an epoch together are the epoch's order.

DDP wraps the model with only the trainable tensors (deltas and head) registered with its reducer
(``requires_grad``); the frozen base never is, and ``init_sync=False`` skips the start-up
broadcast (every rank loaded the same checked files and seed). DDP averages gradients over ranks,
so each rank's loss is multiplied by ``world`` (``grad_scale``) to keep the global sum.

FSDP2 (``fully_shard``: one unit per transformer block, then the root) shards every parameter,
the frozen base included, so a rank holds about ``1/world`` of it between uses. The bypass then
runs in ``sparse`` mode (``train/bypass/layer.py`` says why). Checkpoints gather the full deltas,
head and AdamW moments (``full_tensor``) on every rank; rank 0 alone writes them.

Rank 0 alone writes files, prints the progress bar and the summary; a checkpoint is written after
a barrier, so only once every rank finished that step. A failure on any rank before training
(bad data, a refused setting) reaches every rank through ``agree``: rank 0 reports it as one line
and the others exit quietly.

A rank that dies mid-run is not this module's to notice: on one machine torchrun polls its workers
(``--monitor-interval``, 0.1 s) and stops the others (SIGTERM, SIGKILL after 30 s); a rank on
another machine fails at its next collective on the closed connection, or after ``--dist-timeout``
where the dead machine never closed it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch

from neuroada_tools.errors import NeuroAdaError, TrainingError


class PeerFailed(NeuroAdaError):
    """Another rank failed; rank 0 reports why. The CLI exits with code 2 and prints nothing."""


@dataclass
class Dist:
    """This process's place in the run (``world == 1``: a plain single-process run)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    fsdp: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1 or torch.distributed.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def restarted() -> bool:
    """Whether torchrun restarted this worker group (``--max-restarts``): train then resumes from the
    last checkpoint beside the output, where there is one."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or set up as if it were)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def start(fsdp: bool, timeout_s: float, device_name: str) -> Dist:
    """Join the process group when launched by torchrun; a ``Dist`` for a single process otherwise.

    ``--fsdp`` without torchrun is refused (``TrainingError``) before anything is read.
    """
    if not launched():
        if fsdp:
            raise TrainingError("--fsdp shards the model over processes started by torchrun; run it under "
                                "torchrun --nproc-per-node N -m neuroada_tools train-sparse ...")
        return Dist()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if not torch.distributed.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        timeout = datetime.timedelta(seconds=timeout_s)
        store, _, _ = next(torch.distributed.rendezvous("env://", rank, world, timeout=timeout))
        # torchrun keeps one store across --max-restarts: a restarted group must not read the
        # addresses its killed predecessor left there (gloo then waits on them until the timeout)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        torch.distributed.init_process_group(
            backend="nccl" if cuda else "gloo", store=torch.distributed.PrefixStore(f"neuroada/{attempt}", store),
            rank=rank, world_size=world, timeout=timeout,
        )
    return Dist(rank=rank, world=world, local_rank=local_rank, fsdp=fsdp)


def device_of(dist: Dist, device: torch.device) -> torch.device:
    """``LOCAL_RANK``'s CUDA device under torchrun; ``device`` unchanged otherwise."""
    if dist.enabled and device.type == "cuda":
        return torch.device("cuda", dist.local_rank)
    return device


def finish(dist: Dist, *, together: bool = False) -> None:
    """Leave the process group (after the last collective).

    ``together=True`` (a run that ended well on every rank) waits for every rank first: a rank that
    destroys the group while gloo's threads still serve a peer can abort in teardown (SIGABRT,
    "terminate called without an active exception"), failing a job that trained correctly. After an
    error a peer may be gone, so the group is left without that barrier.
    """
    if dist.enabled:
        leave_group(together=together)


def leave_group(*, together: bool = True) -> None:
    """Destroy the default process group if there is one; with ``together``, after a barrier.
    Also for user scripts under torchrun (e.g. around ``NeuroAdaTrainer``)."""
    if torch.distributed.is_initialized():
        if together:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def agree(dist: Dist, error: BaseException | None) -> None:
    """Every rank learns whether any rank failed; then every rank raises, or none does.

    The first failing rank's error is raised on rank 0 (the one line the user sees); the other
    ranks raise ``PeerFailed``. A rank that failed with an error that is not the project's (a bug)
    re-raises its own, so its traceback is kept.
    """
    if not dist.enabled:
        if error is not None:
            raise error
        return
    mine = None if error is None else (type(error).__name__, str(error), isinstance(error, NeuroAdaError))
    everyone: list[Any] = [None] * dist.world
    torch.distributed.all_gather_object(everyone, mine)
    failed = [(r, e) for r, e in enumerate(everyone) if e is not None]
    if not failed:
        return
    if error is not None and not isinstance(error, NeuroAdaError):
        raise error
    if dist.is_main:
        if error is not None:
            raise error
        rank, (kind, message, _) = failed[0]
        raise TrainingError(f"rank {rank}: {message}")
    raise PeerFailed(f"rank {failed[0][0]} failed")


def same_everywhere(dist: Dist, digests: dict[str, str]) -> None:
    """Refuse ranks that read different files: ``digests`` (what -> sha256) compared with rank 0's."""
    if not dist.enabled:
        return
    everyone: list[Any] = [None] * dist.world
    torch.distributed.all_gather_object(everyone, digests)
    for rank, theirs in enumerate(everyone):
        for what, digest in everyone[0].items():
            if theirs.get(what) != digest:
                if not dist.is_main:
                    raise PeerFailed("ranks read different files")
                raise TrainingError(
                    f"rank {rank} reads another {what} than rank 0 (sha256 {str(theirs.get(what))[:12]}... vs "
                    f"{digest[:12]}...); every machine needs the same files"
                )


def share(indices: list[int], dist: Dist) -> list[int]:
    """This rank's contiguous share of one global micro-batch: shares differ in size by at most one,
    the first ``len(indices) mod world`` ranks taking the larger; possibly empty.

    Example: ``indices = [5, 1, 7, 2, 9]`` on 2 ranks: rank 0 takes ``[5, 1, 7]``, rank 1
    ``[2, 9]``; ``[4]`` on 3 ranks: ``[4]``, ``[]``, ``[]``. A full global micro-batch of
    ``batch_size x world`` gives every rank ``batch_size``.
    """
    if dist.world <= 1:
        return indices
    per, extra = divmod(len(indices), dist.world)
    first = dist.rank * per + min(dist.rank, extra)
    return indices[first : first + per + (1 if dist.rank < extra else 0)]


def all_sum(dist: Dist, values: list[float], device: torch.device) -> list[float]:
    """``values`` summed over ranks (float64 on the wire, so integer counts stay exact)."""
    if not dist.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def barrier(dist: Dist) -> None:
    """Wait until every rank is here."""
    if dist.enabled:
        torch.distributed.barrier()


def no_sync(model: torch.nn.Module, last: bool):
    """DDP's ``no_sync`` for micro-batches before the last of a step (gradients reduced once per step)."""
    if not last and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


# ---------------------------------------------------------------- the model across ranks


def wrap(model: torch.nn.Module, dist: Dist, device: torch.device) -> torch.nn.Module:
    """The module the training forward runs through: the model itself, DDP, or FSDP2 in place.

    DDP registers only parameters that require grad (deltas and head) with its reducer. FSDP2
    shards one unit per transformer block (the classes in transformers' ``_no_split_modules``),
    then the root; the bypasses must already be in ``sparse`` mode.
    """
    if not dist.enabled:
        return model
    if dist.fsdp:
        from torch.distributed.fsdp import fully_shard

        blocks = set(getattr(model, "_no_split_modules", None) or ())
        units = [m for m in model.modules() if type(m).__name__ in blocks]
        if not units:
            raise TrainingError(f"--fsdp: {type(model).__name__} names no transformer block class to shard by")
        for m in units:
            fully_shard(m)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, init_sync=False,
        broadcast_buffers=False,
    )


def local_bytes(t: torch.Tensor) -> int:
    """Bytes of ``t`` this process holds: its shard for an FSDP2 parameter."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2-sharded one (a collective: every rank calls it, in the same
    order); any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor read from a resume state) laid out as ``param``: this rank's shard
    for an FSDP2 parameter (no communication: every rank holds the whole value), else as is."""
    if not hasattr(param, "device_mesh"):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
