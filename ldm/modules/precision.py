"""Frozen weights cast once to the autocast dtype, instead of at every use.

Under ``torch.autocast`` every ``nn.Linear`` and ``nn.Conv2d`` casts its float32 weight and
bias to the autocast dtype at each call. Autocast caches those casts only for leaf tensors
that require grad, so the frozen Stable Diffusion weights are cast again at every use: about
2,400 cast kernels per training step of the full UNet. :func:`cache_autocast_weights` keeps
one low-precision copy of each frozen weight beside the float32 one and uses it whenever
autocast with that dtype is on; the float32 weights stay untouched (state dicts, checkpoints
and calls outside autocast see exactly what they saw before).

The copy is the round-to-nearest cast that autocast itself performs, and the layer then
calls the same kernel on the same values, so outputs and gradients are bit-identical to
autocast's (``tests/test_training.py::test_cached_autocast_weights_equal_autocast``).
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

_ATTRIBUTE = "_autocast_weights"


def _active(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    cached = getattr(module, _ATTRIBUTE, None)
    if cached is None:
        return None
    dtype, weight, bias = cached
    device_type = x.device.type
    if weight.device != x.device or not torch.is_autocast_enabled(device_type):
        return None
    if torch.get_autocast_dtype(device_type) != dtype:
        return None
    return weight, bias


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    cached = _active(self, x)
    if cached is None:
        return F.linear(x, self.weight, self.bias)
    return F.linear(x, *cached)


def _conv2d_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    cached = _active(self, x)
    if cached is None:
        return self._conv_forward(x, self.weight, self.bias)
    return self._conv_forward(x, *cached)


def cache_autocast_weights(module: nn.Module, dtype: torch.dtype) -> int:
    """Give every frozen ``nn.Linear`` / ``nn.Conv2d`` under ``module`` a ``dtype`` copy of its
    weights, used under autocast to ``dtype``. Call after the module is on its device; layers
    with a trainable parameter are left alone (autocast caches those itself).

    Returns:
        The number of layers given a copy.
    """
    count = 0
    for layer in module.modules():
        if type(layer) not in (nn.Linear, nn.Conv2d):
            continue
        if any(p.requires_grad for p in layer.parameters(recurse=False)):
            continue
        with torch.no_grad():
            weight = layer.weight.detach().to(dtype)
            bias = None if layer.bias is None else layer.bias.detach().to(dtype)
        setattr(layer, _ATTRIBUTE, (dtype, weight, bias))
        forward = _linear_forward if isinstance(layer, nn.Linear) else _conv2d_forward
        layer.forward = types.MethodType(forward, layer)
        count += 1
    return count


def release_autocast_weights(module: nn.Module) -> None:
    """Drop the copies made by :func:`cache_autocast_weights` (the layers are plain again)."""
    for layer in module.modules():
        if getattr(layer, _ATTRIBUTE, None) is not None:
            delattr(layer, _ATTRIBUTE)
            del layer.forward


def autocast_dtype(precision: str | int | None) -> torch.dtype | None:
    """The autocast dtype of a Lightning precision setting (``None`` for full precision)."""
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(precision))
