"""One mirror's range response (edgefleet.agent.update.mirrors) over httpx's mock transport:
what is taken, what is a failure (try the next source) and what is a refusal (wrong bytes)."""

from __future__ import annotations

import hashlib

import httpx
import pytest

from edgefleet.agent.update.mirrors import MirrorFailed, MirrorRefused, MirrorSettings, blob_url, mirror_range
from edgefleet.agent.update.rate_limit import TokenBucket
from edgefleet.protos.fleet.release import ArtifactInfo

PAYLOAD = bytes(range(256)) * 40
INFO = ArtifactInfo("model.gguf", len(PAYLOAD), hashlib.sha256(PAYLOAD).hexdigest())
MIRROR = "http://mirror.test/blobs/"


def client(handler: httpx.MockTransport) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=handler)


def ranged(
    status: int = 206, total: int | str = len(PAYLOAD), shift: int = 0, extra: bytes = b""
) -> httpx.MockTransport:
    """A mirror answering Range requests, with the given status, total and start shift."""

    def handle(request: httpx.Request) -> httpx.Response:
        assert request.url.path == f"/blobs/sha256/{INFO.sha256[:2]}/{INFO.sha256}"
        first, last = (int(x) for x in request.headers["range"].removeprefix("bytes=").split("-"))
        first += shift
        body = PAYLOAD[first : last + 1] + extra
        headers = {"content-range": f"bytes {first}-{last}/{total}"} if status == 206 else {}
        return httpx.Response(status, content=body if status != 200 else PAYLOAD, headers=headers)

    return httpx.MockTransport(handle)


async def collect(transport: httpx.MockTransport, offset: int, end: int) -> bytes:
    async with client(transport) as http:
        pieces = [p async for p in mirror_range(http, MIRROR, INFO, offset, end, TokenBucket(0))]
    return b"".join(pieces)


def test_the_url_is_the_blob_directory_layout() -> None:
    assert blob_url("http://m/blobs/", "ab" + "0" * 62) == "http://m/blobs/sha256/ab/ab" + "0" * 62
    assert blob_url("http://m", "cd" + "1" * 62) == "http://m/sha256/cd/cd" + "1" * 62


async def test_a_range_is_served_and_never_overshoots() -> None:
    assert await collect(ranged(), 100, 2000) == PAYLOAD[100:2000]
    assert await collect(ranged(extra=b"more"), 100, 2000) == PAYLOAD[100:2000]
    assert await collect(ranged(status=200), 0, 500) == PAYLOAD[:500]  # no ranges, from byte 0: fine


@pytest.mark.parametrize(
    ("transport", "offset", "refused"),
    [
        (ranged(total=len(PAYLOAD) + 1), 0, True),  # another artifact length
        (ranged(shift=1), 10, True),  # other bytes than asked for
        (ranged(status=200), 10, False),  # ignores Range: cannot resume there
        (ranged(status=404), 0, False),
        (ranged(status=503), 0, False),
        (
            httpx.MockTransport(
                lambda r: httpx.Response(200, content=b"x", headers={"content-encoding": "gzip"})
            ),
            0,
            False,
        ),
    ],
)
async def test_failures_and_refusals(transport: httpx.MockTransport, offset: int, refused: bool) -> None:
    with pytest.raises(MirrorFailed) as raised:
        await collect(transport, offset, 1000)
    assert isinstance(raised.value, MirrorRefused) is refused
    assert MIRROR in str(raised.value)


async def test_a_body_cut_short_is_a_failure_at_the_byte_reached() -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            206, content=PAYLOAD[:300], headers={"content-range": f"bytes 0-999/{len(PAYLOAD)}"}
        )

    with pytest.raises(MirrorFailed, match="ended at byte 300 of 1000") as raised:
        await collect(httpx.MockTransport(handle), 0, 1000)
    assert not isinstance(raised.value, MirrorRefused)


async def test_a_connection_error_is_a_failure() -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(MirrorFailed, match="ConnectError"):
        await collect(httpx.MockTransport(handle), 0, 1000)


def test_settings_replace_the_bucket_only_when_the_rate_changes() -> None:
    settings = MirrorSettings()
    bucket = settings.limiter
    settings.configure(("http://a",), 0)
    assert settings.limiter is bucket and settings.mirrors == ("http://a",)
    settings.configure((), 1 << 20)
    assert settings.limiter.rate == 1 << 20 and settings.mirrors == ()
