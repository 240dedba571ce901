"""Shared fixtures: paths to the shared data, and the skip-or-fail rule for it."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get(
    "SEMINAR_SHARED_DATA", os.path.join(os.path.dirname(REPO), "shared", "data")
)
MOVIELENS = os.path.join(SHARED_DATA, "movielens-small")


@pytest.fixture(autouse=True)
def _no_stale_log_handlers():
    """``seminar`` CLI calls in-process point a root log handler at the test's captured
    stderr, which is closed after the test; drop such plain handlers around every test."""

    def drop():
        root = logging.getLogger()
        for handler in list(root.handlers):
            if type(handler) is logging.StreamHandler:
                root.removeHandler(handler)

    drop()
    yield
    drop()


@pytest.fixture(scope="session")
def movielens_dir() -> str:
    """The shared MovieLens folder; skips where absent, fails under CI's require flag."""
    if not os.path.exists(os.path.join(MOVIELENS, "ratings.csv")):
        msg = f"shared MovieLens data not found at {MOVIELENS} (set SEMINAR_SHARED_DATA)"
        if os.environ.get("SEMINAR_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(msg + "; SEMINAR_REQUIRE_SHARED_DATA=1 forbids skipping")
        pytest.skip(msg)
    return MOVIELENS


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny trained model and its export, built once (shared by pytest-xdist workers)."""
    from export.testing import build_tiny_export

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    return build_tiny_export(str(shared / "seminar-tiny-export"))


@pytest.fixture(scope="session")
def run_script():
    """``run(script, backend, timeout=240) -> stdout``: runs Python source in a fresh process
    under ``KERAS_BACKEND=backend`` (a backend is fixed per process) and fails the test with
    its output when it exits non-zero."""

    def run(script: str, backend: str, timeout: int = 240) -> str:
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        result = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(script)],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        return result.stdout

    return run
