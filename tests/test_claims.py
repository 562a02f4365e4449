"""The miniature world's claims about ViCo, each tested against controls that must fail it (issue 25).

One module-scoped fixture trains, on the shipped base and one concept (moss_square, seed 23),
ViCo with its recipe (``configs/miniworld/vico.yaml``, 400 steps) and the controls, all from the
same photos and seed:

- ``untrained``: the state ``main.py`` builds before its first step (S* at the base model's
  embedding of the init word, "square"; the image attention as seeded), exported as an adapter
  without training;
- ``one-step``: ViCo after one training step;
- ``no-regularizer``: ViCo without the attention regulariser (``configs/ablations/no-regularizer.yaml``),
  400 steps.

It measures each one twice, neither needing samples: the mask IoU of the S* attention on the
reference photo per patched layer (as ``scripts/evaluate_miniworld.py``: the Otsu mask against
the renderer's true mask, prompts "a photo of * <scene>" in 3 scenes, the 5 timesteps of a DDIM
25 schedule), and the denoising loss on 4 photos of the concept that no row trained on (drawn
with another seed), with the reference photo and without it (the image attention switched off),
at fixed timesteps and noise. ViCo sampled with its image attention switched off is the
"without" side of that comparison.

The thresholds sit in the gap between ViCo and its controls over four training seeds of this
very setting (23-26; the numbers are in docs/EVALUATION.md, "Claim tests"), measured with::

    python -m tests.test_claims 23 24 25 26 --outdir /tmp/claims

which runs this fixture's :func:`measure` once per seed and prints its rows. Claims that did not
separate robustly at this size (ViCo against Textual Inversion; the image branch moving the
*samples* toward the reference, by feature similarity or pixel distance) are measured by the
reproduction harness (``scripts/reproduce_miniworld.py``) with their standard errors, not here.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import main
from ldm.data.images import load_image, to_tensor
from ldm.models.export import export_trained
from scripts import evaluate_miniworld as ev
from scripts.miniworld import make_concept

ROOT = Path(__file__).resolve().parents[1]
#: moss_square: its S* mask is the sharpest of the five evaluation concepts (docs/EVALUATION.md).
CLAIM_SPEC = ROOT / "configs" / "miniworld" / "concepts" / "moss_square.yaml"
SEED = 23
TRAIN_STEPS = 400
SCENES = "beach,snow,grass"  # the prompts whose S* maps are scored
DDIM_STEPS = 25  # the schedule whose timesteps (ev.ATTENTION_FRACTIONS of it) the maps are read at
#: Photos of the concept no row trains on: drawn as make-concept draws them, with another seed.
HELD_OUT_PHOTOS, HELD_OUT_SEED = 4, 1
LOSS_PROMPT = "a photo of *"
LOSS_TIMESTEPS = tuple(range(50, 1000, 100))
LOSS_NOISE_DRAWS = 2

#: Trained rows: name -> the Method main.py trains (ViCo's recipe, an ablation, one step).
TRAINED = {
    "vico": ev.METHODS["vico"],
    "no-regularizer": ev.METHODS["no-regularizer"],
    "one-step": ev.Method("one-step", "ViCo after 1 step", "trained", steps=1),
}
ROWS = ("vico", "no-regularizer", "one-step", "untrained")

# Thresholds, each halfway between ViCo's lowest and the controls' highest value over training
# seeds 23-26 of this setting (all numbers: docs/EVALUATION.md, "Claim tests"):
#: mask IoU of the S* attention, per layer. ViCo 0.67-0.88 (layer 10) and 0.52-0.89 (layer 12);
#: the highest control is the untrained state, S* at the init word's embedding, 0.54 and 0.37
#: (one step: 0.30-0.39 and 0.19-0.27; without the regulariser: 0.21-0.35 and 0.06-0.14).
MASK_IOU_THRESHOLDS = {10: 0.61, 12: 0.44}
#: relative drop of the denoising loss on the other training photos when the image attention
#: sees the reference: ViCo +5.5 to +6.8 %; the untrained and one-step image attention -1.2 to
#: +0.5 %. (On the held-out photos ViCo's drop is +1.9 to +2.2 % against up to +0.5 %: too close
#: to test; the harness measures it.)
REFERENCE_GAIN_THRESHOLD = 0.03


# ------------------------------------------------------------------ measuring
def untrained_adapter(folder: Path, job: ev.MethodJob, evaluation: ev.Evaluation) -> Path:
    """ViCo before its first step: main.py builds the run exactly as for training (same seed,
    photos and init word), and its trained parts are exported untouched."""
    path = folder / "adapter-0.safetensors"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        argv = ev.training_argv(replace(job, method=TRAINED["vico"], folder=folder), evaluation)
        with ev.warnings_only(ev.CHATTY_LOGGERS):
            run = main.setup_run(*main.parse_args(argv))
        export_trained(run.model, run.config, folder, 0, formats=("adapter",))
    return path


@torch.no_grad()
def reference_gain(model, targets: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """The eps-MSE on the target latents without and with the reference latent (same S*, noise and
    timesteps): their means, the relative drop the reference brings, and in how many of the
    (target, timestep, noise) triples it lowers the loss."""
    rows = [(i, t) for i in range(len(targets)) for t in LOSS_TIMESTEPS for _ in range(LOSS_NOISE_DRAWS)]
    x0 = targets[[i for i, _ in rows]]
    t = torch.tensor([t for _, t in rows], device=model.device)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)).to(x0)
    tokens = model.tokenize([LOSS_PROMPT] * len(rows))
    context = model.get_learned_conditioning(tokens)
    noisy = model.q_sample(x0, t, noise)
    without = (model.apply_model(noisy, t, context) - noise).pow(2).mean((1, 2, 3))
    condition = model.reference_condition(reference.expand(len(rows), -1, -1, -1), context, tokens)
    with_reference = (model.apply_model(noisy, t, context, condition) - noise).pow(2).mean((1, 2, 3))
    return {
        "loss_without_reference": float(without.mean()),
        "loss_with_reference": float(with_reference.mean()),
        "gain": float((without.mean() - with_reference.mean()) / without.mean()),
        "better_fraction": float((with_reference < without).float().mean()),
    }


def measure(outdir: Path, seed: int = SEED) -> dict[str, dict]:
    """Train (or reuse) every row of :data:`ROWS` in ``outdir`` and measure it: per row its mask
    IoU per patched layer and its held-out denoising losses."""
    args = ev.build_parser().parse_args([
        "--outdir", str(outdir), "--concepts", str(CLAIM_SPEC), "--methods", "vico", "--scenes", SCENES,
        "--train_steps", str(TRAIN_STEPS), "--ddim_steps", str(DDIM_STEPS), "--seed", str(seed), "--device", "cpu",
    ])  # fmt: skip
    evaluation = ev.prepare(args)
    spec = evaluation.concepts[0]
    folder = evaluation.outdir / spec.name
    ev.ensure_photos(spec, folder / "photos", evaluation.settings.photos)
    if not (folder / "held-out" / "concept.yaml").is_file():
        make_concept(spec, folder / "held-out", HELD_OUT_PHOTOS, seed=HELD_OUT_SEED)
    pictures = {
        name: to_tensor(np.stack([load_image(p) for p in sorted((folder / name).glob("[0-9][0-9].png"))]))
        for name in ("photos", "held-out")
    }

    def job(name: str) -> ev.MethodJob:
        method = TRAINED.get(name, replace(TRAINED["vico"], name=name))
        return ev.MethodJob(spec, method, folder / name, folder / "photos", evaluation.scenes, evaluation.n_samples)

    checkpoints = {name: ev.train_method(job(name), evaluation) for name in TRAINED}
    checkpoints["untrained"] = untrained_adapter(folder / "untrained", job("untrained"), evaluation)
    rows = {}
    for name in ROWS:
        row_job = job(name)
        model = ev.load_method_model(row_job, evaluation, checkpoints[name])
        reference = load_image(row_job.reference, (ev.IMAGE_SIZE, ev.IMAGE_SIZE))
        reference_latents = ev.encode_references(model, to_tensor(reference[None]))
        if not ev.attention_complete(row_job):
            ev.score_attention(row_job, model, reference_latents, evaluation, reference)
        layers = ev.attention_scores(row_job)["mask_iou_layers"]
        rows[name] = {
            "mask_iou_layers": {int(layer): value for layer, value in layers.items()},
            # the other training photos, each a view the reference 00.png does not show
            "photos": reference_gain(model, ev.encode_references(model, pictures["photos"][1:]), reference_latents),
            "held-out": reference_gain(model, ev.encode_references(model, pictures["held-out"]), reference_latents),
        }
    return rows


# ------------------------------------------------------------------ the claims
#: The shipped base and classifier: a missing one fails each test (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("shipped_miniworld_models")


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> dict[str, dict]:
    """Every row of :data:`ROWS`, trained and measured once for the module (seed 23)."""
    return measure(tmp_path_factory.mktemp("claims") / "out")


def mask_iou(row: dict, layer: int) -> float:
    return row["mask_iou_layers"][layer]


@pytest.mark.slow
@pytest.mark.parametrize("layer", sorted(MASK_IOU_THRESHOLDS))
def test_training_makes_the_s_star_attention_find_the_object(rows, layer):
    """Paper Sec. 3.3 / Fig. 3: after ViCo's 400 steps the Otsu mask of the S* attention on the
    reference covers the object; before training (S* at the init word's embedding, where main.py
    starts it) and after one step it does not."""
    threshold = MASK_IOU_THRESHOLDS[layer]
    scores = {name: round(mask_iou(rows[name], layer), 3) for name in ROWS}
    assert scores["vico"] > threshold, scores
    for control in ("untrained", "one-step"):
        assert scores[control] < threshold, (control, scores)


@pytest.mark.slow
@pytest.mark.parametrize("layer", sorted(MASK_IOU_THRESHOLDS))
def test_the_regulariser_sharpens_the_s_star_mask(rows, layer):
    """Paper Sec. 3.3, Fig. 5(c): the same 400 steps without the attention regulariser (Eq. 6)
    leave the S* mask at the untrained level; with it the mask covers the object."""
    threshold = MASK_IOU_THRESHOLDS[layer]
    vico, without = mask_iou(rows["vico"], layer), mask_iou(rows["no-regularizer"], layer)
    assert without < threshold < vico, (round(without, 3), round(vico, 3))


@pytest.mark.slow
def test_the_trained_image_attention_brings_the_reference_into_the_prediction(rows):
    """Paper Sec. 3.2: given the reference photo, the trained image attention lowers the denoising
    loss on the concept's other photos (views the reference does not show), against the same model
    with its image attention switched off (S* alone); the untrained and one-step image attention do
    not. Disabling the image attention in the code makes the two losses equal."""
    gains = {name: round(rows[name]["photos"]["gain"], 4) for name in ROWS}
    assert gains["vico"] > REFERENCE_GAIN_THRESHOLD, gains
    for control in ("untrained", "one-step"):
        assert gains[control] < REFERENCE_GAIN_THRESHOLD, (control, gains)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Measure the claim tests' rows for several training seeds.")
    parser.add_argument("seeds", nargs="+", type=int)
    parser.add_argument("--outdir", default="outputs/claims", help="one folder per seed (trainings are reused)")
    options = parser.parse_args()
    torch.set_num_threads(1)
    for seed in options.seeds:
        started = time.time()
        measured = measure(Path(options.outdir) / f"seed{seed}", seed)
        Path(options.outdir, f"seed{seed}.json").write_text(json.dumps(measured, indent=1) + "\n")
        print(f"seed {seed} ({time.time() - started:.0f} s)")
        for name, row in measured.items():
            layers = " ".join(f"{layer}: {iou:.3f}" for layer, iou in row["mask_iou_layers"].items())
            gains = " ".join(
                f"{targets} {row[targets]['loss_without_reference']:.4f} -> {row[targets]['loss_with_reference']:.4f} "
                f"({100 * row[targets]['gain']:+.2f} %, lower in {row[targets]['better_fraction']:.2f})"
                for targets in ("photos", "held-out")
            )
            print(f"  {name:15s} mask IoU {layers} | loss with the reference: {gains}")
