"""A full disk while writing a checkpoint, an export or the random base: one ``error:`` line,
exit status 1, the previous file kept and no partial file left (issue 24, item 5).

``torch.save`` to a path reports a full disk as a ``RuntimeError`` without errno, safetensors
as a ``SafetensorError``; :func:`ldm.util.write_atomically` turns both into ``OSError``.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import SafetensorError

import main
from ldm import util
from ldm.callbacks import AtomicCheckpointIO, CheckpointWriteError
from ldm.util import save_state_dict, write_atomically

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "vico-tiny.yaml")
#: What torch.save to a path raises when the disk fills up (torch 2.x).
TORCH_FULL_DISK = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
SAFETENSORS_FULL_DISK = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.fixture
def full_disk(monkeypatch):
    """The disk of every folder reports no free space."""
    monkeypatch.setattr(util.os, "statvfs", lambda folder: SimpleNamespace(f_bavail=0, f_frsize=4096))


def failing(error: Exception):
    def write(temporary: Path) -> None:
        temporary.write_bytes(b"partial")
        raise error

    return write


@pytest.mark.parametrize("error", [TORCH_FULL_DISK, SAFETENSORS_FULL_DISK, OSError(errno.ENOSPC, "No space left on device")])
def test_a_full_disk_is_an_os_error_and_keeps_the_previous_file(tmp_path, full_disk, error):
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"previous")
    with pytest.raises(OSError) as caught:
        write_atomically(path, failing(error))
    assert caught.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["last.ckpt"]


def test_other_writer_errors_are_not_taken_for_a_full_disk(tmp_path):
    with pytest.raises(RuntimeError, match="unexpected pos"):
        write_atomically(tmp_path / "x.ckpt", failing(TORCH_FULL_DISK))  # this disk has room
    assert os.listdir(tmp_path) == []


def test_a_checkpoint_on_a_full_disk_is_one_line(tmp_path, full_disk, monkeypatch):
    monkeypatch.setattr(torch, "save", lambda obj, path: (Path(path).write_bytes(b"partial"), (_ for _ in ()).throw(TORCH_FULL_DISK)))
    with pytest.raises(CheckpointWriteError) as caught:
        AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, tmp_path / "last.ckpt")
    assert str(caught.value) == f"cannot write {tmp_path / 'last.ckpt'}: No space left on device"
    assert os.listdir(tmp_path) == []


def test_the_random_base_on_a_full_disk_is_one_line_exit_1_and_no_run_folder(tmp_path, full_disk, monkeypatch, capsys):
    def no_room(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise SAFETENSORS_FULL_DISK

    monkeypatch.setattr(util, "save_file", no_room)
    monkeypatch.delenv(main.RUN_DIR_VARIABLE, raising=False)
    logs = tmp_path / "logs"
    argv = ["--base", TINY, "-t", "--logdir", str(logs), "--data_root", str(ROOT / "data" / "monster_toy")]
    assert main.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: cannot write ") and err.endswith(
        "random-base.safetensors: No space left on device; the run stopped\n"
    ), err
    assert not any(logs.iterdir())


def test_save_state_dict_leaves_no_partial_file(tmp_path, full_disk, monkeypatch):
    monkeypatch.setattr(util, "save_file", lambda tensors, filename, metadata=None: (_ for _ in ()).throw(SAFETENSORS_FULL_DISK))
    with pytest.raises(OSError, match="No space left on device"):
        save_state_dict({"w": torch.zeros(2)}, tmp_path / "base.safetensors")
    assert os.listdir(tmp_path) == []


def test_the_write_that_stopped_the_run_is_reported_not_the_loggers_last_one(monkeypatch, capsys):
    """Lightning writes the loggers' last lines while handling the failure; on a full disk that
    write fails too (an OSError without a file name) and would hide the checkpoint that could not be written."""

    def train(run):
        try:
            raise CheckpointWriteError("cannot write logs/run/checkpoints/last.ckpt: No space left on device")
        except CheckpointWriteError:
            raise OSError(errno.ENOSPC, "No space left on device") from None

    monkeypatch.setattr(main, "setup_run", lambda opt, overrides: None)
    monkeypatch.setattr(main, "train", train)
    assert main.main(["--base", TINY, "-t"]) == 1
    assert capsys.readouterr().err == (
        "error: cannot write logs/run/checkpoints/last.ckpt: No space left on device; the run stopped\n"
    )
