"""scripts/evaluate_miniworld.py: end to end at tiny size on a random base; the probe on the shipped one.

The probe test (the base model draws what a prompt names, a random network does not) needs the
pretrained ``models/miniworld/base.safetensors`` and the shipped world classifier; it fails
without them. The claims about ViCo, with their controls, are tests/test_claims.py.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import main
from ldm.data.miniworld import ConceptSpec, concept_scene, render
from ldm.evaluation.miniworld import HEADS, WorldClassifier, load_classifier, save_classifier
from ldm.util import instantiate_from_config, save_state_dict
from ldm.evaluation import miniworld_probe as probe_module
from ldm.evaluation.miniworld_probe import COMPOSITE_PROMPTS, SINGLE_PART_PROMPTS, probe
from scripts import evaluate_miniworld as ev
from scripts import miniworld as miniworld_cli

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_BASE = ROOT / "models" / "miniworld" / "base.safetensors"
SHIPPED_CLASSIFIER = ROOT / "models" / "miniworld" / "classifier.safetensors"
SPEC = ROOT / "configs" / "miniworld" / "concepts" / "sunset_ring.yaml"
CONCEPT = "sunset_ring"
#: The shipped base and classifier: a missing one fails the test (tests/conftest.py).
needs_pretrained = pytest.mark.usefixtures("shipped_miniworld_models")


@pytest.fixture(autouse=True)
def fresh_run_time(monkeypatch):
    monkeypatch.delenv(main.RUN_DIR_VARIABLE, raising=False)


@pytest.fixture(scope="module")
def random_world(tmp_path_factory) -> Path:
    """A random base model of configs/miniworld/base.yaml and a random world classifier."""
    folder = tmp_path_factory.mktemp("world")
    config = OmegaConf.load(ev.BASE_CONFIG)
    config.model.params.pop("ckpt_path", None)
    torch.manual_seed(0)
    model = instantiate_from_config(config.model)
    main.fill_zero_initialised_weights(model)
    save_state_dict(model.base_state_dict(), folder / "base.safetensors")
    save_classifier(WorldClassifier(), folder / "classifier.safetensors")
    return folder


def argv(world: Path, outdir: Path, *extra: str) -> list[str]:
    return [
        "--base_ckpt", str(world / "base.safetensors"), "--classifier", str(world / "classifier.safetensors"),
        "--outdir", str(outdir), "--concepts", str(SPEC), "--scenes", "beach", "--train_steps", "1",
        "--ddim_steps", "2", "--n_samples", "2", "--device", "cpu", *extra,
    ]  # fmt: skip


def evaluate(arguments: list[str]) -> list[dict]:
    args = ev.build_parser().parse_args(arguments)
    return ev.run(ev.prepare(args), load_classifier(args.classifier))


@pytest.fixture(scope="module")
def first_run(random_world, tmp_path_factory) -> tuple[Path, list[dict]]:
    outdir = tmp_path_factory.mktemp("eval") / "out"
    return outdir, evaluate(argv(random_world, outdir))


def test_every_method_is_trained_sampled_and_scored(first_run):
    outdir, rows = first_run
    assert [row["method"] for row in rows] == list(ev.DEFAULT_METHODS)
    for row in rows:
        assert row["num_generated"] == 2 and row["concept"] == CONCEPT
        for key in ("object_fidelity", "shape", "colour_0", "notch", "prompt_fidelity"):
            assert 0 <= row[key] <= 1, (row["method"], key)
        assert -1 <= row["feature_similarity"] <= 1
    with_mask = {row["method"] for row in rows if "mask_iou" in row}
    assert with_mask == {"vico", "no-mask", "no-regularizer"}  # Textual Inversion has no image attention
    vico = next(row for row in rows if row["method"] == "vico")
    assert sorted(vico["mask_iou_layers"]) == [8, 10, 12, 14]
    assert vico["grid"] == {8: [4, 4], 10: [8, 8], 12: [8, 8], 14: [16, 16]}
    concept = outdir / CONCEPT
    assert sorted(p.name for p in (concept / "photos").glob("*.png")) == [f"0{i}.png" for i in range(5)]
    assert len(list((concept / "photos" / "masks").glob("*.png"))) == 5
    for method in ev.DEFAULT_METHODS:
        assert sorted(p.name for p in (concept / method / "samples").iterdir()) == ["beach-s00.png", "beach-s01.png"]
    for method in ("textual-inversion", "vico", "no-mask", "no-regularizer"):
        record = json.loads((concept / method / "training.json").read_text())
        assert main.read_resume_checkpoint(concept / method / record["checkpoint"]) == 1
    assert (concept / "vico" / "attention.png").is_file()
    with Image.open(concept / "sheet.png") as sheet:  # photos, scene names, one row per method
        assert sheet.height == 2 + (2 + len(ev.DEFAULT_METHODS)) * (64 + 2)


def test_tables_and_files(first_run):
    outdir, rows = first_run
    table = (outdir / "table.md").read_text()
    for name in ev.DEFAULT_METHODS:
        assert f"| {ev.METHODS[name].label} |" in table
    assert "## Mean over concepts" in table and "a mask of every patch" in table and "layer 14 (16x16)" in table
    with open(outdir / "scores.csv", newline="") as handle:
        lines = list(csv.DictReader(handle))
    assert [(line["concept"], line["method"]) for line in lines] == [(CONCEPT, m) for m in ev.DEFAULT_METHODS] + [
        ("mean", m) for m in ev.DEFAULT_METHODS
    ]
    report = json.loads((outdir / "scores.json").read_text())
    assert report["settings"]["train_steps"] == 1 and len(report["rows"]) == len(rows)
    assert json.loads((outdir / CONCEPT / "vico" / "scores.json").read_text())["method"] == "vico"


def test_renderer_row_draws_the_concept_with_the_scene_seed(first_run):
    outdir, _ = first_run
    spec = ConceptSpec.load(SPEC)
    seeds = np.random.SeedSequence(ev.scene_seed(23, CONCEPT, "beach")).generate_state(2)
    with Image.open(outdir / CONCEPT / "renderer" / "samples" / "beach-s01.png") as image:
        assert np.array_equal(np.asarray(image), render(concept_scene(spec, int(seeds[1]), "beach")).image)


def test_resuming_keeps_what_is_done_and_adds_what_is_asked(first_run, random_world, tmp_path):
    outdir = tmp_path / "moved"
    shutil.copytree(first_run[0], outdir)  # the output folder may move: training records are relative
    concept = outdir / CONCEPT
    beach = concept / "vico" / "samples" / "beach-s00.png"
    before = beach.stat().st_mtime_ns
    runs = sorted((concept / "vico" / "runs").iterdir())
    rows = evaluate(argv(random_world, outdir, "--scenes", "beach,snow", "--methods", "vico,base"))
    assert beach.stat().st_mtime_ns == before
    assert sorted((concept / "vico" / "runs").iterdir()) == runs  # not trained again
    assert (concept / "vico" / "samples" / "snow-s01.png").is_file()
    assert set(json.loads((concept / "vico" / "attention.json").read_text())["iou"]) == {"beach", "snow"}
    assert [row["num_generated"] for row in rows] == [4, 4]


def test_an_empty_or_cut_sample_is_drawn_again(random_world, tmp_path):
    """A crash after a sample's (unsynced) rename may leave it empty or cut short."""
    outdir = tmp_path / "out"
    evaluate(argv(random_world, outdir, "--methods", "renderer"))
    samples = outdir / CONCEPT / "renderer" / "samples"
    originals = {path.name: path.read_bytes() for path in samples.iterdir()}
    (samples / "beach-s00.png").write_bytes(b"")
    (samples / "beach-s01.png").write_bytes(originals["beach-s01.png"][:50])
    rows = evaluate(argv(random_world, outdir, "--methods", "renderer"))
    assert {path.name: path.read_bytes() for path in samples.iterdir()} == originals
    assert rows[0]["num_generated"] == 2


