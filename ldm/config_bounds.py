"""Bounds on the sizes and learning rates of a config, checked before anything is built.

A config's numbers decide allocations: ``timesteps: 10**12`` asks the noise schedule for
7 TiB, ``model_channels: 10**6`` a UNet of about 10^13 parameters, ``num_workers: 10**5`` as
many processes. A config stored in a file (a checkpoint's, an adapter's, a shared run folder's)
is someone else's data: every size in its ``model`` and ``data`` sections must lie within
:data:`SIZE_BOUNDS`, generous bounds far above every Stable Diffusion model (the SD v1 value is
in each comment), and every learning rate must be a finite number >= 0 (or null, where a class
takes null for its default). ``main.py`` applies the
same check to the user's own ``--base`` configs, where it turns a NaN learning rate or
``batch_size: 0`` into one line at start-up instead of a failure minutes later.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

#: Parameter name -> (lowest, highest) accepted value, wherever the name appears under
#: ``model`` or ``data``; for a list (``channel_mult``), each entry.
SIZE_BOUNDS: dict[str, tuple[int, int]] = {
    "timesteps": (1, 100_000),  # 1000
    "image_size": (1, 1024),  # latent side, 64
    "resolution": (1, 16_384),  # autoencoder, 512
    "channels": (1, 1024),  # latent channels, 4
    "in_channels": (1, 1024),  # 4 (UNet), 3 (autoencoder)
    "out_channels": (1, 1024),  # 4
    "out_ch": (1, 1024),  # 3
    "z_channels": (1, 1024),  # 4
    "embed_dim": (1, 16_384),  # 4 (autoencoder), 1024 (OpenCLIP)
    "model_channels": (1, 4096),  # 320
    "ch": (1, 4096),  # 128
    "context_dim": (1, 16_384),  # 768
    "hidden_size": (1, 16_384),  # 768
    "width": (1, 16_384),  # 1024 (OpenCLIP)
    "intermediate_size": (1, 65_536),  # 3072
    "vocab_size": (1, 1_000_000),  # 49408
    "max_length": (3, 4096),  # 77 tokens
    "num_res_blocks": (1, 32),  # 2
    "num_layers": (1, 256),  # 12
    "layers": (1, 256),  # 24 (OpenCLIP)
    "num_heads": (1, 1024),  # 8 (UNet), 12 (CLIP); -1: set by num_head_channels
    "heads": (1, 1024),  # 16 (OpenCLIP)
    "num_head_channels": (1, 4096),  # -1 (SD v1), 64 (SD 2.x)
    "transformer_depth": (1, 64),  # 1
    "channel_mult": (1, 64),  # [1, 2, 4, 4]
    "ch_mult": (1, 64),  # [1, 2, 4, 4]
    "num_vectors_per_token": (1, 1024),  # 1
    "otsu_thresholds": (1, 1024),  # 10
    "batch_size": (1, 4096),  # 1 per process
    "num_workers": (0, 256),  # 0
    "size": (1, 8192),  # training photos, 512 px
}
#: Sizes whose -1 means "not set" (the UNet takes exactly one of the two).
UNSET_ALLOWED = frozenset({"num_heads", "num_head_channels"})
#: The longest list a size may be (``channel_mult``: one entry per resolution level).
MAX_LIST_LENGTH = 16
SECTIONS = ("model", "data")


class BoundsError(ValueError):
    """A size or learning rate out of bounds; the message is one line naming the key."""


def _leaves(node: Any, path: str) -> Iterator[tuple[str, str, Any]]:
    """``(dotted path, key, value)`` of every mapping entry under ``node``."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            where = f"{path}.{key}"
            yield where, str(key), value
            yield from _leaves(value, where)
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            yield from _leaves(value, f"{path}.{index}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_size(where: str, key: str, value: Any) -> None:
    low, high = SIZE_BOUNDS[key]
    values = value if isinstance(value, (list, tuple)) else [value]
    if isinstance(value, (list, tuple)) and len(value) > MAX_LIST_LENGTH:
        raise BoundsError(f"{where} lists {len(value)} values; at most {MAX_LIST_LENGTH} are accepted")
    for item in values:
        if not isinstance(item, int) or isinstance(item, bool):
            raise BoundsError(f"{where} must be a whole number, got {item!r}")
        if not (low <= item <= high or (item == -1 and key in UNSET_ALLOWED)):
            raise BoundsError(f"{where} is {item}; it must be between {low} and {high}")


def check_bounds(config: Mapping[str, Any]) -> None:
    """Refuse a size outside :data:`SIZE_BOUNDS` or a learning rate (a key ending in
    ``learning_rate``) that is not a finite number >= 0, anywhere under the ``model`` and ``data`` sections of a plain (resolved) config.

    Raises:
        BoundsError: one line naming the dotted key.
    """
    for section in SECTIONS:
        for where, key, value in _leaves(config.get(section), section):
            if key.endswith("learning_rate") and value is not None:  # None: the method's default
                if not _is_number(value) or not math.isfinite(value) or value < 0:
                    raise BoundsError(f"{where} must be a finite number >= 0, got {value!r}")
            elif key in SIZE_BOUNDS and value is not None:
                _check_size(where, key, value)
