"""The ``duch`` command: dispatch, help for every subcommand, config printing, exit codes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobs import cli
from jobs import serve as serve_job

REPO = Path(__file__).resolve().parents[1]


def _duch(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("duch", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "jobs.cli"]
    return subprocess.run([*cmd, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_console_script_lists_every_subcommand():
    out = _duch("--help")
    assert out.returncode == 0, out.stderr
    for name in ("import", "tile", "extract", "train", "evaluate", "encode", "serve", "demo"):
        assert f"  {name} " in out.stdout


def test_unknown_or_missing_subcommand_is_a_usage_error(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert cli.main([]) == 2


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_each_subcommand_help_lists_its_options(name, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main([name, "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert "usage:" in text
    if name != "demo":
        assert "--config" in text and "--print-config" in text and "--verbose" in text


@pytest.mark.parametrize("name", ["train", "evaluate", "extract"])
def test_real_runs_require_a_config(name, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main([name])
    assert stop.value.code == 2
    assert "--config" in capsys.readouterr().err


def test_train_print_config_resolves_overrides(capsys):
    code = cli.main(
        ["train", "--config", "configs/smoke.yaml", "--set", "duch.model.bits=32", "--print-config"]
    )
    assert code == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["duch"]["model"]["bits"] == 32


def test_train_bad_override_exits_2(capsys):
    code = cli.main(["train", "--config", "configs/smoke.yaml", "--set", "duch.model.nope=1"])
    assert code == 2
    assert "nope" in capsys.readouterr().err


def test_serve_print_config_applies_app_overrides(capsys):
    code = serve_job.main(
        [
            "--config",
            "deploy/local_config.yaml",
            "--set",
            "index_root=s3://bucket/index",
            "--print-config",
        ]
    )
    assert code == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    (app,) = resolved["applications"]
    assert app["args"]["index_root"] == "s3://bucket/index"
    assert resolved["http_options"]["host"] == "127.0.0.1"


def test_serve_refuses_arguments_the_app_would_refuse(capsys):
    assert serve_job.main(["--config", "deploy/local_config.yaml", "--set", "k_cap=0"]) == 2
    assert "args.k_cap" in capsys.readouterr().err
    assert serve_job.main(["--config", "deploy/local_config.yaml", "--set", "nope=1"]) == 2
    assert "args.nope" in capsys.readouterr().err
    assert serve_job.main(["--config", "does/not/exist.yaml"]) == 2


def test_serve_command_line():
    cmd = serve_job.serve_command("c.yaml", deploy=True, address="http://127.0.0.1:8265")
    assert cmd[1:] == ["deploy", "c.yaml", "-a", "http://127.0.0.1:8265"]
    assert serve_job.serve_command("c.yaml", deploy=False, address=None)[1:] == ["run", "c.yaml"]
