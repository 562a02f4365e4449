"""configs/baselines: the paper's Table 2 rows as YAML over the same model, trained by main.py.

Each baseline builds for SD v1.4 on the ``meta`` device with the trainable parameters its paper
counts, trains a few steps at tiny size through main.py and exports its community format;
DreamBooth moves the UNet, Custom Diffusion exactly the text cross-attention's keys and values
and its token (checked key by key), and "*" means "[V] class" in training and at sampling.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file

import main
import sample
from ldm import api
from ldm.data.class_images import GeneratedClassImages, MiniworldClassImages
from ldm.models import diffusers_layout
from ldm.models.diffusion.latent import CROSS_ATTENTION_KV
from ldm.models.export import MODIFIER_TOKEN, _diffusers_block_name, available_formats, export_trained
from ldm.modules.encoders.modules import CLIPTokenizer
from ldm.util import instantiate_from_config, read_checkpoint
from tests.test_training import setup as setup_training_run

ROOT = Path(__file__).resolve().parents[1]
BASELINES = ROOT / "configs" / "baselines"
SD = ROOT / "configs" / "vico.yaml"
TINY = ROOT / "configs" / "vico-tiny.yaml"
MINI = (ROOT / "configs" / "miniworld" / "base.yaml", ROOT / "configs" / "miniworld" / "vico.yaml")
PHOTOS = ROOT / "data" / "monster_toy"
CLASS_FOLDER = ROOT / "data" / "miniworld" / "sunset_ring"

SD_UNET = 859_520_964
SD_TEXT_ENCODER = 123_060_480
#: attn2.to_k and attn2.to_v of SD v1's 16 SpatialTransformers: 2 x 768 x (5 x 320 + 5 x 640 + 6 x 1280).
SD_CROSS_ATTENTION_KV = 2 * 768 * (5 * 320 + 5 * 640 + 6 * 1280)
SD_TOKEN = 768
SD_IMAGE_ATTENTION = 51_248_960  # paper Table 1: ViCo 51.3M with S*

#: baseline file -> trainable parameters when merged over configs/vico.yaml
SD_TRAINABLE = {
    "dreambooth": SD_UNET,
    "custom-diffusion": SD_CROSS_ATTENTION_KV + SD_TOKEN,
    "textual-inversion": SD_TOKEN,
    "vico-lr1e-5": SD_TOKEN + SD_IMAGE_ATTENTION,
    "vico-lr1e-4": SD_TOKEN + SD_IMAGE_ATTENTION,
}
MINI_FILES = ("dreambooth", "custom-diffusion", "textual-inversion")
#: Steps to train the tiny runs; class images few and drawn in few steps.
FEW_CLASS_IMAGES = ("data.params.class_images.params.num_images=3",)
FAST_GENERATION = ("data.params.class_images.params.ddim_steps=2", "data.params.class_images.params.batch_size=2")


@pytest.fixture(autouse=True)
def fresh_run_time(monkeypatch):
    monkeypatch.delenv(main.RUN_DIR_VARIABLE, raising=False)


def merged(*paths: Path, overrides: tuple[str, ...] = ()) -> OmegaConf:
    return OmegaConf.merge(*(OmegaConf.load(p) for p in paths), OmegaConf.from_dotlist(list(overrides)))


def baseline(name: str) -> Path:
    return BASELINES / f"{name}.yaml"


def train_tiny(tmp_path: Path, name: str, *extra: str, steps: int = 3):
    """A main.py run of the tiny config with a baseline file; the finished run."""
    run = setup_training_run(
        tmp_path, "--base", str(TINY), str(baseline(name)), "--init_word", "toy",
        "lightning.trainer.enable_model_summary=false", *extra, steps=steps,
    )  # fmt: skip
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    main.train(run)
    return run, before


def logged(run, column: str) -> list[float]:
    (metrics,) = run.logdir.glob("metrics/*/metrics.csv")
    with open(metrics, newline="") as handle:
        return [float(row[column]) for row in csv.DictReader(handle) if row.get(column)]


def changed_keys(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {k for k, v in after.items() if k in before and not torch.equal(v, before[k])}


def is_cross_attention_kv(key: str) -> bool:
    return key.startswith("model.diffusion_model.") and ".transformer_blocks." in key and key.endswith(CROSS_ATTENTION_KV)


def pixels(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("samples/*.png"))])


# ------------------------------------------------------------------ the files
def test_every_baseline_file_is_covered():
    assert {p.stem for p in BASELINES.glob("*.yaml")} == set(SD_TRAINABLE)
    assert {p.stem for p in (BASELINES / "miniworld").glob("*.yaml")} == set(MINI_FILES)


@pytest.mark.parametrize("name", sorted(SD_TRAINABLE))
def test_full_size_baseline_builds_on_meta(name):
    with torch.device("meta"):
        model = instantiate_from_config(merged(SD, baseline(name)).model)
    assert sum(p.numel() for p in model.trainable_parameters()) == SD_TRAINABLE[name]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == SD_TRAINABLE[name]
    if name.startswith("vico"):
        assert model.image_attention_learning_rate == float(name.removeprefix("vico-lr"))
    else:
        assert not model.has_image_attention


def test_dreambooth_with_its_text_encoder_is_table_1s_count():
    """Paper Table 1: DreamBooth 982.6M trainable parameters = the UNet + the text encoder (and [V])."""
    config = merged(SD, baseline("dreambooth"), overrides=("model.params.text_encoder_trainable=true",))
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    count = sum(p.numel() for p in model.trainable_parameters())
    assert count == SD_UNET + SD_TEXT_ENCODER + SD_TOKEN and round(count / 1e6, 1) == 982.6
    optimizer = model.configure_optimizers()
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    assert sizes == [1, len(model.unet_parameters()), len(list(model.cond_stage_model.parameters()))]


def test_custom_diffusion_trains_every_text_cross_attention_kv_on_sd():
    with torch.device("meta"):
        model = instantiate_from_config(merged(SD, baseline("custom-diffusion")).model)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    kv = {name for name in trained if is_cross_attention_kv(name)}
    assert trained - kv == {"embedding_manager.string_to_param_dict.*"}
    assert len(kv) == 32  # 16 SpatialTransformers x (to_k, to_v)
    # one AdamW group with S*'s rate (the script's single group), the token first
    model.learning_rate = 4e-5
    groups = model.configure_optimizers().param_groups
    assert [g["lr"] for g in groups] == [4e-5, 4e-5] and [len(g["params"]) for g in groups] == [1, 32]


def test_custom_diffusion_export_uses_diffusers_names_for_sd():
    """The CompVis -> diffusers names of the export invert the project's diffusers -> CompVis rules."""
    with torch.device("meta"):
        model = instantiate_from_config(merged(SD, baseline("custom-diffusion")).model)
    names = [name for name, _ in model.named_parameters() if is_cross_attention_kv(name)]
    blocks = {}
    for name in names:
        block, leaf = name.removeprefix(diffusers_layout.UNET_PREFIX).split(".attn2.")
        blocks[name] = _diffusers_block_name(block, 2)
        assert diffusers_layout.UNET_PREFIX + diffusers_layout.unet_key(f"{blocks[name]}.attn2.{leaf}", 2, {1, 2, 3}) == name
    expected = {f"down_blocks.{i}.attentions.{j}.transformer_blocks.0" for i in range(3) for j in range(2)}
    expected |= {f"up_blocks.{i}.attentions.{j}.transformer_blocks.0" for i in range(1, 4) for j in range(3)}
    expected |= {"mid_block.attentions.0.transformer_blocks.0"}
    assert set(blocks.values()) == expected


