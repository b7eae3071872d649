"""Processes and devices of a run: joining the torchrun process group and picking the
device of this process."""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the torchrun process group (nccl on GPU, gloo on CPU) when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    # torchrun stops the ranks still running with SIGTERM (another rank failed, or a hang
    # was timed out): each prints the stack of every thread first, so a hung collective or
    # exit shows where it waits; the default action (terminate) still follows
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        faulthandler.register(signal.SIGTERM, file=sys.stderr, all_threads=True, chain=True)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        info.initialized_here = True
    return info


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device: expected 'cpu' or 'auto' without a visible GPU, got {name!r}"
            )
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


def shutdown_distributed(info: DistInfo, timeout_s: float = 300.0) -> None:
    """Leave the process group joined by :func:`init_distributed`.

    A collective barrier first (every rank has finished its collectives), then a barrier
    on the rendezvous store (every rank has also *returned* from that collective), and
    only then the group's sockets close: a rank that tears its connections down while a
    peer is still reading the barrier's last message can leave the peer waiting.
    """
    if not info.initialized_here:
        return
    import datetime

    dist.barrier()
    store = dist.distributed_c10d._get_default_store()
    store.set(f"recon/exit/{info.rank}", "1")
    store.wait(
        [f"recon/exit/{r}" for r in range(info.world)], datetime.timedelta(seconds=timeout_s)
    )
    dist.destroy_process_group()
