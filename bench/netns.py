"""A loopback-only network namespace for benchmarks and tests that start Ray (it binds the external
address otherwise). Needs root; the namespace is deleted on exit."""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import Iterator


@contextlib.contextmanager
def loopback_namespace(label: str = "bench") -> Iterator[str]:
    """Yields the name of a new namespace ``fmtrain-<label>-<random>`` whose loopback is up."""
    name = f"fmtrain-{label}-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)


def run_in(name: str) -> list[str]:
    """The command prefix that runs a command inside the namespace."""
    return ["ip", "netns", "exec", name]
