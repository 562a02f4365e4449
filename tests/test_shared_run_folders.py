"""A shared run folder is untrusted input: resuming one runs no code, touches nothing outside it
and loses no steps (the rules of :mod:`ldm.trust`).

Every hostile folder is made by the test from one honest tiny run (2 steps, a save at each),
then resumed with ``main.main(["-t", "-r", folder])`` as a user would. "Nothing outside" is
checked by listing every file under the test's folder before and after.
"""
from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import main
from ldm.callbacks import ViCoCheckpoint
from ldm.trust import check_merged_targets, resume_values, targets
from ldm.util import UntrustedConfigError, check_stored_config, is_trusted_target, read_checkpoint
from tests.test_training import setup

MODEL = "ldm.models.diffusion.ddpm.LatentDiffusion"


@pytest.fixture(autouse=True)
def fresh_run(monkeypatch):
    monkeypatch.delenv(main.RUN_DIR_VARIABLE, raising=False)


@pytest.fixture(scope="module")
def honest_run(tmp_path_factory) -> Path:
    os.environ.pop(main.RUN_DIR_VARIABLE, None)
    run = setup(tmp_path_factory.mktemp("honest"), "lightning.modelcheckpoint.params.every_n_train_steps=1", steps=2)
    main.train(run)
    os.environ.pop(main.RUN_DIR_VARIABLE, None)
    return run.logdir


@pytest.fixture
def shared(honest_run, tmp_path, monkeypatch) -> Path:
    """A copy of the honest run, as it would arrive from someone else; the working folder is the test's."""
    folder = tmp_path / "downloads" / honest_run.name
    shutil.copytree(honest_run, folder)
    monkeypatch.chdir(tmp_path)
    return folder


