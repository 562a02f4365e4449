"""The miniature world from the command line: concept folders and the pretrained base model.

    # a DreamBooth-style folder of photos of a concept (plus its masks and spec)
    python scripts/miniworld.py make-concept configs/miniworld/concepts/sunset_ring.yaml \\
        --out data/miniworld/sunset_ring

    # pretrain the base model (configs/miniworld/pretrain.yaml): autoencoder, then UNet + text encoder
    python scripts/miniworld.py pretrain [--stage all|vae|ldm] [key=value overrides of the recipe]

``pretrain`` renders the pretraining scenes once (cached), trains the autoencoder, rescales its
latent space to the config's ``scale_factor``, encodes every scene, trains the UNet with the
text encoder, and writes ``<output_dir>/base.safetensors`` (CompVis single-file layout, fp16,
the same reader as ``sd-v1-4.ckpt``), the training curves and ``pretraining.json`` (command,
seed, times, machine).

Predictable mistakes print one ``error: ...`` line on stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from PIL import Image, ImageDraw
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ldm.data.miniworld import ConceptSpec, WorldSampler, concept_scene, concept_seeds, render  # noqa: E402
from ldm.models.pretraining import (  # noqa: E402
    AutoencoderPretraining,
    ImageArray,
    LatentCaptionArray,
    TextToImagePretraining,
    normalise_latent_scale,
    to_signed,
)
from ldm.config_bounds import BoundsError, check_bounds  # noqa: E402
from ldm.config_schema import unknown_key  # noqa: E402
from ldm.models.loading import autoencoder_factor  # noqa: E402
from ldm.modules.embedding_manager import check_init_word  # noqa: E402
from ldm.pictures import make_grid, save_png, to_uint8  # noqa: E402
from ldm.util import CheckpointError, checkpoint_format, instantiate_from_config  # noqa: E402

logger = logging.getLogger("miniworld")

DEFAULT_RECIPE = ROOT / "configs" / "miniworld" / "pretrain.yaml"
BASE_FORMAT = "miniworld-base"


class UsageError(ValueError):
    """A mistake on the command line, reported as one ``error:`` line."""


# ------------------------------------------------------------------- recipes
Check = Callable[[Any], bool]


def _whole(low: int, high: int | None = None, null: bool = False) -> tuple[Check, str]:
    def check(value: Any) -> bool:
        if value is None:
            return null
        return isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)

    what = f"a whole number from {low} to {high}" if high is not None else f"a whole number >= {low}"
    return check, what + (", or null" if null else "")


def _number(low: float, high: float = math.inf, below_high: bool = False, null: bool = False) -> tuple[Check, str]:
    def check(value: Any) -> bool:
        if value is None:
            return null
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            return False
        return low <= value and (value < high if below_high else value <= high)

    what = f"a number >= {low}" if high == math.inf else f"a number from {low} to {high}" + (" (excluded)" if below_high else "")
    return check, what + (", or null" if null else "")


def _text(null: bool = False) -> tuple[Check, str]:
    def check(value: Any) -> bool:
        return value is None and null or isinstance(value, str) and value != ""

    return check, "a path" + (", or null" if null else "")


def _paths(value: Any) -> bool:
    values = [value] if isinstance(value, str) else value
    return isinstance(values, list) and bool(values) and all(isinstance(v, str) and v for v in values)


#: Every key of a pretraining recipe and what its value must be (``configs/miniworld/pretrain.yaml``).
RECIPE_FIELDS: dict[str, Any] = {
    "model_config": (_paths, "a config path or a list of them"),
    "output_dir": _text(),
    "cache_dir": _text(),
    "seed": _whole(0, 2**32 - 1),
    "threads": _whole(1, 1024),
    "scenes": _whole(1, 1_000_000),  # 12 KiB each in memory
    "world": {
        "composite_probability": _number(0, 1),
        "reserved_concepts": _text(null=True),
    },
    "autoencoder": {
        "scenes": _whole(1),
        "steps": _whole(1),
        "batch_size": _whole(1),
        "crop_size": _whole(1, null=True),
        "learning_rate": _number(0),
        "kl_weight": _number(0),
        "warmup_steps": _whole(0),
    },
    "diffusion": {
        "steps": _whole(1),
        "batch_size": _whole(1),
        "learning_rate": _number(0),
        "warmup_steps": _whole(0),
        "caption_dropout": _number(0, 1),
        "snr_gamma": _number(0),
        "ema_decay": _number(0, 1, below_high=True),
        "gradient_clip": _number(0, null=True),
        "init_from": _text(null=True),
    },
}
#: Keys a recipe may leave out (the code has their defaults).
OPTIONAL_RECIPE_KEYS = ("world.composite_probability", "world.reserved_concepts", "diffusion.init_from")


def _check_fields(node: Any, fields: dict[str, Any], path: str) -> None:
    if not isinstance(node, Mapping):
        raise UsageError(f"{path or 'a recipe'} must be a mapping of {', '.join(fields)}, got {node!r}")
    for key in node:
        if key not in fields:
            raise UsageError(str(unknown_key(path, str(key), fields)).replace("config key", "recipe key"))
    for key, rule in fields.items():
        where = f"{path}.{key}" if path else key
        if key not in node:
            if where in OPTIONAL_RECIPE_KEYS:
                continue
            raise UsageError(f"the recipe has no {where} (see {DEFAULT_RECIPE.relative_to(ROOT)})")
        if isinstance(rule, dict):
            _check_fields(node[key], rule, where)
        elif not rule[0](node[key]):
            raise UsageError(f"{where} must be {rule[1]}, got {node[key]!r}")


def read_recipe(files: Sequence[str], overrides: Sequence[str]) -> DictConfig:
    """The recipe files merged in order, then the overrides, checked before anything slow:
    every key known and present, every value of its kind, the sizes consistent with each other
    and the files it names readable; each mistake is one :class:`UsageError` line."""
    parts = []
    for path in files:
        try:
            part = OmegaConf.load(path)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}:" if mark else ""
            raise UsageError(f"{path}:{where} not valid YAML ({getattr(err, 'problem', None) or type(err).__name__})") from None
        except (OmegaConfBaseException, OSError, UnicodeDecodeError) as err:
            raise UsageError(f"{path}: cannot read the recipe ({type(err).__name__})") from None
        if not isinstance(part, DictConfig):
            raise UsageError(f"{path}: a recipe is a mapping of settings (see {DEFAULT_RECIPE.relative_to(ROOT)}), not a list")
        parts.append(part)
    try:
        recipe = OmegaConf.merge(*parts, OmegaConf.from_dotlist(list(overrides)))
        plain = OmegaConf.to_container(recipe, resolve=True)
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        raise UsageError(f"the recipe does not merge or resolve: {str(err).splitlines()[0]}") from None
    _check_fields(plain, RECIPE_FIELDS, "")
    autoencoder, diffusion = plain["autoencoder"], plain["diffusion"]
    if autoencoder["scenes"] > plain["scenes"]:
        raise UsageError(f"autoencoder.scenes ({autoencoder['scenes']}) must not exceed scenes ({plain['scenes']})")
    for name, batch, scenes in (("autoencoder", autoencoder["batch_size"], autoencoder["scenes"]), ("diffusion", diffusion["batch_size"], plain["scenes"])):
        if batch > scenes:
            raise UsageError(f"{name}.batch_size ({batch}) exceeds its {scenes} scenes: not one full batch to train on")
    try:
        factor = autoencoder_factor(OmegaConf.create({"model": load_model_config(plain["model_config"])}))
    except ValueError as err:
        raise UsageError(f"model_config: {err}") from None
    crop = autoencoder["crop_size"]
    if crop is not None and crop % factor:
        raise UsageError(f"autoencoder.crop_size ({crop}) must be a multiple of the autoencoder's factor {factor}")
    init_from = diffusion.get("init_from")
    if init_from:
        if not Path(init_from).is_file():
            raise UsageError(f"diffusion.init_from: no base model at {init_from}")
        try:
            checkpoint_format(Path(init_from))
        except CheckpointError as err:
            raise UsageError(f"diffusion.init_from: {err}") from None
    for key in ("output_dir", "cache_dir"):
        check_writable(Path(plain[key]) if key == "cache_dir" else ROOT / plain[key], key)
    return recipe


def check_writable(folder: Path, key: str) -> None:
    """``folder`` can be created and written (nothing is created to find out)."""
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{key}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{key}: {existing} is not writable")


# ------------------------------------------------------------------ concepts
def make_concept(spec: ConceptSpec, out: Path, count: int = 5, seed: int = 0) -> list[Path]:
    """Write ``count`` photos ``NN.png`` of the concept, their masks ``masks/NN.png`` and ``concept.yaml``.

    Each photo shows the concept alone in its own pose, size and scene; the scenes cycle
    through the world's places in a seed-dependent order so a folder shows several.
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    paths = []
    for index, scene_seed in enumerate(concept_seeds(spec, count, seed)):
        rendering = render(concept_scene(spec, scene_seed))
        path = out / f"{index:02d}.png"
        Image.fromarray(rendering.image).save(path)
        Image.fromarray(rendering.mask.astype(np.uint8) * 255).save(out / "masks" / path.name)
        paths.append(path)
    OmegaConf.save(OmegaConf.create({**spec.to_mapping(), "photos": count, "seed": seed}), out / "concept.yaml")
    return paths


