"""Many hosts: the same program on every process, joined by one `jax.distributed.initialize`.

Each of `coordinator` (host:port of process 0), `num_processes` and `process_id` comes from
`config.distributed`, else from the environment (JAXLM_COORDINATOR, JAXLM_NUM_PROCESSES,
JAXLM_PROCESS_ID, as `tools/launch_local.py` sets them). With none of them given, JAX's own
cluster detection (Cloud TPU pods, SLURM, Open MPI, Kubernetes) decides, but only when it finds
more than one process; otherwise the run is one process and nothing is initialized.

`initialize` must run before anything touches a JAX device: the backends read the distributed
client when they are created.
"""

import logging
import os
from collections.abc import Callable, Mapping

import jax
from jax._src import clusters  # JAX's cluster detection has no public API

log = logging.getLogger("jaxlm")

ENV_VARS = {"coordinator": "JAXLM_COORDINATOR", "num_processes": "JAXLM_NUM_PROCESSES",
            "process_id": "JAXLM_PROCESS_ID"}
UNSET = {"coordinator": "", "num_processes": 0, "process_id": -1}  # the config defaults


def initialize(config=None) -> None:
    """Joins this process to its run when settings (or a detected cluster) say it has company.

    Args:
      config: a run config (its `distributed` section is read), or None to use only the
        environment (tools that restore a run should not reuse the training run's coordinator).
    """
    if jax.distributed.is_initialized():
        return
    kwargs = resolve(config.distributed if config is not None else None, os.environ)
    if kwargs is None:
        return
    # Cross-process collectives on CPU devices need an implementation; gloo works over TCP.
    # This only affects the CPU backend (e.g. tests and laptops), never GPU or TPU devices.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    log.info("process %d of %d joined the run", jax.process_index(), jax.process_count())


def resolve(distributed: Mapping | None, environ: Mapping[str, str],
            detect: Callable[[], int] | None = None) -> dict | None:
    """The keyword arguments for `jax.distributed.initialize`, or None for a single process.

    Args:
      distributed: `config.distributed` (or None); '' / 0 / -1 mean "not set here".
      environ: the environment variables, read for the keys the config leaves unset.
      detect: returns the process count of the cluster JAX detects (0: none); default
        `detected_process_count`.

    Returns:
      None (one process, nothing to initialize), {} (let JAX's auto-detection fill everything),
      or coordinator_address, num_processes and process_id.

    Raises:
      ValueError: some settings are given but not all, or they do not make sense; the message
        names the missing or bad key and where it came from.
    """
    values, sources = {}, {}
    for key, env_var in ENV_VARS.items():
        value = (distributed or {}).get(key, UNSET[key])
        source = f"config.distributed.{key}"
        if value == UNSET[key]:
            value, source = _from_env(key, environ), env_var
        if value != UNSET[key]:
            values[key], sources[key] = value, source
    if not values:
        return {} if (detect or detected_process_count)() > 1 else None
    missing = [k for k in ENV_VARS if k not in values]
    if missing:
        given = ", ".join(f"{k}={values[k]!r} (from {sources[k]})" for k in values)
        needed = "; ".join(f"{k}: set config.distributed.{k} or {ENV_VARS[k]}" for k in missing)
        raise ValueError(f"incomplete distributed settings: {given} given, but missing {needed}")
    if values["num_processes"] < 1 or not 0 <= values["process_id"] < values["num_processes"]:
        raise ValueError(f"process_id={values['process_id']} (from {sources['process_id']}) is not in "
                         f"[0, num_processes={values['num_processes']}) (from {sources['num_processes']})")
    return dict(coordinator_address=values["coordinator"], num_processes=values["num_processes"],
                process_id=values["process_id"],
                cluster_detection_method="deactivate")  # explicit settings are the whole truth


def _from_env(key: str, environ: Mapping[str, str]):
    text = environ.get(ENV_VARS[key], "").strip()
    if not text:
        return UNSET[key]
    if key == "coordinator":
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{ENV_VARS[key]}={text!r} is not an integer") from None


def detected_process_count() -> int:
    """Processes in the cluster JAX's `initialize()` would detect by itself (0: no cluster).

    Mirrors `ClusterEnv.auto_detect_unset_distributed_params`: the first non-opt-in cluster
    environment that is present. A SLURM job with one task counts 1 and stays single-process.
    """
    env = next((env for env in clusters.ClusterEnv._cluster_types
                if not env.opt_in_only_method and env.is_env_present()), None)
    return env.get_process_count() if env is not None else 0
