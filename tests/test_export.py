"""Exports of the trained weights: the authors' pair, Textual Inversion .pt, diffusers, adapter."""
from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from torch import nn

import ldm.models.export as export_module
from ldm.models.export import DEFAULT_FORMATS, export_trained
from ldm.models.loading import load_vico_model, read_vico_weights
from ldm.modules.embedding_manager import load_authors_embeddings
from ldm.util import instantiate_from_config, save_state_dict
from scripts import export as export_cli

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "vico-tiny.yaml"
STAR = 265


def tiny_config(placeholders=("*",)):
    config = OmegaConf.load(TINY_CONFIG)
    config.model.params.personalization_config.params.placeholder_strings = list(placeholders)
    return config


def build(config, seed: int = 0):
    torch.manual_seed(seed)
    model = instantiate_from_config(config.model)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.normal_(0, 1)
    return model.eval()


@pytest.fixture(scope="module")
def tiny():
    return build(tiny_config())


@pytest.fixture(autouse=True)
def usual_umask():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def s_star(model) -> torch.Tensor:
    return model.embedding_manager.string_to_param_dict["*"].detach()


def test_default_formats_and_file_names(tiny, tmp_path):
    written = export_trained(tiny, tiny_config(), tmp_path / "out", 399)
    assert DEFAULT_FORMATS == ("authors", "textual_inversion", "diffusers")
    assert [p.name for p in written] == [
        "cross_attention-399.pt",
        "embeddings_gs-399.pt",
        "textual_inversion-399.pt",
        "learned_embeds-steps-399.safetensors",
    ]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in written)
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_authors_pair_is_what_their_script_reads(tiny, tmp_path):
    cross_attention, embeddings = export_trained(tiny, tiny_config(), tmp_path, 50, formats=["authors"])
    # Their on_save_checkpoint: {k: v for k, v in self.model.state_dict().items() if "image_cross_attention" in k}
    expected = {k: v for k, v in tiny.model.state_dict().items() if "image_cross_attention" in k}
    saved = torch.load(cross_attention, map_location="cpu", weights_only=True)
    assert type(saved) is dict and list(saved) == list(expected)
    assert all(torch.equal(saved[k], v) and not isinstance(saved[k], nn.Parameter) for k, v in expected.items())

    # Their load_imageca: prefix "model." and load_state_dict(strict=False) into the LatentDiffusion.
    fresh = build(tiny_config(), seed=1)
    fresh.load_state_dict({"model." + k: v for k, v in saved.items()}, strict=False)
    assert all(torch.equal(fresh.model.state_dict()[k], v) for k, v in expected.items())

    # Their EmbeddingManager.load: a full unpickle, then the ParameterDict becomes a child module.
    content = torch.load(embeddings, map_location="cpu", weights_only=False)
    assert set(content) == {"string_to_token", "string_to_param"}
    assert content["string_to_token"]["*"].ndim == 0 and content["string_to_token"]["*"].item() == STAR
    holder = nn.Module()
    holder.string_to_param_dict = nn.ParameterDict()
    holder.string_to_param_dict = content["string_to_param"]
    assert torch.equal(holder.string_to_param_dict["*"].to("cpu"), s_star(tiny))
    # torch 1.10 reads a ParameterDict's entries from _parameters; torch 2 lists them in _keys.
    state = content["string_to_param"].__dict__
    assert list(state["_keys"]) == ["*"] and torch.equal(state["_parameters"]["*"], s_star(tiny))


def test_authors_pair_loads_back(tiny, tmp_path):
    base = tmp_path / "base.safetensors"
    save_state_dict(tiny.base_state_dict(), base)
    cross_attention, _ = export_trained(tiny, tiny_config(), tmp_path, 7, formats=["authors"])
    model, _ = load_vico_model(cross_attention, config=TINY_CONFIG, base_ckpt=base)
    for key, value in tiny.trained_state_dict().items():
        assert torch.equal(model.trained_state_dict()[key], value), key


