"""Code Ray runs in every worker process of a cluster ptxray starts (kept tiny: it is imported by
each worker at start-up, before any task).

Ray Train's placement-group cleaner (and any State API call made without an address) finds "the"
cluster by scanning this machine's processes; with a second Ray instance running here (another
user's, a test's, a second `ptxray cluster up`) that scan fails with "Found multiple active Ray
instances", the cleaner's thread dies, and an ASHA-stopped trial's placement group (its CPUs) is
never released, so the next trial waits forever. Pinning the worker's RAY_ADDRESS to the cluster
it is connected to makes those calls find their own cluster. The worker is already connected, so
nothing else reads the variable there.
"""

from __future__ import annotations

import os

# What `ray.init(runtime_env=...)` names (a module path: a callable would be pickled into the GCS).
WORKER_SETUP_HOOK = "ptxray.ray_hooks.pin_ray_address"


def pin_ray_address() -> None:
    """Set RAY_ADDRESS to this worker's own cluster (its GCS address) unless already set."""
    import ray

    if not os.environ.get("RAY_ADDRESS"):
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def with_worker_setup_hook(runtime_env: dict | None) -> dict:
    """`runtime_env` (None = {}) with `pin_ray_address` as its worker setup hook (a caller's own hook wins)."""
    env = dict(runtime_env or {})
    env.setdefault("worker_process_setup_hook", WORKER_SETUP_HOOK)
    return env


__all__ = ["WORKER_SETUP_HOOK", "pin_ray_address", "with_worker_setup_hook"]
