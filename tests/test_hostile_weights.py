"""Sizes before values: weight files whose tensors claim more than they hold, and stored configs
that would build an absurd model, are refused in one line before anything is allocated.

Each file is made here, a few KiB on disk, claiming 256 GiB (a stride-0 ``[2**18, 2**18]``
tensor) or more data than the file has. They are read in one subprocess whose address space
is limited to what it had after its imports plus 2 GiB, so a reader that allocated first would
fail with a MemoryError instead of the expected message.
"""
from __future__ import annotations

import json
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

import main
from ldm.models.export import TI_KEY
from ldm.util import CheckpointError, UntrustedConfigError, check_stored_config, read_checkpoint
from tests.test_sampling import tiny_config

ROOT = Path(__file__).resolve().parents[1]
GIANT = (2**18, 2**18)
IMAGE_ATTENTION_KEY = "diffusion_model.output_blocks.4.1.image_cross_attention.to_q.weight"

#: Reads each ``[reader, path(s)]`` of argv[1] (JSON) under the memory limit; one JSON line each.
RUNNER = """
import json, resource, sys
from ldm.models.loading import load_vico_model, read_vico_weights
from ldm.models.base_checkpoint import read_state_dict
from ldm.util import CheckpointError, read_checkpoint, read_torchscript_tensors

def mapped_bytes():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize"))

limit = mapped_bytes() + (2 << 30)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
readers = {"vico": read_vico_weights, "model": load_vico_model, "checkpoint": read_checkpoint,
           "state_dict": read_state_dict, "torchscript": read_torchscript_tensors}
for reader, paths in json.loads(sys.argv[1]):
    try:
        readers[reader](paths)
        result = "read"
    except (CheckpointError, ValueError) as err:
        result = str(err)
    except MemoryError:
        result = "MemoryError"
    print(json.dumps(result), flush=True)
"""


def giant() -> torch.Tensor:
    """256 GiB as its shape says, 4 bytes on disk."""
    return torch.zeros(1).expand(*GIANT)


def legacy_storage_claim(path: Path, elements: int) -> None:
    """A legacy (pre-zip) ``torch.save`` file whose one float storage claims ``elements``."""
    torch.save({"state_dict": {"model.x": torch.zeros(7)}}, path, _use_new_zipfile_serialization=False)
    claim = b"J" + struct.pack("<i", elements)
    data = path.read_bytes()
    assert data.count(b"K\x07N") == data.count(b"K\x07\x85") == 1  # the storage's numel, the tensor's shape
    path.write_bytes(data.replace(b"K\x07N", claim + b"N").replace(b"K\x07\x85", claim + b"\x85"))


def lying_safetensors(path: Path, metadata: dict[str, str] | None = None) -> None:
    """A safetensors header claiming a ``[2**18, 2**18]`` float tensor over 4 bytes of data."""
    header = {"model.x": {"dtype": "F32", "shape": list(GIANT), "data_offsets": [0, 4]}}
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"\0" * 4)


def small_cross_attention(path: Path) -> None:
    torch.save({IMAGE_ATTENTION_KEY: torch.zeros(4, 4)}, path)


