"""Where the engine runs and in what dtype: CUDA when this machine has it, else the CPU.

RUNTIME_DEVICE (the one variable this module reads) overrides the choice: `cpu` runs the CPU
path on a GPU machine, `cuda` insists on CUDA (an error without it), `auto` (unset) chooses.
Tensor-parallel rank r uses `cuda:r`, or `cuda:LOCAL_RANK` under torchrun, whose ranks may
span machines. Nothing here touches CUDA unless it is available, so the CPU build imports it.
"""

from __future__ import annotations

import os

import torch

from runtime.config import DTYPES

DEVICE_ENV = "RUNTIME_DEVICE"
DEVICE_CHOICES = ("auto", "cpu", "cuda")


def engine_device(rank: int) -> torch.device:
    """The device of tensor-parallel `rank`'s model, KV cache and step tensors."""
    choice = os.environ.get(DEVICE_ENV, "auto")
    if choice not in DEVICE_CHOICES:
        raise ValueError(
            f"{DEVICE_ENV}: expected one of {', '.join(DEVICE_CHOICES)}, got {choice!r}"
        )
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(
            f"{DEVICE_ENV}=cuda but this torch sees no CUDA device: unset it to run on the CPU"
        )
    index = int(os.environ.get("LOCAL_RANK", rank))
    if index >= torch.cuda.device_count():
        raise ValueError(
            f"rank {rank} needs cuda:{index} but {torch.cuda.device_count()} CUDA devices are "
            "visible: lower tensor_parallel_size or make more devices visible"
        )
    return torch.device("cuda", index)


def model_dtype(requested: str, checkpoint: torch.dtype, device: torch.device) -> torch.dtype:
    """`requested` (EngineConfig.dtype) resolved: `auto` keeps the checkpoint's dtype, except
    float32 on CUDA, which runs in bfloat16 (as vLLM: half the memory and bandwidth, and the
    tensor cores' type); the CPU keeps float32, whose matmuls are its fastest."""
    if requested != "auto":
        return DTYPES[requested]
    if device.type == "cuda" and checkpoint == torch.float32:
        return torch.bfloat16
    return checkpoint
