"""A config that arrives inside a file (checkpoint, adapter, run folder) must never run code.

Each hostile file names a target that would create a marker file if it were called; the tests
check the one-line refusal and that the marker never appears.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

import main
import sample
from ldm.models.loading import ADAPTER_FORMAT, read_vico_weights, resolve_config
from ldm.util import UntrustedConfigError, check_stored_config, is_trusted_target

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "vico-tiny.yaml"
PHOTO = ROOT / "data" / "monster_toy" / "00.jpg"


def hostile_config(marker: Path, where: str = "model") -> dict:
    """The tiny config with one target replaced by ``os.system('touch marker')``."""
    config = OmegaConf.to_container(OmegaConf.load(TINY_CONFIG))
    payload = {"target": "os.system", "params": {"command": f"touch {marker}"}}
    if where == "model":
        config["model"] = payload
    elif where == "nested":
        config["model"]["params"]["unet_config"] = payload
    elif where == "callback":
        config["lightning"]["callbacks"]["image_logger"] = payload
    return config


@pytest.mark.parametrize(
    "target, trusted",
    [
        ("ldm.models.diffusion.ddpm.LatentDiffusion", True),
        ("ldm.modules.diffusionmodules.openaimodel.UNetModel", True),
        ("ldm.callbacks.ImageLogger", True),
        ("pytorch_lightning.loggers.TensorBoardLogger", True),
        ("os.system", False),
        ("builtins.eval", False),
        ("subprocess.Popen", False),
        ("ldm.util.instantiate_from_config", False),  # a function that would build anything
        ("ldm.util.get_obj_from_str", False),
        ("ldm.util.Path", False),  # a class ldm only imports
        ("ldm.util.torch", False),  # a module
        ("ldm.no_such_module.Thing", False),
        ("ldm..x", False),
        ("ldm.util.__class__", False),
        (42, False),
    ],
)
def test_allow_list(target, trusted):
    assert is_trusted_target(target) is trusted


@pytest.mark.parametrize("where", ["model", "nested", "callback"])
def test_check_stored_config_finds_every_target(tmp_path, where):
    marker = tmp_path / "pwned"
    with pytest.raises(UntrustedConfigError, match="refusing to build 'os.system'"):
        check_stored_config(OmegaConf.create(hostile_config(marker, where)), "shared.ckpt")
    assert not marker.exists()


@pytest.mark.parametrize(
    "config, where",
    [
        ({"evil": "os.system", "model": {"target": "${evil}"}}, "model.target"),
        # resolves to a trusted class in this file alone; another file could change what it selects
        ({"model": {"target": "${oc.select:x.y,ldm.models.diffusion.ddpm.LatentDiffusion}"}}, "model.target"),
        ({"x": {"target": "ldm.callbacks.StepTime"}, "lightning": {"callbacks": {"a": "${x}"}}}, "lightning.callbacks.a"),
        ({"x": "os.system", "l": [{"target": "${x}"}]}, "l.0.target"),
    ],
)
def test_a_stored_target_must_be_literal(config, where):
    with pytest.raises(UntrustedConfigError, match=f"x.ckpt: {where} is an interpolation"):
        check_stored_config(OmegaConf.create(config), "x.ckpt")


def test_interpolated_values_that_build_nothing_are_fine():
    check_stored_config(OmegaConf.create({"n": 3, "model": {"target": "ldm.callbacks.StepTime", "params": {"k": "${n}"}}}), "x")


def test_the_projects_configs_pass():
    for name in ("vico.yaml", "vico-tiny.yaml"):
        check_stored_config(OmegaConf.load(ROOT / "configs" / name), name)


def write_hostile_checkpoint(path: Path, marker: Path) -> None:
    state = {"model.diffusion_model.x.image_cross_attention.w": torch.zeros(1)}
    torch.save({"state_dict": state, "config": hostile_config(marker)}, path)


def write_hostile_adapter(path: Path, marker: Path) -> None:
    state = {"model.diffusion_model.x.image_cross_attention.w": torch.zeros(1)}
    metadata = {"format": ADAPTER_FORMAT, "config": OmegaConf.to_yaml(OmegaConf.create(hostile_config(marker)))}
    save_file(state, str(path), metadata=metadata)


@pytest.mark.parametrize("kind", ["checkpoint", "adapter"])
def test_loader_refuses_a_stored_hostile_config(tmp_path, kind):
    marker = tmp_path / "pwned"
    path = tmp_path / ("last.ckpt" if kind == "checkpoint" else "adapter.safetensors")
    (write_hostile_checkpoint if kind == "checkpoint" else write_hostile_adapter)(path, marker)
    weights = read_vico_weights(path)
    with pytest.raises(UntrustedConfigError, match=f"{path.name}.*os.system"):
        resolve_config(weights)
    # A config the user passes explicitly is theirs: it replaces the stored one.
    assert resolve_config(weights, TINY_CONFIG).model.target.startswith("ldm.")
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["checkpoint", "adapter"])
def test_sample_cli_refuses_a_hostile_file_in_one_line(tmp_path, capsys, kind):
    marker = tmp_path / "pwned"
    path = tmp_path / ("last.ckpt" if kind == "checkpoint" else "adapter.safetensors")
    (write_hostile_checkpoint if kind == "checkpoint" else write_hostile_adapter)(path, marker)
    code = sample.main(["--ckpt", str(path), "--ref", str(PHOTO), "--prompt", "a photo of *", "--outdir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and "os.system" in err and path.name in err
    assert not marker.exists()


def test_resume_refuses_a_hostile_run_folder(tmp_path, capsys):
    marker = tmp_path / "pwned"
    run = tmp_path / "shared_run"
    (run / "configs").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    OmegaConf.save(OmegaConf.create(hostile_config(marker, "callback")), run / "configs" / "x-project.yaml")
    torch.save({"state_dict": {}}, run / "checkpoints" / "last.ckpt")
    code = main.main(["-t", "-r", str(run)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and "os.system" in err and "x-project.yaml" in err
    assert not marker.exists()
