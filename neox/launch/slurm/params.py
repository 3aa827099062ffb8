"""What the job asks Slurm for: the layout and time checks against the requested allocation, the
job's name, and the submitit SlurmExecutor parameters (sbatch flags). No Slurm command runs here."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict

from neox.config.layout import fit
from neox.config.plan import RunPlan
from neox.config.schema import SlurmCluster
from neox.errors import LaunchError

# Below this much time between start and the time-limit signal, a job may never save a step.
MIN_USEFUL_S = 600


def say(msg: str) -> None:
    print(f"[neox slurm] {msg}", file=sys.stderr, flush=True)


def tasks_per_node(cluster: SlurmCluster) -> int:
    """Ranks per node: tasks_per_node, else one per GPU, else 1 (CPU)."""
    if cluster.tasks_per_node:
        return int(cluster.tasks_per_node)
    return int(cluster.gpus_per_node) or 1


def check(plan: RunPlan) -> int:
    """Validate the layout against the job's allocation (the layout rule, neox.config.layout; the
    plan's resources are the job's, neox.launch.resources.detect) and the time limit; return tasks
    per node. Warns about short limits."""
    cfg = plan.config
    cl = cfg.cluster
    fit(plan.tp, plan.pp, plan.dp, plan.resources, tp_across_nodes=cfg.parallelism.tp_across_nodes_is_slow)
    usable_s = int(cl.time_min) * 60 - int(cl.signal_delay_s)
    if usable_s <= 0:
        raise LaunchError(
            f"cluster.signal_delay_s={cl.signal_delay_s} is not below the time limit of {cl.time_min} min: "
            "the stop signal would come at the start; raise cluster.time_min"
        )
    if usable_s < MIN_USEFUL_S:
        first_save = min(int(cfg.train.save_every or 0) or 10**9, int(cfg.train.steps))
        say(
            f"warning: cluster.time_min={cl.time_min} leaves {usable_s} s before the stop signal "
            f"(signal_delay_s={cl.signal_delay_s}); startup plus the steps to the first checkpoint "
            f"(step {first_save}) may take longer, and a job that never saves restarts from scratch on "
            "every requeue: raise cluster.time_min"
        )
    return tasks_per_node(cl)


def run_name(plan: RunPlan, run_dir: Path) -> str:
    """The Slurm job name: the run's name (a sweep adds its index to it), else the run dir's name."""
    return str(plan.config.run_name or run_dir.name)


def sbatch_extra(cluster: SlurmCluster) -> Dict[str, Any]:
    """`--requeue` plus cluster.sbatch_extra: true is a bare flag, false or null leaves a flag out."""
    extra: Dict[str, Any] = {"requeue": True}
    for key, value in dict(cluster.sbatch_extra or {}).items():
        if value is False or value is None:
            extra.pop(str(key), None)
        else:
            extra[str(key)] = value
    return extra


def executor_parameters(cl: SlurmCluster, tpn: int, job_name: str) -> Dict[str, Any]:
    """The submitit SlurmExecutor parameters (sbatch flags) for this cluster section."""
    cpu = int(cl.gpus_per_node) == 0
    setup = ["export OMP_NUM_THREADS=1" if cpu else "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}"]
    setup += [str(line) for line in (cl.setup or [])]
    params: Dict[str, Any] = dict(
        job_name=job_name,
        nodes=int(cl.nodes),
        ntasks_per_node=tpn,
        cpus_per_task=int(cl.cpus_per_task),
        time=int(cl.time_min),
        signal_delay_s=int(cl.signal_delay_s),
        setup=setup,
        additional_parameters=sbatch_extra(cl),
        # One failing rank ends the step at once, instead of the others waiting in a collective.
        srun_args=["--kill-on-bad-exit=1"],
    )
    if not cpu:
        params["gpus_per_node"] = int(cl.gpus_per_node)
    optional = {
        "partition": cl.partition, "account": cl.account, "qos": cl.qos,
        "constraint": cl.constraint, "exclude": cl.exclude,
    }
    params.update({k: str(v) for k, v in optional.items() if v})
    if cl.mem_gb:
        params["mem"] = f"{int(cl.mem_gb)}GB"
    return params
