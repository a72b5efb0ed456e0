"""Where the CPU of a command goes, by kind of process: the part of the suite's time that the JUnit
tables of ``tests/times.py`` cannot see (Ray's and Slurm's daemons, the workers and ranks they start).

    .venv/bin/python tests/processes.py -- make test      # or any command: its processes, by kind

Every second it reads each process's CPU time (``/proc/PID/stat``) and command line; at the end it prints
the CPU of every process that started while the command ran, summed by kind. A process that lives less
than a second, and the last second of any process, are missed: the sums are a little low.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import defaultdict

# The first pattern a command line matches names its kind.
KINDS = [
    ("Ray workers (actors and tasks)", r"default_worker|setup_worker"),
    ("Ray daemons (GCS, raylet, agents, monitors)", r"gcs_server|raylet|log_monitor|dashboard|runtime_env|monitor\.py|ray start"),
    ("Slurm ranks (submitit tasks)", r"submitit\.core\._submit|fmtrain\.worker"),
    ("C++ compilers", r"cc1plus|cc1 |g\+\+|ninja|/as |collect2|/ld "),
    ("tune trials' local launchers and their ranks", r"-m launch\.local"),
    ("watchdog sidecars", r"fmtrain\.watchdog"),
    ("fmtrain commands run as processes (drivers, status, export)", r"bin/fmtrain|launch\.ray|launch\.cli"),
    ("test processes: pytest workers, forked commands and ranks", r"pytest|exec\(eval|spawn_main"),
    ("Slurm daemons and commands", r"slurm|munge|srun|sbatch|squeue|sacct|scontrol|sinfo|scancel"),
]
TICKS = os.sysconf("SC_CLK_TCK")


def processes() -> dict[str, float]:
    """CPU seconds of every process now, keyed by pid and start time (a pid may be reused)."""
    cpu = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        cpu[f"{pid}:{fields[19]}"] = (int(fields[11]) + int(fields[12])) / TICKS
    return cpu


def command_line(key: str) -> str:
    try:
        with open(f"/proc/{key.split(':')[0]}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kind_of(command: str) -> str:
    return next((kind for kind, pattern in KINDS if re.search(pattern, command)), "other")


def main(argv: list[str]) -> int:
    command = argv[argv.index("--") + 1 :] if "--" in argv else argv
    if not command:
        print(__doc__, file=sys.stderr)
        return 2
    before = set(processes())
    cpu: dict[str, float] = {}
    kinds: dict[str, str] = {}
    started = time.monotonic()
    job = subprocess.Popen(command)
    while True:
        for key, seconds in processes().items():
            if key not in before:
                cpu[key] = max(cpu.get(key, 0.0), seconds)
                kinds.setdefault(key, kind_of(command_line(key)))
        if job.poll() is not None:
            break
        time.sleep(1)
    wall = time.monotonic() - started
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for key, seconds in cpu.items():
        totals[kinds[key]][0] += 1
        totals[kinds[key]][1] += seconds
    print(f"\n{' '.join(command)}: exit code {job.returncode}, {wall:,.0f} s on {os.cpu_count()} cores\n")
    print("| processes | count | CPU s |\n|---|---:|---:|")
    for kind, (count, seconds) in sorted(totals.items(), key=lambda item: -item[1][1]):
        print(f"| {kind} | {count:.0f} | {seconds:,.0f} |")
    print(f"| all | {len(cpu)} | {sum(cpu.values()):,.0f} |")
    return job.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
