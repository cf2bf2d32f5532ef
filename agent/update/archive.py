"""Safe extraction of folder artifacts (MLX and ONNX variants ship as one uncompressed tar).

A tar is a small program that writes files: left to itself it will follow ``..``, write
through symlinks, create devices and fill the disk. This module treats every member as
hostile and refuses (never skips) anything but plain files and directories that stay
inside the destination, raising a subclass of :class:`ArchiveError` that names the member.
Refusal is fatal, not transient: the bytes were signed, so retrying gets the same archive (a
disk that fills up while writing is no refusal: DiskBusy, retried).

How the updater uses it (``model_folder``):

1. The artifact was downloaded and verified against the signed target info first; an
   unverified archive is never opened, however careful this module is.
2. It is extracted into the state dir under its content address,
   ``state_dir / "models" / sha256``, with the artifact's signed length as the byte budget
   (a tar is never smaller than its contents). Because extraction is atomic, an existing
   destination is a complete earlier extraction and is reused.
3. Only then is the runtime loaded from the folder and smoke-tested.

Extraction goes to a temporary sibling of ``dest``; files are fsynced, then the directory is
renamed into place with ``os.replace``, so a power cut leaves either no ``dest`` or a
complete one (plus, at worst, a stale ``.<name>.*.extracting`` sibling to clean up).
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from edgefleet.agent.update.errors import TRANSIENT_ERRNOS, AgentError, DiskBusy, Refusal
from edgefleet.protos.fleet.fsio import fsync_dir

FILE_MODE = 0o644
DIR_MODE = 0o755
COPY_CHUNK = 1 << 20
DEFAULT_MAX_MEMBERS = 10_000
ALLOWED_FILE_TYPES = frozenset({tarfile.REGTYPE, tarfile.AREGTYPE})


class ArchiveError(AgentError, Refusal):
    """Base of extraction refusals; ``member`` names the offending entry ("" for the archive)."""

    def __init__(self, member: str, reason: str) -> None:
        super().__init__(f"{member!r}: {reason}" if member else reason)
        self.member = member


class UnsafePath(ArchiveError):
    """A member's name would write outside the destination."""


class AbsolutePath(UnsafePath):
    """A member's name is absolute."""


class PathEscape(UnsafePath):
    """A member's name has a ``..`` component or resolves outside the destination."""


class SymlinkMember(ArchiveError):
    """Symbolic links are refused: they could redirect later writes or reads."""


class HardlinkMember(ArchiveError):
    """Hard links are refused: they could alias files outside the destination."""


class DeviceMember(ArchiveError):
    """Character and block devices are refused."""


class FifoMember(ArchiveError):
    """FIFOs are refused: opening one blocks the reader."""


class UnsupportedMemberType(ArchiveError):
    """Any other non-regular, non-directory member (sparse, contiguous, vendor types)."""


class DuplicateMember(ArchiveError):
    """Two members with the same normalized path: the later one would silently win."""


class ArchiveTooLarge(ArchiveError):
    """The files' total size is over ``max_total_bytes``."""


class TooManyMembers(ArchiveError):
    """The archive has more than ``max_members`` entries."""


class CorruptArchive(ArchiveError):
    """Not a readable uncompressed tar, truncated, or a member cannot be written."""


class DestinationExists(ArchiveError):
    """The destination exists already; extraction never overwrites."""


def _relative_name(member: tarfile.TarInfo) -> PurePosixPath:
    """The member's path relative to the destination; refuses absolute and ``..`` names."""
    name = member.name
    if name.startswith("/") or PurePosixPath(name).is_absolute():
        raise AbsolutePath(name, "absolute path")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise PathEscape(name, "'..' path component")
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def _check_type(member: tarfile.TarInfo) -> None:
    name = member.name
    if member.issym():
        raise SymlinkMember(name, f"symlink to {member.linkname!r}")
    if member.islnk():
        raise HardlinkMember(name, f"hard link to {member.linkname!r}")
    if member.ischr() or member.isblk():
        raise DeviceMember(name, "device file")
    if member.isfifo():
        raise FifoMember(name, "fifo")
    if not member.isdir() and member.type not in ALLOWED_FILE_TYPES:
        raise UnsupportedMemberType(name, f"unsupported member type {member.type!r}")


