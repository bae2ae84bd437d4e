"""Where the project keeps its state (light: no torch, so the CLI and the service can import it)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def state_dir() -> Path:
    """The project state folder, read when called: ``$LOSA_HOME`` or ``<repo>/.state`` (absolute)."""
    home = os.environ.get("LOSA_HOME")
    return Path(home).expanduser().resolve() if home else PROJECT_ROOT / ".state"


def artifacts_url() -> str:
    """The artifact store: ``$LOSA_ARTIFACTS`` (any fsspec URL) or ``<state>/artifacts``."""
    return os.environ.get("LOSA_ARTIFACTS") or str(state_dir() / "artifacts")


@contextmanager
def file_lock(name: str):
    """A lock between processes on this host, ``<state>/locks/<name>.flock`` (flock: the kernel releases it when its
    holder dies, so it can never strand anyone)."""
    from filelock import FileLock

    folder = state_dir() / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / f"{name}.flock")):
        yield
