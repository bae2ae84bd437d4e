"""Light things stay light: commands and modules that compute nothing never import torch (or peft).

Each check runs in a fresh interpreter and reads ``sys.modules`` after the import or the command.
"""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "peft", "transformers")


def loaded_after(code: str, env: dict | None = None) -> list[str]:
    """The heavy modules imported by running ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport sys, json\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["losa", "losa.patterns", "losa.config", "losa.schedule", "flows.spec",
                                    "flows.cli", "flows.service", "tasks.state"])
def test_light_modules_import_no_torch(module):
    assert loaded_after(f"import {module}") == []


def test_pattern_from_the_package_pulls_no_peft():
    assert loaded_after("from losa.patterns import Pattern; Pattern.parse('2:4')") == []
    assert loaded_after("from losa import Pattern; Pattern.parse('2:4')") == []


def test_package_names_still_resolve_on_use():
    assert loaded_after("from losa import load_model, run_losa, prune_model, PruneReport, get_adapter") != []


@pytest.fixture
def idle_env(tmp_path):
    import os

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    return {**os.environ, "LOSA_HOME": str(tmp_path / "state"), "LOSA_PREFECT_PORT": str(free)}


def test_check_no_cache_imports_no_torch(idle_env):
    assert loaded_after("from flows.cli import main; assert main(['check', 'testbed', '--no-cache']) == 0",
                        idle_env) == []


def test_down_imports_no_torch(idle_env):
    assert loaded_after("from flows.cli import main; assert main(['down']) == 0", idle_env) == []


def test_parsing_a_compute_command_imports_no_torch():
    # the --device default is resolved when a model is loaded, not when the parser is built
    assert loaded_after("from flows.cli import build_parser; a = build_parser().parse_args(['run']); "
                        "assert a.device == 'auto'") == []