def test_overrides_reach_every_training_and_are_part_of_the_settings(first_run, random_world, tmp_path, capsys):
    outdir = tmp_path / "faster-attention"
    override = "model.params.image_attention_learning_rate=0.003"
    evaluate(argv(random_world, outdir, "--methods", "vico", "--overrides", override))
    (config,) = (outdir / CONCEPT / "vico" / "runs").glob("*/configs/*-project.yaml")
    assert OmegaConf.load(config).model.params.image_attention_learning_rate == 0.003
    assert f"trained with {override}." in (outdir / "table.md").read_text()
    assert json.loads((outdir / "settings.json").read_text())["overrides"] == [override]
    # the folder of the run without overrides (its settings.json has no "overrides") is still usable
    assert ev.main(argv(random_world, first_run[0], "--methods", "renderer")) == 0
    capsys.readouterr()
    for folder, extra, message in (
        (outdir, (), "overrides=['model.params.image_attention_learning_rate=0.003'], not []"),
        (first_run[0], ("--overrides", override), "overrides=[], not"),
        (tmp_path / "a", ("--overrides", "model.params.image_attention_lr=1"), "nearest: model.params.image_attention_learning_rate"),
        (tmp_path / "b", ("--overrides", "learning_rate"), "KEY=VALUE"),
        (tmp_path / "c", ("--overrides", "model.params.image_attention_learning_rate=fast"), "must be float"),
    ):
        assert ev.main(argv(random_world, folder, *extra)) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "a").exists()  # refused before anything was written


