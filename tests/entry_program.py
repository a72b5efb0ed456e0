"""A user's own distributed program, as a launcher's entry point runs it (tests/test_entrypoint.py).

    python -m entry_program OUT_DIR [fail-on-rank R]

Each rank joins the process group the launcher's environment describes, all-reduces its rank + 1,
and writes what it saw to ``OUT_DIR/rank<R>.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if argv[1:3] == ["fail-on-rank", str(rank)]:
        raise RuntimeError(f"the user's program failed on rank {rank}")
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    seen = {"rank": rank, "world": world, "sum": total.item(), "local_rank": int(os.environ["LOCAL_RANK"])}
    (out / f"rank{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
