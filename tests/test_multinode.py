"""The pipeline on a real 2-node Ray cluster (a head and a second `ray start --address` node)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import _common

REPO = Path(__file__).resolve().parents[1]


def _driver(cluster, code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``code`` as a separate driver process attached to ``cluster``."""
    env = dict(cluster.env, RAY_ADDRESS=cluster.gcs_address)
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_two_node_fixture_forms_a_cluster_and_tasks_reach_both_nodes(two_node_cluster):
    code = (
        "import json, ray\n"
        "ray.init(address='auto', logging_level='ERROR', log_to_driver=False)\n"
        "@ray.remote(num_cpus=0)\n"
        "def where():\n"
        "    return ray.get_runtime_context().get_node_id()\n"
        "a = ray.get(where.options(resources={'head': 0.01}).remote())\n"
        "b = ray.get(where.options(resources={'node2': 0.01}).remote())\n"
        "print(json.dumps({'nodes': sum(n['Alive'] for n in ray.nodes()), 'a': a, 'b': b}))\n"
    )
    out = _driver(two_node_cluster, code)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["nodes"] == 2
    assert got["a"] != got["b"]


def test_location_check_refuses_node_local_paths_on_two_nodes():
    with pytest.raises(_common.LocationError) as err:
        _common.check_shared_locations(
            {"run.storage_path": "/data/ray_results", "output": "s3://b/bundle", "x": None},
            nodes=2,
        )
    msg = str(err.value)
    assert "run.storage_path=/data/ray_results" in msg and "s3://" in msg
    assert "output" not in msg.split("node-local:")[1]
    # one node: local paths are fine
    _common.check_shared_locations({"run.storage_path": "/data/ray_results"}, nodes=1)


def test_location_check_counts_the_live_cluster(two_node_cluster):
    code = (
        "import ray\n"
        "from jobs import _common\n"
        "ray.init(address='auto', logging_level='ERROR', log_to_driver=False)\n"
        "try:\n"
        "    _common.check_shared_locations({'features.cache_root': 'out/features'})\n"
        "except _common.LocationError as e:\n"
        "    print('REFUSED', e)\n"
    )
    out = _driver(two_node_cluster, code)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "REFUSED" in out.stdout and "features.cache_root=out/features" in out.stdout
