"""Which attention backend an engine uses, and why (the reason is logged).

Chosen from the device, dtype, block size and whether the model has attention sinks, as vLLM
does, unless RUNTIME_ATTENTION_BACKEND names one (which is then required to work: a named
backend that cannot run is an error):

- CUDA: flash-attn when installed and usable (float16/bfloat16, block_size a multiple of 256,
  no sinks), else the Triton kernels (Triton ships with CUDA builds of torch), else the
  reference.
- CPU: the C decode kernel for float32 when a compiler is at hand, else the reference.
  `triton` also runs on the CPU in Triton's interpreter (TRITON_INTERPRET=1), for tests.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

from runtime.attention.cpu_kernel import CpuKernelAttention
from runtime.attention.interface import AttentionBackend
from runtime.attention.reference import TorchAttention
from runtime.native import KernelUnavailableError

log = logging.getLogger(__name__)

BACKEND_ENV = "RUNTIME_ATTENTION_BACKEND"
BACKENDS = ("auto", "torch", "cpu-kernel", "triton", "flash-attn")
FLASH_PAGE_MULTIPLE = 256  # flash-attn 2 pages a KV cache only in blocks of multiples of 256


def select_backend(
    device: torch.device, dtype: torch.dtype, block_size: int, sinks: bool = False
) -> AttentionBackend:
    """The backend for a model on `device` in `dtype`; `sinks`: its attention has sinks."""
    choice = os.environ.get(BACKEND_ENV, "auto")
    if choice not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}: expected one of {', '.join(BACKENDS)}, got {choice!r}")
    backend, reason = _choose(choice, device, dtype, block_size, sinks)
    log.info("attention backend: %s (%s)", backend.name, reason)
    return backend


def _choose(
    choice: str, device: torch.device, dtype: torch.dtype, block_size: int, sinks: bool
) -> tuple[AttentionBackend, str]:
    if choice == "torch":
        return TorchAttention(), f"{BACKEND_ENV}=torch"
    if choice == "cpu-kernel" or (choice == "auto" and device.type == "cpu"):
        return _cpu_kernel(choice, device, dtype)
    if choice == "flash-attn":
        if (why := flash_unusable(device, dtype, block_size, sinks)) is not None:
            raise ValueError(f"{BACKEND_ENV}=flash-attn, but {why}")
        return _flash(), f"{BACKEND_ENV}=flash-attn"
    if choice == "triton":
        if (why := triton_unusable(device)) is not None:
            raise ValueError(f"{BACKEND_ENV}=triton, but {why}")
        return _triton(), f"{BACKEND_ENV}=triton"
    # auto on CUDA
    if (no_flash := flash_unusable(device, dtype, block_size, sinks)) is None:
        return _flash(), "flash-attn is installed"
    if (no_triton := triton_unusable(device)) is None:
        return _triton(), f"Triton kernels ({no_flash})"
    return TorchAttention(), f"{no_flash}; {no_triton}"


def flash_unusable(
    device: torch.device, dtype: torch.dtype, block_size: int, sinks: bool = False
) -> str | None:
    """Why flash-attn cannot serve here, or None when it can. Sinks come first: no device,
    install or flag makes flash-attn serve such a model, so they are the reason worth naming."""
    if sinks:
        return "flash-attn 2 has no attention sinks (GPT-OSS)"
    if device.type != "cuda":
        return f"flash-attn runs on CUDA, the engine is on {device}"
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed (pip install -e '.[gpu]')"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn needs float16 or bfloat16, the model is {dtype}"
    if block_size % FLASH_PAGE_MULTIPLE:
        return (
            f"flash-attn pages the KV cache in multiples of {FLASH_PAGE_MULTIPLE} tokens, "
            f"block_size is {block_size} (--block-size 256 to use it)"
        )
    return None


def triton_unusable(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run here, or None when they can."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return (
            f"Triton kernels run on CUDA (or in its interpreter, TRITON_INTERPRET=1), not {device}"
        )
    return None


def _cpu_kernel(
    choice: str, device: torch.device, dtype: torch.dtype
) -> tuple[AttentionBackend, str]:
    forced = choice == "cpu-kernel"
    if device.type != "cpu" or dtype != torch.float32:
        if forced:
            raise ValueError(
                f"{BACKEND_ENV}=cpu-kernel needs float32 on the CPU, not {dtype} on {device}"
            )
        return TorchAttention(), f"the C decode kernel is float32 only, the model is {dtype}"
    try:
        return CpuKernelAttention(), "float32 on the CPU"
    except KernelUnavailableError as exc:
        if forced:
            raise ValueError(f"{BACKEND_ENV}=cpu-kernel, but {exc}") from exc
        return TorchAttention(), f"the C decode kernel is unavailable: {exc}"


# Imported only when chosen: both need packages a CPU install may lack.
def _flash() -> AttentionBackend:
    from runtime.attention.flash import FlashAttention

    return FlashAttention()


def _triton() -> AttentionBackend:
    from runtime.attention.triton_paged import TritonAttention

    return TritonAttention()
