"""pyproject.toml declares what the code imports, requirements.txt pins it, and a wheel works
outside the checkout (configs inside the package)."""
from __future__ import annotations

import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: Declared without an import: the default logger's backend, and torchvision, which timm needs and
#: requirements.txt pins beside torch so that their builds match.
NOT_IMPORTED = {"tensorboard", "torchvision"}
LOCAL = {"ldm", "main", "sample", "scripts", "tests"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalise(re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0])


def imported_distributions() -> set[str]:
    """Distributions of every third-party module imported by the package, entry points and scripts."""
    files = [*(ROOT / "ldm").rglob("*.py"), ROOT / "main.py", ROOT / "sample.py", *(ROOT / "scripts").glob("*.py")]
    modules = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    third_party = {m for m in modules if m not in sys.stdlib_module_names and m not in LOCAL and m != "__future__"}
    distributions = importlib.metadata.packages_distributions()
    return {normalise(distributions[m][0]) for m in third_party}


def test_dependencies_are_exactly_what_the_code_imports():
    project = PYPROJECT["project"]
    declared = {requirement_name(r) for r in project["dependencies"]}
    extras = {name: {requirement_name(r) for r in reqs} for name, reqs in project["optional-dependencies"].items()}
    assert set(extras) == {"eval", "dev"}
    imported = imported_distributions()
    assert imported - declared - extras["eval"] == set(), "imported but not declared"
    assert declared - imported - NOT_IMPORTED == set(), "declared but imported nowhere"
    assert extras["eval"] == {"timm"} and extras["dev"] == {"pytest", "pytest-xdist", "diffusers"}


def test_requirements_pin_every_declared_dependency():
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not an exact pin: {line}"
            pins[normalise(name)] = version
    project = PYPROJECT["project"]
    declared = [*project["dependencies"], *(r for reqs in project["optional-dependencies"].values() for r in reqs)]
    assert set(pins) == {requirement_name(r) for r in declared}
    assert "kornia" not in pins


def test_every_package_folder_is_listed():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "ldm").rglob("*.py")}
    assert folders <= listed and listed - folders == {"ldm.configs"}


@pytest.mark.slow
def test_wheel_works_outside_the_checkout(tmp_path):
    source = tmp_path / "source"
    for name in ("pyproject.toml", "README.md"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "ldm", source / "ldm", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "configs", source / "configs")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        check=True, cwd=source, capture_output=True, timeout=600,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("vico_ldm-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "installed")
    assert {"ldm/api.py", "ldm/configs/vico.yaml", "ldm/configs/eval/prompts.yaml"} <= names
    assert not any(name.startswith(("tests/", "configs/", "main.py", "sample.py")) for name in names)
    check = (
        "import ldm, ldm.api; from ldm.models.loading import DEFAULT_CONFIG; from ldm.evaluation.prompts import load_prompts; "
        "assert ldm.CONFIG_DIR == ldm._PACKAGE / 'configs', ldm.CONFIG_DIR; assert DEFAULT_CONFIG.is_file(); "
        "assert len(load_prompts().object) == 31"
    )
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", check], cwd=empty, env={"PYTHONPATH": str(tmp_path / "installed")},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
