"""How a checkpoint tensor reaches a parameter: through the parameter's own `weight_loader`.

Each layer attaches the loader that knows its layout (a fused projection copies one shard of
rows; a tensor-parallel layer narrows the tensor to its rank's slice), so the model's
`load_weights` only maps names. A loader always receives the *logical* tensor, the whole one
the checkpoint stores; `logical_shape` says its shape where the parameter holds only a slice.

A weight held quantised from construction is several parameters named `{weight}_{part}` (MXFP4's
`_blocks` and `_scales`), each loading its own part as a quantised checkpoint stores it. The
first part also carries a float loader (`set_float_loader`): it takes the float weight a float
checkpoint or dummy weights give under the name `{weight}`, and fills every part.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# (parameter, checkpoint tensor, shard id of a fused parameter or None for the whole tensor)
WeightLoader = Callable[[nn.Parameter, torch.Tensor, str | None], None]
FloatLoader = Callable[[torch.Tensor], None]


def copy_weight(param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
    """The whole tensor, as stored (converted to the parameter's dtype)."""
    if loaded.shape != param.shape:
        raise ValueError(
            f"checkpoint tensor {tuple(loaded.shape)} != parameter {tuple(param.shape)}"
        )
    param.data.copy_(loaded)


def set_weight_loader(
    module: nn.Module, loader: WeightLoader = copy_weight, logical_shape: tuple[int, ...] = ()
) -> None:
    """Attach `loader` to the module's own parameters (not its children's); a sharded weight
    also records the shape of the whole tensor its loader takes."""
    for name, param in module.named_parameters(recurse=False):
        set_param_loader(param, loader, logical_shape if name == "weight" else ())


def set_param_loader(
    param: nn.Parameter, loader: WeightLoader, logical_shape: tuple[int, ...] = ()
) -> None:
    """One parameter's loader, and the shape of the whole tensor it takes where the parameter
    holds a slice of it, or another layout of it."""
    param.weight_loader = loader  # type: ignore[attr-defined]
    if logical_shape:
        param.logical_shape = logical_shape  # type: ignore[attr-defined]


def logical_shape(param: nn.Parameter) -> tuple[int, ...]:
    """The shape of the whole tensor this parameter holds (a slice of, under tensor
    parallelism)."""
    return tuple(getattr(param, "logical_shape", param.shape))


def set_float_loader(
    param: nn.Parameter, loader: FloatLoader, logical_shape: tuple[int, ...]
) -> None:
    """`param`, the first part of a weight held quantised, takes the float weight (of
    `logical_shape`, as the checkpoint stores it) through `loader`, which fills every part."""
    param.float_loader = loader  # type: ignore[attr-defined]
    param.float_shape = logical_shape  # type: ignore[attr-defined]


def float_name(part: str) -> str:
    """The float weight's name of a quantised weight's part `{weight}_{part}`."""
    return part.rsplit("_", 1)[0]


def float_loader(param: nn.Parameter) -> tuple[FloatLoader, tuple[int, ...]] | None:
    """(loader, shape of the float weight) for a quantised weight's first part, else None."""
    if not hasattr(param, "float_loader"):
        return None
    return param.float_loader, param.float_shape  # type: ignore[attr-defined]