def files_under(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def outside(before: dict[Path, bytes], after: dict[Path, bytes], run: Path) -> list[str]:
    """Files created, changed or deleted outside ``run``."""
    changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    return sorted(str(p) for p in changed if not p.is_relative_to(run))


def stored_config(run: Path) -> Path:
    (path,) = (run / "configs").glob("*.yaml")
    return path


def edit_stored_config(run: Path, **updates) -> None:
    path = stored_config(run)
    config = OmegaConf.load(path)
    for key, value in updates.items():
        OmegaConf.update(config, key, value, force_add=True)
    OmegaConf.save(config, path)


def rewrite_checkpoint(path: Path, state: dict) -> None:
    """Replace ``path`` by a new file (``state`` may be memory-mapped from the old one)."""
    temporary = path.with_name("edited.tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def resume(run: Path, capsys, *extra: str) -> tuple[int, str]:
    code = main.main(["-t", "-r", str(run), "lightning.trainer.enable_progress_bar=false", *extra])
    return code, capsys.readouterr().err.strip()


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------ code
def test_a_target_planted_across_two_stored_files_is_refused(shared, tmp_path, capsys):
    """The issue's exploit: file one's target selects a value that only file two sets."""
    marker = tmp_path / "pwned"
    edit_stored_config(shared, **{"model.target": f"${{oc.select:lightning.loggers.csv.params.name,{MODEL}}}"})
    OmegaConf.save(
        OmegaConf.create({"lightning": {"loggers": {"csv": {"params": {"name": "os.system"}}}}, "model": {"params": {"command": f"touch {marker}"}}}),
        shared / "configs" / "zz-second.yaml",
    )
    code, err = resume(shared, capsys, "lightning.trainer.max_steps=3")
    assert code == 2
    assert "is an interpolation" in one_line_error(err)
    assert not marker.exists()


def test_a_target_the_merge_would_change_is_refused(shared, tmp_path, capsys):
    """A literal stored value that the user's own --base file would interpolate into a target."""
    marker = tmp_path / "pwned"
    edit_stored_config(shared, **{"model.params.planted": "os.system"})
    users = tmp_path / "mine.yaml"
    users.write_text(f'model:\n  target: "${{oc.select:model.params.planted,{MODEL}}}"\n')
    code, err = resume(shared, capsys, "--base", str(users), "lightning.trainer.max_steps=3")
    assert code == 2
    assert "refusing to build 'os.system' at model" in one_line_error(err)
    assert not marker.exists()


def test_check_merged_targets_accepts_what_the_user_wrote():
    merged = OmegaConf.create({"model": {"target": "my_lab.models.Thing"}, "data": {"target": "ldm.data.personalized.PersonalizedDataModule"}})
    check_merged_targets(merged, OmegaConf.create({"model": {"target": "my_lab.models.Thing"}}))
    with pytest.raises(UntrustedConfigError, match="my_lab.models.Thing"):
        check_merged_targets(merged, OmegaConf.create({}))


# ------------------------------------------------------------------ deletion
def test_checkpoint_state_cannot_delete_files_outside_the_run(shared, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's file")
    (tmp_path / "sd-v1-4.ckpt").write_text("weights")
    edit_stored_config(shared, **{"lightning.modelcheckpoint.params.dirpath": ".", "lightning.modelcheckpoint.params.save_top_k": 1})
    last = shared / "checkpoints" / "last.ckpt"
    state = read_checkpoint(last)
    (key,) = state["callbacks"]
    lexically_inside = str(shared / "checkpoints" / ".." / ".." / ".." / "victim.txt")
    state["callbacks"][key].update(best_model_path=lexically_inside, kth_best_model_path="../sd-v1-4.ckpt", dirpath=".")
    state["callbacks"][key]["best_k_models"] = {lexically_inside: torch.tensor(0.0)}
    rewrite_checkpoint(last, state)
    before = files_under(tmp_path)
    code, err = resume(shared, capsys, "lightning.trainer.max_steps=4")
    assert code == 0, err
    assert victim.read_text() == "the user's file"
    assert outside(before, files_under(tmp_path), shared) == []
    assert read_checkpoint(last)["global_step"] == 4


def test_confinement_of_restored_paths(tmp_path):
    callback = ViCoCheckpoint(dirpath=str(tmp_path / "checkpoints"))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "escape.ckpt").symlink_to(tmp_path / "victim.ckpt")
    callback.load_state_dict({
        "best_model_path": "/elsewhere/old-run/checkpoints/step=000002.ckpt",  # a moved run: re-rooted
        "last_model_path": str(tmp_path / "checkpoints" / ".." / ".." / "x" / "last.ckpt"),
        "kth_best_model_path": str(tmp_path / "checkpoints" / "escape.ckpt"),  # a link out: dropped
        "best_k_models": {"..": torch.tensor(1.0), "notes.txt": torch.tensor(2.0)},
        "dirpath": "/elsewhere/old-run/checkpoints",
    })  # fmt: skip
    assert callback.best_model_path == str(tmp_path / "checkpoints" / "step=000002.ckpt")
    assert callback.last_model_path == str(tmp_path / "checkpoints" / "last.ckpt")
    assert callback.kth_best_model_path == ""
    assert callback.best_k_models == {}


# ------------------------------------------------------------------ redirected writes
def test_stored_paths_plugins_and_loggers_do_not_take_effect(shared, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    edit_stored_config(shared, **{
        "lightning.modelcheckpoint.params.dirpath": str(elsewhere),
        "lightning.modelcheckpoint.params.filename": "../../escaped-{step}",
        "lightning.modelcheckpoint.params.save_top_k": -1,
        "lightning.callbacks.export": {"target": "ldm.callbacks.TrainedWeightsExport", "params": {"logdir": str(elsewhere)}},
        "lightning.callbacks.image_logger.params.logdir": str(elsewhere),
        "lightning.callbacks.image_logger.params.batch_frequency": 1,
        "lightning.loggers.csv.params.save_dir": str(elsewhere),
        "lightning.loggers.wandb": {"target": "pytorch_lightning.loggers.WandbLogger", "params": {"offline": True}},
        "lightning.trainer.plugins": [],
        "lightning.trainer.default_root_dir": str(elsewhere),
    })  # fmt: skip
    before = files_under(tmp_path)
    code, err = resume(shared, capsys, "lightning.trainer.max_steps=3")
    assert code == 0, err
    after = files_under(tmp_path)
    assert outside(before, after, shared) == []
    assert not elsewhere.exists()
    assert read_checkpoint(shared / "checkpoints" / "last.ckpt")["global_step"] == 3
    assert (shared / "checkpoints" / "step=000003.ckpt").is_file()  # the stored save_top_k is a value: kept
    assert list((shared / "images" / "train").glob("step-000003.png"))  # the preview settings too
    assert not list(shared.rglob("wandb"))


def test_the_atomic_checkpoint_writer_stays_whatever_the_plugins_say(tmp_path):
    plugins = main.with_atomic_checkpoints([])
    assert [type(p).__name__ for p in plugins] == ["AtomicCheckpointIO"]
    assert len(main.with_atomic_checkpoints(plugins)) == 1


def test_a_checkpoint_folder_that_leads_elsewhere_is_refused(shared, tmp_path, capsys):
    target = tmp_path / "home" / ".ssh"
    target.mkdir(parents=True)
    shutil.move(shared / "checkpoints", target / "checkpoints")
    (shared / "checkpoints").symlink_to(target / "checkpoints")
    before = files_under(tmp_path)
    code, err = resume(shared, capsys)
    assert code == 2
    assert "checkpoints/ leads outside the run folder" in one_line_error(err)
    assert files_under(tmp_path) == before


# ------------------------------------------------------------------ steps
def test_a_moved_run_resumes_from_its_latest_step_and_keeps_one_last_ckpt(shared, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="main")
    moved = tmp_path / "moved" / shared.name
    shutil.move(shared, moved)
    for steps in (3, 4):
        caplog.clear()
        code, err = resume(moved, capsys, f"lightning.trainer.max_steps={steps}")
        assert code == 0, err
        assert f"resuming {moved} at step {steps - 1}" in caplog.text
        assert sorted(p.name for p in (moved / "checkpoints").glob("last*.ckpt")) == ["last.ckpt"]
        assert read_checkpoint(moved / "checkpoints" / "last.ckpt")["global_step"] == steps


def test_leftovers_of_a_killed_write_are_removed_at_the_next_start(shared, capsys):
    leftover = shared / "checkpoints" / ".last.ckpt.k9x2.tmp"
    leftover.write_bytes(b"half a checkpoint")
    code, err = resume(shared, capsys, "lightning.trainer.max_steps=3")
    assert code == 0, err
    assert not list((shared / "checkpoints").glob(".*.tmp"))


def test_a_failed_in_place_resume_leaves_the_folder_as_it_was(shared, tmp_path, capsys):
    photos = tmp_path / "photos"
    shutil.copytree(Path(OmegaConf.load(stored_config(shared)).data.params.train.params.data_root), photos)
    edit_stored_config(shared, **{"data.params.train.params.data_root": str(photos)})
    for photo in photos.iterdir():
        photo.write_bytes(b"not an image any more")
    before = files_under(shared)
    code, err = resume(shared, capsys)
    assert code == 2, err
    one_line_error(err)
    assert files_under(shared) == before


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_finite_checkpoint(shared, capsys, monkeypatch):
    from ldm.models.diffusion.latent import LatentDiffusionModel

    real = LatentDiffusionModel.p_losses

    def diverging(self, *args, **kwargs):
        loss, logs = real(self, *args, **kwargs)
        return (loss * float("nan"), logs) if self.global_step >= 3 else (loss, logs)

    monkeypatch.setattr(LatentDiffusionModel, "p_losses", diverging)
    code, err = resume(shared, capsys, "lightning.trainer.max_steps=6")
    assert code == 1
    assert "the loss is nan at step 3" in one_line_error(err)
    state = read_checkpoint(shared / "checkpoints" / "last.ckpt")
    assert state["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())


# ------------------------------------------------------------------ fuzz
#: Fragments of stored configs: trusted and untrusted literals, interpolations that select
#: keys another file may set, whole sections pulled from elsewhere.
_TARGETS = [MODEL, "ldm.callbacks.StepTime", "os.system", "builtins.eval", "pytorch_lightning.loggers.WandbLogger"]
_KEYS = ["model.target", "model.params.unet_config.target", "data.target", "model.params.x", "lightning.callbacks.a.target",
         "lightning.loggers.csv.params.name", "lightning.callbacks.a", "model.params.unet_config", "seed"]  # fmt: skip


def _fragment(rng: random.Random) -> object:
    kind = rng.choice(["literal", "literal", "section", "section", "interpolation", "select", "interpolated section"])
    if kind == "literal":
        return rng.choice(_TARGETS)
    if kind == "section":
        return {"target": rng.choice(_TARGETS), "params": {"command": "touch pwned"}}
    if kind == "interpolation":
        return f"${{{rng.choice(_KEYS)}}}"
    if kind == "select":
        return f"${{oc.select:{rng.choice(_KEYS)},{rng.choice(_TARGETS)}}}"
    return {"target": f"${{{rng.choice(_KEYS)}}}"}


def _random_config(rng: random.Random) -> dict:
    config: dict = {}
    for _ in range(rng.randint(1, 4)):
        node = config
        *parents, last = rng.choice(_KEYS).split(".")
        for part in parents:
            child = node.get(part)
            node[part] = child = child if isinstance(child, dict) else {}
            node = child
        node[last] = _fragment(rng)
    return config


def test_fuzz_no_merge_of_stored_configs_builds_an_untrusted_target():
    """Merges of two or three hand-made stored configs, each passed through the same checks
    as a resumed run's: whatever is accepted resolves to allow-listed targets only, and
    whatever is refused is refused as untrusted (never a crash)."""
    rng = random.Random(24)
    accepted = refused = 0
    for _ in range(3000):
        files = [OmegaConf.create(_random_config(rng)) for _ in range(rng.randint(2, 3))]
        try:
            for index, config in enumerate(files):
                check_stored_config(config, f"{index}.yaml")
            merged = OmegaConf.merge(*(resume_values(config, "stored.yaml") for config in files))
            check_merged_targets(merged, OmegaConf.create({}))
        except UntrustedConfigError:
            refused += 1
            continue
        accepted += 1
        plain = OmegaConf.to_container(merged, resolve=True)
        assert all(is_trusted_target(target) for _, target in targets(plain)), files
    assert accepted > 30 and refused > 30, (accepted, refused)  # both sides were exercised


def test_a_stored_folder_the_run_writes_class_images_into_is_dropped(tmp_path):
    stored = OmegaConf.create({"data": {"target": "ldm.data.personalized.PersonalizedDataModule", "params": {
        "class_images": {"target": "ldm.data.class_images.GeneratedClassImages",
                         "params": {"class_word": "dog", "folder": str(tmp_path / "elsewhere")}}}}})  # fmt: skip
    values = resume_values(stored, "stored.yaml")
    assert "folder" not in values.data.params.class_images.params
    assert values.data.params.class_images.params.class_word == "dog"
    # a folder that is only read (images the user brings) is a value like the photos' folder
    stored.data.params.class_images.target = "ldm.data.class_images.ClassImageFolder"
    assert resume_values(stored, "stored.yaml").data.params.class_images.params.folder == str(tmp_path / "elsewhere")
