"""Test-session settings: one intra-op thread per test process, shipped model files required,
no skip but the allowed ones, and the longest file first.

The tiny models gain nothing from a second thread, and on a 2-core machine several
processes (CPU DDP ranks, CLI subprocesses, other jobs) each starting a full thread pool
oversubscribe the cores and slow everything down. Subprocesses inherit the variable.

Skips (issue 25): a skipped test is a test that did not run, and CI must not stay green
because of one. A skip is allowed only when its reason names an optional dependency listed in
:data:`ALLOWED_SKIPS`; any other skip (or a skip at collection, e.g. a module-level
``importorskip``) is reported as a failure. Every dependency that requirements.txt pins is
required, diffusers included, and the shipped model files (:data:`SHIPPED_MINIWORLD_MODELS`)
are part of the repository: the tests that need them use the ``shipped_miniworld_models``
fixture, which fails when one is missing.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]

#: Reasons a test may skip for: ``{text the skip reason contains: why it is allowed}``. Only
#: optional dependencies, each named; nothing that requirements.txt pins.
ALLOWED_SKIPS = {
    "wandb is installed": "wandb is an optional logger (not a dependency); "
    "test_main_cli checks the one-line error when it is absent",
}

#: The miniature world's pretrained base and classifier, shipped in the repository.
SHIPPED_MINIWORLD_MODELS = (
    ROOT / "models" / "miniworld" / "base.safetensors",
    ROOT / "models" / "miniworld" / "classifier.safetensors",
)


@pytest.fixture
def shipped_miniworld_models() -> tuple[Path, ...]:
    """The shipped miniature-world models; a missing one fails the test (it is not skipped)."""
    for path in SHIPPED_MINIWORLD_MODELS:
        if not path.is_file():
            pytest.fail(
                f"shipped model file missing: {path.relative_to(ROOT)} is part of the repository "
                f"(restore it with git checkout, or rebuild it with scripts/miniworld.py)",
                pytrace=False,
            )
    return SHIPPED_MINIWORLD_MODELS


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Back to one torch thread after each test: the miniworld commands run in-process set their
    ``--threads`` (2) for the whole process, and every later test of that process then ran with two
    threads beside the other test process, ten times slower (a sampling fixture: 11 s alone, 190 s
    in the suite)."""
    yield
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


#: Files whose module fixtures take longest (the claim tests train three runs): collected first,
#: so that with ``make test``'s two processes one starts them at once and the other takes the rest.
LONGEST_FIRST = ("test_claims.py",)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name not in LONGEST_FIRST)  # stable: otherwise in order


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: reason")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _fail_unexpected_skip(report) -> None:
    """Turn a skip whose reason is not allowed into a failure naming it (xfail is left alone)."""
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    if any(allowed in reason for allowed in ALLOWED_SKIPS):
        return
    report.outcome = "failed"
    report.longrepr = (
        f"skipped for a reason not allowed: {reason!r}. A test may skip only for a named optional "
        f"dependency (tests/conftest.py ALLOWED_SKIPS: {sorted(ALLOWED_SKIPS)}); pinned dependencies "
        f"and shipped model files are required."
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    _fail_unexpected_skip(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    _fail_unexpected_skip(report)
    return report
