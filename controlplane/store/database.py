"""Runs blocking store work off the event loop, one transaction per call."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.engine import Engine
from sqlmodel import Session

T = TypeVar("T")


class Database:
    """Gives async servicers a transaction in a worker thread, so SQL never blocks grpc.aio."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def run_sync(self, work: Callable[[Session], T]) -> T:
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            return work(session)

    async def run(self, work: Callable[[Session], T]) -> T:
        return await asyncio.to_thread(self.run_sync, work)
