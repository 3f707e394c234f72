"""Ray clusters: a local one started here by default, or a running cluster named by its address.

Local clusters use the settings measured on our machines (design.md): token auth off and the
cluster kept on 127.0.0.1, a bounded object store, no dashboard. A real cluster comes from
`address` ("auto", "host:6379" or "ray://host:10001") or, when that is empty, from RAY_ADDRESS;
connecting sets none of the local settings (a cluster's token auth stands).
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which keeps a local cluster on the loopback, also stops
`ray start --address` adding a node: a multi-node cluster's nodes run without it
(tests/test_cluster_ray.py).
If this process is already connected to Ray (a test fixture, a notebook), that connection is used
and left open.
"""
from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from deco.data.errors import ExpectedError

log = logging.getLogger(__name__)

LOCAL_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
# Where storage and weights are, passed on to the job's workers (a real cluster's workers do not
# share this shell). Never credentials: those stay in each node's environment or instance role,
# since a job's runtime_env is visible to everyone on the cluster.
FORWARDED_ENV = ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION",
                 "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


class ClusterError(ExpectedError, ConnectionError):
    """Ray lost work it could not redo (a node or worker died more often than tasks are retried):
    said in one line; the same command resumes, since every finished partition is kept."""


def lost_work(err: BaseException, desc: str) -> ClusterError:
    """`err`, a Ray system error (not a task's own exception), as one line for the user."""
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return ClusterError(f"the {desc} pass lost a Ray task ({type(err).__name__}: {first[:200]}); "
                        "rerun the same command to resume: finished partitions are kept")


@dataclass(kw_only=True)
class RayConfig:
    address: str = ""  # empty: RAY_ADDRESS if set, else start a local cluster
    num_cpus: int | None = None  # local cluster only; None = all cores
    object_store_mb: int = 768   # local cluster only
    include_dashboard: bool = False
    log_to_driver: bool = False  # worker logs to this terminal (noisy with many workers)

    def validate(self) -> None:
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"ray.num_cpus must be >= 1, got {self.num_cpus}")
        if self.object_store_mb < 78:  # Ray's own minimum is 75 MiB
            raise ValueError(f"ray.object_store_mb must be at least 78, got {self.object_store_mb}")


@dataclass(frozen=True)
class ClusterInfo:
    address: str      # GCS address another driver can pass as ray.address
    num_cpus: float
    started_here: bool


def resolved_address(cfg: RayConfig) -> str:
    return cfg.address or os.environ.get("RAY_ADDRESS", "")


def check_reachable(cfg: RayConfig, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not minutes, when a named cluster does not answer (ray.init retries long)."""
    address = resolved_address(cfg)
    if not address or address == "auto" or address.startswith(("local", "anyscale://")):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConnectionError(f"Ray address {address!r} is not host:port, ray://host:port or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ConnectionError(f"cannot reach the Ray cluster at {address}: {err}; check --ray-address / RAY_ADDRESS") from None


def ray_is_connected() -> bool:
    import ray

    return ray.is_initialized()


@contextmanager
def ray_cluster(cfg: RayConfig) -> Iterator[ClusterInfo]:
    """Connect to (or start) Ray for the duration of the block; shut down only what was started here."""
    import ray

    if ray.is_initialized():
        yield ClusterInfo(ray.get_runtime_context().gcs_address, ray.cluster_resources().get("CPU", 0), False)
        return
    address = resolved_address(cfg)
    if not address:  # a named cluster's own settings stand: its auth mode (token), its node IPs
        for key, value in LOCAL_ENV.items():
            os.environ.setdefault(key, value)
    common = {"logging_level": logging.WARNING, "log_to_driver": cfg.log_to_driver,
              "runtime_env": {"env_vars": {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}}}
    try:
        if address:
            context = ray.init(address=address, **common)
        else:
            context = ray.init(num_cpus=cfg.num_cpus, object_store_memory=cfg.object_store_mb * 2**20,
                               include_dashboard=cfg.include_dashboard, **common)
    except ConnectionError as err:
        raise ConnectionError(f"cannot connect to the Ray cluster at {address!r}: {err}") from None
    address_info = getattr(context, "address_info", None) or {}  # a ray:// client context has none
    info = ClusterInfo(address_info.get("gcs_address", address), ray.cluster_resources().get("CPU", 0), True)
    log.info("ray %s at %s with %s CPUs", "connected" if address else "started", info.address, info.num_cpus)
    try:
        yield info
    finally:
        ray.shutdown()
