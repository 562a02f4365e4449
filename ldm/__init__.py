"""ViCo (plug-and-play visual condition for personalised text-to-image) on CompVis latent diffusion."""
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
#: The checkout this package runs from (``configs/`` beside ``ldm/``, as in an editable
#: install), or None in an installed wheel: paths recorded relative to it (the shipped
#: ``models/miniworld/base.safetensors``) are found from any working folder.
CHECKOUT: Path | None = _PACKAGE.parent if (_PACKAGE.parent / "configs").is_dir() else None
#: The YAML configs: ``configs/`` in a checkout, or ``ldm/configs/`` inside an installed wheel,
#: where ``pyproject.toml`` puts them.
CONFIG_DIR = CHECKOUT / "configs" if CHECKOUT is not None else _PACKAGE / "configs"
