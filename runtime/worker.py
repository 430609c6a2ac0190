"""Tensor-parallel worker ranks: how rank 0 starts them, feeds them steps, and notices a death.

Rank 0 runs the scheduler and the sampler; ranks 1..N-1 only run the forward over their shard:

    worker: receive a step -> forward (joining its all-reduces and the logits gather) -> repeat

Each step rank 0 broadcasts a header on the control group (the command and the sizes of the
step's tensors), then the tensors packed into one flat int64 tensor on the default group; a
SHUTDOWN header ends the loop. Every rank then executes the same inputs, so the collectives
inside the forward pair up in the same order everywhere.

Failure: a dead rank must stop the engine with an error that names it, never hang it. Before
each step rank 0 checks its spawned workers' exit codes; during one, gloo fails a collective at
once when a peer's connection closes (a process that exits or is killed) and after
COLLECTIVE_TIMEOUT when a peer hangs, and rank 0 then looks again for an exit code to name.
Spawned workers are daemonic (multiprocessing ends them when rank 0's process exits cleanly)
and end themselves when rank 0's process is gone by any means, SIGKILL included
(runtime/lifetime.py); they ignore a terminal's Ctrl-C and hang-up, which reach the whole
process group, since rank 0 stops them. Under torchrun the agent owns the processes, so rank 0
can report the failed collective but not which rank died.
"""

from __future__ import annotations

import logging
import multiprocessing.process
import os
from collections.abc import Sequence
from enum import IntEnum

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from runtime.attention.interface import AttentionMetadata
from runtime.config import EngineConfig
from runtime.device import engine_device
from runtime.lifetime import bind_to_parent
from runtime.loader import resolve_model
from runtime.model_runner import ModelRunner, StepInputs, load_runner
from runtime.parallel import TensorParallel, close_group, free_port, init_group, torchrun_rank

log = logging.getLogger(__name__)

# How long rank 0 waits, after a collective failed, for a dead worker's exit code to appear.
DEATH_GRACE_S = 2.0
# How long close() waits for workers to leave their loop before terminating them.
SHUTDOWN_S = 5.0


class Command(IntEnum):
    SHUTDOWN = 0
    STEP = 1


class WorkerDiedError(RuntimeError):
    """A tensor-parallel rank died or stopped answering; the engine cannot go on."""


def _send_step(inputs: StepInputs, control: dist.ProcessGroup) -> None:
    meta = inputs.meta
    seqs, width = meta.block_tables.shape
    header = [Command.STEP, len(inputs.input_ids), seqs, width, len(inputs.sample_rows)]
    dist.broadcast(torch.tensor(header, dtype=torch.long), src=0, group=control)
    parts = (inputs.input_ids, inputs.positions, meta.slot_mapping, meta.query_start_loc,
             meta.context_lens, meta.block_tables.flatten(), inputs.sample_rows)  # fmt: skip
    dist.broadcast(torch.cat(parts), src=0)


def _receive_step(control: dist.ProcessGroup, device: torch.device) -> StepInputs | None:
    """The next step's inputs, on `device` (where nccl receives them), or None when rank 0
    says shut down. The header stays on the CPU: the control group is gloo."""
    header = torch.empty(5, dtype=torch.long)
    dist.broadcast(header, src=0, group=control)
    command, tokens, seqs, width, samples = header.tolist()
    if command == Command.SHUTDOWN:
        return None
    sizes = [tokens, tokens, tokens, seqs + 1, seqs, seqs * width, samples]
    flat = torch.empty(sum(sizes), dtype=torch.long, device=device)
    dist.broadcast(flat, src=0)
    ids, positions, slots, starts, context_lens, tables, rows = torch.split(flat, sizes)
    meta = AttentionMetadata(slots, starts, context_lens, tables.view(seqs, width))
    return StepInputs(ids, positions, meta, rows)


def worker_loop(runner: ModelRunner, control: dist.ProcessGroup) -> None:
    while (inputs := _receive_step(control, runner.device)) is not None:
        runner.execute(inputs)


def run_worker(cfg: EngineConfig, rank: int, size: int, init_method: str) -> None:
    """A worker rank from start to shutdown: join the group, load its shard, serve steps."""
    tp, control = init_group(rank, size, init_method, engine_device(rank))
    try:
        path, mcfg, max_model_len = resolve_model(cfg)
        runner = load_runner(cfg, path, mcfg, max_model_len, tp).runner
        worker_loop(runner, control)
    finally:
        close_group()


