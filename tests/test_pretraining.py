"""Pretraining of a base model (the miniature world's): the losses, what trains, the latent rescale, the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors import safe_open

from ldm.data.miniworld import WorldSampler, render
from ldm.models.pretraining import (
    AutoencoderPretraining,
    TextToImagePretraining,
    normalise_latent_scale,
    to_signed,
    warmup_cosine,
)
from ldm.models.base_checkpoint import read_state_dict
from ldm.util import instantiate_from_config
from scripts import miniworld

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "vico-tiny.yaml"


def scenes(count: int) -> torch.Tensor:
    sampler = WorldSampler()
    return torch.from_numpy(np.stack([render(sampler.scene(seed)).image for seed in range(count)]))


def test_warmup_cosine_schedule():
    factor = warmup_cosine(10, 110, final_fraction=0.1)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0) and factor(60) == pytest.approx(0.55)
    assert factor(110) == pytest.approx(0.1) and factor(500) == pytest.approx(0.1)


def test_latent_rescale_is_exact_and_gives_unit_variance():
    torch.manual_seed(0)
    autoencoder = instantiate_from_config(OmegaConf.load(TINY).model.params.first_stage_config).eval()
    images = scenes(8)
    x = to_signed(images)
    with torch.no_grad():
        before = autoencoder.decode(autoencoder.encode(x).mode())
        mean_before = autoencoder.encode(x).mean
    c = normalise_latent_scale(autoencoder, images, scale_factor=0.5)
    with torch.no_grad():
        posterior = autoencoder.encode(x)
        after = autoencoder.decode(posterior.mode())
        torch.manual_seed(1)
        sample = posterior.sample()
    torch.testing.assert_close(posterior.mean, c * mean_before, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    assert 0.5 * sample.std().item() == pytest.approx(1.0, rel=0.1)


def test_autoencoder_step_trains_on_crops():
    torch.manual_seed(0)
    autoencoder = instantiate_from_config(OmegaConf.load(TINY).model.params.first_stage_config)
    module = AutoencoderPretraining(autoencoder, learning_rate=1e-3, crop_size=32)
    batch = scenes(2)
    assert module.crop(to_signed(batch)).shape == (2, 3, 32, 32)
    module.log_dict = module.log = lambda *a, **k: None
    loss = module.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in autoencoder.parameters())


def test_text_to_image_step_trains_unet_and_text_encoder_only():
    torch.manual_seed(0)
    config = OmegaConf.to_container(OmegaConf.load(TINY).model)
    config["params"]["unet_config"]["params"]["image_attention_layers"] = []
    model = instantiate_from_config(config)
    empty = model.cond_stage_model.tokenizer([""])[0]
    module = TextToImagePretraining(model, learning_rate=1e-3, empty_tokens=empty, caption_dropout=0.5)
    module.log_dict = module.log = lambda *a, **k: None
    tokens = model.cond_stage_model.tokenizer(["a photo of a red ring on the beach"] * 4)
    batch = (torch.randn(4, 4, 16, 16), torch.rand(4, 4, 16, 16) * 0.1, tokens)
    loss = module.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.model.diffusion_model.input_blocks[0][0].weight.grad is not None
    assert model.cond_stage_model.token_embedding.weight.grad is not None
    assert all(p.grad is None for p in model.first_stage_model.parameters())
    assert not any(p.requires_grad for p in model.embedding_manager.parameters())


def test_min_snr_weights():
    config = OmegaConf.to_container(OmegaConf.load(TINY).model)
    model = instantiate_from_config(config)
    module = TextToImagePretraining(model, 1e-3, model.cond_stage_model.tokenizer([""])[0], snr_gamma=5.0)
    t = torch.tensor([0, 500, 999])
    alpha = model.alphas_cumprod[t]
    snr = alpha / (1 - alpha)
    torch.testing.assert_close(module.loss_weights(t), torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert module.loss_weights(torch.tensor([999])).item() == pytest.approx(1.0)  # low SNR: full weight


def test_make_concept_writes_photos_masks_and_spec(tmp_path):
    spec = ROOT / "configs" / "miniworld" / "concepts" / "sunset_ring.yaml"
    assert miniworld.main(["make-concept", str(spec), "--out", str(tmp_path / "c"), "--count", "3"]) == 0
    photos = sorted((tmp_path / "c").glob("*.png"))
    masks = sorted((tmp_path / "c" / "masks").glob("*.png"))
    assert [p.name for p in photos] == [m.name for m in masks] == ["00.png", "01.png", "02.png"]
    assert np.asarray(Image.open(photos[0])).shape == (64, 64, 3)
    assert OmegaConf.load(tmp_path / "c" / "concept.yaml").name == "sunset_ring"


def test_make_concept_bad_spec_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nshape: blob\nparts: [{colour: red}, {colour: blue}]\n")
    assert miniworld.main(["make-concept", str(bad), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "unknown shape 'blob'" in err and "\n" not in err


SPEC_MISTAKES = {
    "not valid YAML": ("name: x\n  shape: [\n", "line 2: not valid YAML"),
    "a list": ("- ring\n", "a concept spec is a mapping of fields"),
    "an unresolvable interpolation": ("name: ${nope}\nshape: ring\nparts: [{colour: red}, {colour: blue}]\n", "cannot read the spec"),
    "a name that is a list": ("name: [a, b]\nshape: ring\nparts: [{colour: red}, {colour: blue}]\n", "name must be a word, got ['a', 'b']"),
    "an empty name": ("name: ''\nshape: ring\nparts: [{colour: red}, {colour: blue}]\n", "name '' must be letters, digits"),
    "a name with a slash": ("name: a/b\nshape: ring\nparts: [{colour: red}, {colour: blue}]\n", "name 'a/b' must be letters"),
    "an init word that is a list": ("name: x\ninit_word: [a]\nshape: ring\nparts: [{colour: red}, {colour: blue}]\n", "init_word must be a word"),
    "two init words": ("name: x\ninit_word: a ring\nshape: ring\nparts: [{colour: red}, {colour: blue}]\n", "init_word must be one word"),
    "a part that is a word": ("name: x\nshape: ring\nparts: [red, blue]\n", "each part is {colour: ..., pattern: ...}"),
    "a part with an unknown key": ("name: x\nshape: ring\nparts: [{colour: red, size: 3}, {colour: blue}]\n", "got {'colour': 'red', 'size': 3}"),
    "a colour that is a list": ("name: x\nshape: ring\nparts: [{colour: [red]}, {colour: blue}]\n", "a part's colour must be a word"),
    "an unknown colour": ("name: x\nshape: ring\nparts: [{colour: mauve}, {colour: blue}]\n", "unknown colour 'mauve'"),
    "an unknown notch": ("name: x\nshape: ring\nnotch: middle\nparts: [{colour: red}, {colour: blue}]\n", "unknown notch 'middle'"),
}


@pytest.mark.parametrize("mistake", sorted(SPEC_MISTAKES))
def test_make_concept_spec_mistakes_are_one_line(tmp_path, capsys, mistake):
    text, expected = SPEC_MISTAKES[mistake]
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    assert miniworld.main(["make-concept", str(spec), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {spec}") and expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--out", "{file}/c"], "--out: {file} is a file, not a folder"),
        (["--out", "{file}"], "--out: {file} is a file, not a folder"),
        (["--out", "{tmp}/c", "--seed", "-1"], "--seed must be >= 0, got -1"),
    ],
)
def test_make_concept_argument_mistakes_are_one_line(tmp_path, capsys, argv, expected):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    argv = [word.format(file=a_file, tmp=tmp_path) for word in argv]
    spec = ROOT / "configs" / "miniworld" / "concepts" / "sunset_ring.yaml"
    assert miniworld.main(["make-concept", str(spec), *argv]) == 2
    assert capsys.readouterr().err == f"error: {expected.format(file=a_file)}\n"


def small_recipe(tmp_path: Path) -> list[str]:
    return [
        "model_config=configs/vico-tiny.yaml", f"cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'out'}",
        "scenes=16", "autoencoder.scenes=16", "autoencoder.batch_size=8", "diffusion.batch_size=8",
    ]  # fmt: skip


RECIPE_MISTAKES = {
    "an unknown key": (["diffusion.stpes=3"], "unknown recipe key 'diffusion.stpes'; nearest: diffusion.steps"),
    "negative steps (Lightning's endless run)": (["diffusion.steps=-1"], "diffusion.steps must be a whole number >= 1, got -1"),
    "no steps": (["autoencoder.steps=0"], "autoencoder.steps must be a whole number >= 1, got 0"),
    "a batch of 0": (["diffusion.batch_size=0"], "diffusion.batch_size must be a whole number >= 1, got 0"),
    "a batch larger than the scenes": (["diffusion.batch_size=64"], "diffusion.batch_size (64) exceeds its 16 scenes"),
    "more autoencoder scenes than scenes": (["autoencoder.scenes=100"], "autoencoder.scenes (100) must not exceed scenes (16)"),
    "no scenes": (["scenes=0"], "scenes must be a whole number from 1 to 1000000, got 0"),
    "a learning rate in words": (["diffusion.learning_rate=fast"], "diffusion.learning_rate must be a number >= 0, got 'fast'"),
    "a NaN learning rate": (["autoencoder.learning_rate=.nan"], "autoencoder.learning_rate must be a number >= 0, got nan"),
    "a seed in words": (["seed=abc"], "seed must be a whole number from 0 to 4294967295, got 'abc'"),
    "a negative seed": (["seed=-1"], "seed must be a whole number from 0 to 4294967295, got -1"),
    "no threads": (["threads=0"], "threads must be a whole number from 1 to 1024, got 0"),
    "a model config that is a number": (["model_config=3"], "model_config must be a config path or a list of them, got 3"),
    "a model config without a model": (["model_config=configs/miniworld/pretrain.yaml"], "no model section with a target"),
    "a world that is a number": (["world=3"], "world must be a mapping of composite_probability, reserved_concepts, got 3"),
    "a probability above 1": (["world.composite_probability=2"], "world.composite_probability must be a number from 0 to 1, got 2"),
    "no output folder": (["output_dir=null"], "output_dir must be a path, got None"),
    "a crop the autoencoder cannot take": (["autoencoder.crop_size=30"], "autoencoder.crop_size (30) must be a multiple of the autoencoder's factor 4"),
    "an EMA decay of 1": (["diffusion.ema_decay=1"], "diffusion.ema_decay must be a number from 0 to 1 (excluded), got 1"),
    "a section that is null": (["autoencoder=null"], "autoencoder must be a mapping of scenes"),
    "a section that is a list": (["diffusion=[1,2]"], "the recipe does not merge or resolve: Cannot merge incompatible container types"),
    "an unresolvable interpolation": (["seed=${nope}"], "the recipe does not merge or resolve: Interpolation key 'nope' not found"),
    "init_from a folder": (["diffusion.init_from={tmp}"], "diffusion.init_from: no base model at {tmp}"),
    "init_from a file that is no checkpoint": (["diffusion.init_from={file}"], "diffusion.init_from: {file}: is empty (0 bytes)"),
    "an output folder under a file": (["output_dir={file}/out"], "output_dir: {file} is a file, not a folder"),
}


@pytest.mark.parametrize("mistake", sorted(RECIPE_MISTAKES))
def test_pretrain_recipe_mistakes_are_one_line_before_anything_runs(tmp_path, capsys, mistake):
    a_file = tmp_path / "a-file"
    a_file.write_text("")

    def filled(text: str) -> str:
        return text.replace("{tmp}", str(tmp_path)).replace("{file}", str(a_file))

    overrides, expected = RECIPE_MISTAKES[mistake]
    argv = ["pretrain", "--config", str(miniworld.DEFAULT_RECIPE), *small_recipe(tmp_path), *map(filled, overrides)]
    assert miniworld.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and filled(expected) in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # no cache, no output


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", "the recipe has no model_config (see configs/miniworld/pretrain.yaml)"),
        ("- a\n", "a recipe is a mapping of settings (see configs/miniworld/pretrain.yaml), not a list"),
        ("seed: [\n", "line 2: not valid YAML"),
    ],
)
def test_pretrain_recipe_file_mistakes_are_one_line(tmp_path, capsys, text, expected):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    assert miniworld.main(["pretrain", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1, err


def test_pretrain_end_to_end_writes_a_loadable_base(tmp_path, capsys):
    """Both stages for a few steps on 32 scenes; the result loads through the SD base loader."""
    overrides = [
        "model_config=configs/vico-tiny.yaml", f"cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'out'}",
        "scenes=32", "autoencoder.scenes=32", "autoencoder.steps=2", "autoencoder.batch_size=8",
        "diffusion.steps=2", "diffusion.batch_size=8",
    ]  # fmt: skip
    overlay = tmp_path / "overlay.yaml"  # recipe files merge in order, then the overrides
    overlay.write_text("diffusion:\n  snr_gamma: 4.0\n  steps: 7\n")
    assert miniworld.main(["pretrain", "--config", str(miniworld.DEFAULT_RECIPE), str(overlay), *overrides]) == 0
    recipe = json.loads((tmp_path / "out" / "pretraining.json").read_text())["recipe"]
    assert recipe["diffusion"]["snr_gamma"] == 4.0 and recipe["diffusion"]["steps"] == 2
    # The recipe's world draws composites, none with a reserved concept's look; the cache says which world.
    (scenes,) = (tmp_path / "cache").glob("scenes-32-seed0-composite0.4-reserved*.npz")
    captions = [str(c) for c in np.load(scenes)["captions"]]
    assert any(" and " in c.split(" and a small ")[0] for c in captions)
    base = tmp_path / "out" / "base.safetensors"
    with safe_open(str(base), "pt") as handle:
        assert handle.metadata()["format"] == miniworld.BASE_FORMAT
        table = handle.get_tensor("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight")
    assert table.dtype == torch.float16
    used = table.abs().sum(-1) > 0
    assert 10 < used.sum() < 200  # only the world's words (and start/end) keep their rows
    config = OmegaConf.load(TINY)
    config.model.params.ckpt_path = str(base)
    instantiate_from_config(config.model)  # strict: every UNet, VAE and text key present with its shape
    assert (tmp_path / "out" / "pretraining.json").is_file() and (tmp_path / "out" / "diffusion-round1-curve.png").is_file()
    first_round = read_state_dict(base)

    # A further round starts from the first round's base and records both rounds.
    assert miniworld.main(["pretrain", "--stage", "ldm", *overrides, f"diffusion.init_from={base}", "diffusion.learning_rate=0"]) == 0
    record = json.loads((tmp_path / "out" / "pretraining.json").read_text())
    assert [r["round"] for r in record["diffusion"]] == [1, 2] and record["diffusion"][1]["init_from"] == str(base)
    assert (tmp_path / "out" / "diffusion-round2-curve.png").is_file()
    second_round = read_state_dict(base)
    unet = [k for k in first_round if k.startswith("model.diffusion_model.")]
    assert all(torch.equal(first_round[k], second_round[k]) for k in unet)  # learning rate 0: the round continued from the file
    assert miniworld.main(["pretrain", "--stage", "ldm", *overrides, f"diffusion.init_from={tmp_path / 'none.safetensors'}"]) == 2
    assert miniworld.main(["pretrain", "--stage", "ldm", *overrides, f"world.reserved_concepts={tmp_path / 'cache'}"]) == 2
    # a folder whose YAML is not a concept spec (the overlay above) is a one-line error too
    capsys.readouterr()
    assert miniworld.main(["pretrain", "--stage", "ldm", *overrides, f"world.reserved_concepts={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: world.reserved_concepts: ") and "unknown field 'diffusion'" in err and err.count("\n") == 1, err


def test_model_config_files_merge_in_order_and_two_heads_keep_the_file_layout():
    """configs/miniworld/two-heads.yaml over base.yaml (the 2-hour recipe's model): 2 heads
    everywhere, the same parameter names and shapes, so such a base must be read with its config."""
    from ldm.modules.attention import CrossAttention

    recipe = OmegaConf.merge(*(OmegaConf.load(ROOT / "configs" / "miniworld" / name) for name in ("pretrain.yaml", "pretrain-2h.yaml")))
    four = miniworld.load_model_config("configs/miniworld/base.yaml")
    two = miniworld.load_model_config(recipe.model_config)
    with torch.device("meta"):
        unets = [instantiate_from_config(config.params.unet_config) for config in (four, two)]
    assert [{m.heads for m in unet.modules() if isinstance(m, CrossAttention)} for unet in unets] == [{4}, {2}]
    layouts = [{name: tuple(t.shape) for name, t in unet.state_dict().items()} for unet in unets]
    assert layouts[0] == layouts[1]
    with pytest.raises(miniworld.UsageError, match="model config not found: configs/none.yaml"):
        miniworld.load_model_config(["configs/miniworld/base.yaml", "configs/none.yaml"])


def test_pretrain_recipe_files_merge_and_a_missing_one_is_a_one_line_error(tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    assert miniworld.main(["pretrain", "--config", str(miniworld.DEFAULT_RECIPE), str(missing)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: recipe not found: {missing}\n"
