"""The layering rules, checked: the library imports without Ray, jobs never import each other."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
JOBS = sorted(p for p in (REPO / "jobs").glob("*.py") if p.name != "__init__.py")
# modules every job may use; the CLI and the demo driver are the callers of jobs
SHARED_JOB_MODULES = {"jobs._common", "jobs.train_config"}
JOB_CALLERS = {"cli.py", "demo.py"}


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_duch_core_imports_without_ray_fastapi_or_pydantic():
    code = (
        "import sys, pkgutil, importlib, duch_core\n"
        "for m in pkgutil.iter_modules(duch_core.__path__):\n"
        "    importlib.import_module('duch_core.' + m.name)\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in "
        "('ray', 'fastapi', 'pydantic', 'starlette'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "", f"duch_core pulled in: {out.stdout.strip()}"


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_no_job_imports_another_job(path: Path):
    if path.name in JOB_CALLERS:
        return
    jobs_imported = {
        m
        for m in _imported_modules(path)
        if m.startswith("jobs.") and m.count(".") == 1 and m not in SHARED_JOB_MODULES
    }
    assert not jobs_imported, f"{path.name} imports job modules {sorted(jobs_imported)}"


def test_no_sys_path_manipulation_in_project_code():
    offenders = [
        str(p.relative_to(REPO))
        for d in ("jobs", "deploy", "duch_core", "bench")
        for p in (REPO / d).rglob("*.py")
        if "sys.path.insert" in p.read_text() or "sys.path.append" in p.read_text()
    ]
    assert offenders == []


def _serve_start_calls(path: Path) -> list[ast.Call]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "start"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "serve"
    ]


def test_every_serve_start_gives_the_controller_its_proxy_timeouts():
    """Serve kills a proxy that is not ready within 5 s; on a busy machine serve.start() then
    fails. Every place that starts Serve passes the app's controller options."""
    files = [p for d in ("jobs", "deploy", "bench", "tests") for p in (REPO / d).rglob("*.py")]
    calls = [(p, c) for p in files for c in _serve_start_calls(p)]
    assert len(calls) >= 5  # the demo, the benchmark and the Serve test fixtures
    missing = [
        f"{p.relative_to(REPO)}:{c.lineno}"
        for p, c in calls
        if "controller_options" not in {k.arg for k in c.keywords}
    ]
    assert not missing, f"serve.start() without controller_options: {missing}"
