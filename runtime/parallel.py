"""Tensor parallelism's process group: which shard this process holds, and the collectives.

A `TensorParallel` is passed explicitly to every layer that shards. At size 1 (the default,
`SINGLE`) no process group exists and every collective is the identity, so the single-process
engine makes no distributed call at all.

Two groups join the same ranks (see runtime/worker.py for who sends what):
- the default group carries the forward's collectives; its timeout is COLLECTIVE_TIMEOUT, so
  a rank that hangs (not one that dies: gloo sees a closed connection at once) fails the step
  instead of stalling it forever;
- the control group carries only the step headers rank 0 broadcasts. A worker waits there for
  as long as the server is idle, so its timeout is CONTROL_TIMEOUT, far longer.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

import psutil
import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)
CONTROL_TIMEOUT = datetime.timedelta(days=30)
# torchrun sets all four; their presence means "join the group it launched".
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1

    def slice_of(self, total: int) -> tuple[int, int]:
        """(start, length) of this rank's even share of `total` (which size divides)."""
        length = total // self.size
        return self.rank * length, length

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, in place."""
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def all_min(self, value: int, device: torch.device) -> int:
        """The smallest of every rank's `value` (a tensor on `device`, as nccl wants)."""
        if self.size == 1:
            return value
        x = torch.tensor([value], device=device)
        dist.all_reduce(x, op=dist.ReduceOp.MIN)
        return int(x.item())

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Rank 0: every rank's `x` (all of one shape) concatenated along the last dimension,
        in rank order. Other ranks: None."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(x, parts, dst=0)
        return None if parts is None else torch.cat(parts, dim=-1)


SINGLE = TensorParallel()


def torchrun_rank(size: int) -> int | None:
    """This process's rank if torchrun launched it (its variables are set), else None; raises
    if torchrun's world is not `size` ranks (the tensor-parallel size)."""
    if not all(name in os.environ for name in TORCHRUN_ENV):
        return None
    if int(os.environ["WORLD_SIZE"]) != size:
        raise ValueError(
            f"torchrun started WORLD_SIZE={os.environ['WORLD_SIZE']} ranks but "
            f"tensor_parallel_size is {size}: launch with --nproc-per-node {size}"
        )
    return int(os.environ["RANK"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def backend(device: torch.device) -> str:
    """The collectives' backend for tensors on `device`: nccl for CUDA where this torch has
    it, gloo otherwise."""
    return "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"


def cores() -> int:
    """The cores this process may run on (its affinity, which a container may narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def init_group(
    rank: int, size: int, init_method: str, device: torch.device
) -> tuple[TensorParallel, dist.ProcessGroup]:
    """Join the `size` ranks at `init_method` (tcp://host:port, or env:// under torchrun);
    returns this rank's TensorParallel and the control group. Also shares the machine's cores
    out: N ranks on one box get cores // N threads each, not all of them (N ranks x all cores
    would thrash)."""
    torch.set_num_threads(max(1, cores() // size))
    _gloo_on_loopback(init_method)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # nccl's collectives run on the current device
    dist.init_process_group(
        backend(device), init_method=init_method, rank=rank, world_size=size,
        timeout=COLLECTIVE_TIMEOUT,
    )  # fmt: skip
    control = dist.new_group(list(range(size)), timeout=CONTROL_TIMEOUT, backend="gloo")
    assert control is not None  # every rank is a member
    return TensorParallel(rank, size), control


def _gloo_on_loopback(init_method: str) -> None:
    """Ranks that meet on a loopback address talk over loopback. Gloo otherwise listens on
    the address the machine's hostname resolves to, which may face a network; an interface
    set in GLOO_SOCKET_IFNAME is left alone."""
    host = urlsplit(init_method).hostname if init_method.startswith("tcp://") else None
    host = host or os.environ.get("MASTER_ADDR", "")
    if "GLOO_SOCKET_IFNAME" in os.environ or not _is_loopback(host):
        return
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and _is_loopback(a.address) for a in addresses):
            os.environ["GLOO_SOCKET_IFNAME"] = name
            return


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def close_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
