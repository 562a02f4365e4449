"""Every command line the README shows runs as written, at tiny size (issue 23, item 2).

The command lines are read from the README's ```bash blocks (a line ending in ``\\`` continues
on the next; ``#`` starts a comment) and run in order, in a sandbox folder that looks like the
checkout (``configs/``, ``data/``, ``models/``, ``ldm/``, the scripts), so that ``logs/`` and
``outputs/`` are written there. What is changed to make them run on a CPU in a minute, and why:

* ``make demo``: run with the Makefile's own variables for a short demo
  (``DEMO_TRAIN_ARGS``: 2 steps at batch 1, no previews; ``DEMO_SAMPLE_ARGS``: 2 sampling
  steps, 1 sample) and ``STAMP`` pointing at a fresh file, so that nothing is installed;
* ``python``: this interpreter;
* ``configs/vico.yaml`` -> ``configs/vico-tiny.yaml`` and ``--actual_resume ...`` dropped:
  Stable Diffusion's weights are not in the repository; the tiny config is the same classes at
  random weights, which it draws itself;
* ``--gpus ...`` dropped: CI has no GPU;
* ``data/my_toy``: the bundled DreamBooth photos (``data/monster_toy``), linked under that name;
* every ``main.py`` line gets ``lightning.trainer.max_steps=2``, batch 1, a save at every step
  and no previews; ``--step 300`` becomes ``--step 1`` (a save of the short run);
* ``logs/<run>``: the run the commands before it made;
* ``sample.py``: ``--ddim_steps 2 --n_samples 1``.

Not run: ``make test`` (the suite this test belongs to; CI runs it, ``.ci/run``) and the two
install lines (they change the environment and need the network): the test checks that they
are what the Makefile and ``environment.yaml`` do.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: What the sandbox links from the checkout.
CHECKOUT_ENTRIES = ("configs", "models", "ldm", "scripts", "main.py", "sample.py", "Makefile", "requirements.txt")
TINY_TRAINING = (
    "lightning.trainer.max_steps=2", "data.params.batch_size=1",
    "lightning.modelcheckpoint.params.every_n_train_steps=1", "lightning.callbacks.image_logger.params.batch_frequency=0",
)  # fmt: skip
NOT_RUN = {
    "make test": "the suite this test belongs to",
    "python3 -m venv .venv": "installs into the environment",
    "conda env create": "installs into the environment",
}


def readme_commands() -> list[str]:
    """The command lines of the README's bash blocks, continuation lines joined, comments dropped."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(shlex.join(words))
    return commands


def sandbox(tmp_path: Path) -> Path:
    """A folder that looks like the checkout, with ``data/my_toy`` the bundled DreamBooth photos."""
    for name in CHECKOUT_ENTRIES:
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "data").mkdir()
    for entry in (ROOT / "data").iterdir():
        (tmp_path / "data" / entry.name).symlink_to(entry)
    (tmp_path / "data" / "my_toy").symlink_to(ROOT / "data" / "monster_toy")
    return tmp_path


def latest_run(folder: Path) -> str:
    runs = sorted((folder / "logs").iterdir(), key=lambda p: p.stat().st_mtime)
    assert runs, "a README command uses logs/<run> before any training command"
    return str(runs[-1].relative_to(folder))


def tiny(words: list[str], folder: Path) -> list[str]:
    """A README command line at tiny size (the module docstring lists each change)."""
    out: list[str] = []
    skip = 0
    for index, word in enumerate(words):
        if skip:
            skip -= 1
            continue
        if word in ("--gpus", "--actual_resume"):
            skip = 1
            continue
        following = words[index - 1] if index else ""
        if following == "--ddim_steps":
            word = "2"
        elif following == "--n_samples":
            word = "1"
        elif following == "--step" and word == "300":
            word = "1"
        word = word.replace("configs/vico.yaml", "configs/vico-tiny.yaml")
        word = word.replace("logs/<run>", latest_run(folder)) if "logs/<run>" in word else word
        out.append(word)
    if out[0] == "python":
        out[0] = sys.executable
    if out[1] == "main.py":
        out += TINY_TRAINING
    return out


def make_demo(folder: Path) -> list[str]:
    stamp = folder / "installed"
    stamp.touch()
    return [
        "make", "demo", f"PY={sys.executable}", f"STAMP={stamp}",
        "DEMO_TRAIN_ARGS=" + " ".join(TINY_TRAINING), "DEMO_SAMPLE_ARGS=--ddim_steps 2 --n_samples 1",
    ]  # fmt: skip


def test_the_readme_shows_the_commands_this_test_knows():
    """Every command line is one this test runs or names in NOT_RUN (a new kind needs a rule)."""
    for command in readme_commands():
        runnable = command == "make demo" or command.split()[:2] in (
            ["python", "main.py"], ["python", "sample.py"], ["python", "scripts/export.py"],
        )  # fmt: skip
        assert runnable or any(command.startswith(prefix) for prefix in NOT_RUN), command


def test_the_install_lines_are_what_the_makefile_and_conda_do():
    makefile = (ROOT / "Makefile").read_text()
    assert "-m venv $(VENV)" in makefile and "pip install --quiet -r requirements.txt" in makefile
    assert "-r requirements.txt" in (ROOT / "environment.yaml").read_text()
    assert any(c.startswith("python3 -m venv .venv") and "pip install -r requirements.txt" in c for c in readme_commands())


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path):
    folder = sandbox(tmp_path)
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    environment.pop("VICO_RUN_DIR", None)
    ran = []
    for command in readme_commands():
        if any(command.startswith(prefix) for prefix in NOT_RUN):
            continue
        argv = make_demo(folder) if command == "make demo" else tiny(shlex.split(command), folder)
        result = subprocess.run(argv, cwd=folder, env=environment, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        ran.append(command)
    assert ran[0] == "make demo" and len(ran) >= 5, ran
    assert (folder / "outputs" / "demo" / "metrics.md").is_file()