def test_mistakes_are_one_line_errors(first_run, random_world, tmp_path, capsys):
    cases = [
        (argv(random_world, tmp_path / "a", "--methods", "vico,dreamboth"), "unknown method 'dreamboth'"),
        (argv(random_world, tmp_path / "b", "--scenes", "moon"), "unknown scene 'moon'"),
        (argv(tmp_path, tmp_path / "c"), "base model not found"),
        (argv(random_world, tmp_path / "d", "--classifier", str(tmp_path / "none.safetensors")), "world classifier not found"),
        (argv(random_world, first_run[0], "--train_steps", "2"), "train_steps=1, not 2"),
        (argv(random_world, tmp_path / "e", "--photos", "1"), "--photos must be at least 2"),
    ]
    for arguments, message in cases:
        assert ev.main(arguments) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def image_attention_widths(config_path: Path) -> dict[int, int]:
    config = OmegaConf.load(config_path)
    with torch.device("meta"):
        unet = instantiate_from_config(config.model.params.unet_config)
    return {
        block.layer_index: block.image_cross_attention.attn1.to_q.in_features
        for block in unet.modules()
        if getattr(block, "image_cross_attention", None) is not None
    }


def test_image_attention_learning_rate_is_the_papers_transferred_to_the_miniature_width():
    """configs/miniworld/base.yaml: SD's 1e-5 x the narrowest width ratio of the patched layers
    (Adam's 1/fan-in rule; docs/EVALUATION.md). Changing the widths without the rate fails here."""
    sd_config, mini_config = ROOT / "configs" / "vico.yaml", ev.BASE_CONFIG
    sd_widths, mini_widths = image_attention_widths(sd_config), image_attention_widths(mini_config)
    assert sorted(sd_widths) == sorted(mini_widths) == [8, 10, 12, 14]  # the same decoder layers
    ratio = min(sd_widths[layer] / mini_widths[layer] for layer in sd_widths)
    assert ratio == 10  # 1280/64, 640/64, 640/64, 320/32
    paper = OmegaConf.load(sd_config).model.params.image_attention_learning_rate
    assert paper == 1e-5
    assert OmegaConf.load(mini_config).model.params.image_attention_learning_rate == pytest.approx(paper * ratio)


# ----------------------------------------------------------- measured claims
def named_accuracy(base: Path, classifier: WorldClassifier, n_samples: int = 3) -> float:
    """Mean accuracy of shape, colour and scene over the first four single-part probe prompts."""
    model = ev.build_base_model(OmegaConf.load(ev.BASE_CONFIG).model)
    model.load_base_checkpoint(str(base))
    model.eval()
    return probe(model, classifier, n_samples, single_part=4, composite=0).single_part_accuracy()["mean"]


