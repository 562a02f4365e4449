"""Runs that lose nothing and mix nothing: atomic saves, unique folders, branches, Ctrl-C, moves."""
from __future__ import annotations

import datetime
import errno
import logging
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import main
import sample
from ldm.callbacks import CheckpointWriteError, ImageLogger, StepProgressBar, ViCoCheckpoint
from ldm.util import read_checkpoint
from tests.probes import RecordConsoleHandlers
from tests.test_training import PHOTOS, TINY, setup

REFERENCE = PHOTOS / "00.jpg"
#: What a run writes beside last.ckpt at every save of step N: name-N.ext.
#: The exports of a save; the Textual Inversion file is named after the run ("t").
EXPORTS = [("cross_attention", "pt"), ("embeddings_gs", "pt"), ("t", "pt"), ("learned_embeds-steps", "safetensors")]


@pytest.fixture(autouse=True)
def fresh_run(monkeypatch):
    monkeypatch.delenv(main.RUN_DIR_VARIABLE, raising=False)


def resume(*argv: str) -> main.Run:
    opt, overrides = main.parse_args(["-t", *argv, "lightning.trainer.enable_progress_bar=false"])
    return main.setup_run(opt, overrides)


def step_of(path: Path) -> int:
    return read_checkpoint(path)["global_step"]


def leftovers(folder: Path) -> list[Path]:
    return list(folder.rglob("*.tmp"))


# ------------------------------------------------------------------ atomic checkpoints
def test_full_disk_stops_the_run_in_one_line_with_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    """The second save of last.ckpt fails half-way with ENOSPC: step 1's survives, no partial file."""
    real_save = torch.save
    saves = []

    def fill_the_disk(obj, file, *args, **kwargs):
        if Path(file).name.startswith(".last.ckpt."):
            saves.append(file)
        if len(saves) == 2 and Path(file).name.startswith(".last.ckpt."):
            Path(file).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr("ldm.callbacks.torch.save", fill_the_disk)
    code = main.main(
        ["--base", TINY, "-t", "--logdir", str(tmp_path), "-n", "full", "lightning.trainer.max_steps=3",
         "lightning.modelcheckpoint.params.every_n_train_steps=1", "lightning.callbacks.image_logger.params.batch_frequency=0",
         "lightning.trainer.enable_progress_bar=false"]
    )  # fmt: skip
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 1
    assert len(errors) == 1 and "No space left on device" in errors[0] and "last.ckpt" in errors[0]
    (run,) = tmp_path.glob("*_full")
    assert step_of(run / "checkpoints" / "last.ckpt") == 1
    assert not leftovers(run)


# ------------------------------------------------------------------ retention and exports
def test_retention_keeps_one_full_state_and_an_export_at_every_save(tmp_path):
    run = setup(tmp_path, "lightning.modelcheckpoint.params.every_n_train_steps=2", steps=3)
    main.train(run)
    checkpoints = run.logdir / "checkpoints"
    exports = [f"{name}-{step}.{ext}" for step in (2, 3) for name, ext in EXPORTS]
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted(["adapter.safetensors", "last.ckpt", *exports])
    assert step_of(checkpoints / "last.ckpt") == 3  # the final step, though 3 is not a multiple of 2
    assert set(read_checkpoint(checkpoints / "cross_attention-2.pt")) == {
        key.removeprefix("model.") for key in run.model.trained_state_dict() if ".image_cross_attention." in key
    }


def test_config_merges_over_the_defaults(tmp_path):
    run = setup(tmp_path, "lightning.modelcheckpoint.params.save_top_k=-1", "lightning.trainer.logger=false", steps=1)
    callback = main.checkpoint_callback(run.trainer)
    assert callback.save_top_k == -1 and "'every_n_train_steps': 5" in callback.state_key  # config, override
    assert run.trainer.loggers == []


# ------------------------------------------------------------------ run folders
def test_run_folders_are_created_exclusively(tmp_path, monkeypatch):
    class FrozenClock(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2030, 1, 2, 3, 4, 5)

    monkeypatch.setattr(main.datetime, "datetime", FrozenClock)
    first, second = setup(tmp_path, steps=1), setup(tmp_path, steps=1)
    assert first.logdir.name == "2030-01-02T03-04-05_t" and second.logdir.name == "2030-01-02T03-04-05_t-1"
    assert (second.logdir / "configs").is_dir()


