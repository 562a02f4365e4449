"""ViCo (plug-and-play visual condition for personalised text-to-image) on CompVis latent diffusion."""
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
#: The YAML configs: ``configs/`` beside ``ldm/`` in a checkout (and an editable install), or
#: ``ldm/configs/`` inside an installed wheel, where ``pyproject.toml`` puts them.
CONFIG_DIR = _PACKAGE.parent / "configs" if (_PACKAGE.parent / "configs").is_dir() else _PACKAGE / "configs"