# ---------------------------------------------------------------- pretraining
def scene_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def world_sampler(world: DictConfig) -> WorldSampler:
    """The pretraining world of the recipe's ``world`` section: how often the main object is a
    composite, and the concepts (every spec in ``reserved_concepts``) whose look it never draws."""
    probability = float(world.get("composite_probability", 0.0))
    folder = world.get("reserved_concepts")
    reserved = ()
    if folder:
        specs = sorted(Path(ROOT / folder).glob("*.yaml"))
        if not specs:
            raise UsageError(f"world.reserved_concepts: no concept specs (*.yaml) in {folder}")
        try:
            reserved = tuple(ConceptSpec.load(path).object for path in specs)
        except ValueError as err:
            raise UsageError(f"world.reserved_concepts: {err}") from None
    return WorldSampler(composite_probability=probability, reserved=reserved)


def pretraining_scenes(count: int, seed: int, cache_dir: Path, sampler: WorldSampler) -> tuple[np.ndarray, list[str]]:
    """The rendered pretraining pictures and captions, from the cache when present."""
    name = f"scenes-{count}-seed{seed}"
    if sampler.composite_probability:
        looks = ";".join(sorted(f"{o.shape}:{','.join(sorted(p.colour for p in o.halves))}" for o in sampler.reserved))
        digest = hashlib.sha256(looks.encode()).hexdigest()[:8]
        name += f"-composite{sampler.composite_probability:g}-reserved{digest}"
    cache = cache_dir / f"{name}.npz"
    if cache.is_file():
        data = np.load(cache)
        return data["images"], [str(c) for c in data["captions"]]
    images = np.empty((count, 64, 64, 3), dtype=np.uint8)
    captions = []
    for index in tqdm(range(count), desc="rendering scenes", unit="scene"):
        rendering = render(sampler.scene(scene_seed(seed, index)))
        images[index] = rendering.image
        captions.append(rendering.caption)
    cache_dir.mkdir(parents=True, exist_ok=True)
    temporary = cache.with_suffix(".tmp.npz")
    np.savez(temporary, images=images, captions=np.array(captions))
    os.replace(temporary, cache)
    return images, captions


