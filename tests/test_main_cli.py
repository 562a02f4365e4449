"""main.py's command line and config checks: one `error:` line before anything slow."""
from __future__ import annotations

import errno
import pickle
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import main
from ldm.config_schema import ConfigError, accepted_parameters, check_parameters, matches

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "vico-tiny.yaml")
PHOTOS = ROOT / "data" / "monster_toy"


@pytest.fixture(autouse=True)
def no_model_building(monkeypatch):
    """These tests fail before anything slow: building a model is a test failure."""
    monkeypatch.delenv(main.RUN_DIR_VARIABLE, raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the error was found")

    monkeypatch.setattr(main, "build_model", refuse)


def error_of(capsys, *argv: str) -> str:
    code = main.main(list(argv))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def tiny(tmp_path: Path, *extra: str) -> list[str]:
    return ["--base", TINY, "-t", "--logdir", str(tmp_path / "logs"), *extra]


def no_run_folders(tmp_path: Path) -> bool:
    return not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())


# ------------------------------------------------------------------ parsing
def test_overrides_may_stand_anywhere():
    opt, overrides = main.parse_args(["-t", "a.b=1", "--base", "x.yaml", "c.d=2", "-n", "run", "e=3"])
    assert opt.train is True and opt.base == ["x.yaml"] and opt.name == "run"
    assert overrides == ["a.b=1", "c.d=2", "e=3"]
    opt, _ = main.parse_args(["--data_root=some/folder", "-t", "False"])
    assert opt.data_root == ["some/folder"] and opt.train is False


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        main.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "(default: logs)" in out and "(default: 1)" in out and "default: 23" in out
    assert "--placeholder_string" in out
    assert "(default: the config's name)" in out and "(default: )" not in out  # said once, in words


def test_unknown_flag_is_one_line(capsys, tmp_path):
    assert "unrecognized arguments: --bogus" in error_of(capsys, *tiny(tmp_path, "--bogus"))


# ------------------------------------------------------------------ bad input, one line each
@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--num_processes", "0"], "--num_processes must be at least 1"),
        (["-n", "../escape"], "without path separators"),
        (["-n", "a/b"], "without path separators"),
        (["model.params.reg_weight=lots"], "model.params.reg_weight must be float, got 'lots'"),
        (["model.params.reg_weigth=0"], "unknown config key 'model.params.reg_weigth'; nearest: model.params.reg_weight"),
        (["model.reg_weight=0"], "unknown config key 'model.reg_weight'"),
        (["foo.bar=1"], "unknown config key 'foo'"),
        (["lightning.trainer.max_step=3"], "nearest: lightning.trainer.max_steps"),
        (["lightning.modelcheckpont.params.every_n_train_steps=1"], "nearest: lightning.modelcheckpoint"),
        (["lightning.callbacks.image_logger.params.batch_frequencies=1"], "nearest: lightning.callbacks.image_logger.params.batch_frequency"),
        (["lightning.trainer.logger=tensorboard"], "lightning.trainer.logger must be true or false"),
        (["data.params.train.params.placeholder_token=sks"], "placeholder 'sks'"),
        (["--placeholder_string", "S*"], "'S*' is 2 CLIP tokens"),
        (["lightning.callbacks.image_logger.params.prompts=[a photo of a dog]"], "does not contain the placeholder '*'"),
        (["lightning.loggers.x.target=pytorch_lightning.loggers.NoSuchLogger"], "cannot import"),
        (["model.params.unet_config.target=null"], "model.params.unet_config.target must name a class"),
        (["model.base_learning_rate=fast"], "model.base_learning_rate must be a finite number >= 0, got 'fast'"),
        (["model.base_learning_rate=.nan"], "model.base_learning_rate must be a finite number >= 0, got nan"),
        (["model.base_learning_rate=.inf"], "model.base_learning_rate must be a finite number >= 0, got inf"),
        (["model.base_learning_rate=-0.005"], "model.base_learning_rate must be a finite number >= 0, got -0.005"),
        (["model.params.image_attention_learning_rate=-1e-5"], "image_attention_learning_rate must be a finite number >= 0"),
        (["data.params.batch_size=0"], "data.params.batch_size is 0; it must be between 1 and 4096"),
        (["data.params.num_workers=-1"], "data.params.num_workers is -1; it must be between 0 and 256"),
        (["model.params.timesteps=1000000000000"], "model.params.timesteps is 1000000000000; it must be between 1 and 100000"),
        (
            ["model.params.unet_config.params.image_attention_layers=[4,60]"],
            "model.params.unet_config.params.image_attention_layers [60] do not exist: this UNet has 7 attention layers (indices 0-6)",
        ),
        (["model.params.unet_config.params.image_attention_layers=[a]"], "must list layer indices (whole numbers)"),
    ],
)
def test_bad_settings_are_one_line_before_anything_slow(capsys, tmp_path, extra, expected):
    assert expected in error_of(capsys, *tiny(tmp_path, *extra))
    assert no_run_folders(tmp_path)


def test_gpus_without_cuda_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA device is available" in error_of(capsys, *tiny(tmp_path, "--gpus", "0,"))