def test_probe_command_prints_both_tables_and_writes_the_grid(random_world, tmp_path, capsys):
    grid = tmp_path / "probe.png"
    code = miniworld_cli.main([
        "probe", "--base", str(random_world / "base.safetensors"), "--classifier", str(random_world / "classifier.safetensors"),
        "--n_samples", "1", "--ddim_steps", "2", "--threads", "1", "--grid", str(grid),
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    rows = [line for line in out.splitlines() if line.startswith("| a photo of")]
    assert len(rows) == len(SINGLE_PART_PROMPTS) + len(COMPOSITE_PROMPTS)
    assert "| a photo of an orange and teal ring on the beach |" in out and "**composite mean**" in out
    width, height = Image.open(grid).size
    assert height > width * (len(rows) - 1)  # one 64 px row per prompt, one sample wide


def test_probe_command_rejects_bad_input_in_one_line(random_world, tmp_path, capsys):
    not_a_model = tmp_path / "notes.safetensors"
    not_a_model.write_bytes(b"not safetensors")
    classifier = ["--classifier", str(random_world / "classifier.safetensors")]
    cases = [
        (["--base", str(tmp_path / "missing.safetensors"), *classifier], "--base file not found"),
        (["--base", str(not_a_model), *classifier], "notes.safetensors"),
        (["--base", str(random_world / "base.safetensors"), *classifier, "--n_samples", "0"], "--n_samples must be at least 1"),
        (["--base", str(random_world / "base.safetensors"), *classifier, "--config", "configs/none.yaml"], "model config not found"),
    ]
    for arguments, message in cases:
        assert miniworld_cli.main(["probe", *arguments]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_probe_scores_what_the_classifier_reads(monkeypatch):
    """Accuracies are the classifier's reads against the prompt's words; composites count colours in either order."""
    prompts = []

    def fake_sample(model, prompt, n_samples, seed, ddim_steps=25, scale=7.5):
        prompts.append((prompt, seed))
        return torch.zeros(n_samples, 3, 64, 64)

    def fake_classify(classifier, images):
        names = {"shape": "ring", "colour_0": "teal", "colour_1": "orange", "scene": "beach"}
        return type("P", (), {"labels": {h: np.array([HEADS[h].index(v)] * len(images)) for h, v in names.items()}})()

    monkeypatch.setattr(probe_module, "sample_prompt", fake_sample)
    monkeypatch.setattr(probe_module, "classify", fake_classify)
    result = probe(None, None, n_samples=2, single_part=1, composite=2)
    assert prompts == [("a photo of a red circle on the beach", 0), ("a photo of an orange and teal ring on the beach", 100),
                       ("a photo of a pink and yellow star in the snow", 101)]  # fmt: skip
    assert result.single_part == [{"shape": 0.0, "colour_0": 0.0, "scene": 1.0}]
    assert result.single_part_accuracy()["mean"] == pytest.approx(1 / 3)
    assert result.composite == [{"colours": 1.0, "shape": 1.0}, {"colours": 0.0, "shape": 0.0}]


@needs_pretrained
def test_base_model_draws_what_a_prompt_names(random_world):
    classifier = load_classifier(SHIPPED_CLASSIFIER)
    # Measured: shipped base 0.50 (round 3: 0.42, round 4: 0.53; colours and most scenes right,
    # shapes less often: see models/miniworld/README.md), a random network 0.06, chance about 0.12.
    assert named_accuracy(SHIPPED_BASE, classifier) > 0.3
    assert named_accuracy(random_world / "base.safetensors", classifier) < 0.15  # a random network fails


def test_the_base_row_reads_its_model_with_the_overrides(random_world, tmp_path):
    """A base pretrained with two heads (configs/miniworld/two-heads.yaml) is evaluated with
    --overrides model.params.unet_config.params.num_heads=2; the untrained base row must use them too."""
    from ldm.modules.attention import CrossAttention

    args = ev.build_parser().parse_args(argv(random_world, tmp_path / "out", "--overrides", "model.params.unet_config.params.num_heads=2"))
    evaluation = ev.prepare(args)
    (job,) = [job for job in ev.concept_jobs(evaluation.concepts[0], evaluation) if job.method.name == "base"]
    model = ev.load_method_model(job, evaluation, None)
    assert {m.heads for m in model.modules() if isinstance(m, CrossAttention)} == {2}
