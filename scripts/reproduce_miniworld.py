"""The paper's experiments in miniature: Table 2's comparison, the ablations, the mask analyses
and a Table 3 analogue, on the miniature world's base model; writes ``docs/REPRODUCTION.md``.

    python scripts/reproduce_miniworld.py                 # everything (hours on a 2-core CPU), resumable
    python scripts/reproduce_miniworld.py --quick         # one concept, a few steps: a smoke test (minutes)
    python scripts/reproduce_miniworld.py --stages report # rewrite the report from what is done

Stages (``--stages``, comma-separated, in this order):

* ``main``: every concept spec of ``configs/miniworld/concepts/`` with two seeds (23, 24), the
  rows of Table 2: Textual Inversion at ViCo's budget and at its own recipe, DreamBooth, Custom
  Diffusion, ViCo with the image attention at the paper's 1e-5 and at the width-transferred
  1e-4, plus the renderer (ceiling) and the base model with the init word (floor);
* ``ablations``: seed 23: the rows of the ablations (``scripts/evaluate_miniworld.py``'s
  ``METHODS``: mask, regulariser, layers, photos, init word, steps, reference, true mask);
* ``analyses``: the S* mask over the course of training (Fig. 19), S* attention on the
  generated image with and without the regulariser (Figs. 20-21), property editing;
* ``table3``: trainable parameters, time per step and per sample, peak memory, side by side;
* ``report``: ``docs/REPRODUCTION.md`` (and its pictures in ``docs/images/reproduction/``).

Everything goes to ``--outdir`` (``outputs/reproduce``): ``seed23/`` and ``seed24/`` are
``scripts/evaluate_miniworld.py`` folders (trainings, samples, scores), ``analyses/`` and
``table3/`` hold the rest as JSON. Every stage keeps what is done: rerunning the command
continues where it stopped. Predictable mistakes print one ``error: ...`` line (exit 2).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import scripts.evaluate_miniworld as ev  # noqa: E402
from ldm.data.images import load_image, to_tensor  # noqa: E402
from ldm.data.miniworld import IMAGE_SIZE, SCENES, ConceptSpec, concept_scene, render  # noqa: E402
from ldm.evaluation.attention_analysis import (  # noqa: E402
    TokenAttentionRecorder,
    colour_mask,
    mask_iou,
    proxy_quality,
    upsampled_mean,
)
from ldm.evaluation.miniworld import HEADS, classify, load_classifier  # noqa: E402
from ldm.evaluation.miniworld_metrics import attention_mask_iou, downsample_mask, mean_dicts  # noqa: E402
from ldm.models.diffusion.ddim import DDIMSampler  # noqa: E402
from ldm.models.diffusion.sampling import encode_references, sample_prompt  # noqa: E402
from ldm.modules.vico import otsu_mask  # noqa: E402
from ldm.modules.embedding_manager import load_authors_embeddings  # noqa: E402
from ldm.util import CheckpointError  # noqa: E402
from sample import OneLineErrorParser, UsageError, make_grid, to_uint8  # noqa: E402
from scripts.compare_miniworld import Comparison, compare, metric_value  # noqa: E402
from scripts.evaluate import save_png_atomically, text_cell  # noqa: E402

logger = logging.getLogger("reproduce_miniworld")

STAGES = ("main", "ablations", "analyses", "table3", "report")
SEEDS = (23, 24)
MAIN_METHODS = (
    "renderer", "base", "textual-inversion", "textual-inversion-recipe", "dreambooth", "custom-diffusion", "vico-lr1e-5", "vico",
)  # fmt: skip
ABLATION_METHODS = (
    "no-mask", "no-regularizer", "paper-mask", "encoder-layers", "both-layers", "photos-1", "photos-3", "init-object",
    "textual-inversion-init-object", "steps-300", "reference-unseen", "no-reference", "true-mask",
)  # fmt: skip
#: The settings of every evaluation folder (``scripts/evaluate_miniworld.py`` options).
FULL = {"scenes": tuple(SCENES), "n_samples": 4, "ddim_steps": 50, "scale": 7.5, "photos": 5, "train_steps": 400}
QUICK = {"scenes": ("beach",), "n_samples": 2, "ddim_steps": 2, "scale": 7.5, "photos": 3, "train_steps": 2}
QUICK_CONCEPT = "sunset_ring"
#: ``--quick`` runs a row of each kind of path (trainings with and without image attention,
#: class images, sampling without the reference, the true mask, an unseen reference).
QUICK_MAIN = ("base", "textual-inversion", "dreambooth", "custom-diffusion", "vico")
QUICK_ABLATIONS = ("no-reference", "true-mask", "reference-unseen")
QUICK_COSTS = ("textual-inversion", "vico")
#: Rows of the analyses: S* attention on the generated image, property editing.
ATTENTION_METHODS = ("textual-inversion", "vico", "no-regularizer")
EDIT_METHODS = ("base", "textual-inversion", "textual-inversion-recipe", "dreambooth", "custom-diffusion", "vico-lr1e-5", "vico")
EDIT_SCENES = ("beach", "grass", "snow", "studio")
#: Rows of the cost table (Table 3): training steps measured, samples timed.
COST_METHODS = ("textual-inversion", "textual-inversion-recipe", "dreambooth", "custom-diffusion", "vico")
REPORT = ROOT / "docs" / "REPRODUCTION.md"
IMAGES = ROOT / "docs" / "images" / "reproduction"


@dataclass(frozen=True)
class Plan:
    """What the command runs: the evaluation settings, concepts, seeds and stages."""

    outdir: Path
    settings: dict[str, Any]
    concepts: tuple[str, ...]
    seeds: tuple[int, ...]
    stages: tuple[str, ...]
    quick: bool
    device: str
    report: Path
    images: Path

    @property
    def main_methods(self) -> tuple[str, ...]:
        return QUICK_MAIN if self.quick else MAIN_METHODS

    @property
    def ablation_methods(self) -> tuple[str, ...]:
        return QUICK_ABLATIONS if self.quick else ABLATION_METHODS

    @property
    def cost_methods(self) -> tuple[str, ...]:
        return QUICK_COSTS if self.quick else COST_METHODS


# ------------------------------------------------------------------ evaluation folders
def methods(names: Sequence[str], quick: bool) -> tuple[ev.Method, ...]:
    """The registry's rows; in ``--quick`` every own budget is cut to the quick steps and
    DreamBooth draws 2 class images with 2 DDIM steps."""
    rows = tuple(ev.METHODS[name] for name in names)
    if not quick:
        return rows
    cut = []
    for method in rows:
        if method.steps is not None:
            method = replace(method, steps=QUICK["train_steps"])
        if method.name == "dreambooth":
            method = replace(method, overrides=(*method.overrides, "data.params.class_images.params.num_images=2",
                                                "data.params.class_images.params.ddim_steps=2"))  # fmt: skip
        cut.append(method)
    return tuple(cut)


def seed_folder(plan: Plan, seed: int) -> Path:
    return plan.outdir / f"seed{seed}"


def evaluation_for(plan: Plan, seed: int, names: Sequence[str]) -> ev.Evaluation:
    """An ``evaluate_miniworld`` evaluation of ``names`` into the seed's folder."""
    settings = plan.settings
    argv = [
        "--outdir", str(seed_folder(plan, seed)), "--seed", str(seed), "--methods", ",".join(n for n in names if n in ev.METHODS),
        "--scenes", ",".join(settings["scenes"]), "--n_samples", str(settings["n_samples"]), "--ddim_steps", str(settings["ddim_steps"]),
        "--scale", str(settings["scale"]), "--photos", str(settings["photos"]), "--train_steps", str(settings["train_steps"]),
        "--device", plan.device, "--concepts", *(str(ev.CONCEPTS_DIR / f"{name}.yaml") for name in plan.concepts),
    ]  # fmt: skip
    evaluation = ev.prepare(ev.build_parser().parse_args(argv))
    return replace(evaluation, methods=methods([m.name for m in evaluation.methods], plan.quick))


