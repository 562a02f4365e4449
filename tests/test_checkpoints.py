"""Reading weight files: what each wrong file is called, values that would give black images,
SD v1 in the diffusers folder layout, and adapters fit for sharing."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ldm.models import diffusers_layout
from ldm.models.loading import base_checkpoint_path, load_vico_model, read_vico_weights, save_adapter
from ldm.models.base_checkpoint import find_base_checkpoint, load_base_checkpoint, read_state_dict
from ldm.util import CheckpointError, instantiate_from_config, read_checkpoint, save_state_dict
from tests.manifest import read_manifest
from tests.test_sampling import build_tiny, tiny_config

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"


@pytest.fixture(scope="module")
def tiny():
    return build_tiny(tiny_config())


# ------------------------------------------------------------ what a file is
def test_each_wrong_file_is_named_for_what_it_is(tmp_path):
    random_bytes = tmp_path / "random.ckpt"
    random_bytes.write_bytes(os.urandom(4096))
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:3000])
    hostile = tmp_path / "hostile.ckpt"
    torch.save({"state_dict": {}, "payload": Path("x")}, hostile)
    scripted = tmp_path / "model.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(scripted))
    cases = {
        random_bytes: "not a checkpoint (neither a PyTorch",
        empty: "is empty (0 bytes)",
        truncated: "truncated or corrupted zip archive",
        hostile: "refused to unpickle 'pathlib.",
        scripted: "a TorchScript archive",
        tmp_path: "is a directory, not a checkpoint file",
        tmp_path / "missing.ckpt": "checkpoint not found",
    }
    for path, fragment in cases.items():
        with pytest.raises(CheckpointError) as caught:
            read_checkpoint(path)
        message = str(caught.value)
        assert fragment in message and str(path) in message and "\n" not in message, (path, message)
        assert "unpickle" not in message or path == hostile, message


def test_safetensors_are_recognised_by_content(tmp_path):
    path = tmp_path / "weights.ckpt"  # a safetensors file under another name
    save_file({"w": torch.arange(3.0)}, str(path))
    assert torch.equal(read_checkpoint(path)["w"], torch.arange(3.0))


def test_vico_loader_says_directory(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory, not a checkpoint file"):
        read_vico_weights(tmp_path)


# ------------------------------------------------------- values, not just shapes
@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda v: v.to(torch.int32), "holds int32 values; weights must be floating point"),
        (lambda v: v.clone().index_fill_(0, torch.tensor([0]), float("nan")), "holds NaN or infinite values"),
        (lambda v: v.clone().index_fill_(0, torch.tensor([0]), float("inf")), "holds NaN or infinite values"),
    ],
)
def test_broken_values_in_a_base_are_refused(tiny, tmp_path, change, fragment):
    state = tiny.base_state_dict()
    key = "model.diffusion_model.out.2.weight"
    state[key] = change(state[key])
    path = tmp_path / "base.safetensors"
    save_state_dict(state, path)
    with pytest.raises(CheckpointError) as caught:
        load_base_checkpoint(tiny, path)
    message = str(caught.value)
    assert fragment in message and key in message and "\n" not in message


def test_integer_or_nan_adapters_are_refused_before_building(tiny, tmp_path):
    config = tiny_config()
    config.model.params.ckpt_path = str(tmp_path / "base.safetensors")
    adapter = tmp_path / "adapter.safetensors"
    save_adapter(tiny, config, adapter)
    for name, change in {"int32": lambda v: v.to(torch.int32), "nan": lambda v: v * float("nan")}.items():
        tensors = read_vico_weights(adapter).state_dict
        key = next(iter(tensors))
        tensors[key] = change(tensors[key])
        broken = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(broken), metadata={"format": "vico-adapter"})
        with pytest.raises(CheckpointError, match=f"{name}.safetensors: key '{key}' holds"):
            read_vico_weights(broken)


# ------------------------------------------------------------- diffusers layout
def diffusers_manifest() -> dict[str, dict[str, tuple[int, ...]]]:
    """``{part: {key: shape}}`` of the published SD v1 diffusers layout."""
    parts: dict[str, dict[str, tuple[int, ...]]] = {"unet": {}, "vae": {}, "text_encoder": {}}
    for key, shape in read_manifest(DATA / "sd-v1-diffusers-state-dict.tsv").items():
        part, _, name = key.partition("/")
        parts[part][name] = shape
    return parts


def convert(parts: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {
        **diffusers_layout.unet_to_compvis(parts["unet"]),
        **diffusers_layout.vae_to_compvis(parts["vae"]),
        **diffusers_layout.text_encoder_to_compvis(parts["text_encoder"]),
    }


def test_diffusers_manifest_maps_onto_the_compvis_manifest():
    """Every published diffusers key of SD v1 lands on its CompVis key with the CompVis shape."""
    parts = {
        part: {key: torch.empty(shape, device="meta") for key, shape in keys.items()}
        for part, keys in diffusers_manifest().items()
    }
    converted = convert(parts)
    compvis = read_manifest(DATA / "sd-v1-state-dict.tsv")
    expected = {k: v for k, v in compvis.items() if k.startswith(("model.", "first_stage_model.", "cond_stage_model."))}
    assert len(converted) == sum(len(p) for p in parts.values())  # one to one
    assert set(converted) == set(expected)
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected


def small_sd_config():
    """The SD v1 layout (4 levels, 2 resnets, attention on 3 levels, 4-level VAE) at tiny widths."""
    config = OmegaConf.load(ROOT / "configs" / "vico.yaml")
    unet = config.model.params.unet_config.params
    unet.model_channels, unet.context_dim, unet.use_checkpoint = 32, 32, False
    vae = config.model.params.first_stage_config.params.ddconfig
    vae.ch, vae.resolution = 32, 64
    config.model.params.cond_stage_config = tiny_config().model.params.cond_stage_config
    return config


def fabricate_diffusers_folder(model, folder: Path, vae_names: str = "new", unet_suffix: str = ".safetensors") -> None:
    """A diffusers folder with the published key names (those of the manifest) holding the
    weights of ``model``; the text encoder has only the model's layers."""
    base = model.base_state_dict()
    for part, keys in diffusers_manifest().items():
        numbered = {key: torch.tensor([i]) for i, key in enumerate(keys)}
        names = {int(v): k for k, v in convert({p: numbered if p == part else {} for p in ("unet", "vae", "text_encoder")}).items()}
        tensors = {}
        for i, key in enumerate(keys):
            compvis = names[i]
            if compvis.endswith("position_ids"):
                tensors[key] = torch.arange(77)[None]
            elif compvis in base:
                value = base[compvis]
                tensors[key] = value.flatten(1) if part == "vae" and value.ndim == 4 and ".attentions." in key else value
        if part == "vae" and vae_names == "old":
            renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
            for new, old in renames.items():
                tensors = {k.replace(new, old): v for k, v in tensors.items()}
        (folder / part).mkdir(parents=True)
        stem = "model" if part == "text_encoder" else "diffusion_pytorch_model"
        suffix = unet_suffix if part == "unet" else (".bin" if part == "vae" else ".safetensors")
        path = folder / part / f"{stem}{suffix}"
        if suffix.endswith(".bin"):
            torch.save(tensors, path)
        else:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