def _inside(root: Path, target: Path) -> bool:
    return os.path.commonpath([os.path.realpath(root), os.path.realpath(target)]) == os.path.realpath(root)


def _write_file(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path, budget: int) -> int:
    """Copies the member's bytes to target (new file, fsynced); returns the bytes written."""
    source = tar.extractfile(member)
    if source is None:
        raise CorruptArchive(member.name, "no data for a regular file")
    written = 0
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    with os.fdopen(fd, "wb") as out, source:
        # Counted as read, not as declared: stop at the budget whatever the header said.
        while chunk := source.read(min(COPY_CHUNK, budget - written + 1)):
            written += len(chunk)
            if written > budget:
                raise ArchiveTooLarge(member.name, "archive expands past max_total_bytes")
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    if written != member.size:
        raise CorruptArchive(member.name, f"declared {member.size} bytes, read {written}")
    return written


def _extract_into(
    tar: tarfile.TarFile, root: Path, *, max_total_bytes: int, max_members: int
) -> list[PurePosixPath]:
    """Checks and writes every member under root; returns the regular files' relative paths."""
    seen: set[PurePosixPath] = set()
    files: list[PurePosixPath] = []
    directories = {root}
    total = 0
    count = 0
    for member in tar:
        count += 1
        if count > max_members:
            raise TooManyMembers(member.name, f"more than {max_members} members")
        relative = _relative_name(member)
        _check_type(member)
        if relative == PurePosixPath("."):
            if member.isdir():
                continue  # "./" the archive root itself
            raise PathEscape(member.name, "a file named like the destination itself")
        if relative in seen:
            raise DuplicateMember(member.name, f"duplicate of an earlier {relative}")
        seen.add(relative)
        target = root / relative
        if not _inside(root, target):
            raise PathEscape(member.name, "resolves outside the destination")
        try:
            tarfile.data_filter(member, str(root))  # second line of defence, same verdicts
        except tarfile.FilterError as exc:
            raise UnsafePath(member.name, f"refused by tarfile's data filter: {exc}") from exc
        try:
            if member.isdir():
                target.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
                directories.add(target)
                continue
            if member.size > max_total_bytes - total:
                raise ArchiveTooLarge(member.name, f"total size over {max_total_bytes} bytes")
            target.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            directories.add(target.parent)
            total += _write_file(tar, member, target, max_total_bytes - total)
        except OSError as exc:
            if exc.errno in TRANSIENT_ERRNOS:  # a full disk is no fault of the archive: retried
                raise DiskBusy(f"cannot write {member.name!r}: {exc.strerror or exc}", exc.errno) from exc
            raise CorruptArchive(
                member.name, f"cannot write: {exc}"
            ) from exc  # e.g. a file member later used as a directory
        files.append(relative)
    for directory in directories:
        os.chmod(directory, DIR_MODE)
        fsync_dir(directory)
    return files


def extract_archive(
    archive: Path, dest: Path, *, max_total_bytes: int, max_members: int = DEFAULT_MAX_MEMBERS
) -> list[Path]:
    """Extracts an uncompressed tar into the new directory dest, atomically.

    Returns the extracted regular files' paths under dest, in archive order. Raises an
    :class:`ArchiveError` subclass naming the offending member for anything unsafe; dest is
    then absent and nothing is left behind. See the module docstring for when to call it.
    """
    if max_total_bytes < 0 or max_members < 1:
        raise ValueError("max_total_bytes must be >= 0 and max_members >= 1")
    if dest.exists() or dest.is_symlink():
        raise DestinationExists("", f"{dest} exists already")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".extracting", dir=dest.parent))
    try:
        try:
            with tarfile.open(archive, mode="r:", encoding="utf-8") as tar:
                files = _extract_into(tar, staging, max_total_bytes=max_total_bytes, max_members=max_members)
        except tarfile.TarError as exc:
            raise CorruptArchive("", f"{archive.name} is not a readable tar: {exc}") from exc
        os.replace(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(dest.parent)
    return [dest / relative for relative in files]


def model_folder(archive: Path, dest: Path, *, max_total_bytes: int) -> Path:
    """The extracted folder of a verified folder artifact, extracting it on first use only."""
    if not dest.is_dir():
        extract_archive(archive, dest, max_total_bytes=max_total_bytes)
    return dest
