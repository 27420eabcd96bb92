"""Data-parallel training under torchrun: process group, rank helpers, the sampler's shards,
collectives and one error message per job.

Why this shape: every process (rank) builds the same patient split, decodes the same
images and draws the same epoch order from the same seed, so the only things that ever
cross the network are gradients (DistributedDataParallel), validation logits (gathered so
every rank sees the whole validation set and takes the same decisions: best epoch, early
stopping) and a few checks. Rank 0 alone writes the run folder.

`torchrun` sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them (or
with WORLD_SIZE=1) `init_from_env` returns None and training runs in one process exactly
as before. GPUs use NCCL (one GPU per process, `cuda:LOCAL_RANK`), CPUs use gloo.

Failures: collectives time out after FETALPLANES_DIST_TIMEOUT seconds (default 1800), a
rank that dies makes its peers' next collective fail at once (gloo/NCCL see the closed
connection), and SIGTERM from the launcher (torchrun stops the survivors) raises
`LauncherStop`. Each such end becomes one `JobFailed`; the first rank to report claims a
key in the job's store and prints it, the others exit quietly (`JobFailed.quiet`).
"""

from __future__ import annotations

import hashlib
import math
import os
import signal
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NoReturn

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from fetalplanes.errors import FetalPlanesError
from fetalplanes.models.devices import pick_device

TIMEOUT_ENV = "FETALPLANES_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
#: How long a failing rank waits on the store to learn whether another rank already spoke.
CLAIM_TIMEOUT_S = 5.0


class JobFailed(FetalPlanesError):
    """A distributed job ended early; `quiet` when another rank already said why."""

    def __init__(self, message: str, quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet


class LauncherStop(Exception):
    """SIGTERM in a distributed job: torchrun stops the survivors when a rank fails."""


def world_from_env() -> tuple[int, int, int]:
    """(world size, rank, local rank) as torchrun sets them; (1, 0, 0) outside torchrun."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise FetalPlanesError("WORLD_SIZE, RANK and LOCAL_RANK must be integers") from None
    if world > 1 and not 0 <= rank < world:
        raise FetalPlanesError(f"RANK {rank} is outside WORLD_SIZE {world}")
    return world, rank, local


def timeout_seconds() -> float:
    """Collective timeout: FETALPLANES_DIST_TIMEOUT (seconds) or 30 minutes."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise FetalPlanesError(f"{TIMEOUT_ENV}={raw!r}: expected seconds, e.g. 600") from None
    if value <= 0:
        raise FetalPlanesError(f"{TIMEOUT_ENV}={raw!r}: must be positive")
    return value


# ----------------------------------------------------------------- pure helpers
def shard_indices(order: Tensor, rank: int, world: int) -> Tensor:
    """This rank's share of one epoch's global order (like DistributedSampler): the order
    is padded by wrapping around to a multiple of `world`, then dealt out round-robin, so
    every rank gets the same number of samples (and of batches: no rank waits forever in
    an all-reduce the others never join)."""
    n = len(order)
    if n == 0:
        return order
    per = math.ceil(n / world)
    padded = order.repeat(math.ceil(per * world / n))[: per * world]
    return padded[rank::world]


def block_range(n: int, rank: int, world: int) -> range:
    """Contiguous rows [start, stop) of n for this rank (validation shards, in order)."""
    per = math.ceil(n / world) if n else 0
    start = min(n, rank * per)
    return range(start, min(n, start + per))


def local_batch(batch_size: int, world: int) -> int:
    """Per-process batch for a global `--batch-size` (the recipe stays the same)."""
    per = math.ceil(batch_size / world)
    if per < 2:
        raise FetalPlanesError(
            f"--batch-size {batch_size} over {world} processes leaves {per} image per "
            f"process (BatchNorm needs 2); use --batch-size {2 * world} or more"
        )
    return per


def digest(*parts: Any) -> str:
    """A hash of arrays and JSON-able values (compares what each rank built)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(np.ascontiguousarray(p).tobytes() if isinstance(p, np.ndarray) else
                 repr(p).encode())
    return h.hexdigest()


# ----------------------------------------------------------------- the process group
@dataclass
class Dist:
    """This process's place in the job, and the collectives training uses."""

    world: int
    rank: int
    local_rank: int
    device: torch.device
    backend: str
    store: Any = field(repr=False)
    _old_sigterm: Any = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- sampler and shards
    def shard(self, order: Tensor) -> Tensor:
        return shard_indices(order, self.rank, self.world)

    def shard_len(self, n: int) -> int:
        return math.ceil(n / self.world) if n else 0

    def block(self, n: int) -> range:
        return block_range(n, self.rank, self.world)

    # -- collectives
    def mean(self, *values: float) -> tuple[float, ...]:
        """Mean over ranks (every rank trains on the same number of samples)."""
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return tuple(float(v) / self.world for v in t.cpu())

    def gather_rows(self, part: np.ndarray, n: int, n_cols: int) -> np.ndarray:
        """The (n, n_cols) rows whose blocks (`block(n)`) the ranks computed, in order."""
        per = self.shard_len(n)
        buf = torch.zeros((per, n_cols), dtype=torch.float32, device=self._comm_device())
        if len(part):
            buf[: len(part)] = torch.from_numpy(np.asarray(part, np.float32)).to(buf.device)
        bufs = [torch.zeros_like(buf) for _ in range(self.world)]
        dist.all_gather(bufs, buf)
        rows = [b[: len(block_range(n, r, self.world))] for r, b in enumerate(bufs)]
        return torch.cat(rows).cpu().numpy()

    def broadcast_text(self, text: str) -> str:
        """Rank 0's `text` on every rank (e.g. the run folder it chose)."""
        box = [text if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self._comm_device())
        return str(box[0])

    def check_same(self, what: str, value: str) -> None:
        """Every rank must have built the same `what` (same data, code and seed)."""
        mine = torch.tensor(list(bytes.fromhex(value)), dtype=torch.uint8,
                            device=self._comm_device())
        every = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine)
        differ = [r for r, t in enumerate(every) if not torch.equal(t, every[0])]
        if differ:
            ranks = ", ".join(map(str, differ))
            raise FetalPlanesError(
                f"rank {ranks} built a different {what} than rank 0: every node needs the "
                "same data folder, fetalplanes version and options"
            )

    def sync_buffers(self, model: nn.Module) -> None:
        """Rank 0's BatchNorm statistics everywhere (each rank updated its own in the last
        step), so sharded validation uses one model."""
        for buf in model.buffers():
            dist.broadcast(buf.data, src=0)

    def wrap(self, model: nn.Module, find_unused: bool = False) -> nn.Module:
        """DistributedDataParallel: gradients averaged over ranks in every backward."""
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids,
                                       find_unused_parameters=find_unused)

    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    # -- the end
    def close(self) -> None:
        """Leave the process group after a successful run."""
        self._restore_sigterm()
        if dist.is_initialized():
            dist.destroy_process_group()

    def fail(self, exc: BaseException, hint: str = "") -> NoReturn:
        """Re-raise `exc` as this job's one message (JobFailed), or quietly when another
        rank already reported; an unexpected error keeps its traceback on the reporter."""
        self._restore_sigterm()
        message = failure_message(exc)
        speaker = self.claim_report()
        if not speaker:
            raise JobFailed(message or str(exc), quiet=True) from None
        if message is None:
            raise exc
        raise JobFailed(message + hint) from None

    def claim_report(self) -> bool:
        """True for the first failing rank of this job (a counter in the job's store); a
        rank that cannot reach the store reports too (better twice than never)."""
        key = f"fetalplanes/failure/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        try:
            self.store.set_timeout(timedelta(seconds=CLAIM_TIMEOUT_S))
            return int(self.store.add(key, 1)) == 1
        except Exception:  # the store died with its host: say it here
            return True

    def _restore_sigterm(self) -> None:
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None


