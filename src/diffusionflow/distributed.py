"""One process or the processes ``torchrun`` started, for the commands that split work over seeds.

``torchrun --nproc_per_node K -m diffusionflow.sample ...`` starts K processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment; a plain
``python -m ...`` has none of them and is rank 0 of 1. :func:`init_ranks` joins the process group
(NCCL on CUDA, gloo on the CPU) and puts rank r on ``cuda:LOCAL_RANK``; the commands then give each rank
the seeds ``metrics.generate.shard(N, rank, world)``, so that a sample depends on its seed only, not on
the number of processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from diffusionflow.checks import check_device, show
from diffusionflow.errors import ConfigError

__all__ = ["Ranks", "barrier", "close_ranks", "gather_objects", "init_ranks"]

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Ranks:
    """This process's ``rank`` among ``world`` processes and its ``device``; ``owns_group``: the process
    group was started by :func:`init_ranks` (and is closed by :func:`close_ranks`)."""

    rank: int
    world: int
    device: torch.device
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes what is written once."""
        return self.rank == 0


def _torchrun_env() -> dict[str, str]:
    """The torchrun variables of this process when ``WORLD_SIZE`` > 1 (all of them, or an error
    naming the missing ones), else {}."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return {}
    missing = [name for name in TORCHRUN_ENV if name not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: start the processes "
            "with torchrun (torchrun --nproc_per_node K -m diffusionflow.<command> ...)"
        )
    return {name: os.environ[name] for name in TORCHRUN_ENV}


def init_ranks(device: str | None, key: str = "device") -> Ranks:
    """One process, or the processes torchrun started (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
    ``MASTER_ADDR``/``MASTER_PORT`` in the environment): joins the process group once (NCCL on CUDA,
    gloo on the CPU; a group that is already there is used as it is), on CUDA with device
    ``cuda:LOCAL_RANK``. ``device`` is checked with :func:`~diffusionflow.checks.check_device`
    (a ``ConfigError`` naming ``key``); under torchrun it names a device type (``cuda``, ``cpu``),
    not an index, since each process takes its own."""
    chosen = check_device(device, key)
    env = _torchrun_env()
    if not env:
        return Ranks(0, 1, chosen)
    rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    if chosen.type == "mps" or (device is not None and chosen.index is not None):
        raise ConfigError(
            f"{key}={show(device)}: under torchrun ({world} processes) each process takes its own device; "
            f"allowed: {key}=null, {key}=cuda or {key}=cpu"
        )
    if chosen.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={local}, but this machine has {torch.cuda.device_count()} CUDA devices: "
                f"start at most that many processes per node, or give {key}=cpu"
            )
        chosen = torch.device("cuda", local)
        torch.cuda.set_device(chosen)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo", rank=rank, world_size=world)
    elif (dist.get_rank(), dist.get_world_size()) != (rank, world):
        raise ConfigError(
            f"RANK={rank}, WORLD_SIZE={world} in the environment, but the process group already started "
            f"is rank {dist.get_rank()} of {dist.get_world_size()}"
        )
    return Ranks(rank, world, chosen, owns)


def barrier(ranks: Ranks) -> None:
    """Waits until every rank is here (nothing to wait for with one process)."""
    if ranks.world > 1:
        dist.barrier(device_ids=[ranks.device.index] if ranks.device.type == "cuda" else None)


def gather_objects(ranks: Ranks, obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank: ``[obj]`` with one process."""
    if ranks.world == 1:
        return [obj]
    out: list[Any] = [None] * ranks.world
    dist.all_gather_object(out, obj)
    return out


def close_ranks(ranks: Ranks) -> None:
    """Leaves the process group if :func:`init_ranks` started it."""
    if ranks.owns_group and dist.is_initialized():
        dist.destroy_process_group()
