"""Artifact bytes from HTTP(S) mirrors of the control plane's blob directory.

A mirror is a base URL; an artifact is ``<base>/sha256/<aa>/<sha256>``, the layout of the
control plane's blob directory (edgefleet.controlplane.store.blob_directory), so a mirror can be
a plain copy of that directory behind any web server, a CDN or a caching proxy in front of it.
Bytes are asked for with an HTTP Range request. A mirror is untrusted like every source: what it
serves is hashed before use, and this module only refuses what it can tell is wrong from the
response itself (a length other than the signed one, a range other than the one asked for).

Failures come in two kinds: :class:`MirrorFailed` (down, an HTTP error, a stall, a cut-off
body: try the next source from the byte reached) and :class:`MirrorRefused` (it serves the
wrong bytes: skip it for the rest of the download).
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

import httpx

from edgefleet.agent.update.rate_limit import TokenBucket
from edgefleet.protos.fleet.release import ArtifactInfo

CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")

CONNECT_TIMEOUT_S = 10.0
STALL_TIMEOUT_S = 30.0


class MirrorFailed(Exception):
    """A mirror could not serve the bytes (down, an HTTP error, no bytes for the stall timeout,
    a body cut short); the download goes on from the next source at the byte it reached."""

    def __init__(self, mirror: str, reason: str) -> None:
        super().__init__(f"mirror {mirror}: {reason}")
        self.mirror, self.reason = mirror, reason


class MirrorRefused(MirrorFailed):
    """A mirror served bytes that are not the signed artifact's; it is not asked again during
    this download."""


@dataclass(slots=True)
class MirrorSettings:
    """The mirrors and download rate in force (from the signed device config), shared by every
    download of an artifact store; ``configure`` applies a new device config to the next download.
    The timeouts are the agent's own: ``stall_timeout_s`` is how long a mirror may send nothing."""

    mirrors: tuple[str, ...] = ()
    limiter: TokenBucket = field(default_factory=lambda: TokenBucket(0))
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    stall_timeout_s: float = STALL_TIMEOUT_S

    def configure(self, mirrors: tuple[str, ...], max_download_rate: int) -> None:
        self.mirrors = tuple(mirrors)
        if self.limiter.rate != max_download_rate:
            self.limiter = TokenBucket(max_download_rate)

    def client(self) -> httpx.AsyncClient:
        """An HTTP client for one download: no redirects (a mirror serves its bytes or fails),
        no proxies or credentials from the environment, no content decoding."""
        timeout = httpx.Timeout(
            connect=self.connect_timeout_s,
            read=self.stall_timeout_s,
            write=self.connect_timeout_s,
            pool=self.connect_timeout_s,
        )
        return httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False)


def blob_url(mirror: str, sha256: str) -> str:
    """Where ``mirror`` holds the artifact: the blob directory's layout under its base URL."""
    return f"{mirror.rstrip('/')}/sha256/{sha256[:2]}/{sha256}"


def _check_range(mirror: str, response: httpx.Response, info: ArtifactInfo, offset: int, end: int) -> None:
    """Refuses a response that is not the bytes asked for of an artifact of the signed length."""
    if response.status_code == httpx.codes.PARTIAL_CONTENT:
        match = CONTENT_RANGE.fullmatch(response.headers.get("content-range", "").strip())
        if match is None:
            raise MirrorFailed(mirror, f"a 206 without a usable Content-Range for {info.sha256[:12]}")
        first, last, total = int(match[1]), int(match[2]), match[3]
        if total != "*" and int(total) != info.length:
            raise MirrorRefused(
                mirror, f"serves artifact {info.sha256[:12]} with {total} bytes, signed: {info.length}"
            )
        if first != offset or last >= end:
            raise MirrorRefused(mirror, f"served bytes {first}-{last} when asked for {offset}-{end - 1}")
        return
    if response.status_code == httpx.codes.OK:
        if offset != 0:
            raise MirrorFailed(mirror, "does not serve byte ranges")
        length = response.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) != info.length:
            raise MirrorRefused(
                mirror, f"serves artifact {info.sha256[:12]} with {length} bytes, signed: {info.length}"
            )
        return
    raise MirrorFailed(mirror, f"HTTP {response.status_code} for {info.sha256[:12]}")


async def mirror_range(
    client: httpx.AsyncClient,
    mirror: str,
    info: ArtifactInfo,
    offset: int,
    end: int,
    limiter: TokenBucket,
) -> AsyncGenerator[bytes, None]:
    """The bytes ``[offset, end)`` of ``info`` from ``mirror``, in the pieces they arrive in,
    each let through ``limiter`` first; never a byte past ``end``. Raises MirrorFailed when the
    body ends early or the mirror stalls, MirrorRefused when the response is for other bytes."""
    position = offset
    headers = {"Range": f"bytes={offset}-{end - 1}", "Accept-Encoding": "identity"}
    try:
        async with client.stream("GET", blob_url(mirror, info.sha256), headers=headers) as response:
            if response.headers.get("content-encoding", "identity").lower() != "identity":
                # Asked for identity: a compressed body's ranges and lengths are not the file's.
                raise MirrorFailed(mirror, f"sent a {response.headers['content-encoding']} body")
            _check_range(mirror, response, info, offset, end)
            pieces = response.aiter_bytes()
            async for raw in pieces:
                data = raw[: end - position]
                if data:
                    await limiter.take(len(data))
                    position += len(data)
                    yield data
                if position >= end:
                    break
    except httpx.TimeoutException as exc:
        raise MirrorFailed(mirror, f"stalled at byte {position} ({type(exc).__name__})") from exc
    except httpx.HTTPError as exc:
        raise MirrorFailed(mirror, f"failed at byte {position}: {type(exc).__name__}: {exc}") from exc
    if position < end:
        raise MirrorFailed(mirror, f"body ended at byte {position} of {end}")