def make_trainer(steps: int, log_dir: Path, name: str, callbacks: Sequence = (), gradient_clip: float | None = None):
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    return pl.Trainer(
        max_steps=steps,
        max_epochs=-1,
        accelerator="auto",
        devices=1,
        precision=32,
        logger=CSVLogger(save_dir=log_dir, name=name, version=""),
        callbacks=list(callbacks),
        enable_checkpointing=False,
        gradient_clip_val=gradient_clip,
        log_every_n_steps=min(10, steps),
        enable_model_summary=False,
    )


def loader(dataset, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator)


def config_paths(value: str | Sequence[str]) -> list[str]:
    """A recipe's ``model_config``: one path, or a list of paths merged in order."""
    return [value] if isinstance(value, str) else list(value)


def load_model_config(paths: str | Sequence[str]) -> DictConfig:
    """The ``model`` section of a config file, or of several merged in order (as ``main.py --base``)."""
    paths = config_paths(paths)
    missing = [str(p) for p in paths if not (ROOT / p).is_file()]
    if missing:
        raise UsageError(f"model config not found: {', '.join(missing)}")
    try:
        merged = OmegaConf.merge(*(OmegaConf.load(ROOT / p) for p in paths))
        model = OmegaConf.to_container(merged, resolve=True).get("model")
    except (OmegaConfBaseException, yaml.YAMLError, AttributeError, ValueError) as err:
        raise UsageError(f"model config {', '.join(paths)}: not a readable config ({str(err).splitlines()[0]})") from None
    if not isinstance(model, Mapping) or "target" not in model:
        raise UsageError(f"model config {', '.join(paths)}: no model section with a target (e.g. configs/miniworld/base.yaml)")
    try:
        check_bounds({"model": model})
    except BoundsError as err:
        raise UsageError(f"model config {', '.join(paths)}: {err}") from None
    return merged.model