def test_textual_inversion_pt_is_what_common_tools_read(tiny, tmp_path):
    (path,) = export_trained(tiny, tiny_config(), tmp_path, 400, formats=["textual_inversion"])
    data = torch.load(path, map_location="cpu", weights_only=True)  # plain dicts and tensors only
    # AUTOMATIC1111: string_to_param, a ParameterDict's _parameters or a dict, one entry.
    params = data["string_to_param"]
    params = getattr(params, "_parameters", params)
    assert len(params) == 1 and torch.equal(next(iter(params.values())), s_star(tiny))
    # diffusers' load_textual_inversion (A1111 branch): the token is "name" (the file's stem, the
    # web UI's trigger word; "*" is already a CLIP token), the vectors "*".
    assert data["name"] == path.stem.rsplit("-", 1)[0] and torch.equal(data["string_to_param"]["*"], s_star(tiny))
    assert data["step"] == 400 and data["string_to_token"] == {"*": STAR}
    assert data["string_to_param"]["*"].dtype == torch.float32
    assert torch.equal(load_authors_embeddings(path)["*"], s_star(tiny))


def test_diffusers_safetensors(tiny, tmp_path):
    (path,) = export_trained(tiny, tiny_config(), tmp_path, 400, formats=["diffusers"])
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        assert list(handle.keys()) == ["*"]
        assert torch.equal(handle.get_tensor("*"), s_star(tiny))


def test_adapter_format(tiny, tmp_path):
    (path,) = export_trained(tiny, tiny_config(), tmp_path, 12, formats=["adapter"])
    assert path.name == "adapter-12.safetensors"
    weights = read_vico_weights(path)
    assert all(torch.equal(weights.state_dict[k], v) for k, v in tiny.trained_state_dict().items())


def test_textual_inversion_formats_hold_the_first_placeholder(tmp_path, caplog):
    config = tiny_config(placeholders=("*", "@"))
    model = build(config)
    with caplog.at_level(logging.WARNING, logger="ldm.models.export"):
        ti, diffusers = export_trained(model, config, tmp_path, 1, formats=["textual_inversion", "diffusers"])
    assert "'*' only" in caplog.text and "'@'" in caplog.text
    assert list(torch.load(ti, weights_only=True)["string_to_param"]) == ["*"]
    with safe_open(str(diffusers), framework="pt") as handle:
        assert list(handle.keys()) == ["*"]