@pytest.fixture(scope="module")
def small_sd():
    torch.manual_seed(0)
    return instantiate_from_config(small_sd_config().model).eval()


@pytest.mark.parametrize(("vae_names", "unet_suffix"), [("new", ".safetensors"), ("old", ".fp16.safetensors")])
def test_diffusers_folder_loads_the_same_weights(small_sd, tmp_path, vae_names, unet_suffix):
    source = small_sd.base_state_dict()
    folder = tmp_path / "stable-diffusion-v1-5"
    fabricate_diffusers_folder(small_sd, folder, vae_names, unet_suffix)
    assert set(read_state_dict(folder)) >= set(source)
    torch.manual_seed(1)
    fresh = instantiate_from_config(small_sd_config().model)
    assert not torch.equal(fresh.base_state_dict()["first_stage_model.encoder.mid.attn_1.q.weight"], source["first_stage_model.encoder.mid.attn_1.q.weight"])
    load_base_checkpoint(fresh, folder)
    for key, value in fresh.base_state_dict().items():
        assert torch.equal(value, source[key]), key


def test_a_diffusers_folder_as_the_configs_base(small_sd, tmp_path):
    """``--actual_resume``/``--base_ckpt`` end up as ``model.params.ckpt_path``, read at construction."""
    folder = tmp_path / "sd"
    fabricate_diffusers_folder(small_sd, folder)
    config = small_sd_config()
    config.model.params.ckpt_path = str(folder)
    model = instantiate_from_config(config.model)
    for key, value in model.base_state_dict().items():
        assert torch.equal(value, small_sd.base_state_dict()[key]), key