@pytest.fixture(scope="module")
def hostile_files(tmp_path_factory) -> dict[str, tuple[str, object, str]]:
    """Case -> (reader, path or paths, what the one-line error must say)."""
    folder = tmp_path_factory.mktemp("hostile")
    claim = "claims shape [262144, 262144] (256.0 GiB) but holds 4 bytes of data"
    cases: dict[str, tuple[str, object, str]] = {}

    training = folder / "last.ckpt"
    torch.save({"state_dict": {"model.x.image_cross_attention.w": giant()}, "global_step": 1}, training)
    cases["training checkpoint"] = ("vico", str(training), f"{training}: key 'state_dict.model.x.image_cross_attention.w' {claim}")

    legacy = folder / "legacy.ckpt"
    torch.save({"state_dict": {"model.x.image_cross_attention.w": giant()}}, legacy, _use_new_zipfile_serialization=False)
    cases["legacy-format checkpoint"] = ("vico", str(legacy), f"{legacy}: key 'state_dict.model.x.image_cross_attention.w' {claim}")

    legacy_claim = folder / "legacy-claim.ckpt"
    legacy_storage_claim(legacy_claim, 2**30)
    cases["legacy storage larger than the file"] = (
        "checkpoint", str(legacy_claim), f"{legacy_claim}: its tensors claim 4.0 GiB of data in a file of",
    )  # fmt: skip

    adapter = folder / "adapter.safetensors"
    lying_safetensors(adapter, {"format": "vico-adapter"})
    cases["adapter export"] = ("vico", str(adapter), f"{adapter}: key 'model.x' claims shape [262144, 262144] (256.0 GiB) but holds 4 bytes")

    authors = folder / "authors"
    authors.mkdir()
    torch.save({IMAGE_ATTENTION_KEY: giant()}, authors / "cross_attention-5.pt")
    small_cross_attention(authors / "cross_attention-6.pt")
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": {"*": giant()}}, authors / "embeddings_gs-6.pt")
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": {"*": torch.zeros(1, 4)}}, authors / "embeddings_gs-5.pt")
    cross_attention = authors / "cross_attention-5.pt"
    cases["authors' cross_attention"] = ("vico", str(cross_attention), f"{cross_attention}: key '{IMAGE_ATTENTION_KEY}' {claim}")
    embeddings = authors / "embeddings_gs-6.pt"
    cases["authors' embeddings_gs"] = ("vico", str(embeddings), f"{embeddings}: key 'string_to_param.*' {claim}")

    textual_inversion = folder / "textual_inversion-3.pt"
    torch.save({"string_to_token": {TI_KEY: 265}, "string_to_param": {TI_KEY: giant()}, "name": "*", "step": 3}, textual_inversion)
    cases["Textual Inversion .pt beside a cross_attention file"] = (
        "vico", [str(authors / "cross_attention-6.pt"), str(textual_inversion)],
        f"{textual_inversion}: key 'string_to_param.*' {claim}",
    )  # fmt: skip

    base = folder / "sd-base.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.out.2.weight": giant()}}, base)
    cases["base checkpoint"] = ("state_dict", str(base), f"{base}: key 'state_dict.model.diffusion_model.out.2.weight' {claim}")
    base_safetensors = folder / "sd-base.safetensors"
    lying_safetensors(base_safetensors)
    cases["base safetensors"] = ("state_dict", str(base_safetensors), f"{base_safetensors}: key 'model.x' claims shape")

    diffusers = folder / "diffusers"
    for part in ("unet", "vae", "text_encoder"):
        (diffusers / part).mkdir(parents=True)
    torch.save({"conv_in.weight": giant()}, diffusers / "unet" / "diffusion_pytorch_model.bin")
    save_file({"x": torch.zeros(1)}, str(diffusers / "vae" / "diffusion_pytorch_model.safetensors"))
    save_file({"x": torch.zeros(1)}, str(diffusers / "text_encoder" / "model.safetensors"))
    unet = diffusers / "unet" / "diffusion_pytorch_model.bin"
    cases["diffusers folder"] = ("state_dict", str(diffusers), f"{unet}: key 'conv_in.weight' {claim}")

    scripted = folder / "ViT-B-32.pt"
    module = torch.jit.script(torch.nn.Linear(2, 2))
    module.weight = torch.nn.Parameter(giant())
    module.save(str(scripted))
    cases["TorchScript metric weights"] = ("torchscript", str(scripted), f"{scripted}: key 'weight' {claim}")
    return cases


def test_giant_tensors_are_refused_before_any_allocation(hostile_files):
    jobs = [[reader, paths] for reader, paths, _ in hostile_files.values()]
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(jobs)], capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    assert result.returncode == 0, result.stderr
    messages = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(messages) == len(hostile_files), result.stdout
    for (name, (_, _, expected)), message in zip(hostile_files.items(), messages):
        assert expected in message and "\n" not in message, (name, message)