def _spawned_worker(
    cfg: EngineConfig, rank: int, size: int, init_method: str, parent_pid: int
) -> None:
    """A rank that rank 0 spawned: it lives and dies with rank 0's process."""
    bind_to_parent(parent_pid)
    run_worker(cfg, rank, size, init_method)


class Workers:
    """Rank 0's handle on the other ranks: the processes it spawned (none under torchrun,
    whose agent owns them) and the control group."""

    def __init__(
        self, tp: TensorParallel, control: dist.ProcessGroup,
        processes: Sequence[multiprocessing.process.BaseProcess], threads: int,
    ) -> None:  # fmt: skip
        self.tp, self.control, self.processes = tp, control, processes
        # Why the ranks cannot run steps any more; set once, and every later step refused.
        self.failure: str | None = None
        self.closed = False
        self.threads = threads  # this process's torch threads before init_group shared them

    @classmethod
    def start(cls, cfg: EngineConfig) -> Workers:
        """Under torchrun, join its group as rank 0; otherwise spawn ranks 1..N-1 here."""
        size, threads = cfg.tensor_parallel_size, torch.get_num_threads()
        rank = torchrun_rank(size)
        if rank is not None:
            if rank != 0:
                raise ValueError(f"under torchrun the engine runs on RANK 0, not RANK {rank}")
            tp, control = init_group(0, size, "env://", engine_device(0))
            return cls(tp, control, [], threads)
        init_method = f"tcp://127.0.0.1:{free_port()}"
        context = mp.get_context("spawn")
        processes = [
            context.Process(
                target=_spawned_worker,
                args=(cfg, rank, size, init_method, os.getpid()),
                name=f"tp-rank-{rank}",
                daemon=True,
            )
            for rank in range(1, size)
        ]
        for process in processes:
            process.start()
        try:
            tp, control = init_group(0, size, init_method, engine_device(0))
        except BaseException:
            for process in processes:
                process.kill()
            raise
        return cls(tp, control, processes, threads)

    def execute(self, runner: ModelRunner, inputs: StepInputs) -> torch.Tensor:
        """Run one step on every rank; rank 0's logits."""
        if self.failure is None and (dead := self._dead()):
            self.failure = dead
        if self.failure is not None:
            raise WorkerDiedError(self.failure)
        try:
            _send_step(inputs, self.control)
            logits = runner.execute(inputs)
        except RuntimeError as exc:
            self.failure = self._diagnose(exc)
            raise WorkerDiedError(self.failure) from exc
        assert logits is not None  # rank 0 gathers the logits
        return logits

    def _dead(self) -> str | None:
        dead = [
            f"tensor-parallel rank {rank} died (exit code {p.exitcode})"
            for rank, p in enumerate(self.processes, start=1)
            if p.exitcode is not None
        ]
        return "; ".join(dead) + ": the engine cannot continue, restart it" if dead else None

    def _diagnose(self, exc: RuntimeError) -> str:
        """What went wrong when a step failed: which rank died, if one did."""
        for p in self.processes:
            p.join(DEATH_GRACE_S / len(self.processes))  # a killed process needs a moment
        if dead := self._dead():
            return dead
        if not self.processes:
            return f"a tensor-parallel step failed (under torchrun, see the ranks' logs): {exc}"
        return (
            "a tensor-parallel step failed while every spawned rank is alive (one may hang past "
            f"the collective timeout, or the error is rank 0's own): {exc}"
        )

    def close(self) -> None:
        """Tell the workers to leave their loop, wait for them, end the group. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.failure is None:  # the workers wait for a header: tell them to leave
            try:
                dist.broadcast(torch.tensor([Command.SHUTDOWN, 0, 0, 0, 0]), 0, self.control)
            except RuntimeError:
                log.warning("a tensor-parallel worker was gone before shutdown")
        for p in self.processes:
            p.join(SHUTDOWN_S if self.failure is None else 0)  # after a failure, none serves
            if p.is_alive():  # hung, stopped, or orphaned: SIGKILL, which none can ignore
                log.warning("tensor-parallel %s did not exit; killing it", p.name)
                p.kill()
                p.join()
        close_group()
        torch.set_num_threads(self.threads)