@pytest.mark.parametrize("name", MINI_FILES)
def test_miniworld_overlays_scale_the_unet_rate_by_width(name):
    sd = merged(SD, baseline(name)).model
    mini = merged(*MINI, BASELINES / "miniworld" / f"{name}.yaml").model
    assert mini.base_learning_rate == sd.base_learning_rate  # S*: an input embedding, not rescaled
    assert mini.params.get("unet_trainable") == sd.params.get("unet_trainable")
    assert mini.params.get("prior_loss_weight") == sd.params.get("prior_loss_weight")
    if name == "dreambooth":
        assert mini.params.unet_learning_rate == pytest.approx(10 * sd.params.unet_learning_rate)
    if name == "custom-diffusion":  # SD: the token's rate, 2e-5 x batch 2; the miniature writes it out x 10
        assert sd.params.unet_learning_rate is None
        assert mini.params.unet_learning_rate == pytest.approx(10 * 2 * sd.base_learning_rate)


# ------------------------------------------------------------------ "[V] class"
def test_placeholder_stands_for_identifier_and_class_word():
    config = merged(TINY, baseline("dreambooth"), overrides=("model.params.personalization_config.params.initializer_words=[toy]",))
    model = instantiate_from_config(config.model)
    tokenizer = CLIPTokenizer()
    assert torch.equal(model.tokenize(["a photo of * on the beach"]), tokenizer(["a photo of * toy on the beach"]))
    assert torch.equal(model.tokenize(["a photo of a toy"]), tokenizer(["a photo of a toy"]))  # the class prompt
    long = model.tokenize(["a photo of * " + "very " * 80])[0]  # cut as the tokenizer cuts: end token kept
    assert long.shape == (77,) and long[-1] == tokenizer.eos_token_id and long[5] == tokenizer.encode("toy")[0]
    # [V] is the embedding of "sks", fixed
    table = model.cond_stage_model.token_embedding.weight
    assert torch.equal(model.embedding_manager.string_to_param_dict["*"][0], table[tokenizer.encode("sks")[0]])
    assert not model.embedding_manager.string_to_param_dict["*"].requires_grad


