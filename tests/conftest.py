"""Shared test infrastructure: environment, a real S3 server and one local Ray runtime.

The environment is fixed here, before anything imports Ray, boto3 or pyarrow, so every process
started by the tests (Ray workers included) inherits it.
"""

from __future__ import annotations

import os

for _k, _v in {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "AWS_EC2_METADATA_DISABLED": "true",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_DEDUP_LOGS": "0",
}.items():
    os.environ.setdefault(_k, _v)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_session(s3_server):  # noqa: ARG001 - S3 env must exist before workers start
    """One local Ray runtime for the whole session (4 logical CPUs on 2 cores, no dashboard)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            object_store_memory=300 * 1024**2,
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    ray.shutdown()
