"""Joining or starting Ray, and what it can place. Tune and Serve both wait forever, warning now
and then, for work that asks for more CPUs or GPUs than the cluster has. A fixed local instance
never grows, so cxrtune says so at once instead. A cluster that may autoscale is not checked: one
named by ``RAY_ADDRESS``, or a cluster-launcher node (``ray up`` leaves ``~/ray_bootstrap_config.yaml``)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import CxrtuneError


def init_ray(num_cpus: int | None = None, dashboard: bool = False) -> None:
    """Join the cluster that ``RAY_ADDRESS`` or ``ray start`` names, else start a local instance
    (with ``num_cpus``, default all). ``dashboard`` keeps Ray's dashboard on (``cxrtune serve``:
    ``serve status`` and ``serve deploy`` talk to it)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=dashboard, log_to_driver=True)


def may_autoscale() -> bool:
    return bool(os.environ.get("RAY_ADDRESS")) or Path("~/ray_bootstrap_config.yaml").expanduser().exists()


def check_fits(what: str, cpus: float, gpus: float, hint: str) -> None:
    """Raise if one unit of ``what`` (a trial, a replica) needs more than the running instance has."""
    import ray

    if may_autoscale():
        return
    have = ray.cluster_resources()
    for resource, asked in (("GPU", gpus), ("CPU", cpus)):
        if asked > have.get(resource, 0):
            raise CxrtuneError(f"{what} asks for {asked:g} {resource}s but this Ray instance has "
                               f"{have.get(resource, 0):g}: it could never start. {hint}")