def test_resuming_an_earlier_checkpoint_branches_into_a_new_run(tmp_path):
    first = setup(tmp_path, "lightning.modelcheckpoint.params.every_n_train_steps=1",
                  "lightning.modelcheckpoint.params.save_top_k=-1", steps=2)  # fmt: skip
    main.train(first)
    before = {p: p.read_bytes() for p in first.logdir.rglob("*") if p.is_file()}
    branch = resume("-r", str(first.logdir / "checkpoints" / "step=000001.ckpt"), "lightning.trainer.max_steps=3")
    assert branch.logdir != first.logdir and branch.logdir.parent == first.logdir.parent
    main.train(branch)
    assert {p: p.read_bytes() for p in first.logdir.rglob("*") if p.is_file()} == before
    assert step_of(branch.logdir / "checkpoints" / "last.ckpt") == 3
    assert (branch.logdir / "checkpoints" / "cross_attention-3.pt").is_file()
    # Changed settings on the latest checkpoint branch too; unchanged ones continue in place.
    assert resume("-r", str(first.logdir), "model.params.reg_weight=0").logdir != first.logdir
    assert resume("-r", str(first.logdir), "lightning.trainer.max_steps=4").logdir == first.logdir


def test_the_data_stream_follows_the_seed_and_resume_keeps_it(tmp_path):
    a, b = setup(tmp_path, "-s", "1", steps=1), setup(tmp_path, "-s", "2", steps=1)
    items = lambda run: [run.data.train_dataset[i] for i in range(8)]  # noqa: E731
    assert items(a) != items(b)
    assert items(a) == items(setup(tmp_path, "-s", "1", steps=1))
    main.train(a)
    resumed = resume("-r", str(a.logdir), "lightning.trainer.max_steps=2")
    assert resumed.logdir == a.logdir and resumed.model.seed == 1 and items(resumed) == items(a)