def test_a_zip_bomb_is_refused_before_it_is_inflated(tmp_path):
    """A deflated zip record inflates when not memory-mapped (``torch.load`` of an embeddings file)."""
    plain = tmp_path / "plain.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 1 << 24)}}, plain)  # 64 MiB of zeros
    bomb = tmp_path / "embeddings_gs-1.pt"
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info))
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(CheckpointError, match=r"its tensors claim 64\.0 MiB of data in a file of .* KiB"):
        read_checkpoint(bomb)


def test_whole_checkpoints_in_every_format_still_read(tmp_path):
    state = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.arange(4.0)[::2], "ids": torch.arange(77).expand(1, -1)}
    for name, kwargs in {"zip.ckpt": {}, "legacy.ckpt": {"_use_new_zipfile_serialization": False}}.items():
        torch.save({"state_dict": state, "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(3)}}}]}, tmp_path / name, **kwargs)
        read = read_checkpoint(tmp_path / name)["state_dict"]
        assert all(torch.equal(read[k], v) for k, v in state.items()), name
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    assert torch.equal(read_checkpoint(tmp_path / "w.safetensors")["b"], torch.tensor([0.0, 2.0]))


# ------------------------------------------------------------------ stored configs
@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("model.params.timesteps", 10**12, "model.params.timesteps is 1000000000000; it must be between 1 and 100000"),
        ("model.params.unet_config.params.model_channels", 10**7, "model_channels is 10000000; it must be between 1 and 4096"),
        ("model.params.unet_config.params.context_dim", 2**30, "context_dim is 1073741824"),
        ("model.params.unet_config.params.channel_mult", [1, 2, 1000], "channel_mult is 1000; it must be between 1 and 64"),
        ("model.params.unet_config.params.num_res_blocks", 10**4, "num_res_blocks is 10000"),
        ("model.params.image_size", 10**6, "model.params.image_size is 1000000"),
        ("model.params.first_stage_config.params.ddconfig.resolution", 10**9, "resolution is 1000000000"),
        ("model.params.cond_stage_config.params.num_layers", 10**5, "num_layers is 100000"),
        ("data.params.num_workers", 10**5, "data.params.num_workers is 100000; it must be between 0 and 256"),
        ("model.params.timesteps", "1e12", "model.params.timesteps must be a whole number, got '1e12'"),
        ("model.base_learning_rate", float("nan"), "model.base_learning_rate must be a finite number >= 0, got nan"),
    ],
)
def test_stored_configs_of_absurd_models_are_refused_in_one_line(tmp_path, key, value, expected):
    config = tiny_config()
    OmegaConf.update(config, key, value, merge=False)
    with pytest.raises(UntrustedConfigError) as caught:
        check_stored_config(OmegaConf.to_container(config), "last.ckpt")
    message = str(caught.value)
    assert message.startswith("last.ckpt: its stored config is refused: ") and expected in message and "\n" not in message


def test_an_absurd_stored_config_is_refused_before_building(tmp_path, capsys):
    """Through the loader and through main.py -r, in the memory-limited subprocess for the first."""
    config = OmegaConf.to_container(tiny_config())
    config["model"]["params"]["unet_config"]["params"]["model_channels"] = 2**20
    checkpoint = tmp_path / "absurd.ckpt"
    torch.save({"state_dict": {"model.x.image_cross_attention.w": torch.zeros(1)}, "config": config}, checkpoint)
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps([["model", str(checkpoint)]])], capture_output=True, text=True, cwd=ROOT, timeout=600
    )  # fmt: skip
    assert json.loads(result.stdout) == (
        f"{checkpoint}: its stored config is refused: "
        f"model.params.unet_config.params.model_channels is 1048576; it must be between 1 and 4096"
    )
    run = tmp_path / "run"
    (run / "configs").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    OmegaConf.save(OmegaConf.create(config), run / "configs" / "project.yaml")
    (run / "checkpoints" / "last.ckpt").write_bytes(pickle.dumps(0))
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert main.main(["-t", "-r", str(run)]) == 2
    assert capsys.readouterr().err == (
        f"error: {run / 'configs' / 'project.yaml'}: its stored config is refused: "
        f"model.params.unet_config.params.model_channels is 1048576; it must be between 1 and 4096\n"
    )
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
