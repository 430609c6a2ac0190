"""Which attention backend an engine uses, and why.

Chosen automatically from the device and dtype, as vLLM does, unless RUNTIME_ATTENTION_BACKEND
names one. On the CPU: the C decode kernel for float32 when a compiler is at hand, else the
reference backend.
"""

from __future__ import annotations

import logging
import os

import torch

from runtime.attention.cpu_kernel import CpuKernelAttention, KernelUnavailableError
from runtime.attention.interface import AttentionBackend
from runtime.attention.reference import TorchAttention

log = logging.getLogger(__name__)

BACKEND_ENV = "RUNTIME_ATTENTION_BACKEND"
BACKENDS = ("auto", "torch", "cpu-kernel")


def select_backend(device: torch.device, dtype: torch.dtype) -> AttentionBackend:
    choice = os.environ.get(BACKEND_ENV, "auto")
    if choice not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}: expected one of {', '.join(BACKENDS)}, got {choice!r}")
    backend, reason = _choose(choice, device, dtype)
    log.info("attention backend: %s (%s)", backend.name, reason)
    return backend


def _choose(choice: str, device: torch.device, dtype: torch.dtype) -> tuple[AttentionBackend, str]:
    if choice == "torch":
        return TorchAttention(), f"{BACKEND_ENV}=torch"
    if device.type == "cpu":
        return _cpu(choice, dtype)
    if choice != "auto":
        raise ValueError(f"{BACKEND_ENV}={choice} runs on the CPU, but the engine is on {device}")
    return TorchAttention(), f"no GPU attention kernel for {device} yet"


def _cpu(choice: str, dtype: torch.dtype) -> tuple[AttentionBackend, str]:
    if dtype != torch.float32:
        if choice == "cpu-kernel":
            raise ValueError(f"{BACKEND_ENV}=cpu-kernel needs float32, not {dtype}")
        return TorchAttention(), f"the C decode kernel is float32 only, the model is {dtype}"
    try:
        return CpuKernelAttention(), "float32 on the CPU"
    except KernelUnavailableError as exc:
        if choice == "cpu-kernel":
            raise ValueError(f"{BACKEND_ENV}=cpu-kernel, but {exc}") from exc
        return TorchAttention(), f"the C decode kernel is unavailable: {exc}"