# ------------------------------------------------------------------ Ctrl-C
def test_ctrl_c_saves_a_checkpoint_and_an_export_and_says_how_to_continue(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pytorch_lightning")
    handler = signal.getsignal(signal.SIGINT)
    code = main.main(
        ["--base", TINY, "-t", "--logdir", str(tmp_path), "-n", "stop", "lightning.trainer.max_steps=5",
         "lightning.callbacks.image_logger.params.batch_frequency=0", "lightning.trainer.enable_progress_bar=false",
         "lightning.callbacks.stop.target=tests.probes.InterruptAt", "lightning.callbacks.stop.params.step=2"]
    )  # fmt: skip
    (run,) = tmp_path.glob("*_stop")
    assert code == 130
    assert f"interrupted at step 2: saved {run / 'checkpoints' / 'last.ckpt'}" in caplog.text
    assert f"python main.py -t -r {run}" in caplog.text
    assert "Detected KeyboardInterrupt" in caplog.text and "weights_only` was not set" not in caplog.text  # a full state, said so
    assert step_of(run / "checkpoints" / "last.ckpt") == 2
    assert (run / "checkpoints" / "cross_attention-2.pt").is_file() and (run / "checkpoints" / "adapter.safetensors").is_file()
    assert signal.getsignal(signal.SIGINT) == handler


# ------------------------------------------------------------------ relocatable runs
def test_a_moved_run_resumes_and_samples(tmp_path):
    run = setup(tmp_path / "here", steps=1)
    main.train(run)
    (project,) = (run.logdir / "configs").glob("*.yaml")
    assert OmegaConf.load(project).model.params.ckpt_path == "random-base.safetensors"
    assert read_checkpoint(run.logdir / "checkpoints" / "last.ckpt")["config"]["model"]["params"]["ckpt_path"] == (
        "random-base.safetensors"
    )
    moved = tmp_path / "elsewhere" / run.logdir.name
    shutil.move(run.logdir, moved)
    resumed = resume("-r", str(moved), "lightning.trainer.max_steps=2")
    assert resumed.logdir == moved
    main.train(resumed)
    argv = ["--ckpt", str(moved / "checkpoints" / "last.ckpt"), "--ref", str(REFERENCE), "--prompt", "a photo of *",
            "--n_samples", "1", "--ddim_steps", "2", "--outdir", str(tmp_path / "samples")]  # fmt: skip
    assert sample.main(argv) == 0


# ------------------------------------------------------------------ one photo
def test_one_training_photo_is_a_clear_warning(tmp_path, caplog):
    photos = tmp_path / "one"
    photos.mkdir()
    Image.open(REFERENCE).save(photos / "only.jpg")
    opt, overrides = main.parse_args(
        ["--base", TINY, "-t", "--logdir", str(tmp_path / "logs"), f"--data_root={photos}", "lightning.trainer.max_steps=1",
         "lightning.callbacks.image_logger.params.batch_frequency=0", "lightning.trainer.enable_progress_bar=false"]
    )  # fmt: skip
    main.setup_run(opt, overrides)  # not setup(): its --data_root would make this a second concept
    assert "only one training photo" in caplog.text and "its own reference" in caplog.text


# ------------------------------------------------------------------ monitoring
def test_loggers_previews_progress_and_console(tmp_path, monkeypatch):
    """TensorBoard gets scalars, learning rates, step time and the previews; CSV is kept; the
    previews use the config's prompts and seed; the bar counts steps; logs go around the bar."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    console = logging.StreamHandler(sys.stderr)
    logging.getLogger().addHandler(console)
    monkeypatch.setattr(main, "console_loggers", lambda: [logging.getLogger()])
    try:
        run = setup(tmp_path, "lightning.callbacks.image_logger.params.batch_frequency=1",
                    "lightning.callbacks.image_logger.params.ddim_steps=2",
                    "lightning.callbacks.image_logger.params.prompts=[a * on the beach]",
                    "lightning.callbacks.image_logger.params.seed=5", "lightning.trainer.enable_progress_bar=true",
                    "lightning.callbacks.console.target=tests.probes.RecordConsoleHandlers", steps=2)  # fmt: skip
        main.train(run)
    finally:
        logging.getLogger().removeHandler(console)
    (events,) = run.logdir.glob("tensorboard/*/events.out.tfevents.*")
    tags = EventAccumulator(str(events)).Reload().Tags()
    assert {"train/loss", "train/loss_reg", "train/step_time"} <= set(tags["scalars"])
    assert any(tag.startswith("lr-AdamW") for tag in tags["scalars"])
    assert "previews" in tags["images"]
    (csv,) = run.logdir.glob("metrics/*/metrics.csv")
    assert "train/step_time" in csv.read_text().splitlines()[0]
    previews = sorted((run.logdir / "images" / "train").glob("step-*.txt"))
    assert [p.read_text() for p in previews] == ["a * on the beach\n"] * 2
    image_logger = next(c for c in run.trainer.callbacks if isinstance(c, ImageLogger))
    first, again = (image_logger.sample(run.model, "a * on the beach", ["*"], run.data.train_dataset) for _ in range(2))
    assert len(first) == 3 and all(np.array_equal(a, b) for a, b in zip(first, again))
    bar = next(c for c in run.trainer.callbacks if isinstance(c, StepProgressBar)).train_progress_bar
    assert (bar.n, bar.total, bar.desc.rstrip(": ")) == (2, 2, "step")
    probe = next(c for c in run.trainer.callbacks if isinstance(c, RecordConsoleHandlers))
    assert "_TqdmLoggingHandler" in probe.seen and "StreamHandler" not in probe.seen


def test_checkpoint_io_failure_keeps_the_previous_file(tmp_path, monkeypatch):
    run = setup(tmp_path, steps=1)
    main.train(run)
    last = run.logdir / "checkpoints" / "last.ckpt"
    original = last.read_bytes()

    def die_half_way(obj, file, *args, **kwargs):
        Path(file).write_bytes(original[: len(original) // 2])
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr("ldm.callbacks.torch.save", die_half_way)
    with pytest.raises(KeyboardInterrupt):
        run.trainer.save_checkpoint(last)
    monkeypatch.setattr("ldm.callbacks.torch.save", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(CheckpointWriteError, match="previous last.ckpt is unchanged"):
        run.trainer.save_checkpoint(last)
    assert last.read_bytes() == original and not leftovers(run.logdir)
    assert isinstance(main.checkpoint_callback(run.trainer), ViCoCheckpoint)