def run_evaluation(plan: Plan, seed: int, names: Sequence[str], classifier) -> None:
    logger.info("seed %d: %s", seed, ", ".join(names))
    ev.run(evaluation_for(plan, seed, names), classifier)


def all_rows(plan: Plan, seed: int) -> list[dict[str, Any]]:
    """Every scored (concept, method) of the seed's folder (each cell's own ``scores.json``)."""
    folder = seed_folder(plan, seed)
    return [json.loads(path.read_text()) for concept in plan.concepts for path in sorted((folder / concept).glob("*/scores.json"))]


# ------------------------------------------------------------------ analyses
def concept_spec(name: str) -> ConceptSpec:
    return ConceptSpec.load(ev.CONCEPTS_DIR / f"{name}.yaml")


def job_of(plan: Plan, seed: int, concept: str, method: str) -> ev.MethodJob:
    evaluation = evaluation_for(plan, seed, [method])
    (job,) = ev.concept_jobs(concept_spec(concept), replace(evaluation, methods=methods([method], plan.quick)))
    return job


def trained_checkpoint(job: ev.MethodJob) -> Path | None:
    marker = job.folder / ev.TRAINED_FILE
    if not marker.is_file():
        return None
    return job.folder / json.loads(marker.read_text())["checkpoint"]


def mask_over_training(plan: Plan) -> dict[str, Any]:
    """Fig. 19: the IoU of the S* mask on the reference with the true mask at every saved step
    of ViCo's training (the reference stream depends on S* alone, so each step's exported
    ``embeddings_gs-N.pt`` gives that step's masks); step 0 is S* at the init word."""
    seed = plan.seeds[0]
    results: dict[str, Any] = {}
    for concept in plan.concepts:
        job = job_of(plan, seed, concept, "vico")
        checkpoint = trained_checkpoint(job)
        if checkpoint is None:
            continue
        evaluation = evaluation_for(plan, seed, ["vico"])
        model = ev.load_method_model(job, evaluation, checkpoint)
        reference = load_image(job.reference, (IMAGE_SIZE, IMAGE_SIZE))
        latents = encode_references(model, to_tensor(np.stack([reference])).to(model.device))
        truth = load_image(job.reference_mask)[..., 0] > 127
        manager = model.embedding_manager
        (placeholder,) = manager.string_to_param_dict.keys()
        trained = manager.string_to_param_dict[placeholder].detach().clone()
        steps: dict[int, torch.Tensor] = {0: manager.initial_embeddings[placeholder].detach().clone()}
        for export in checkpoint.parent.glob("embeddings_gs-*.pt"):
            steps[int(export.stem.rpartition("-")[2])] = load_authors_embeddings(export)[placeholder]
        timesteps = ev.attention_timesteps(plan.settings["ddim_steps"], model.num_timesteps)
        curve = {}
        for step, vector in sorted(steps.items()):
            manager.load_placeholder_vectors({placeholder: vector.to(trained)})
            rows = [attention_mask_iou(ev.reference_records(model, latents, job.prompt(scene), t), [truth])
                    for scene in plan.settings["scenes"][:2] for t in timesteps]  # fmt: skip
            layers = mean_dicts(rows)
            curve[step] = {"mask_iou": float(np.mean(list(layers.values()))), "layers": layers}
        manager.load_placeholder_vectors({placeholder: trained})
        results[concept] = curve
    return results


def generated_attention(plan: Plan) -> dict[str, Any]:
    """Figs. 20-21: the S* attention of the generated image, averaged over the sampling steps and
    the UNet's layers, against a mask of the generated object (the colour proxy, whose own IoU
    with the true mask on renders is reported beside it); one picture per concept."""
    seed = plan.seeds[0]
    scenes = plan.settings["scenes"][: len(EDIT_SCENES)]
    results: dict[str, Any] = {}
    for concept in plan.concepts:
        spec = concept_spec(concept)
        colours = [part.colour for part in spec.object.halves]
        renders = [render(concept_scene(spec, int(s), scene)) for scene in scenes for s in range(4)]
        entry: dict[str, Any] = {
            "proxy_iou_on_renders": proxy_quality(np.stack([r.image for r in renders]), np.stack([r.mask for r in renders]), colours),
        }
        pictures: list[list[np.ndarray | None]] = []
        for name in ATTENTION_METHODS:
            job = job_of(plan, seed, concept, name)
            checkpoint = trained_checkpoint(job)
            if checkpoint is None:
                continue
            evaluation = evaluation_for(plan, seed, [name])
            model = ev.load_method_model(job, evaluation, checkpoint)
            reference = load_image(job.reference, (IMAGE_SIZE, IMAGE_SIZE))
            latents = encode_references(model, to_tensor(np.stack([reference])).to(model.device)) if ev.has_image_attention(model) else None
            ious, layer_ious, row = [], [], [text_cell(job.method.label, IMAGE_SIZE, IMAGE_SIZE)]
            for scene in scenes:
                prompt = job.prompt(scene)
                index = int(model.embedding_manager.placeholder_positions(model.tokenize([prompt]))[0][0])
                recorder = TokenAttentionRecorder(model.model.diffusion_model, index, job.n_samples)
                generator = torch.Generator().manual_seed(ev.scene_seed(seed, concept, scene))
                with recorder.recording():
                    decoded, _ = sample_prompt(
                        model, DDIMSampler(model), prompt, latents, n_samples=job.n_samples,
                        latent_shape=(model.channels, model.image_size, model.image_size),
                        steps=plan.settings["ddim_steps"], scale=plan.settings["scale"], generator=generator,
                    )  # fmt: skip
                images = to_uint8(decoded)
                maps = recorder.maps()
                masks = [colour_mask(image, colours) for image in images]
                for layer, layer_map in maps.items():
                    binary = otsu_mask(layer_map.flatten(1)).reshape(layer_map.shape).numpy()
                    size = layer_map.shape[-2:]
                    scores = [mask_iou(b, downsample_mask(m, *size)) for b, m in zip(binary, masks)]
                    layer_ious.append({layer: float(np.mean(scores))})
                mean_map = upsampled_mean(maps, IMAGE_SIZE)
                for image, heat, mask in zip(images, mean_map, masks):
                    binary = otsu_mask(heat.flatten()[None])[0].reshape(heat.shape).numpy()
                    ious.append(mask_iou(binary, mask))
                if scene == scenes[0]:
                    row += [images[0], heat_picture(mean_map[0].numpy()), (np.stack([masks[0]] * 3, -1) * 255).astype(np.uint8)]
            entry[name] = {"iou_mean_map": float(np.mean(ious)), "iou_per_layer": mean_dicts(layer_ious)}
            pictures.append(row)
        if pictures:
            plan.outdir.joinpath("analyses").mkdir(parents=True, exist_ok=True)
            save_png_atomically(make_grid(pictures), plan.outdir / "analyses" / f"generated-attention-{concept}.png")
        results[concept] = entry
    return results


