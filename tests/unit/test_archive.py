"""Folder artifacts: deterministic packing on the control plane, hostile-proof extraction on the device."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from edgefleet.agent.update.archive import (
    AbsolutePath,
    ArchiveError,
    ArchiveTooLarge,
    DestinationExists,
    DeviceMember,
    DuplicateMember,
    FifoMember,
    HardlinkMember,
    PathEscape,
    SymlinkMember,
    TooManyMembers,
    extract_archive,
)
from edgefleet.controlplane.build.archive_pack import UnsupportedMember, pack_folder

LIMIT = 1 << 20


def make_folder(root: Path) -> Path:
    folder = root / "model"
    (folder / "sub" / "deeper").mkdir(parents=True)
    (folder / "empty").mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(os.urandom(200_000))
    (folder / "sub" / "tokenizer.json").write_text("{}")
    (folder / "sub" / "deeper" / "nul.bin").write_bytes(b"\0" * 513)
    (folder / "zero-length").write_bytes(b"")
    os.chmod(folder / "config.json", 0o600)
    return folder


def tree(folder: Path) -> dict[str, bytes | None]:
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
    }


def test_pack_extract_round_trip(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    archive = pack_folder(folder, tmp_path / "a" / "model.q4.mlx.tar")
    files = extract_archive(archive, tmp_path / "out", max_total_bytes=LIMIT)
    assert tree(tmp_path / "out") == tree(folder)
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in files) == sorted(
        name for name, data in tree(folder).items() if data is not None
    )
    assert (tmp_path / "out" / "config.json").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_pack_is_deterministic(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    first = pack_folder(folder, tmp_path / "one.tar").read_bytes()
    os.utime(folder / "config.json", (1_000_000, 1_000_000))
    os.chmod(folder / "model.safetensors", 0o755)
    second = pack_folder(folder, tmp_path / "two.tar").read_bytes()
    assert first == second
    with tarfile.open(tmp_path / "one.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == sorted(m.name for m in members)
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "", "")}
    assert {m.mode for m in members if m.isdir()} == {0o755}
    assert {m.mode for m in members if m.isfile()} == {0o644}


def test_pack_refuses_symlinks_and_hardlinks(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    (folder / "link").symlink_to("config.json")
    with pytest.raises(UnsupportedMember) as symlink:
        pack_folder(folder, tmp_path / "x.tar")
    assert symlink.value.member == "link"
    (folder / "link").unlink()
    os.link(folder / "config.json", folder / "sub" / "alias.json")
    with pytest.raises(UnsupportedMember) as hardlink:
        pack_folder(folder, tmp_path / "x.tar")
    assert hardlink.value.member in {"config.json", "sub/alias.json"}
    (folder / "sub" / "alias.json").unlink()
    os.mkfifo(folder / "pipe")
    with pytest.raises(UnsupportedMember, match="fifo"):
        pack_folder(folder, tmp_path / "x.tar")
    assert not (tmp_path / "x.tar").exists()


# --- hostile archives, crafted member by member ------------------------------------------

Member = tuple[tarfile.TarInfo, bytes]


def regular(name: str, data: bytes = b"x") -> Member:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def special(name: str, kind: bytes, linkname: str = "") -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, b""


def craft(path: Path, members: list[Member]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


HOSTILE: dict[str, tuple[list[Member], type[ArchiveError], str]] = {
    "absolute": ([regular("ok"), regular("/etc/evil")], AbsolutePath, "/etc/evil"),
    "dotdot": ([regular("a/../../evil")], PathEscape, "a/../../evil"),
    "symlink": ([special("link", tarfile.SYMTYPE, "/etc/passwd"), regular("z")], SymlinkMember, "link"),
    "hardlink": ([regular("a"), special("b", tarfile.LNKTYPE, "a")], HardlinkMember, "b"),
    "chardev": ([special("null", tarfile.CHRTYPE)], DeviceMember, "null"),
    "blockdev": ([special("sda", tarfile.BLKTYPE)], DeviceMember, "sda"),
    "fifo": ([special("pipe", tarfile.FIFOTYPE)], FifoMember, "pipe"),
    "duplicate": ([regular("a", b"1"), regular("./a", b"2")], DuplicateMember, "./a"),
    "duplicate-dir": (
        [special("d", tarfile.DIRTYPE), regular("d/x"), special("d/", tarfile.DIRTYPE)],
        DuplicateMember,
        "d",
    ),
    "oversize": ([regular("a", b"1" * 600), regular("b", b"2" * 600)], ArchiveTooLarge, "b"),
    "too-many": ([regular(f"f{i}") for i in range(6)], TooManyMembers, "f5"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_member_is_refused(tmp_path: Path, case: str) -> None:
    members, error, offender = HOSTILE[case]
    archive = craft(tmp_path / "evil.tar", members)
    dest = tmp_path / "state" / "models" / "abc"
    with pytest.raises(error) as raised:
        extract_archive(archive, dest, max_total_bytes=1000, max_members=5)
    assert raised.value.member == offender
    assert offender in str(raised.value)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []  # no staging directory left behind
    assert not (tmp_path / "etc").exists() and not (tmp_path / "state" / "evil").exists()


def test_size_limit_is_inclusive(tmp_path: Path) -> None:
    archive = craft(tmp_path / "big.tar", [regular("a", b"1" * 600), regular("b", b"2" * 400)])
    assert len(extract_archive(archive, tmp_path / "fits", max_total_bytes=1000)) == 2
    with pytest.raises(ArchiveTooLarge):
        extract_archive(archive, tmp_path / "out", max_total_bytes=999)
    assert not (tmp_path / "out").exists()


def test_existing_destination_is_not_overwritten(tmp_path: Path) -> None:
    archive = craft(tmp_path / "ok.tar", [regular("a")])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("mine")
    with pytest.raises(DestinationExists):
        extract_archive(archive, tmp_path / "out", max_total_bytes=LIMIT)
    assert (tmp_path / "out" / "keep").read_text() == "mine"


@pytest.mark.parametrize(
    "corrupt",
    [lambda data: data[:700], lambda data: b"not a tar at all" * 64],
    ids=["truncated", "garbage"],
)
def test_corrupt_archive_is_an_archive_error(tmp_path: Path, corrupt: Callable[[bytes], bytes]) -> None:
    good = craft(tmp_path / "ok.tar", [regular("a", b"1" * 2000)])
    bad = tmp_path / "bad.tar"
    bad.write_bytes(corrupt(good.read_bytes()))
    with pytest.raises(ArchiveError):
        extract_archive(bad, tmp_path / "out", max_total_bytes=LIMIT)
    assert not (tmp_path / "out").exists()


def test_model_folder_extracts_once_and_garbage_collection_removes_it(tmp_path: Path) -> None:
    from edgefleet.agent.update.archive import model_folder
    from edgefleet.agent.update.artifacts import ArtifactStore

    store = ArtifactStore(tmp_path / "artifacts", tmp_path / "downloads", tmp_path / "models")
    store.artifact_dir.mkdir()
    source = make_folder(tmp_path / "src")
    archive = pack_folder(source, store.path("a" * 64))
    folder = model_folder(archive, tmp_path / "models" / ("a" * 64), max_total_bytes=archive.stat().st_size)
    assert tree(folder) == tree(source)
    (folder / "marker").write_bytes(b"kept")  # a second call reuses, never re-extracts
    assert model_folder(archive, folder, max_total_bytes=archive.stat().st_size) == folder
    assert (folder / "marker").exists()
    (tmp_path / "models" / ".x.extracting").mkdir()  # left by a crash mid-extraction

    assert store.collect_garbage({"a" * 64}) == [".x.extracting"]
    assert sorted(store.collect_garbage(set())) == ["a" * 64, "a" * 64]
    assert not folder.exists() and not archive.exists()