def build_base_model(model_config: DictConfig):
    """The base LatentDiffusion of the config, without ViCo's image attention (plain SD layout)."""
    config = OmegaConf.to_container(model_config, resolve=True)
    config["params"]["unet_config"]["params"]["image_attention_layers"] = []
    config["params"].pop("ckpt_path", None)
    return instantiate_from_config(config)


def train_autoencoder(recipe: DictConfig, model_config: DictConfig, images: np.ndarray) -> dict:
    """Stage 1: the autoencoder; writes ``<cache_dir>/autoencoder.safetensors``."""
    from safetensors.torch import save_file

    settings = recipe.autoencoder
    torch.manual_seed(recipe.seed)
    autoencoder = instantiate_from_config(model_config.params.first_stage_config)
    module = AutoencoderPretraining(
        autoencoder, settings.learning_rate, settings.kl_weight, settings.warmup_steps, settings.crop_size
    )
    subset = images[: settings.scenes]
    trainer = make_trainer(settings.steps, Path(recipe.cache_dir) / "logs", "autoencoder")
    trainer.fit(module, loader(ImageArray(subset), settings.batch_size, recipe.seed))
    autoencoder.eval()
    probe = torch.from_numpy(subset[:4096])
    factor = normalise_latent_scale(autoencoder, probe, float(model_config.params.scale_factor))
    with torch.no_grad():
        reconstruction = torch.cat([autoencoder.decode(autoencoder.encode(to_signed(x)).mode()) for x in probe[:512].split(128)])
        error = (reconstruction.clamp(-1, 1) - to_signed(probe[:512])).abs().mean().item() * 127.5
    save_file({k: v.contiguous() for k, v in autoencoder.state_dict().items()}, str(Path(recipe.cache_dir) / "autoencoder.safetensors"))
    logger.info("autoencoder: latent rescaled by %.4f; mean absolute reconstruction error %.2f / 255", factor, error)
    return {"latent_rescale": factor, "reconstruction_error_255": error}