def test_diffusers_folder_errors_are_one_line(small_sd, tmp_path):
    folder = tmp_path / "sd"
    fabricate_diffusers_folder(small_sd, folder)
    (folder / "text_encoder" / "model.safetensors").unlink()
    cases = {folder: "text_encoder: no weights file (model.safetensors/.bin or pytorch_model.safetensors/.bin)"}
    plain = tmp_path / "plain"
    plain.mkdir()
    cases[plain] = "is a directory, neither a checkpoint file nor a diffusers folder"
    half = tmp_path / "half"
    (half / "unet").mkdir(parents=True)
    cases[half] = "a diffusers folder needs unet/, vae/ and text_encoder/; vae/ is missing"
    for path, fragment in cases.items():
        with pytest.raises(CheckpointError) as caught:
            find_base_checkpoint(path)
        assert fragment in str(caught.value) and "\n" not in str(caught.value), str(caught.value)
        with pytest.raises(CheckpointError, match=fragment.split(":")[0]):
            load_base_checkpoint(small_sd, path)
    other = tmp_path / "other"
    fabricate_diffusers_folder(small_sd, other)
    tensors = torch.load(other / "vae" / "diffusion_pytorch_model.bin", weights_only=True)
    tensors["decoder.conv_out.weight"] = torch.zeros(3, 7, 3, 3)
    torch.save(tensors, other / "vae" / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"key 'first_stage_model\.decoder\.conv_out\.weight' has shape \[3, 7, 3, 3\]"):
        load_base_checkpoint(small_sd, other)


# --------------------------------------------------------------- sharing
def test_adapter_is_readable_by_others_and_has_no_absolute_paths(tiny, tmp_path):
    base = tmp_path / "models" / "sd-v1-4.ckpt"
    base.parent.mkdir()
    save_state_dict(tiny.base_state_dict(), base)
    config = tiny_config()
    config.model.params.ckpt_path = str(base)
    config.data.params.train.params.data_root = str(tmp_path / "photos")
    adapter = tmp_path / "run" / "adapter.safetensors"
    old_umask = os.umask(0o022)
    try:
        save_adapter(tiny, config, adapter)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(adapter.stat().st_mode) == 0o644
    weights = read_vico_weights(adapter)
    text = OmegaConf.to_yaml(weights.config)
    assert str(tmp_path) not in text and "/" not in str(weights.config.model.params.ckpt_path)
    assert weights.config.model.params.ckpt_path == "sd-v1-4.ckpt"
    with pytest.raises(CheckpointError, match=r"base checkpoint not found: sd-v1-4\.ckpt .*pass --base_ckpt"):
        base_checkpoint_path(weights.config, None, weights.source, weights.folder)
    assert base_checkpoint_path(weights.config, base, weights.source, weights.folder) == base
    (tmp_path / "run" / "sd-v1-4.ckpt").symlink_to(base)  # the name found beside the adapter
    model, _ = load_vico_model(adapter)
    for key, value in tiny.trained_state_dict().items():
        assert torch.equal(model.trained_state_dict()[key], value), key


def test_s_star_starts_at_the_init_words_embedding_in_the_loaded_base(tiny, tmp_path):
    """As in the authors' code (their embedding manager is built on the pretrained CLIP), S*
    starts at the init word's embedding in the base weights, not in the table as first built."""
    base_state = tiny.base_state_dict()
    table_key = next(k for k in base_state if k.endswith("token_embedding.weight"))
    base_state[table_key] = torch.randn_like(base_state[table_key]) * 0.01  # unlike any fresh initialisation
    save_state_dict(base_state, tmp_path / "base.safetensors")
    config = tiny_config()
    config.model.params.ckpt_path = str(tmp_path / "base.safetensors")
    model = instantiate_from_config(config.model)
    manager = model.embedding_manager
    (init_id,) = manager.init_token_ids.values()
    assert init_id == model.cond_stage_model.tokenizer.encode("toy")[0]
    expected = base_state[table_key][init_id]
    assert torch.equal(manager.string_to_param_dict["*"][0], expected)
    assert torch.equal(manager.initial_embeddings["*"][0], expected)
    assert manager.string_to_param_dict["*"].requires_grad and not manager.initial_embeddings["*"].requires_grad