def failure_message(exc: BaseException) -> str | None:
    """One line for how a distributed job ended; None for an unexpected error."""
    if isinstance(exc, FetalPlanesError):
        return str(exc)
    if isinstance(exc, LauncherStop):
        return ("stopped by the launcher: another process of this job failed or the job "
                "was cancelled")
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if is_peer_loss(exc):
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"lost contact with another process of this job ({first[:160]})"
    return None


def is_peer_loss(exc: BaseException) -> bool:
    """A collective failed because a peer died, hung past the timeout or left."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        word in text for word in ("gloo", "nccl", "connection closed", "connection reset",
                                  "timed out", "broken pipe", "peer")
    )


def _on_sigterm(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills
    raise LauncherStop()


def init_from_env(device: str = "auto") -> Dist | None:
    """Join the torchrun job described by the environment; None in a single process."""
    world, rank, local = world_from_env()
    if world <= 1:
        return None
    dev = pick_device(device)
    if dev.type == "cuda":
        if local >= torch.cuda.device_count():
            raise FetalPlanesError(
                f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs here; "
                "use --nproc-per-node at most the number of GPUs"
            )
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_seconds())
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise FetalPlanesError("WORLD_SIZE is set but MASTER_ADDR/MASTER_PORT are not: "
                               "launch with torchrun")
    store = None  # a process group made by the caller is used as it is
    if not dist.is_initialized():
        store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                timeout=timeout)
    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGTERM, _on_sigterm)
    return Dist(world, rank, local, dev, backend, store, old)


def convert_sync_batchnorm(model: nn.Module, ctx: Dist | None) -> nn.Module:
    """SyncBatchNorm (statistics over the global batch) for `--sync-bn` on GPUs."""
    if ctx is None:
        return model  # one process: plain BatchNorm is the same thing
    if ctx.backend != "nccl":
        raise FetalPlanesError("--sync-bn needs GPUs (NCCL); gloo on CPUs cannot sync "
                               "BatchNorm: leave it off")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