@torch.no_grad()
def encode_scenes(model, images: np.ndarray, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for part in tqdm(torch.from_numpy(images).split(chunk), desc="encoding scenes", unit="chunk"):
        posterior = model.encode_first_stage(to_signed(part))
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def used_token_ids(model, captions: Sequence[str]) -> torch.Tensor:
    """Token ids the captions use (with start/end), the rows of the embedding table that trained."""
    ids = {model.cond_stage_model.tokenizer.bos_token_id, model.cond_stage_model.tokenizer.eos_token_id}
    for caption in set(captions):
        ids.update(model.cond_stage_model.tokenizer.encode(caption))
    return torch.tensor(sorted(ids))


def train_diffusion(recipe: DictConfig, model_config: DictConfig, images: np.ndarray, captions: list[str]) -> dict:
    """Stage 2: UNet + text encoder on the frozen autoencoder; returns the trained model's record."""
    from pytorch_lightning.callbacks import EMAWeightAveraging
    from safetensors.torch import load_file

    settings = recipe.diffusion
    torch.manual_seed(recipe.seed)
    model = build_base_model(model_config)
    autoencoder_file = Path(recipe.cache_dir) / "autoencoder.safetensors"
    init_from = settings.get("init_from")
    if not autoencoder_file.is_file() and not init_from:
        raise UsageError(f"no trained autoencoder at {autoencoder_file}: run --stage vae first")
    if init_from:
        # A further round from an earlier base file: its UNet and text encoder, and its
        # autoencoder unless the cache holds the one that base was trained on (a fresh checkout
        # continuing the shipped base has only the base file: its fp16 autoencoder is the one
        # every sample of that base was decoded with).
        init = Path(init_from)
        if not init.is_file():
            raise UsageError(f"diffusion.init_from: no base model at {init}")
        try:
            model.load_base_checkpoint(str(init))
        except CheckpointError as err:
            raise UsageError(f"diffusion.init_from: {err}") from None
    if autoencoder_file.is_file():
        model.first_stage_model.load_state_dict(load_file(str(autoencoder_file)))
    else:
        logger.info("no cached autoencoder at %s: keeping the one in %s", autoencoder_file, init_from)
    mean, std = encode_scenes(model, images)
    tokens = model.cond_stage_model.tokenizer(captions)
    empty = model.cond_stage_model.tokenizer([""])[0]
    module = TextToImagePretraining(
        model, settings.learning_rate, empty, settings.caption_dropout, settings.snr_gamma, settings.warmup_steps
    )
    ema = EMAWeightAveraging(decay=settings.ema_decay, update_starting_at_step=settings.steps // 5)
    trainer = make_trainer(settings.steps, Path(recipe.cache_dir) / "logs", "diffusion", [ema], settings.gradient_clip)
    trainer.fit(module, loader(LatentCaptionArray(mean, std, tokens), settings.batch_size, recipe.seed))
    table = model.cond_stage_model.token_embedding.weight
    keep = used_token_ids(model, captions)
    with torch.no_grad():
        unused = torch.ones(table.shape[0], dtype=torch.bool)
        unused[keep] = False
        table[unused] = 0.0  # never trained: zero rows keep the shipped file compressible
    return {"model": model, "used_tokens": int(keep.numel())}


def write_base(model, path: Path, metadata: dict[str, str]) -> None:
    """The base weights in the CompVis single-file layout, as fp16 safetensors."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in model.base_state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(temporary), metadata=metadata)
    os.replace(temporary, path)
    path.chmod(0o644)


def plot_curve(csv_path: Path, column: str, out: Path, title: str) -> None:
    """A small PNG of one logged column against the step (smoothed), drawn with PIL."""
    import csv

    with csv_path.open() as handle:
        rows = [(int(r["step"]), float(r[column])) for r in csv.DictReader(handle) if r.get(column)]
    if not rows:
        return
    steps, values = np.array(rows).T
    kernel = max(1, len(values) // 50)
    smooth = np.convolve(values, np.ones(kernel) / kernel, mode="valid")
    width, height, pad = 480, 240, 36
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    logs = np.log10(np.maximum(smooth, 1e-8))
    low, high = logs.min(), logs.max() + 1e-9
    xs = pad + (steps[kernel - 1 :] - steps[0]) / max(1, steps[-1] - steps[0]) * (width - 2 * pad)
    ys = height - pad - (logs - low) / (high - low) * (height - 2 * pad)
    draw.line(list(zip(xs.tolist(), ys.tolist())), fill=(20, 80, 200), width=2)
    draw.rectangle([pad, pad, width - pad, height - pad], outline="black")
    draw.text((pad, 8), f"{title} ({column}, log scale, moving average of {kernel})", fill="black")
    draw.text((pad, height - pad + 6), f"step {int(steps[0])}", fill="black")
    draw.text((width - pad - 70, height - pad + 6), f"step {int(steps[-1])}", fill="black")
    draw.text((2, pad - 12), f"{10 ** high:.3g}", fill="black")
    draw.text((2, height - pad), f"{10 ** low:.3g}", fill="black")
    image.save(out)


def pretrain(recipe: DictConfig, stage: str, command: str) -> Path:
    # The frozen parts (the autoencoder in stage 2, the text encoder's dropout-free holder) stay in eval mode.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    torch.set_num_threads(int(recipe.threads))
    model_config = load_model_config(recipe.model_config)
    output = ROOT / recipe.output_dir
    cache = Path(recipe.cache_dir)
    record_path = cache / "pretraining.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() and stage == "ldm" else {}
    started = time.time()
    images, captions = pretraining_scenes(int(recipe.scenes), int(recipe.seed), cache, world_sampler(recipe.world))
    record["render_seconds"] = round(time.time() - started, 1)
    if stage in ("all", "vae"):
        started = time.time()
        record["autoencoder"] = train_autoencoder(recipe, model_config, images)
        record["autoencoder"]["seconds"] = round(time.time() - started, 1)
        record_path.write_text(json.dumps(record, indent=2))
    if stage in ("all", "ldm"):
        started = time.time()
        trained = train_diffusion(recipe, model_config, images, captions)
        init_from = recipe.diffusion.get("init_from")
        rounds = [r for r in record.get("diffusion", []) if isinstance(r, dict)] if init_from else []
        rounds.append({
            "round": len(rounds) + 1, "command": command, "steps": int(recipe.diffusion.steps), "init_from": init_from,
            "seconds": round(time.time() - started, 1), "used_tokens": trained["used_tokens"],
        })  # fmt: skip
        record["diffusion"] = rounds
        record.update(
            command=command,
            seed=int(recipe.seed),
            recipe=OmegaConf.to_container(recipe),
            torch=torch.__version__,
            machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads {recipe.threads}",
        )
        metadata = {"format": BASE_FORMAT, "config": " ".join(config_paths(recipe.model_config)), "seed": str(recipe.seed), "command": command}
        write_base(trained["model"], output / "base.safetensors", metadata)
        curves = (("autoencoder", "autoencoder", "vae/l1"), ("diffusion", f"diffusion-round{len(rounds)}", "ldm/mse"))
        for log, name, column in curves:
            csv_path = cache / "logs" / log / "metrics.csv"
            if csv_path.is_file():
                shutil.copyfile(csv_path, output / f"{name}-metrics.csv")
                plot_curve(csv_path, column, output / f"{name}-curve.png", name)
        (output / "pretraining.json").write_text(json.dumps(record, indent=2) + "\n")
        logger.info("base model: %s", output / "base.safetensors")
    record_path.write_text(json.dumps(record, indent=2))
    return output / "base.safetensors"


# ------------------------------------------------------------ world classifier
def add_classifier_parser(commands) -> None:
    from ldm.evaluation.miniworld_training import ClassifierRecipe

    defaults = ClassifierRecipe()
    parser = commands.add_parser("train-classifier", help="train the world classifier the evaluation scores with")
    parser.add_argument("--out", default=str(ROOT / "models" / "miniworld" / "classifier.safetensors"),
                        help="weights; the report goes beside them as .json")
    parser.add_argument("--base", default=str(ROOT / "models" / "miniworld" / "base.safetensors"),
                        help="base model whose autoencoder reconstructs part of the training pictures (if the file exists)")
    parser.add_argument("--no_autoencoder", action="store_true", help="train on renders only, even if the base model exists")
    parser.add_argument("--scenes", type=int, default=defaults.scenes, help="rendered training pictures")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="training steps")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the scenes, augmentation and training")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--cache_dir", default="outputs/miniworld-cache", help="where rendered pictures are cached")  # fmt: skip


def train_classifier_command(args: argparse.Namespace, command: str) -> None:
    """``train-classifier``: render, train, write the weights and the report (held-out accuracy per head)."""
    from ldm.evaluation.miniworld_training import ClassifierRecipe, load_autoencoder, train_classifier, write_classifier

    for name in ("scenes", "steps", "threads"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    recipe = ClassifierRecipe(scenes=args.scenes, steps=args.steps, seed=args.seed)
    use_autoencoder = not args.no_autoencoder and Path(args.base).is_file()
    if not use_autoencoder and not args.no_autoencoder:
        logger.warning("no base model at %s: training on renders only (no autoencoder round trips)", args.base)
    try:
        autoencoder = load_autoencoder(args.base, ROOT / "configs" / "miniworld" / "base.yaml") if use_autoencoder else None
    except CheckpointError as err:
        raise UsageError(str(err)) from None
    concepts = [ConceptSpec.load(path) for path in sorted((ROOT / "configs" / "miniworld" / "concepts").glob("*.yaml"))]
    model, report = train_classifier(
        recipe, concepts, autoencoder, args.base if use_autoencoder else None, Path(args.cache_dir)
    )
    record = write_classifier(model, report, Path(args.out), command)
    logger.info("held-out accuracy: %s", ", ".join(f"{k} {v:.3f}" for k, v in report.heldout_accuracy.items()))
    logger.info("world classifier: %s (report %s)", args.out, record)


# --------------------------------------------------------------------- probe
def add_probe_parser(commands) -> None:
    parser = commands.add_parser("probe", help="what a base model draws from words alone, read by the world classifier")
    parser.add_argument("--base", default=str(ROOT / "models" / "miniworld" / "base.safetensors"), help="base model")
    parser.add_argument("--config", nargs="+", default=["configs/miniworld/base.yaml"],
                        help="the base model's config; several files are merged in order (as main.py --base)")
    parser.add_argument("--classifier", default=str(ROOT / "models" / "miniworld" / "classifier.safetensors"), help="world classifier")
    parser.add_argument("--n_samples", type=int, default=4, help="samples per prompt")
    parser.add_argument("--ddim_steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--grid", help="also write the samples as a PNG grid (one row per prompt)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")  # fmt: skip


def probe_command(args: argparse.Namespace) -> None:
    """``probe``: the single-part and composite prompt table of :mod:`ldm.evaluation.miniworld_probe`."""
    from ldm.evaluation.miniworld import load_classifier
    from ldm.evaluation.miniworld_probe import probe

    for name in ("n_samples", "ddim_steps", "threads"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("base", "classifier"):
        if not Path(getattr(args, name)).is_file():
            raise UsageError(f"--{name} file not found: {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    model = build_base_model(load_model_config(args.config))
    try:
        model.load_base_checkpoint(args.base)
    except CheckpointError as err:
        raise UsageError(str(err)) from None
    model.eval()
    result = probe(model, load_classifier(args.classifier), args.n_samples, ddim_steps=args.ddim_steps)
    print(f"base: {args.base} (config: {' '.join(args.config)}); {args.n_samples} samples per prompt, DDIM {args.ddim_steps}, guidance 7.5\n")
    print(result.markdown())
    if args.grid:
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        save_png(make_grid([list(to_uint8(row)) for row in result.samples]), Path(args.grid))
        logger.info("samples: %s", args.grid)


# ----------------------------------------------------------------------- CLI
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(description="The miniature world: concept folders and the pretrained base model.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    concept = commands.add_parser("make-concept", help="write a DreamBooth-style folder of photos of a concept")
    concept.add_argument("spec", help="concept spec (YAML), e.g. configs/miniworld/concepts/sunset_ring.yaml")
    concept.add_argument("--out", required=True, help="output folder")
    concept.add_argument("--count", type=int, default=5, help="number of photos")
    concept.add_argument("--seed", type=int, default=0, help="seed of the poses and scenes")
    train = commands.add_parser("pretrain", help="pretrain the base model (autoencoder, then UNet + text encoder)")
    train.add_argument("--config", nargs="+", default=[str(DEFAULT_RECIPE)],
                       help="pretraining recipe; several files are merged in order (as main.py --base)")
    train.add_argument("--stage", choices=("all", "vae", "ldm"), default="all", help="which stage(s) to run")
    train.add_argument("overrides", nargs="*", help="dotted overrides of the recipe, e.g. diffusion.steps=100")
    add_classifier_parser(commands)
    add_probe_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        if args.command == "make-concept":
            if args.count < 1:
                raise UsageError(f"--count must be at least 1, got {args.count}")
            if args.seed < 0:
                raise UsageError(f"--seed must be >= 0, got {args.seed}")
            try:
                spec = ConceptSpec.load(args.spec)
                check_init_word(spec.init_word, args.spec)
            except ValueError as err:
                raise UsageError(str(err)) from None
            check_writable(Path(args.out), "--out")
            paths = make_concept(spec, Path(args.out), args.count, args.seed)
            logger.info("%d photos of the concept in %s", len(paths), args.out)
            return 0
        if args.command == "probe":
            probe_command(args)
            return 0
        if args.command == "train-classifier":
            train_classifier_command(args, "python scripts/miniworld.py " + " ".join(argv))
            return 0
        # --config takes several files, so overrides written after them land in its list.
        files = [word for word in args.config if "=" not in word]
        overrides = [word for word in args.config if "=" in word] + args.overrides
        missing = [path for path in files if not Path(path).is_file()]
        if missing or not files:
            raise UsageError(f"recipe not found: {', '.join(missing) or 'no recipe file given'}")
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise UsageError(f"overrides look like diffusion.steps=100, got '{bad[0]}'")
        pretrain(read_recipe(files, overrides), args.stage, "python scripts/miniworld.py " + " ".join(argv))
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk or a folder removed during the run
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
