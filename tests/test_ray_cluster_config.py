"""ray_cluster.yaml: a valid Ray cluster-launcher config with the shape the project needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

CONFIG = Path(__file__).resolve().parents[1] / "ray_cluster.yaml"


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return yaml.safe_load(CONFIG.read_text())


def test_matches_the_cluster_launcher_schema(cluster: dict[str, Any]) -> None:
    import copy

    from ray.autoscaler._private.util import prepare_config, validate_config

    # what `ray up` does before launching anything: merge the AWS defaults, then check the
    # result against Ray's JSON schema (unknown or mistyped fields fail)
    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    assert prepared["available_node_types"]["gpu_worker"]["min_workers"] == 0
    assert prepared["setup_commands"] == cluster["setup_commands"]


def test_aws_cpu_head_and_gpu_workers_from_zero(cluster: dict[str, Any]) -> None:
    assert cluster["provider"]["type"] == "aws" and cluster["provider"]["region"]
    assert cluster["provider"]["cache_stopped_nodes"] is False
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    workers = {k: v for k, v in types.items() if k != cluster["head_node_type"]}
    assert head["node_config"]["InstanceType"].startswith(("m", "c", "r"))  # CPU family
    assert "GPU" not in head.get("resources", {})
    (gpu,) = workers.values()
    assert gpu["node_config"]["InstanceType"].split(".")[0] in {
        "g4dn",
        "g5",
        "g6",
        "p3",
        "p4d",
        "p5",
    }
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert cluster["max_workers"] >= gpu["max_workers"]
    assert cluster["idle_timeout_minutes"] > 0


def test_s3_through_instance_profiles_not_keys(cluster: dict[str, Any]) -> None:
    for node in cluster["available_node_types"].values():
        profile = node["node_config"]["IamInstanceProfile"]
        assert profile.get("Name") or profile.get("Arn")
    text = CONFIG.read_text()
    assert "AWS_ACCESS_KEY_ID" not in text and "AWS_SECRET_ACCESS_KEY" not in text


def test_setup_installs_the_project_with_the_right_torch(cluster: dict[str, Any]) -> None:
    assert cluster["file_mounts"] == {"~/duch": "."}
    assert {".venv", ".git", "out"} <= set(cluster["rsync_exclude"])
    head = " ".join(cluster["head_setup_commands"])
    worker = " ".join(cluster["worker_setup_commands"])
    for cmds in (head, worker):
        assert '"torch==2.13.0"' in cmds and "-e ~/duch" in cmds
        assert cmds.index("torch==2.13.0") < cmds.index("-e ~/duch")  # torch first, pinned
    assert "download.pytorch.org/whl/cpu" in head  # CPU build on the CPU head
    assert "whl/cpu" not in worker  # CUDA build on the GPU workers
    start = " ".join(cluster["head_start_ray_commands"])
    assert "--head" in start and "--autoscaling-config=~/ray_bootstrap_config.yaml" in start
    assert "$RAY_HEAD_IP:6379" in " ".join(cluster["worker_start_ray_commands"])


def test_ray_version_on_the_cluster_is_the_projects() -> None:
    import tomllib

    deps = tomllib.loads((CONFIG.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    import ray

    assert any(d.startswith("ray[") and d.endswith(f"=={ray.__version__}") for d in deps)
