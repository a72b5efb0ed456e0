"""A loopback-only network namespace for benchmarks that start Ray (it binds the external address
otherwise). Needs root; the namespace is deleted on exit."""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import Iterator


@contextlib.contextmanager
def loopback_namespace() -> Iterator[list[str]]:
    """Yields the command prefix that runs a command inside the namespace."""
    name = f"fmtrain-bench-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield ["ip", "netns", "exec", name]
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)
