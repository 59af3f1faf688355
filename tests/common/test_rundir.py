"""Run directories (launcher/common/rundir.py): never shared by two launches, reused only when merely planned."""

from __future__ import annotations

import threading
from pathlib import Path

from launcher.common.rundir import CLAIM_FILE, PLAN_FILE, claim_run_dir, release_run_dir


def test_racing_launches_get_distinct_directories(tmp_path: Path) -> None:
    # A planned-only directory is free for the next launch: eight launches racing for it and for new names.
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / PLAN_FILE).write_text("{}")
    start = threading.Barrier(8)
    claimed: list[Path] = []

    def launch() -> None:
        start.wait()
        claimed.append(claim_run_dir(tmp_path, "demo"))

    threads = [threading.Thread(target=launch) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(claimed)) == 8, sorted(p.name for p in claimed)
    assert {p.name for p in claimed} == {"demo", *(f"demo-{i}" for i in range(2, 9))}
    assert all((p / CLAIM_FILE).is_file() for p in claimed)


def test_plan_does_not_own_and_a_released_claim_is_free_again(tmp_path: Path) -> None:
    planned = claim_run_dir(tmp_path, "demo", own=False)
    (planned / PLAN_FILE).write_text("{}")
    assert claim_run_dir(tmp_path, "demo", own=False) == planned  # `launch plan` twice: the same directory
    launched = claim_run_dir(tmp_path, "demo")
    assert launched == planned
    assert claim_run_dir(tmp_path, "demo") == tmp_path / "demo-2"  # owned now: the next launch goes elsewhere
    release_run_dir(launched)
    assert sorted(p.name for p in launched.iterdir()) == [PLAN_FILE]
    release_run_dir(tmp_path / "demo-2")
    assert not (tmp_path / "demo-2").exists()
    assert claim_run_dir(tmp_path, "demo") == planned
