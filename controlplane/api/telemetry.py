"""OperatorService's telemetry RPCs: a page of stored rows, and a tail of rows as they are
stored. Reads only; the queries are ``store.telemetry_reads``'."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from functools import partial

from sqlmodel import Session

from edgefleet.controlplane.api import pages
from edgefleet.controlplane.api.auth import Context, authorize
from edgefleet.controlplane.api.operator_parts import OperatorParts, timestamp
from edgefleet.controlplane.api.refusals import InvalidRequest
from edgefleet.controlplane.fleet.rbac import Role
from edgefleet.controlplane.store.models import TelemetryRecord
from edgefleet.controlplane.store.telemetry_reads import (
    TAIL_BATCH_ROWS,
    query_telemetry,
    tail_after,
    tail_start,
)
from edgefleet.protos.fleet.topics import TopicKind
from edgefleet.protos.fleet.v1 import operator_pb2

MAX_TELEMETRY_ROWS = 10_000  # TailTelemetry's backlog
TAIL_POLL_SECONDS = 0.5
MAX_PAYLOAD_CHARS = 256 * 1024  # one telemetry row's JSON as a reply carries it
TELEMETRY = pages.PageSpec("QueryTelemetry", default_size=100, max_size=1000)


def telemetry_row(r: TelemetryRecord) -> operator_pb2.TelemetryRow:
    """One stored record as a row; a payload over MAX_PAYLOAD_CHARS of JSON is left out and
    flagged, so whatever was stored, every row fits in a reply."""
    payload = json.dumps(r.payload, sort_keys=True)
    row = operator_pb2.TelemetryRow(
        device_id=r.device_id, kind=r.kind, seq=r.seq, time=timestamp(r.time), payload_json=payload
    )
    if len(payload) > MAX_PAYLOAD_CHARS:
        row.payload_json, row.payload_truncated, row.payload_bytes = "{}", True, len(payload.encode())
    return row


class TelemetryRpcs(OperatorParts):
    async def QueryTelemetry(
        self, request: operator_pb2.QueryTelemetryRequest, context: Context
    ) -> operator_pb2.QueryTelemetryResponse:
        """A page of stored rows, newest first; ``limit`` is the page size of older callers."""
        await authorize(self.db, context, Role.VIEWER)
        size = TELEMETRY.size(request.page_size or request.limit)
        filters = {"device_id": request.device_id, "kind": request.kind}
        before = pages.int_key(pages.decode_token(TELEMETRY, request.page_token, filters))

        def query(session: Session) -> pages.Page[operator_pb2.TelemetryRow]:
            rows = query_telemetry(
                session,
                device_id=request.device_id or None,
                kind=request.kind or None,
                limit=size + 1,
                before=before,
            )
            return pages.cut(
                TELEMETRY, rows, size=size, encode=telemetry_row, key=lambda r: r.id or 0, filters=filters
            )

        page = await self.db.run(query)
        return operator_pb2.QueryTelemetryResponse(rows=page.items, next_page_token=page.next_page_token)

    async def TailTelemetry(
        self, request: operator_pb2.TailTelemetryRequest, context: Context
    ) -> AsyncIterator[operator_pb2.TelemetryRow]:
        """Sends the ``backlog`` newest matching rows, then every matching row stored after the
        call began, in id order, until the caller cancels.

        Why polling the table (every TAIL_POLL_SECONDS, one indexed range query on the primary
        key) rather than a hook in the ingestor: rows are written by the ingestor's own thread
        and, with several control-plane replicas behind a shared subscription, by other
        processes; the database is the one place that sees them all, and SQLite has no
        LISTEN/NOTIFY. Ids grow with every insert, so "id greater than the last sent" neither
        repeats nor skips a row written by one ingestor; a row another replica commits after a
        higher id was already sent can be missed (``fleetctl telemetry query`` is the record).
        """
        await authorize(self.db, context, Role.VIEWER)
        kinds = {k.value for k in TopicKind}
        if request.kind and request.kind not in kinds:
            raise InvalidRequest(f"kind must be one of {', '.join(sorted(kinds))}")
        device_id, kind = request.device_id or None, request.kind or None
        backlog = min(request.backlog, MAX_TELEMETRY_ROWS)
        last_id, rows = await self.db.run(
            lambda s: tail_start(s, device_id=device_id, kind=kind, backlog=backlog)
        )
        for row in rows:
            yield telemetry_row(row)
        while True:
            rows = await self.db.run(partial(tail_after, after=last_id, device_id=device_id, kind=kind))
            for row in rows:
                yield telemetry_row(row)
            if rows:
                last_id = rows[-1].id or last_id
            if len(rows) < TAIL_BATCH_ROWS:  # a full batch means more are waiting: no pause
                await asyncio.sleep(TAIL_POLL_SECONDS)
