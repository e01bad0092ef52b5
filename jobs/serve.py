"""Run or deploy the query service from a Serve config (``deploy/*.yaml``).

    duch serve --config deploy/local_config.yaml                      # foreground, Ctrl-C stops
    duch serve --config deploy/serve_config.yaml --deploy -a http://HEAD:8265

``--set KEY=VALUE`` overrides one argument of the application (``args:`` in the config, e.g.
``--set index_root=s3://bucket/index/ucm``). The arguments are checked against the application's
schema before anything starts, so a typo exits 2 here instead of failing inside a replica. The
resolved config is handed to Ray Serve's own ``serve run`` / ``serve deploy``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from jobs import _common


class ServeConfigError(ValueError):
    """The Serve config or an override is unusable; the message names the key."""


def build_parser(prog: str = "serve") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Run (foreground) or deploy (to a running cluster) the query service "
        "described by a Serve config, after checking the application's arguments.",
    )
    _common.add_common_arguments(p, config_required=True)
    p.add_argument("--app", help="application to override with --set (default: the only one)")
    p.add_argument(
        "--deploy",
        action="store_true",
        help="deploy to a running cluster (serve deploy) instead of running in the foreground",
    )
    p.add_argument("-a", "--address", help="dashboard address for --deploy (Ray's default)")
    return p


def resolve(path: str, overrides: list[str], app_name: str | None) -> dict[str, Any]:
    """The Serve config at ``path`` with ``overrides`` applied to one application's args.

    Raises:
        ServeConfigError: unreadable file, no such application, bad override, or arguments the
            application's schema refuses.
    """
    from duch_core import storage
    from duch_core.config import ConfigError, apply_overrides

    try:
        data = yaml.safe_load(storage.read_bytes(path).decode("utf-8"))
    except FileNotFoundError as e:
        raise ServeConfigError(f"serve config not found: {path}") from e
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ServeConfigError(f"serve config {path} is not valid YAML: {e}") from e
    apps = data.get("applications") if isinstance(data, dict) else None
    if not isinstance(apps, list) or not apps:
        raise ServeConfigError(f"{path}: no `applications:` list")
    if app_name is None:
        if overrides and len(apps) > 1:
            raise ServeConfigError(f"{path} has {len(apps)} applications: name one with --app")
        targets = apps if not overrides else apps[:1]
    else:
        targets = [a for a in apps if a.get("name") == app_name]
        if not targets:
            names = ", ".join(str(a.get("name")) for a in apps)
            raise ServeConfigError(f"{path}: no application named {app_name!r} (have {names})")
    for app in targets:
        try:
            app["args"] = apply_overrides(dict(app.get("args") or {}), overrides)
        except ConfigError as e:
            raise ServeConfigError(str(e)) from e
    for app in apps:
        _check_args(app)
    return data


def _check_args(app: dict[str, Any]) -> None:
    """Validate the args of an application built by ``deploy.app:build_app``."""
    if app.get("import_path") != "deploy.app:build_app":
        return  # someone else's application: Serve checks it
    from pydantic import ValidationError

    from deploy.app import AppArgs

    try:
        AppArgs.model_validate(app.get("args") or {})
    except ValidationError as e:
        where = "; ".join(
            f"args.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()
        )
        raise ServeConfigError(f"application {app.get('name')!r}: {where}") from e


def attach_tokens(data: dict[str, Any], environ: dict[str, str] | None = None) -> list[str]:
    """Copy the token variables each ``deploy.app:build_app`` application names from this
    shell into its ``runtime_env.env_vars``: ``serve deploy`` builds the app on the cluster,
    which does not see this shell. Returns the names copied."""
    from deploy.app import AppArgs

    env = os.environ if environ is None else environ
    copied = []
    for app in data.get("applications") or []:
        if app.get("import_path") != "deploy.app:build_app":
            continue
        args = AppArgs.model_validate(app.get("args") or {})
        for name in (args.auth_token_env, args.admin_token_env):
            if name and env.get(name, "").strip():
                runtime_env = app.setdefault("runtime_env", {}) or {}
                app["runtime_env"] = runtime_env
                runtime_env.setdefault("env_vars", {})[name] = env[name].strip()
                copied.append(name)
    return copied


def serve_command(config_file: str, deploy: bool, address: str | None) -> list[str]:
    """The ``serve run`` / ``serve deploy`` command line for a resolved config file."""
    serve_bin = shutil.which("serve", path=str(Path(sys.executable).parent)) or "serve"
    cmd = [serve_bin, "deploy" if deploy else "run", config_file]
    if address:
        cmd += ["-a", address]
    return cmd


def main(argv: list[str] | None = None, prog: str = "serve") -> int:
    args = build_parser(prog).parse_args(argv)
    _common.setup_logging(args.verbose)
    try:
        data = resolve(args.config, args.set, args.app)
    except ServeConfigError as e:
        print(f"serve: {e}", file=sys.stderr)
        return _common.EXIT_BAD_INPUT
    text = yaml.safe_dump(data, sort_keys=False)
    if args.print_config:
        sys.stdout.write(text)
        return _common.EXIT_OK
    if args.deploy and attach_tokens(data):
        # the config now holds the tokens: hand it to `serve deploy` and remove it (mode 0600)
        with tempfile.NamedTemporaryFile("w", prefix="duch-serve-", suffix=".yaml") as f:
            f.write(yaml.safe_dump(data, sort_keys=False))
            f.flush()
            cmd = serve_command(f.name, True, args.address)
            print(f"serve: serve deploy  (from {args.config}, tokens from this shell)", flush=True)
            return subprocess.run(cmd, check=False).returncode
    with tempfile.NamedTemporaryFile("w", prefix="duch-serve-", suffix=".yaml", delete=False) as f:
        f.write(text)
    cmd = serve_command(f.name, args.deploy, args.address)
    print(f"serve: {' '.join(cmd[1:])}  (from {args.config})", flush=True)
    os.execv(cmd[0], cmd)
    return _common.EXIT_FAILED  # not reached: execv replaces this process


if __name__ == "__main__":
    sys.exit(main())
