"""The import direction of the brief: losa/ never imports Prefect, MLflow, tasks or flows."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_importing_losa_pulls_no_orchestration_or_tracking():
    code = "import sys, losa, losa.data, losa.evaluate, losa.testbed, losa.pruners; " \
           "print(sorted(m for m in ('prefect', 'mlflow', 'tasks', 'flows') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_no_source_file_in_losa_imports_them():
    pattern = re.compile(r"^\s*(import|from)\s+(prefect|mlflow|tasks|flows)\b", re.M)
    offenders = [str(p) for p in (ROOT / "losa").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_tasks_never_import_flows_and_modules_import_without_mlflow():
    pattern = re.compile(r"^\s*(import|from)\s+(flows|mlflow)\b", re.M)
    offenders = [str(p) for p in (ROOT / "tasks").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []  # CLI -> flows -> tasks -> losa, one way
