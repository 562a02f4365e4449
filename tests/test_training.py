"""Training on the tiny config: what moves, what stays, checkpoints, resume, DDP, bad input."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main
from ldm.data.personalized import PersonalizedBase, ResumableSampler
from ldm.util import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "vico-tiny.yaml")
PHOTOS = ROOT / "data" / "monster_toy"


def setup(tmp_path: Path, *extra: str, steps: int = 2):
    # --data_root repeats for several concepts: the default folder only when the test gives none
    photos = [] if any(e.startswith("--data_root") for e in extra) else ["--data_root", str(PHOTOS)]
    opt, overrides = main.parse_args(
        ["--base", TINY, "-t", "--logdir", str(tmp_path), "-n", "t", *photos,
         f"lightning.trainer.max_steps={steps}", "lightning.callbacks.image_logger.params.batch_frequency=0",
         "lightning.trainer.enable_progress_bar=false", *extra]
    )  # fmt: skip
    return main.setup_run(opt, overrides)


@pytest.fixture(autouse=True)
def fresh_run_time(monkeypatch):
    monkeypatch.delenv(main.RUN_DIR_VARIABLE, raising=False)


def test_training_moves_only_what_it_should(tmp_path):
    run = setup(tmp_path, steps=3)
    model = run.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained = set(model.trained_state_dict())
    main.train(run)
    after = model.state_dict()
    (csv,) = run.logdir.glob("metrics/*/metrics.csv")
    metrics = csv.read_text()
    assert "train/loss_simple" in metrics and "train/loss_reg" in metrics
    losses = [float(v) for v in _column(csv, "train/loss")]
    assert len(losses) == 3 and all(np.isfinite(losses))
    for key, value in after.items():
        if key in trained:
            assert not torch.equal(value, before[key]), f"{key} did not train"
        else:
            assert torch.equal(value, before[key]), f"frozen {key} changed"
    assert (run.logdir / "checkpoints" / "adapter.safetensors").is_file()


def _column(csv: Path, name: str) -> list[str]:
    header, *rows = [line.split(",") for line in csv.read_text().splitlines()]
    index = header.index(name)
    return [row[index] for row in rows if row[index]]


def test_checkpoint_holds_only_trained_weights_and_config(tmp_path):
    run = setup(tmp_path, steps=2)
    main.train(run)
    checkpoint = read_checkpoint(run.logdir / "checkpoints" / "last.ckpt")
    assert set(checkpoint["state_dict"]) == set(run.model.trained_state_dict())
    assert checkpoint["global_step"] == 2
    assert checkpoint["config"]["model"]["params"]["ckpt_path"].endswith("random-base.safetensors")
    assert len(checkpoint["optimizer_states"][0]["param_groups"]) == 2


def test_resume_continues_exactly(tmp_path):
    straight = setup(tmp_path / "a", steps=4)
    main.train(straight)
    first = setup(tmp_path / "b", steps=2)
    main.train(first)
    opt, overrides = main.parse_args(
        ["-t", "-r", str(first.logdir), "lightning.trainer.max_steps=4", "lightning.trainer.enable_progress_bar=false"]
    )
    resumed = main.setup_run(opt, overrides)
    assert resumed.logdir == first.logdir
    main.train(resumed)
    a = read_checkpoint(straight.logdir / "checkpoints" / "last.ckpt")
    b = read_checkpoint(first.logdir / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 4
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    state_a, state_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for index in state_a:
        assert torch.equal(state_a[index]["exp_avg"], state_b[index]["exp_avg"])


def test_cached_latents_equal_the_uncached_path(tmp_path):
    run = setup(tmp_path)
    model, dataset = run.model, run.data.train_dataset
    pixels = dataset.pixels()
    model.cache_first_stage(pixels, with_flips=True)
    index, flip = torch.tensor([1, 3, 1]), torch.tensor([False, True, True])
    cached = model.cached_latent(index, flip, torch.Generator().manual_seed(5))
    images = torch.stack([pixels[i].flip(-1) if f else pixels[i] for i, f in zip(index.tolist(), flip.tolist())])
    uncached = model.get_first_stage_encoding(images, torch.Generator().manual_seed(5))
    torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- dataset
def test_dataset_items_and_references():
    dataset = PersonalizedBase(str(PHOTOS), size=32, flip_p=0.5, seed=3, shuffle=False)
    assert [p.name for p in dataset.paths] == sorted(p.name for p in PHOTOS.glob("*.jpg"))
    items = [dataset[i] for i in range(40)]
    assert [it["image_index"] for it in items[:6]] == [0, 1, 2, 3, 4, 0]
    assert all(it["reference_index"] != it["image_index"] for it in items)
    assert {it["flip"] for it in items} == {True, False}
    assert all(it["caption"].count("*") == 1 for it in items)
    assert dataset[17] == PersonalizedBase(str(PHOTOS), size=32, flip_p=0.5, seed=3, shuffle=False)[17]
    assert dataset.pixels().shape == (5, 3, 32, 32)


def test_single_image_is_its_own_reference(tmp_path):
    Image.new("RGB", (40, 30), "red").save(tmp_path / "only.png")
    dataset = PersonalizedBase(str(tmp_path), size=16)
    assert dataset[0]["reference_index"] == 0 and dataset[1]["image_index"] == 0


def test_resumable_sampler_splits_ranks_and_resumes():
    whole = list(ResumableSampler(4, 2, rank=0, world_size=2)) + list(ResumableSampler(4, 2, rank=1, world_size=2))
    assert sorted(whole) == list(range(16))
    progress = {"step": 2}
    resumed = ResumableSampler(4, 2, start_batch=lambda: progress["step"])
    assert list(resumed) == list(ResumableSampler(4, 2))[4:]
    progress["step"] = 3  # a restarted iteration follows the trainer's progress
    assert list(resumed) == list(ResumableSampler(4, 2))[6:]


def make_odd_images(folder: Path) -> None:
    rgb = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).convert("RGBA").save(folder / "rgba.png")
    Image.fromarray(rgb).convert("L").save(folder / "gray.jpg")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(folder / "sixteen.png")
    rotated = Image.fromarray(rgb)
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    rotated.save(folder / "exif.jpg", exif=exif)
    Image.fromarray(rgb[:5, :7]).save(folder / "tiny.bmp")
    Image.fromarray(np.tile(rgb, (60, 60, 1))).save(folder / "huge.webp", quality=30)
    (folder / "notes.txt").write_text("ignored")


def test_odd_image_forms_load(tmp_path):
    make_odd_images(tmp_path)
    dataset = PersonalizedBase(str(tmp_path), size=32)
    assert dataset.num_images == 8 and dataset.images.shape == (8, 32, 32, 3)
    assert dataset.images.dtype == np.uint8
    names = [p.name for p in dataset.paths]
    assert "notes.txt" not in names
    sixteen = dataset.images[names.index("sixteen.png")]
    assert 0 < sixteen.mean() < 255  # scaled to 8 bits, not clipped to white
    rgba = dataset.images[names.index("rgba.png")]
    assert rgba.shape == (32, 32, 3)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (60, 20), "white")
    image.paste((255, 0, 0), (0, 0, 20, 20))  # red on the left
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "r.jpg", exif=exif, quality=95)
    from ldm.data.images import load_image

    upright = load_image(tmp_path / "r.jpg")
    assert upright.shape[:2] == (60, 20)  # rotated to portrait
    assert upright[:20, :, 0].mean() > 200 and upright[:20, :, 1].mean() < 60  # red now on top


def test_odd_image_forms_train(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    make_odd_images(photos)
    run = setup(tmp_path / "logs", f"--data_root={photos}", steps=1)
    main.train(run)
    assert (run.logdir / "checkpoints" / "last.ckpt").is_file()


# ------------------------------------------------------------------ CLI errors
def run_main(capsys, *argv: str) -> tuple[int, str]:
    code = main.main(list(argv))
    return code, capsys.readouterr().err.strip()


def test_bad_inputs_exit_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    Image.new("RGB", (20, 20)).save(bad / "ok.png")
    (bad / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (bad / "empty.png").write_bytes(b"")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no photos here")
    common = ["--base", TINY, "-t", "--logdir", str(tmp_path / "logs")]
    cases = {
        "broken.jpg": [*common, "--data_root", str(bad)],
        "no images": [*common, "--data_root", str(empty)],
        "not found": [*common, "--data_root", str(tmp_path / "missing")],
        "base checkpoint not found": [*common, "--actual_resume", str(tmp_path / "sd-v1-4.ckpt")],
        "'teddy bear' is 2 CLIP tokens": [*common, "--init_word", "teddy bear"],
        "max_steps must be a positive number": [*common, "lightning.trainer.max_steps=-1"],
    }
    for expected, argv in cases.items():
        code, err = run_main(capsys, *argv)
        assert code == 2, expected
        assert err.startswith("error: ") and expected in err, err
        assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "empty.png" in run_main(capsys, *cases["broken.jpg"])[1]
    assert not list((tmp_path / "logs").glob("*/checkpoints/*.ckpt"))


# ------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_two_process_ddp_on_cpu_keeps_ranks_identical(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != main.RUN_DIR_VARIABLE}
    result = subprocess.run(
        [sys.executable, "main.py", "--base", TINY, "-t", "--num_processes", "2", "--logdir", str(tmp_path),
         "lightning.trainer.max_steps=2", "lightning.callbacks.image_logger.params.batch_frequency=0",
         "lightning.trainer.enable_progress_bar=false",
         "lightning.callbacks.probe.target=tests.ddp_probe.SaveTrainedWeights",
         f"lightning.callbacks.probe.params.folder={tmp_path / 'probe'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = torch.load(tmp_path / "probe" / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "probe" / "rank1.pt", weights_only=True)
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["global_step"] == rank1["global_step"] == 2
    for key, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][key]), key
    # The two ranks saw different photos, so synchronised gradients are what kept them equal.
    assert rank0["items"] != rank1["items"]
    assert len(list(tmp_path.glob("*/checkpoints/last.ckpt"))) == 1


# ---------------------------------------------------------------- placeholder
def test_placeholder_string_sets_the_captions_and_the_model(tmp_path):
    run = setup(tmp_path, "--placeholder_string", "sks", steps=1)
    manager = run.model.embedding_manager
    assert list(manager.string_to_token_dict) == ["sks"]
    assert all("sks" in run.data.train_dataset[i]["caption"].split() for i in range(5))
    before = manager.string_to_param_dict["sks"].detach().clone()
    main.train(run)
    assert not torch.equal(manager.string_to_param_dict["sks"], before)  # S* gets a gradient