def heat_picture(values: np.ndarray) -> np.ndarray:
    """A ``[H, W]`` map in [0, 1] as a black-red-yellow picture."""
    v = np.clip(values, 0, 1)
    rgb = np.stack([np.clip(2 * v, 0, 1), np.clip(2 * v - 1, 0, 1), np.zeros_like(v)], -1)
    return (rgb * 255).round().astype(np.uint8)


def edits_for(spec: ConceptSpec) -> dict[str, tuple[str, str]]:
    """Property edits that change something: a colour and a pattern the concept does not have."""
    colours = {part.colour for part in spec.object.halves}
    patterns = {part.pattern for part in spec.object.halves}
    colour = next(c for c in ("red", "blue", "purple") if c not in colours)
    pattern = next(p for p in ("striped", "dotted", "checkered") if p not in patterns)
    return {f"a {colour}": ("colour", colour), f"a {pattern}": ("pattern", pattern)}


def property_editing(plan: Plan, classifier) -> dict[str, Any]:
    """"a red *", "a striped *": does the object take the property while keeping its shape and
    the rest (scored by the world classifier)? Success: either half has the asked colour (or
    pattern); kept: the shape and the other attribute of both halves."""
    seed = plan.seeds[0]
    scenes = tuple(s for s in EDIT_SCENES if s in plan.settings["scenes"]) or plan.settings["scenes"][:1]
    results: dict[str, Any] = {}
    for concept in plan.concepts:
        spec = concept_spec(concept)
        target = ev.object_labels(spec.object)
        results[concept] = {}
        for name in EDIT_METHODS:
            job = job_of(plan, seed, concept, name)
            checkpoint = trained_checkpoint(job) if job.method.kind == "trained" else None
            if job.method.kind == "trained" and checkpoint is None:
                continue
            model = ev.load_method_model(job, evaluation_for(plan, seed, [name]), checkpoint)
            uses_reference = job.method.kind == "trained" and ev.has_image_attention(model)
            reference = load_image(job.reference, (IMAGE_SIZE, IMAGE_SIZE))
            latents = encode_references(model, to_tensor(np.stack([reference])).to(model.device)) if uses_reference else None
            entry = {}
            for phrase, (kind, value) in edits_for(spec).items():
                images = []
                for scene in scenes:
                    subject = f"{phrase} {spec.init_word}" if job.method.kind == "base" else f"{phrase} *"
                    prompt = ev.PROMPT.format(subject=subject, scene=SCENES[scene])
                    generator = torch.Generator().manual_seed(ev.scene_seed(seed, concept, f"{scene}/{phrase}"))
                    decoded, _ = sample_prompt(
                        model, DDIMSampler(model), prompt, latents, n_samples=job.n_samples,
                        latent_shape=(model.channels, model.image_size, model.image_size),
                        steps=plan.settings["ddim_steps"], scale=plan.settings["scale"], generator=generator,
                    )  # fmt: skip
                    images.append(to_uint8(decoded))
                labels = classify(classifier, np.concatenate(images)).labels
                wanted = HEADS[f"{kind}_0"].index(value)
                other = "pattern" if kind == "colour" else "colour"
                entry[phrase] = {
                    "success": float(np.mean((labels[f"{kind}_0"] == wanted) | (labels[f"{kind}_1"] == wanted))),
                    "shape_kept": float(np.mean(labels["shape"] == target["shape"])),
                    f"{other}_kept": float(np.mean([(labels[f"{other}_{h}"] == target[f"{other}_{h}"]).mean() for h in (0, 1)])),
                    "samples": int(len(labels["shape"])),
                }
            results[concept][name] = entry
    return results


def reference_contribution(plan: Plan) -> dict[str, Any]:
    """How much of ViCo's picture comes from the reference: the mean absolute pixel difference
    (0-255) between ViCo's samples and the same model's samples without the reference stream
    (the ``no-reference`` row: same noise), beside the difference to Textual Inversion's (same
    noise, another model); and the image-attention branch's share of the hidden state in each
    patched layer, ``|block(h) - h| / |h|``, over a sampling run."""
    seed = plan.seeds[0]
    results: dict[str, Any] = {}
    for concept in plan.concepts:
        vico = job_of(plan, seed, concept, "vico")
        entry: dict[str, Any] = {}
        for other in ("no-reference", "textual-inversion"):
            job = job_of(plan, seed, concept, other)
            pairs = [(vico.sample_path(scene, i), job.sample_path(scene, i)) for scene in vico.scenes for i in range(vico.n_samples)]
            pairs = [(a, b) for a, b in pairs if a.is_file() and b.is_file()]
            if pairs:
                entry[f"pixel_difference_to_{other}"] = float(np.mean(
                    [np.abs(load_image(a).astype(np.float32) - load_image(b).astype(np.float32)).mean() for a, b in pairs]))  # fmt: skip
        checkpoint = trained_checkpoint(vico)
        if checkpoint is not None:
            entry["branch_share"] = branch_share(plan, vico, checkpoint)
        results[concept] = entry
    return results


