"""Scheduler variables -> the torch distributed environment. The only module that reads ``SLURM_*``.

    os.environ.update(torch_env_from_slurm(os.environ))   # in each Slurm task, before run(cfg)

Rank, world size and local rank come from Slurm's task layout. The rendezvous is the first node of
the allocation on a port derived from the job id, so every task computes the same address without
talking to the others, and two jobs sharing a node do not collide.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

# 20000-32767: above Ray's worker ports (10002-19999) and below Linux's ephemeral range (32768-60999),
# where a port taken by any outgoing connection on the node made the rendezvous fail (EADDRINUSE).
PORT_BASE, PORT_SPAN = 20000, 12768


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list -> host names: ``gpu[01-03,07],cpu1`` -> gpu01 gpu02 gpu03 gpu07 cpu1."""
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            if "-" in part:
                start, end = part.split("-")
                hosts += [f"{prefix}{i:0{len(start)}d}" for i in range(int(start), int(end) + 1)]
            else:
                hosts.append(prefix + part)
    return hosts


def rendezvous_port(job_id: str) -> int:
    """A port every task of a job agrees on: from the job id (array tasks have their own ids)."""
    return PORT_BASE + int(re.sub(r"\D", "", job_id) or 0) % PORT_SPAN


def torch_env_from_slurm(environ: Mapping[str, str]) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT of this Slurm task."""
    nodes = expand_nodelist(environ["SLURM_JOB_NODELIST"])
    world = int(environ["SLURM_NTASKS"])
    local_world = world // max(1, int(environ.get("SLURM_NNODES", len(nodes))))
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": environ["SLURM_LOCALID"],
        "LOCAL_WORLD_SIZE": str(local_world),
        "GROUP_RANK": environ.get("SLURM_NODEID", "0"),
        "MASTER_ADDR": nodes[0],
        "MASTER_PORT": str(rendezvous_port(environ["SLURM_JOB_ID"])),
    }


def slurm_job(environ: Mapping[str, str]) -> dict[str, str | int]:
    """This task's job: its id (``ARRAY_TASK`` form for arrays), restarts so far, node rank and count."""
    array = environ.get("SLURM_ARRAY_JOB_ID")
    return {
        "job_id": environ["SLURM_JOB_ID"],
        "display_id": f"{array}_{environ['SLURM_ARRAY_TASK_ID']}" if array else environ["SLURM_JOB_ID"],
        "restarts": int(environ.get("SLURM_RESTART_COUNT", "0")),
        "node_rank": int(environ.get("SLURM_NODEID", "0")),
        "nodes": int(environ.get("SLURM_NNODES", "1")),
    }
