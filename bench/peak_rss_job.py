"""`launcher.train.job` for one rank, then this process's peak RSS written to RUN_DIR/peak_rss.rank<R>.json.

    python -m torch.distributed.run --nproc-per-node=2 bench/peak_rss_job.py RUN_DIR

Used by bench/qlora_loading.py. Peak RSS is `getrusage(RUSAGE_SELF).ru_maxrss` (KiB on Linux).
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


if __name__ == "__main__":
    from launcher.train.job import main

    code = main()
    rank = int(os.environ.get("RANK", "0"))
    out = Path(sys.argv[1]) / f"peak_rss.rank{rank}.json"
    out.write_text(json.dumps({"rank": rank, "peak_rss": peak_rss(), "exit": code}))
    raise SystemExit(code)