def test_failed_write_keeps_the_previous_file(tiny, tmp_path, monkeypatch):
    (path,) = export_trained(tiny, tiny_config(), tmp_path, 5, formats=["textual_inversion"])
    before = path.read_bytes()

    def broken_save(obj, f):
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(export_module.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export_trained(tiny, tiny_config(), tmp_path, 5, formats=["textual_inversion"])
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_bad_arguments(tiny, tmp_path):
    with pytest.raises(ValueError, match="unknown export format 'onnx'"):
        export_trained(tiny, tiny_config(), tmp_path, 1, formats=["authors", "onnx"])
    with pytest.raises(ValueError, match="must be >= 0"):
        export_trained(tiny, tiny_config(), tmp_path, -1)
    assert not any(tmp_path.iterdir())


# -------------------------------------------------------------- scripts/export.py
@pytest.fixture
def run(tiny, tmp_path):
    """A run folder as main.py writes it: checkpoints/step=000003.ckpt and last.ckpt."""
    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    config = OmegaConf.to_container(tiny_config())
    for name, step in (("step=000003.ckpt", 3), ("last.ckpt", 4)):
        content = {"state_dict": tiny.trained_state_dict(), "config": config, "global_step": step}
        torch.save(content, folder / "checkpoints" / name)
    return folder


def test_cli_exports_a_run(tiny, run, capsys):
    assert export_cli.main(["--run", str(run)]) == 0
    checkpoints = run / "checkpoints"
    names = ["cross_attention-4.pt", "embeddings_gs-4.pt", "textual_inversion-4.pt"]
    names.append("learned_embeds-steps-4.safetensors")
    assert capsys.readouterr().out.split() == [str(checkpoints / name) for name in names]
    assert torch.equal(load_authors_embeddings(checkpoints / "embeddings_gs-4.pt")["*"], s_star(tiny))
    assert export_cli.main(["--run", str(run), "--step", "3", "--formats", "diffusers", "adapter"]) == 0
    assert (checkpoints / "learned_embeds-steps-3.safetensors").is_file()
    assert (checkpoints / "adapter-3.safetensors").is_file()


def test_cli_exports_a_file_and_names_the_step(tiny, run, tmp_path, capsys):
    last = run / "checkpoints" / "last.ckpt"
    assert export_cli.main(["--run", str(last), "--formats", "authors", "--outdir", str(tmp_path / "o")]) == 0
    pair = tmp_path / "o" / "cross_attention-4.pt"
    assert pair.is_file()
    argv = ["--run", str(pair), "--config", str(TINY_CONFIG), "--formats", "diffusers", "--outdir", str(tmp_path / "p")]
    assert export_cli.main(argv) == 0  # the step comes from the authors' file name
    assert (tmp_path / "p" / "learned_embeds-steps-4.safetensors").is_file()
    capsys.readouterr()


def test_cli_mistakes_are_one_line(run, tmp_path, capsys):
    assert export_cli.main(["--run", str(run), "--formats", "adapter", "--outdir", str(tmp_path)]) == 0
    cases = [
        (["--run", str(run), "--step", "9"], "step=000009.ckpt not found, nor an export of step 9 that holds all"),
        (["--run", str(tmp_path / "nope")], "no such run folder or file"),
        (["--run", str(run), "--formats", "onnx"], "invalid choice: 'onnx'"),
    ]
    # an adapter records its step (issue 23), so exporting it needs no --step
    assert export_cli.main(["--run", str(tmp_path / "adapter-4.safetensors"), "--outdir", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "learned_embeds-steps-4.safetensors").is_file()
    capsys.readouterr()
    for argv, fragment in cases:
        assert export_cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and fragment in err, (argv, err)
    assert not list((run / "checkpoints").glob("*-9.*"))


def test_cli_never_writes_over_its_input(tiny, run, tmp_path, capsys):
    """The authors' release is fp16: exporting it as the pair into its own folder used to replace it with fp32."""
    folder = tmp_path / "release"
    assert export_cli.main(["--run", str(run / "checkpoints" / "last.ckpt"), "--formats", "authors", "--outdir", str(folder)]) == 0
    cross_attention = folder / "cross_attention-4.pt"
    torch.save({k: v.half() for k, v in torch.load(cross_attention, weights_only=True).items()}, cross_attention)
    release = {path.name: path.read_bytes() for path in folder.iterdir()}
    capsys.readouterr()

    argv = ["--run", str(cross_attention), "--config", str(TINY_CONFIG)]
    assert export_cli.main([*argv, "--outdir", str(folder)]) == 2
    assert capsys.readouterr().err == (
        f"error: --outdir {folder}: the export would write over its input {cross_attention}; choose another --outdir\n"
    )
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == release  # nothing written, no staging left

    assert export_cli.main(argv) == 0  # by default, beside it in exported/
    exported = folder / "exported"
    names = ["cross_attention-4.pt", "embeddings_gs-4.pt", "textual_inversion-4.pt", "learned_embeds-steps-4.safetensors"]
    assert capsys.readouterr().out.split() == [str(exported / name) for name in names]
    assert {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()} == release
    assert sorted(path.name for path in folder.iterdir()) == [*sorted(release), "exported"]
    assert {v.dtype for v in torch.load(exported / "cross_attention-4.pt", weights_only=True).values()} == {torch.float32}


def test_cli_exports_into_the_checkpoints_folder_when_nothing_read_is_replaced(run, capsys):
    adapter_argv = ["--run", str(run), "--formats", "adapter"]
    assert export_cli.main(adapter_argv) == 0
    adapter = run / "checkpoints" / "adapter-4.safetensors"
    assert capsys.readouterr().out.split() == [str(adapter)]
    assert export_cli.main(["--run", str(adapter), "--step", "4", "--formats", "adapter"]) == 0  # its own name: beside it
    assert capsys.readouterr().out.split() == [str(run / "checkpoints" / "exported" / "adapter-4.safetensors")]