def branch_share(plan: Plan, job: ev.MethodJob, checkpoint: Path) -> dict[str, dict[int, float]]:
    """Per patched layer, means over a sampling run of how much the image-attention block
    changes the noisy stream's hidden state ``h``: the whole block (a transformer block: self-
    attention, attention to the reference tokens, feed-forward), ``|block(h) - h| / |h|``, and its
    attention to the reference alone, ``|attn2(norm(h), reference)| / |h|``."""
    model = ev.load_method_model(job, evaluation_for(plan, plan.seeds[0], ["vico"]), checkpoint)
    reference = load_image(job.reference, (IMAGE_SIZE, IMAGE_SIZE))
    latents = encode_references(model, to_tensor(np.stack([reference])).to(model.device))
    block_share: dict[int, list[float]] = {}
    reference_share: dict[int, list[float]] = {}
    hidden_norm: dict[int, torch.Tensor] = {}
    handles = []
    for module in model.model.diffusion_model.modules():
        block = getattr(module, "image_cross_attention", None)
        if block is None:
            continue
        layer = module.layer_index

        def block_hook(block, args, kwargs, output, layer=layer):
            hidden = args[0].float()
            block_share.setdefault(layer, []).append(float((output.float() - hidden).norm() / hidden.norm()))

        def keep_norm(block, args, kwargs, layer=layer):
            hidden_norm[layer] = args[0].float().norm()

        def attention_hook(attention, args, kwargs, output, layer=layer):
            reference_share.setdefault(layer, []).append(float(output.float().norm() / hidden_norm[layer]))

        handles += [block.register_forward_pre_hook(keep_norm, with_kwargs=True),
                    block.register_forward_hook(block_hook, with_kwargs=True),
                    block.attn2.register_forward_hook(attention_hook, with_kwargs=True)]  # fmt: skip
    try:
        scene = job.scenes[0]
        sample_prompt(model, DDIMSampler(model), job.prompt(scene), latents, n_samples=job.n_samples,
                      latent_shape=(model.channels, model.image_size, model.image_size), steps=plan.settings["ddim_steps"],
                      scale=plan.settings["scale"], generator=torch.Generator().manual_seed(ev.scene_seed(plan.seeds[0], job.concept.name, scene)))  # fmt: skip
    finally:
        for handle in handles:
            handle.remove()
    return {
        "block": {layer: float(np.mean(v)) for layer, v in sorted(block_share.items())},
        "reference_attention": {layer: float(np.mean(v)) for layer, v in sorted(reference_share.items())},
    }


def run_analyses(plan: Plan, classifier) -> None:
    folder = plan.outdir / "analyses"
    folder.mkdir(parents=True, exist_ok=True)
    for name, function in (("mask-over-training", lambda: mask_over_training(plan)),
                           ("generated-attention", lambda: generated_attention(plan)),
                           ("property-editing", lambda: property_editing(plan, classifier)),
                           ("reference-contribution", lambda: reference_contribution(plan))):  # fmt: skip
        path = folder / f"{name}.json"
        if path.is_file():
            continue
        logger.info("analysis: %s", name)
        path.write_text(json.dumps(function(), indent=2) + "\n")


# ------------------------------------------------------------------ Table 3
COST_SNIPPET = r"""
import json, sys, time
sys.path.insert(0, {root!r})
import main, torch
torch.set_num_threads({threads})
opt, overrides = main.parse_args({argv!r})
run = main.setup_run(opt, overrides)
trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
started = time.perf_counter()
main.train(run)
wall = time.perf_counter() - started
import csv, glob
rows = [r for path in glob.glob(str(run.logdir / "metrics" / "*" / "metrics.csv")) for r in csv.DictReader(open(path)) if r.get("train/step_time")]
steps = [float(r["train/step_time"]) for r in rows]
# VmHWM: this process's peak resident memory (ru_maxrss would include the parent's, kept across exec)
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("COST " + json.dumps({{"trainable": trainable, "wall": wall, "step_times": steps, "peak_rss_mb": peak / 1024}}))
"""