def test_custom_diffusion_token_starts_from_ktn():
    """diffusers' --initializer_token ktn and the authors' code both take CLIP vocabulary entry 42170."""
    model = instantiate_from_config(merged(TINY, baseline("custom-diffusion")).model)
    table = model.cond_stage_model.token_embedding.weight
    assert torch.equal(model.embedding_manager.string_to_param_dict["*"][0], table[42170])
    assert model.embedding_manager.string_to_param_dict["*"].requires_grad


# ------------------------------------------------------------------ training at tiny size
def test_dreambooth_trains_the_unet_with_prior_preservation(tmp_path):
    run, before = train_tiny(tmp_path, "dreambooth", *FEW_CLASS_IMAGES, *FAST_GENERATION)
    model = run.model
    # class images drawn by the base once, before the first step, in the run folder
    folder = run.logdir / "class_images"
    assert sorted(p.name for p in folder.glob("*.png")) == ["00000.png", "00001.png", "00002.png"]
    assert (folder / "prompt.txt").read_text().strip() == "a photo of a toy"
    assert len(logged(run, "train/loss_prior")) == 3 and all(map(math.isfinite, logged(run, "train/loss")))
    # the instance prompt is "a photo of a [V] toy"; one AdamW group, the UNet at DreamBooth's rate
    caption = run.data.train_dataset[0]["caption"]
    assert caption == "a photo of a *"
    assert torch.equal(model.tokenize([caption]).cpu(), CLIPTokenizer()(["a photo of a * toy"]))
    (group,) = run.trainer.optimizers[0].param_groups
    assert group["lr"] == 5e-6 and len(group["params"]) == len(model.unet_parameters())
    # the UNet moved, nothing else did ([V] is fixed)
    after = model.state_dict()
    changed = changed_keys(before, after)
    unet = {k for k in after if k.startswith("model.diffusion_model.")}
    assert changed and changed <= unet
    assert len(changed) > 0.9 * len(unet)
    # the checkpoint holds the UNet and [V]; the export is the whole model, loadable as a base
    saved = read_checkpoint(run.logdir / "checkpoints" / "last.ckpt")["state_dict"]
    assert set(saved) == unet | {"embedding_manager.string_to_param_dict.*"}
    checkpoints = run.logdir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["adapter.safetensors", "dreambooth-3.safetensors", "last.ckpt"]
    full = load_file(str(checkpoints / "dreambooth-3.safetensors"))
    assert set(full) == set(model.base_state_dict())
    assert all(torch.equal(full[k], v) for k, v in after.items() if k in unet)
    table = full["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]
    assert torch.equal(table[CLIPTokenizer().encode("sks")[0]], after["embedding_manager.string_to_param_dict.*"][0])

    # sample.py samples the checkpoint, and the same with the whole-model export as its base
    common = ["--ref", str(PHOTOS / "00.jpg"), "--prompt", "a photo of * on the beach", "--n_samples", "1", "--ddim_steps", "2"]
    assert sample.main(["--ckpt", str(checkpoints / "last.ckpt"), *common, "--outdir", str(tmp_path / "a")]) == 0
    argv = ["--ckpt", str(checkpoints / "adapter.safetensors"), "--base_ckpt", str(checkpoints / "dreambooth-3.safetensors")]
    assert sample.main([*argv, *common, "--outdir", str(tmp_path / "b")]) == 0
    assert np.array_equal(pixels(tmp_path / "a"), pixels(tmp_path / "b"))

    # generation resumes: images there are kept, a missing one is drawn again by the base, identically
    base = instantiate_from_config(merged(TINY, baseline("dreambooth")).model)
    base.load_base_checkpoint(str(run.logdir / main.RANDOM_BASE))
    class_images = GeneratedClassImages("toy", num_images=3, folder=str(folder), ddim_steps=2, batch_size=2, size=64, seed=23)
    first = (folder / "00001.png").read_bytes()
    (folder / "00001.png").unlink()
    kept = (folder / "00000.png").stat().st_mtime_ns
    class_images.prepare(base.eval())
    assert (folder / "00000.png").stat().st_mtime_ns == kept
    # the same noise and weights; alone instead of in a batch of two, so float rounding may differ
    again, before = (np.asarray(Image.open(f), dtype=np.int16) for f in (folder / "00001.png", io.BytesIO(first)))
    assert np.abs(again - before).max() <= 2


def test_custom_diffusion_changes_only_cross_attention_kv_and_the_token(tmp_path):
    run, before = train_tiny(
        tmp_path, "custom-diffusion", f"data.params.class_images.params.folder={CLASS_FOLDER}",
        "data.params.class_images.params.num_images=4",
    )  # fmt: skip
    model = run.model
    after = model.state_dict()
    changed = changed_keys(before, after)
    kv = {k for k in after if is_cross_attention_kv(k)}
    assert changed == kv | {"embedding_manager.string_to_param_dict.*"}
    assert len(kv) == 14  # the tiny UNet's 7 SpatialTransformers
    assert len(logged(run, "train/loss_prior")) == 3
    # class captions: the folder's images have none, so the class word (the script's --class_prompt)
    assert run.data.class_images.captions == ["toy"] * 4

    saved = read_checkpoint(run.logdir / "checkpoints" / "last.ckpt")["state_dict"]
    assert set(saved) == kv | {"embedding_manager.string_to_param_dict.*"}
    folder = run.logdir / "checkpoints" / "custom_diffusion-3"
    assert sorted(p.name for p in (run.logdir / "checkpoints").iterdir()) == ["adapter.safetensors", "custom_diffusion-3", "last.ckpt"]
    weights = torch.load(folder / "pytorch_custom_diffusion_weights.bin", weights_only=True)
    tensors = {k: v for k, v in weights.items() if isinstance(v, torch.Tensor)}
    assert len(tensors) == 14 and all(k.endswith(("to_k_custom_diffusion.weight", "to_v_custom_diffusion.weight")) for k in tensors)
    assert {k for k, v in weights.items() if v == {}} == {k.split(".attn2.")[0] + ".attn1.processor" for k in tensors}
    ours = sorted(v.sum().item() for k, v in after.items() if k in kv)
    assert sorted(v.sum().item() for v in tensors.values()) == pytest.approx(ours)
    token = torch.load(folder / f"{MODIFIER_TOKEN}.bin", weights_only=True)
    assert torch.equal(token[MODIFIER_TOKEN], after["embedding_manager.string_to_param_dict.*"][0])

    # the API samples it (and "*" means "* toy" there too)
    vico = api.load(run.logdir / "checkpoints" / "last.ckpt", device="cpu")
    assert torch.equal(vico.model.tokenize(["a photo of *"]), CLIPTokenizer()(["a photo of * toy"]))
    (image,) = api.sample(vico, "a photo of * on the beach", [PHOTOS / "00.jpg"], steps=2)
    assert image.size == (64, 64)


def test_textual_inversion_recipe_trains_s_star_alone(tmp_path):
    config = merged(TINY, baseline("textual-inversion"))
    assert config.lightning.trainer.max_steps == 6100 and config.data.params.batch_size == 2
    run, before = train_tiny(tmp_path, "textual-inversion", steps=1)
    assert run.model.learning_rate == pytest.approx(1e-2)  # 5e-3 x batch 2, as Textual Inversion's main.py
    assert changed_keys(before, run.model.state_dict()) == {"embedding_manager.string_to_param_dict.*"}
    # its formats, and no empty image-attention file
    assert sorted(p.name for p in (run.logdir / "checkpoints").iterdir()) == [
        "adapter.safetensors", "last.ckpt", "learned_embeds-steps-1.safetensors", "t-1.pt",  # S* named after the run
    ]  # fmt: skip
    with pytest.raises(ValueError, match="nothing to write as 'authors'"):
        export_trained(run.model, run.config, tmp_path / "x", 1, formats=["authors"])
    assert available_formats(run.model) == ("textual_inversion", "diffusers", "adapter")


def test_miniworld_custom_diffusion_regularises_with_renders_of_the_class(tmp_path):
    run = setup_training_run(
        tmp_path, "--base", *map(str, MINI), str(BASELINES / "miniworld" / "custom-diffusion.yaml"),
        "--data_root", str(CLASS_FOLDER), "--init_word", "ring", "data.params.class_images.params.num_images=4",
        "lightning.trainer.enable_model_summary=false", "lightning.trainer.log_every_n_steps=1", steps=1,
    )  # fmt: skip
    class_images = run.data.class_images
    assert isinstance(class_images, MiniworldClassImages) and len(class_images) == 4
    assert all(" ring " in caption for caption in class_images.captions)
    main.train(run)
    assert len(logged(run, "train/loss_prior")) == 1
    assert (run.logdir / "checkpoints" / "custom_diffusion-1" / "pytorch_custom_diffusion_weights.bin").is_file()


def test_prior_preservation_needs_weight_and_images(tmp_path, capsys):
    argv = [
        "--base", str(TINY), "-t", "--logdir", str(tmp_path), "--data_root", str(PHOTOS), "model.params.prior_loss_weight=1.0",
        "lightning.trainer.max_steps=1", "lightning.trainer.enable_progress_bar=false", "lightning.trainer.enable_model_summary=false",
    ]  # fmt: skip
    assert main.main(argv) == 2
    assert "prior preservation needs both" in capsys.readouterr().err


def test_custom_diffusion_names_its_class_folder(tmp_path, capsys):
    argv = ["--base", str(TINY), str(baseline("custom-diffusion")), "-t", "--logdir", str(tmp_path), "--data_root", str(PHOTOS)]
    assert main.main(argv) == 2
    assert "data.params.class_images.params.folder must be str" in capsys.readouterr().err
