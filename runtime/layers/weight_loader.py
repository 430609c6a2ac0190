"""How a checkpoint tensor reaches a parameter: through the parameter's own `weight_loader`.

Each layer attaches the loader that knows its layout (a fused projection copies one shard of
rows; tensor parallelism will slice here too), so the model's `load_weights` only maps names.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# (parameter, checkpoint tensor, shard id of a fused parameter or None)
WeightLoader = Callable[[nn.Parameter, torch.Tensor, str | None], None]


def copy_weight(param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
    """The whole tensor, as stored (converted to the parameter's dtype)."""
    if loaded.shape != param.shape:
        raise ValueError(
            f"checkpoint tensor {tuple(loaded.shape)} != parameter {tuple(param.shape)}"
        )
    param.data.copy_(loaded)


def set_weight_loader(module: nn.Module, loader: WeightLoader = copy_weight) -> None:
    """Attach `loader` to the module's own parameters (not its children's)."""
    for param in module.parameters(recurse=False):
        param.weight_loader = loader  # type: ignore[attr-defined]