def test_yaml_syntax_error_and_missing_target(capsys, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  target: x\n    params: [unclosed\n")
    assert "broken.yaml: line" in error_of(capsys, "--base", str(broken), "-t", "--logdir", str(tmp_path / "logs"))
    config = OmegaConf.load(TINY)
    del config.model["target"]
    untargeted = tmp_path / "untargeted.yaml"
    OmegaConf.save(config, untargeted)
    err = error_of(capsys, "--base", str(untargeted), "-t", "--logdir", str(tmp_path / "logs"))
    assert "model has no 'target'" in err


def test_logdir_that_is_a_file_is_one_line(capsys, tmp_path):
    (tmp_path / "logs").write_text("a file, not a folder")
    assert "cannot create a run folder" in error_of(capsys, *tiny(tmp_path))


def test_full_logdir_is_one_line_and_leaves_no_run_folder(capsys, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(main.OmegaConf, "save", full)
    assert "No space left on device" in error_of(capsys, *tiny(tmp_path))
    assert no_run_folders(tmp_path)


def test_missing_optional_logger_is_one_line(capsys, tmp_path):
    import tensorboard  # noqa: F401 - pinned (the default logger needs it): required, never skipped
    try:
        import wandb  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("wandb is installed")
    err = error_of(capsys, *tiny(tmp_path, "lightning.loggers.wandb.target=pytorch_lightning.loggers.WandbLogger",
                                 "lightning.loggers.wandb.params.offline=true"))  # fmt: skip
    assert "lightning.loggers.wandb" in err and "wandb" in err.split("cannot start:")[1]
    assert no_run_folders(tmp_path)


# ------------------------------------------------------------------ -r
def make_run_folder(tmp_path: Path) -> Path:
    run = tmp_path / "shared_run"
    (run / "configs").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    config = OmegaConf.load(TINY)
    config.data.params.train.params.data_root = str(PHOTOS)
    OmegaConf.save(config, run / "configs" / "x-project.yaml")
    return run


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resume_checks_the_checkpoint_with_the_safe_reader(capsys, tmp_path):
    run = make_run_folder(tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    marker = tmp_path / "pwned"
    whole = {"state_dict": {"w": torch.zeros(3)}, "optimizer_states": [], "loops": {}, "global_step": 1}
    torch.save(whole, last)
    truncated = last.read_bytes()[: last.stat().st_size // 2]
    cases = {
        "empty": b"",
        "truncated": truncated,
        "random bytes": bytes(range(256)) * 4,
        "hostile": pickle.dumps({"state_dict": _Payload(marker)}),
    }
    for name, content in cases.items():
        last.write_bytes(content)
        err = error_of(capsys, "-t", "-r", str(run))
        assert "last.ckpt" in err, name
    torch.save({"state_dict": {}}, last)  # a foreign file: no optimizer state
    assert "not a resumable training checkpoint" in error_of(capsys, "-t", "-r", str(run))
    assert not marker.exists()


def test_resume_of_a_folder_without_configs_says_so(capsys, tmp_path):
    folder = tmp_path / "not_a_run"
    (folder / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {}}, folder / "checkpoints" / "last.ckpt")
    assert "has no configs/" in error_of(capsys, "-t", "-r", str(folder))
    assert "not found" in error_of(capsys, "-t", "-r", str(tmp_path / "missing"))


# ------------------------------------------------------------------ config schema
def test_schema_follows_kwargs_to_the_base_class():
    from ldm.callbacks import ViCoCheckpoint

    parameters, open_ = accepted_parameters(ViCoCheckpoint)
    assert not open_ and {"save_top_k", "every_n_train_steps", "monitor", "dirpath"} <= set(parameters)
    with pytest.raises(ConfigError, match="nearest: x.save_top_k"):
        check_parameters({"save_topk": 1}, ViCoCheckpoint, "x")


@pytest.mark.parametrize(
    "value, hint, ok",
    [(1, float, True), (True, float, False), ("1", int, False), (None, int | None, True), ("a", list[str], False),
     (["a"], list[str], True), ("bf16-mixed", "literal", True), ("bf17", "literal", False)],
)  # fmt: skip
def test_value_types(value, hint, ok):
    from typing import Literal

    hint = Literal["bf16-mixed", 32] if hint == "literal" else hint
    assert matches(value, hint) is ok


def test_the_shipped_configs_pass_the_schema():
    configs = ROOT / "configs"
    combos = [[configs / "vico.yaml"], [configs / "vico-tiny.yaml"]]
    combos += [[configs / "vico.yaml", path] for path in sorted((configs / "ablations").glob("*.yaml"))]
    combos += [[configs / "vico-tiny.yaml", path] for path in sorted((configs / "ablations" / "tiny").glob("*.yaml"))]
    combos.append([configs / "miniworld" / "base.yaml", configs / "miniworld" / "vico.yaml"])
    for paths in combos:
        config = OmegaConf.merge(*(OmegaConf.load(path) for path in paths))
        main.check_schema(OmegaConf.to_container(config, resolve=True))