def measure_costs(plan: Plan) -> dict[str, Any]:
    """Each method trains ``steps`` steps in a fresh process, one after another, on one concept:
    trainable parameters, median seconds per step (``train/step_time``: compute only), peak
    resident memory of the process; then the time to draw samples, all methods interleaved."""
    steps = 3 if plan.quick else 20
    seed = plan.seeds[0]
    concept = plan.concepts[0]
    folder = plan.outdir / "table3"
    folder.mkdir(parents=True, exist_ok=True)
    costs: dict[str, Any] = {}
    for name in tqdm(plan.cost_methods, desc="table 3", unit="method"):
        job = job_of(plan, seed, concept, name)
        ev.ensure_photos(job.concept, job.photos, plan.settings["photos"])
        evaluation = evaluation_for(plan, seed, [name])
        argv = ev.training_argv(replace(job, folder=folder / name), evaluation)
        argv = [a for a in argv if not a.startswith("lightning.trainer.max_steps=")] + [
            f"lightning.trainer.max_steps={steps}", "lightning.modelcheckpoint.params.every_n_train_steps=100000",
            "lightning.trainer.log_every_n_steps=1", "lightning.callbacks.export=null",
        ]  # fmt: skip
        if job.method.name == "dreambooth":  # class images are not part of the paper's times either
            argv.append("data.params.class_images.params.num_images=4")
        code = COST_SNIPPET.format(root=str(ROOT), argv=argv, threads=torch.get_num_threads())
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        line = next((l for l in result.stdout.splitlines() if l.startswith("COST ")), None)
        if line is None:
            raise UsageError(f"table 3: training {name} failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
        measured = json.loads(line[5:])
        times = measured.pop("step_times")[1:] or [float("nan")]  # the first step warms up
        costs[name] = {**measured, "median_step_seconds": statistics.median(times), "recipe_steps": ev.method_steps(job.method, evaluation)}
    costs.update(sampling_times(plan, concept, seed))
    return costs


def sampling_times(plan: Plan, concept: str, seed: int) -> dict[str, Any]:
    """Seconds per sample of each trained model (4 samples, DDIM as the evaluation), interleaved over repeats."""
    repeats = 1 if plan.quick else 3
    models = {}
    for name in plan.cost_methods:
        job = job_of(plan, seed, concept, name)
        checkpoint = trained_checkpoint(job)
        if checkpoint is None:
            continue
        model = ev.load_method_model(job, evaluation_for(plan, seed, [name]), checkpoint)
        reference = load_image(job.reference, (IMAGE_SIZE, IMAGE_SIZE))
        latents = encode_references(model, to_tensor(np.stack([reference])).to(model.device)) if ev.has_image_attention(model) else None
        models[name] = (model, latents, job.prompt("beach"))
    times: dict[str, list[float]] = {name: [] for name in models}
    for repeat in range(repeats + 1):  # the first round warms up and is not counted
        for name, (model, latents, prompt) in models.items():
            started = time.perf_counter()
            sample_prompt(model, DDIMSampler(model), prompt, latents, n_samples=4,
                          latent_shape=(model.channels, model.image_size, model.image_size),
                          steps=plan.settings["ddim_steps"], scale=plan.settings["scale"], generator=torch.Generator().manual_seed(0))  # fmt: skip
            if repeat:
                times[name].append((time.perf_counter() - started) / 4)
    return {f"{name}_sample_seconds": statistics.median(values) for name, values in times.items()}


def run_table3(plan: Plan) -> None:
    path = plan.outdir / "table3" / "costs.json"
    if path.is_file():
        return
    costs = measure_costs(plan)
    costs["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
    path.write_text(json.dumps(costs, indent=2) + "\n")


# ------------------------------------------------------------------ report
def number(value: float | None, digits: int = 3) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|", *("| " + " | ".join(r) + " |" for r in rows)]


REPORT_METRICS = ("feature_similarity", "attribute_accuracy", "prompt_fidelity", "object_fidelity", "mask_iou")
METRIC_LABELS = {"feature_similarity": "feature sim. (I_DINO analogue)", "attribute_accuracy": "attribute accuracy",
                 "prompt_fidelity": "prompt fidelity (T_CLIP analogue)", "object_fidelity": "object fidelity", "mask_iou": "mask IoU"}  # fmt: skip


def rows_by(plan: Plan, seeds: Sequence[int]) -> dict[tuple[int, str, str], dict[str, Any]]:
    return {(seed, row["concept"], row["method"]): row for seed in seeds for row in all_rows(plan, seed)}


def mean_and_se(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None)


def with_se(values: Sequence[float]) -> str:
    mean, se = mean_and_se(values)
    return "" if mean is None else number(mean) + ("" if se is None else f" ± {se:.3f}")


def pairs_of(rows: Mapping, seeds: Sequence[int], concepts: Sequence[str], a: str, b: str) -> list[tuple[dict, dict]]:
    return [(rows[s, c, a], rows[s, c, b]) for s in seeds for c in concepts if (s, c, a) in rows and (s, c, b) in rows]


#: The verdict of a comparison measured on one (concept, seed) pair: no standard error, no verdict.
ONE_PAIR = "one pair: no verdict"


def no_verdict(comparison: Comparison | None) -> str | None:
    """Why a comparison cannot be judged (not measured, or one pair without a standard error); None if it can."""
    if comparison is None:
        return "not measured"
    return ONE_PAIR if comparison.se is None else None


def verdict(comparison: Comparison | None) -> str:
    """Whether b is ahead of a beyond two standard errors of the paired difference."""
    if reason := no_verdict(comparison):
        return reason
    if comparison.mean_difference > 2 * comparison.se:
        return "ahead"
    if comparison.mean_difference < -2 * comparison.se:
        return "behind"
    return "within noise"


def difference_cell(comparison: Comparison | None) -> str:
    if comparison is None:
        return ""
    se = "" if comparison.se is None else f" ± {comparison.se:.3f}"
    return f"{comparison.mean_difference:+.3f}{se} ({comparison.ahead}/{comparison.level}/{comparison.behind})"


def trained_steps(plan: Plan, name: str) -> str:
    """The steps the row's trainings ran (their ``training.json``), or nothing for untrained rows."""
    steps = {json.loads(path.read_text())["steps"] for seed in plan.seeds for concept in plan.concepts
             for path in [seed_folder(plan, seed) / concept / name / ev.TRAINED_FILE] if path.is_file()}  # fmt: skip
    return ", ".join(str(s) for s in sorted(steps))


def label(name: str) -> str:
    return ev.METHODS[name].label


def main_section(plan: Plan, rows: Mapping) -> list[str]:
    seeds, concepts = plan.seeds, plan.concepts
    lines = ["## Table 2 in miniature: the baselines at their own recipes", ""]
    header = ["method", "training steps", "cells", *(METRIC_LABELS[m] for m in REPORT_METRICS), "paper: I_DINO / I_CLIP / T_CLIP"]
    body = []
    for name in MAIN_METHODS:
        values = {m: [v for s in seeds for c in concepts if (s, c, name) in rows
                      for v in [metric_value(rows[s, c, name], m)] if v is not None] for m in REPORT_METRICS}  # fmt: skip
        if not values["feature_similarity"]:
            continue
        paper = " / ".join(f"{v:.3f}" for v in PAPER_TABLE2[name]) if name in PAPER_TABLE2 else ""
        cells = sum((s, c, name) in rows for s in seeds for c in concepts)
        body.append([label(name), trained_steps(plan, name), str(cells), *(with_se(values[m]) for m in REPORT_METRICS), paper])
    pairs = len(seeds) * len(concepts)
    lines += [
        f"Mean over the (concept, seed) cells done of {len(concepts)} concepts x {len(seeds)} seeds ({pairs} cells "
        "planned; the 'cells' column counts each row's), ± the standard error over those cells. Attribute "
        "accuracy is the mean accuracy of shape, both colours, both patterns and the notch; object fidelity "
        "needs all of them right at once.",
        "",
        *table(header, body),
        "",
        "ViCo (image attention at 1e-4) against each row, paired by (concept, seed): mean difference ± "
        "standard error (ViCo ahead / level / behind); 'ahead' or 'behind' when the difference is beyond "
        "two standard errors.",
        "",
    ]
    compare_rows = []
    for name in MAIN_METHODS:
        if name in ("vico", "renderer"):
            continue
        pairs = pairs_of(rows, seeds, concepts, name, "vico")
        if not pairs:
            continue
        cells = []
        for metric in ("feature_similarity", "attribute_accuracy", "prompt_fidelity", "object_fidelity"):
            comparison = compare(pairs, metric)
            cells.append(f"{difference_cell(comparison)} {verdict(comparison)}")
        compare_rows.append([label(name), *cells])
    lines += table(["ViCo vs", "feature sim.", "attribute accuracy", "prompt fidelity", "object fidelity"], compare_rows)
    heads = ("shape", "colour_0", "pattern_0", "colour_1", "pattern_1", "notch")
    detail = []
    for name in MAIN_METHODS:
        cells = [with_se([rows[s, c, name][h] for s in seeds for c in concepts if (s, c, name) in rows and h in rows[s, c, name]]) for h in heads]
        if any(cells):
            detail.append([label(name), *cells])
    lines += ["", "The details: accuracy of each attribute of the concept's object (what attribute accuracy averages).", "",
              *table(["method", "shape", "colour 1", "pattern 1", "colour 2", "pattern 2", "notch"], detail)]  # fmt: skip
    return lines + [""]


#: The paper's Table 2 (I_DINO, I_CLIP, T_CLIP) and Table 3 (training s, inference s) rows.
PAPER_TABLE2 = {
    "dreambooth": (0.628, 0.804, 0.236), "custom-diffusion": (0.570, 0.768, 0.249),
    "textual-inversion-recipe": (0.520, 0.768, 0.216), "vico": (0.631, 0.809, 0.229),
}  # fmt: skip
PAPER_TABLE3 = {"dreambooth": (1411, 11.2), "custom-diffusion": (682, 8.4), "textual-inversion-recipe": (735, 9.8), "vico": (353, 15.4)}


@dataclass(frozen=True)
class Claim:
    """A claim of the paper as a paired comparison: ``b`` beats ``a`` on ``metric`` (``sign`` -1: loses)."""

    text: str
    source: str
    a: str
    b: str
    metric: str
    sign: int = 1
    seeds: str = "all"


CLAIMS = (
    Claim("ViCo keeps the object better than Textual Inversion", "Table 2 (I_DINO 0.631 vs 0.520)", "textual-inversion-recipe", "vico", "feature_similarity"),
    Claim("... also than Textual Inversion held to ViCo's budget", "Table 2", "textual-inversion", "vico", "feature_similarity"),
    Claim("ViCo keeps the object's attributes better than Textual Inversion", "Table 2, Fig. 4", "textual-inversion-recipe", "vico", "attribute_accuracy"),
    Claim("ViCo keeps the object at least as well as DreamBooth", "Table 2 (0.631 vs 0.628)", "dreambooth", "vico", "feature_similarity"),
    Claim("ViCo keeps the object better than Custom Diffusion", "Table 2 (0.631 vs 0.570)", "custom-diffusion", "vico", "feature_similarity"),
    Claim("ViCo follows the prompt better than Textual Inversion", "Table 2 (T_CLIP 0.229 vs 0.216)", "textual-inversion-recipe", "vico", "prompt_fidelity"),
    Claim("DreamBooth follows the prompt better than ViCo", "Table 2 (0.236 vs 0.229)", "vico", "dreambooth", "prompt_fidelity"),
    Claim("Custom Diffusion follows the prompt better than ViCo", "Table 2 (0.249 vs 0.229)", "vico", "custom-diffusion", "prompt_fidelity"),
    Claim("The image attention at the paper's 1e-5 is enough (no gain from 1e-4)", "Appendix A", "vico", "vico-lr1e-5", "feature_similarity", -1),
    Claim("The mask helps", "Table 4 (1) vs (2)", "no-mask", "vico", "feature_similarity", seeds="first"),
    Claim("The regulariser sharpens the S* mask", "Figs. 5(c), 20", "no-regularizer", "vico", "mask_iou", seeds="first"),
    Claim("Image attention in the decoder beats the encoder", "Fig. 8", "encoder-layers", "vico", "feature_similarity", seeds="first"),
    Claim("The true object mask does no better than the Otsu mask", "Fig. 9", "true-mask", "vico", "feature_similarity", -1, seeds="first"),
    Claim("A generic init word ('object') costs ViCo little", "Fig. 6", "vico", "init-object", "feature_similarity", -1, seeds="first"),
    Claim("The reference adds to what S* alone draws", "Sec. 3.2", "no-reference", "vico", "feature_similarity", seeds="first"),
    Claim("An unseen reference photo does as well as a seen one", "Appendix C", "vico", "reference-unseen", "feature_similarity", -1, seeds="first"),
    Claim("300 steps keep more of the prompt than 400", "Appendix D", "vico", "steps-300", "prompt_fidelity", seeds="first"),
)


def claim_verdict(claim: Claim, comparison: Comparison | None) -> str:
    """'holds' / 'contradicted' beyond two standard errors, else 'within noise'. A claim of no
    difference (sign -1 on "does as well"/"is enough" rows) holds when b is not behind beyond noise."""
    if reason := no_verdict(comparison):
        return reason
    difference, margin = comparison.mean_difference, 2 * comparison.se
    if claim.sign < 0:  # a claim that b is no worse than a
        return "holds" if difference > -margin else "contradicted"
    if difference > margin:
        return "holds"
    return "contradicted" if difference < -margin else "within noise"


def claims_section(plan: Plan, rows: Mapping) -> list[str]:
    lines = ["## The paper's claims, in miniature", "",
             "Each claim as a paired comparison (same concepts, seeds and starting noise): the mean difference "
             "(second row - first row) ± its standard error; 'holds' or 'contradicted' beyond two standard errors, "
             "else 'within noise'. A claim of no difference ('is enough', 'does as well', 'costs little') holds "
             "unless the second row is behind beyond two standard errors.", ""]  # fmt: skip
    body = []
    for claim in CLAIMS:
        seeds = plan.seeds if claim.seeds == "all" else plan.seeds[:1]
        comparison = compare(pairs_of(rows, seeds, plan.concepts, claim.a, claim.b), claim.metric) if pairs_of(rows, seeds, plan.concepts, claim.a, claim.b) else None
        body.append([claim.text, claim.source, f"{label(claim.b)} - {label(claim.a)}", METRIC_LABELS[claim.metric],
                     difference_cell(comparison), claim_verdict(claim, comparison)])  # fmt: skip
    return lines + table(["claim", "paper", "comparison", "metric", "difference ± se (ahead/level/behind)", "verdict"], body) + [""]


def ablation_section(plan: Plan, rows: Mapping) -> list[str]:
    seed = plan.seeds[:1]
    concepts = plan.concepts
    measured = [c for c in concepts if any((seed[0], c, name) in rows for name in ABLATION_METHODS)]
    lines = ["## Ablations", "", f"Seed {seed[0]}; concepts with ablation cells: "
             f"{', '.join(measured) or 'none yet'}. Each row against ViCo on the same "
             "concepts, seed and starting noise: mean difference (row - ViCo) ± standard error over the concepts "
             "(row ahead / level / behind).", ""]  # fmt: skip
    body = []
    for name in ABLATION_METHODS:
        pairs = [(b, a) for a, b in pairs_of(rows, seed, concepts, name, "vico")]  # (vico, row): row - vico
        if not pairs:
            continue
        cells = [f"{difference_cell(compare(pairs, m))} {verdict(compare(pairs, m))}" for m in REPORT_METRICS]
        body.append([label(name), *cells])
    return lines + table(["row", *(METRIC_LABELS[m] for m in REPORT_METRICS)], body) + [""]


def analyses_section(plan: Plan) -> list[str]:
    folder = plan.outdir / "analyses"
    lines = ["## The mask analyses", ""]
    path = folder / "mask-over-training.json"
    if path.is_file():
        curves = json.loads(path.read_text())
        steps = sorted({int(s) for curve in curves.values() for s in curve})
        lines += ["### The S* mask over the course of training (Fig. 19)", "",
                  "IoU of the Otsu mask of the S* attention on the reference with its true mask (mean over the "
                  "patched layers, two prompts, the scored timesteps), at every saved step of ViCo's training "
                  "(step 0: S* at the init word).", "",
                  *table(["concept", *(f"step {s}" for s in steps)],
                         [[c, *(number(curve.get(str(s), {}).get("mask_iou")) for s in steps)] for c, curve in curves.items()]),
                  ""]  # fmt: skip
    path = folder / "generated-attention.json"
    if path.is_file():
        results = json.loads(path.read_text())
        lines += ["### S* attention on the generated image (Figs. 20-21)", "",
                  "The S* attention of the generated image's patches in every SpatialTransformer, averaged over "
                  "the sampling steps, layers normalised and averaged, binarised by Otsu's method, against a "
                  "mask of the generated object. That mask is a proxy (pixels within 0.18 of the concept's "
                  "colours or their pattern ink); its IoU with the true mask on renders of the concept in the "
                  "same scenes is the first column.", "",
                  *table(["concept", "proxy on renders", *(label(m) for m in ATTENTION_METHODS)],
                         [[c, number(r["proxy_iou_on_renders"]), *(number(r.get(m, {}).get("iou_mean_map")) for m in ATTENTION_METHODS)]
                          for c, r in results.items()]),
                  ""]  # fmt: skip
    path = folder / "reference-contribution.json"
    if path.is_file():
        results = json.loads(path.read_text())
        layers = sorted({int(k) for r in results.values() for k in r.get("branch_share", {}).get("block", {})})

        def share(result: Mapping[str, Any], kind: str, layer: int) -> str:
            return number(result.get("branch_share", {}).get(kind, {}).get(str(layer)))

        lines += ["### How much of ViCo's picture comes from the reference", "",
                  "Mean absolute pixel difference (0-255) between ViCo's samples and, at the same noise, the same "
                  "model sampled without its reference (S* alone) or Textual Inversion's. Then, per patched layer, "
                  "over one sampling run, how much the image-attention block changes the noisy stream's hidden "
                  "state h: the whole block (it is a transformer block: self-attention, attention to the reference, "
                  "feed-forward, as in the authors' code), |block(h) - h| / |h|, and its attention to the reference "
                  "alone, |attn(norm(h), reference)| / |h|.", "",
                  *table(["concept", "vs S* alone", "vs Textual Inversion",
                          *(f"block, layer {layer}" for layer in layers), *(f"reference attention, layer {layer}" for layer in layers)],
                         [[c, number(r.get("pixel_difference_to_no-reference"), 1), number(r.get("pixel_difference_to_textual-inversion"), 1),
                           *(share(r, "block", layer) for layer in layers), *(share(r, "reference_attention", layer) for layer in layers)]
                          for c, r in results.items()]),
                  ""]  # fmt: skip
    path = folder / "property-editing.json"
    if path.is_file():
        results = json.loads(path.read_text())
        body = []
        for concept, by_method in results.items():
            for name, edits in by_method.items():
                for phrase, scores in edits.items():
                    kept = next(v for k, v in scores.items() if k.endswith("_kept") and k != "shape_kept")
                    body.append([concept, label(name), f'"{phrase} *"', number(scores["success"]), number(scores["shape_kept"]), number(kept)])
        lines += ["### Property editing", "",
                  "Prompts 'a photo of a <colour> * <scene>' and 'a photo of a <pattern> * <scene>' with a colour and "
                  "a pattern the concept does not have; success: either half has the asked property; kept: the "
                  "concept's shape, and its other attribute (pattern after a colour edit, colour after a pattern "
                  "edit) on both halves.", "",
                  *table(["concept", "method", "edit", "success", "shape kept", "other attribute kept"], body), ""]  # fmt: skip
    return lines


def table3_section(plan: Plan) -> list[str]:
    path = plan.outdir / "table3" / "costs.json"
    if not path.is_file():
        return []
    costs = json.loads(path.read_text())
    vico = costs.get("vico", {})
    body = []
    for name in plan.cost_methods:
        if name not in costs:
            continue
        c = costs[name]
        total = c["median_step_seconds"] * c["recipe_steps"]
        ratio = total / (vico["median_step_seconds"] * vico["recipe_steps"]) if vico else float("nan")
        sample = costs.get(f"{name}_sample_seconds")
        paper = PAPER_TABLE3.get(name)
        paper_cell = f"{paper[0]} s ({paper[0] / PAPER_TABLE3['vico'][0]:.2f}x) / {paper[1]} s" if paper else ""
        body.append([label(name), f"{c['trainable']:,}", number(c["median_step_seconds"]), str(c["recipe_steps"]),
                     f"{total:.0f}", number(ratio, 2), number(sample), f"{c['peak_rss_mb']:.0f}", paper_cell])  # fmt: skip
    return ["## Table 3 in miniature: cost", "",
            f"Measured side by side on one machine ({costs['machine']}), one after another on one concept: "
            "trainable parameters; median seconds of compute per training step (first step excluded); the recipe's "
            "steps and their product (seconds of training, its ratio to ViCo's); seconds per sample (DDIM as the "
            "evaluation, 4 samples per batch); peak resident memory of the training process. DreamBooth's class "
            "images are not counted (as in the paper).", "",
            *table(["method", "trainable parameters", "s / step", "steps", "training s", "x ViCo", "s / sample", "peak MB",
                    "paper: training (x ViCo) / inference, 4 RTX 3090"], body), ""]  # fmt: skip


def concept_sheets(plan: Plan) -> list[str]:
    """Per concept: the reference, then one column per main method, one row per scene (4 scenes)."""
    seed = plan.seeds[0]
    lines = ["## Pictures", "", f"Seed {seed}; per concept the reference photo, then the first sample of each method "
             "(rows: scenes)."  , ""]  # fmt: skip
    plan.images.mkdir(parents=True, exist_ok=True)
    scenes = [s for s in EDIT_SCENES if s in plan.settings["scenes"]] or list(plan.settings["scenes"][:1])
    for concept in plan.concepts:
        folder = seed_folder(plan, seed) / concept
        reference = folder / "photos" / "00.png"
        present = [n for n in MAIN_METHODS if (folder / n / "samples" / f"{scenes[0]}-s00.png").is_file()]
        if not reference.is_file() or not present:
            continue
        size = (IMAGE_SIZE, IMAGE_SIZE)
        header = [text_cell("reference", *size), *(text_cell(label(n), *size) for n in present)]
        rows: list[list[np.ndarray | None]] = [header]
        for index, scene in enumerate(scenes):
            cells = [load_image(reference, size) if index == 0 else text_cell(scene, *size)]
            cells += [load_image(folder / n / "samples" / f"{scene}-s00.png", size) for n in present]
            rows.append(cells)
        grid = make_grid(rows)
        big = np.kron(grid, np.ones((2, 2, 1), dtype=np.uint8))  # 2x, nearest: small pictures stay crisp
        save_png_atomically(big, plan.images / f"{concept}.png")
        lines += [f"### {concept}", "", f"![{concept}](images/reproduction/{concept}.png)", ""]
    return lines


def status_section(plan: Plan, rows: Mapping) -> list[str]:
    """How much of the plan is done: the trained-and-scored cells of each part, and what is missing."""
    main_cells = [(s, c, m) for s in plan.seeds for c in plan.concepts for m in plan.main_methods]
    ablation_cells = [(plan.seeds[0], c, m) for c in plan.concepts for m in plan.ablation_methods]
    analyses = [p.stem for p in sorted((plan.outdir / "analyses").glob("*.json"))]

    def done(cells: Sequence[tuple[int, str, str]]) -> int:
        return sum(cell in rows for cell in cells)

    missing = sorted({cell[2] for cell in main_cells + ablation_cells if cell not in rows})
    lines = ["## What is done", "",
             f"- main comparison: {done(main_cells)} of {len(main_cells)} (seed, concept, method) cells",
             f"- ablations (seed {plan.seeds[0]}): {done(ablation_cells)} of {len(ablation_cells)} cells",
             f"- analyses: {', '.join(analyses) if analyses else 'none'}; Table 3: "
             f"{'measured' if (plan.outdir / 'table3' / 'costs.json').is_file() else 'not measured'}"]  # fmt: skip
    if missing:
        lines += [f"- rows with cells still to run: {', '.join(missing)}. The same command continues where it "
                  "stopped; a comparison measured on one (concept, seed) pair has no standard error and "
                  f"no verdict ('{ONE_PAIR}')."]  # fmt: skip
    return lines + [""]


def write_report(plan: Plan) -> None:
    rows = rows_by(plan, plan.seeds)
    settings = plan.settings
    command = "python scripts/reproduce_miniworld.py" + (" --quick" if plan.quick else "")
    if not plan.quick and plan.concepts != all_concepts():
        command += " --concepts " + ",".join(plan.concepts)
    lines = [
        "# The paper's experiments in miniature",
        "",
        f"Made by `{command}` (resumable; `--stages report` rewrites this page from what is done). "
        f"Base model `models/miniworld/base.safetensors`; concepts {', '.join(plan.concepts)}; seeds "
        f"{', '.join(map(str, plan.seeds))}; {settings['photos']} photos per concept; prompts 'a photo of * <scene>' "
        f"in {len(settings['scenes'])} scenes x {settings['n_samples']} samples, DDIM {settings['ddim_steps']}, "
        f"guidance {settings['scale']}. Metrics: docs/EVALUATION.md, 'The miniature world'. Every row trains with "
        "main.py from the same base, photos and seed; its steps are in the table.",
        "",
        *status_section(plan, rows),
        *claims_section(plan, rows),
        *main_section(plan, rows),
        *ablation_section(plan, rows),
        *analyses_section(plan),
        *table3_section(plan),
        *concept_sheets(plan),
    ]
    plan.report.parent.mkdir(parents=True, exist_ok=True)
    plan.report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    logger.info("report: %s", plan.report)


# ------------------------------------------------------------------ driver
def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outdir", default="outputs/reproduce", help="where every stage writes")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, any of {', '.join(STAGES)}")
    parser.add_argument("--quick", action="store_true", help=f"one concept ({QUICK_CONCEPT}), one seed, a few steps: a smoke test")
    parser.add_argument("--report", default=None, help=f"the report file (default {REPORT.relative_to(ROOT)}; with --quick: <outdir>/REPRODUCTION.md)")
    parser.add_argument("--concepts", default=None, help="comma-separated concept names (default: every spec of "
                        f"{ev.CONCEPTS_DIR.relative_to(ROOT)}); a report on fewer concepts says so")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    return parser


def all_concepts() -> tuple[str, ...]:
    """The names of the shipped concept specs."""
    return tuple(sorted(p.stem for p in ev.CONCEPTS_DIR.glob("*.yaml")))


def make_plan(args: argparse.Namespace) -> Plan:
    stages = ev.comma_list(args.stages, STAGES, "stage")
    outdir = Path(args.outdir)
    if args.concepts:
        concepts = ev.comma_list(args.concepts, all_concepts(), "concept")
    else:
        concepts = (QUICK_CONCEPT,) if args.quick else all_concepts()
    report = Path(args.report) if args.report else (outdir / "REPRODUCTION.md" if args.quick else REPORT)
    images = report.parent / "images" / "reproduction"
    return Plan(outdir, dict(QUICK if args.quick else FULL), concepts, SEEDS[:1] if args.quick else SEEDS,
                tuple(s for s in STAGES if s in stages), args.quick, args.device, report, images)  # fmt: skip


def run(plan: Plan) -> None:
    classifier = None
    if {"main", "ablations", "analyses"} & set(plan.stages):
        classifier = load_classifier(str(ev.DEFAULT_CLASSIFIER), torch.device(plan.device))
    if "main" in plan.stages:
        for seed in plan.seeds:
            run_evaluation(plan, seed, plan.main_methods, classifier)
    if "ablations" in plan.stages:
        run_evaluation(plan, plan.seeds[0], plan.ablation_methods, classifier)
    if "analyses" in plan.stages:
        run_analyses(plan, classifier)
    if "table3" in plan.stages:
        run_table3(plan)
    if "report" in plan.stages:
        write_report(plan)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        plan = make_plan(build_parser().parse_args(argv))
        run(plan)
    except (UsageError, CheckpointError, ev.TrainingError, FileNotFoundError) as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    except ev.trainer.Interrupted as err:
        logger.warning("%s; rerun the same command to continue", err)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
