"""The health probe answers for the database, not for how busy the database work is: it runs
on a thread of its own, so a default executor full of blocked work does not make it fail."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from edgefleet.controlplane.app.dbprobe import SqlProbe


async def test_the_probe_answers_while_the_default_executor_is_busy(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    busy, release = ThreadPoolExecutor(max_workers=1), threading.Event()
    loop.set_default_executor(busy)
    blocked = loop.run_in_executor(None, release.wait)  # every default-executor thread taken
    probe = SqlProbe(f"sqlite:///{tmp_path / 'db.sqlite'}", timeout=2.0)
    try:
        assert await probe.alive()
    finally:
        release.set()
        await blocked
        probe.close()
        busy.shutdown()


async def test_a_database_that_cannot_be_opened_is_not_alive(tmp_path: Path) -> None:
    probe = SqlProbe(f"sqlite:///{tmp_path / 'missing' / 'db.sqlite'}", timeout=1.0)
    try:
        assert not await probe.alive()
    finally:
        probe.close()
