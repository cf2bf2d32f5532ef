"""Packs a model folder (MLX / Hugging Face layout) into one deterministic tar artifact.

Bundles sign and ship single files, so a folder variant travels as an uncompressed POSIX
(pax) tar. The archive's bytes depend only on the folder's relative paths and file
contents: members are sorted, and mtime, uid/gid, owner names and modes are normalised
(0644 files, 0755 directories). Packing the same folder twice therefore gives the same
sha256, so a rebuilt release does not look like a new artifact.

Only regular files and directories are packed. Symlinks, hard links (two paths to one
inode inside the folder), devices, FIFOs and sockets are refused with
:class:`UnsupportedMember` rather than silently followed or skipped: the device-side
extractor (``edgefleet.agent.update.archive``) would refuse them anyway, and following a link could pull
files from outside the folder into a signed release. Safetensors are already compressed
as far as they go, and an uncompressed tar lets the device stream-extract without a
decompressor in the trust path.
"""

from __future__ import annotations

import os
import stat
import tarfile
import tempfile
from pathlib import Path

from edgefleet.controlplane.build.bundles import BundleError
from edgefleet.protos.fleet.fsio import fsync_dir

FILE_MODE = 0o644
DIR_MODE = 0o755
COPY_CHUNK = 1 << 20


class PackError(BundleError):
    """The folder cannot be packed into an archive artifact."""


class UnsupportedMember(PackError):
    """The folder holds something other than regular files and directories."""

    def __init__(self, member: str, kind: str) -> None:
        super().__init__(f"cannot pack {member!r}: {kind} (only regular files and directories)")
        self.member = member
        self.kind = kind


class FolderChanged(PackError):
    """A file changed size while it was being packed."""

    def __init__(self, member: str) -> None:
        super().__init__(f"{member!r} changed while it was being packed")
        self.member = member


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device file"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"


def _walk(folder: Path) -> list[tuple[str, Path, os.stat_result]]:
    """Every member below folder as (archive name, path, lstat), sorted by archive name."""
    found: list[tuple[str, Path, os.stat_result]] = []
    inodes: dict[tuple[int, int], str] = {}
    pending = [folder]
    while pending:
        directory = pending.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                path = Path(entry.path)
                name = path.relative_to(folder).as_posix()
                info = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(info.st_mode):
                    pending.append(path)
                elif stat.S_ISREG(info.st_mode):
                    key = (info.st_dev, info.st_ino)
                    if key in inodes:
                        raise UnsupportedMember(name, f"hard link to {inodes[key]!r}")
                    inodes[key] = name
                else:
                    raise UnsupportedMember(name, _kind(info.st_mode))
                found.append((name, path, info))
    found.sort(key=lambda item: item[0])
    return found


def _tarinfo(name: str, info: os.stat_result) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.mtime = 0
    member.uid = member.gid = 0
    member.uname = member.gname = ""
    if stat.S_ISDIR(info.st_mode):
        member.type = tarfile.DIRTYPE
        member.mode = DIR_MODE
        member.size = 0
    else:
        member.type = tarfile.REGTYPE
        member.mode = FILE_MODE
        member.size = info.st_size
    return member


def pack_folder(folder: Path, dest: Path) -> Path:
    """Writes folder's tree to dest as a deterministic tar, atomically; returns dest.

    Raises UnsupportedMember for anything but regular files and directories, PackError when
    folder is not a directory, FolderChanged when a file changes size during packing.
    """
    if folder.is_symlink() or not folder.is_dir():
        raise PackError(f"{folder} is not a directory")
    members = _walk(folder)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8") as tar:
                for name, path, info in members:
                    member = _tarinfo(name, info)
                    if member.isdir():
                        tar.addfile(member)
                        continue
                    with path.open("rb") as source:
                        try:
                            tar.addfile(member, source)
                        except OSError as exc:  # tarfile's "unexpected end of data": it shrank
                            raise FolderChanged(name) from exc
                        if source.read(1):
                            raise FolderChanged(name)
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp_name, FILE_MODE)
        os.replace(tmp_name, dest)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)
    return dest
