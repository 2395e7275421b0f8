"""The copy engine against real files: round trips, cp semantics, hostile trees, races."""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from rune.files import safepath
from rune.files.entries import CopyLimits
from rune.files.pump import TreeSink, stream_tree
from rune.files.reader import TreeReader
from rune.files.safepath import PathRefused, SafeRoot
from rune.files.worker import FileWorker
from rune.files.writer import CopyAborted, TreeWriter

RESOLVERS = [pytest.param(True, id="openat2"), pytest.param(False, id="walk")]


def copy(src_root: Path, sources: list[str], dst_root: Path, dest: str, *,
         recursive: bool = True, follow: bool = False, preserve: bool = False,
         limits: CopyLimits | None = None, openat2: bool | None = None, pack: bool = False):
    """Reads `sources` inside src_root and writes them to `dest` inside dst_root."""

    async def run():
        rroot = SafeRoot.at(str(src_root), openat2)
        wroot = SafeRoot.at(str(dst_root), openat2)
        worker = FileWorker()
        try:
            writer = TreeWriter(wroot, dest, multiple=len(sources) > 1, limits=limits,
                                preserve=preserve)
            sink = TreeSink(worker, writer)
            errors: list[str] = []

            async def emit(kind, payload):
                if kind == "error":
                    errors.append(f"{payload['path']}: {payload['message']}")
                else:
                    await sink.apply(kind, payload)

            sent, _ = await stream_tree(worker, TreeReader(rroot, recursive, follow),
                                        sources, emit, pack=pack)
            got = await sink.finish()
            return sent, got, errors + [str(e) for e in writer.errors]
        finally:
            worker.close()
            rroot.close()
            wroot.close()

    return asyncio.run(run())


def feed(dst_root: Path, dest: str, entries: list[tuple[str, object]], multiple=False,
         limits=None, openat2=None):
    """Writes a hand-made (hostile) stream of entries; returns the writer's errors."""
    root = SafeRoot.at(str(dst_root), openat2)
    writer = TreeWriter(root, dest, multiple=multiple, limits=limits)
    try:
        for kind, payload in entries:
            getattr(writer, kind)(payload)
        writer.finish()
    finally:
        writer.close()
        root.close()
    return [str(e) for e in writer.errors]


def file_entries(path: str, data: bytes, mode: int = 0o644) -> list[tuple[str, object]]:
    return [("header", {"path": path, "kind": "file", "size": len(data), "mode": mode,
                        "mtime": 0.0, "target": ""}),
            ("data", data),
            ("end", {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()})]


def dir_entry(path: str) -> tuple[str, object]:
    return ("header", {"path": path, "kind": "dir", "size": 0, "mode": 0o755, "mtime": 0.0})


def link_entry(path: str, target: str) -> tuple[str, object]:
    return ("header", {"path": path, "kind": "symlink", "size": 0, "mode": 0o777,
                       "mtime": 0.0, "target": target})


def snapshot(top: Path) -> dict[str, tuple]:
    """Everything cp promises to keep: kind, content, mode bits, link targets."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            rel = str(p.relative_to(top))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), p.read_bytes())
    return out


def make_tree(top: Path) -> None:
    (top / "a" / "b" / "c").mkdir(parents=True)
    (top / "empty").write_bytes(b"")
    (top / "a" / "data.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (top / "a" / "b" / "c" / "deep.txt").write_text("deep\n")
    (top / "ünïcødé ✓.txt").write_text("名前\n")
    (top / "script.sh").write_text("#!/bin/sh\n")
    (top / "script.sh").chmod(0o750)
    (top / "a" / "private").write_text("x")
    (top / "a" / "private").chmod(0o600)
    (top / "a" / "b").chmod(0o711)
    (top / "emptydir").mkdir()
    os.symlink("a/b/c/deep.txt", top / "link-to-deep")
    os.symlink("../empty", top / "a" / "up-link")
    os.symlink("dangling-inside", top / "dangling")


@pytest.mark.parametrize("openat2", RESOLVERS)
def test_tree_round_trip_is_identical(tmp_path: Path, openat2: bool) -> None:
    """Nested dirs, empty files, symlinks, unicode names and mode bits come back the same."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    make_tree(src / "tree")
    sent, got, errors = copy(src, ["tree"], dst, "/", openat2=openat2)
    assert errors == []
    assert snapshot(dst / "tree") == snapshot(src / "tree")
    assert sent.digest() == got.digest()
    assert not list(dst.rglob("*.rune-*.tmp"))


def test_preserve_keeps_times_and_default_does_not(tmp_path: Path) -> None:
    """-p keeps modification times; without it files get the time of the copy."""
    (tmp_path / "f").write_text("x")
    os.utime(tmp_path / "f", (1_000_000, 1_000_000))
    (tmp_path / "out").mkdir()
    copy(tmp_path, ["f"], tmp_path / "out", "kept", preserve=True)
    copy(tmp_path, ["f"], tmp_path / "out", "fresh")
    assert (tmp_path / "out" / "kept").stat().st_mtime == 1_000_000
    assert (tmp_path / "out" / "fresh").stat().st_mtime > 1_000_000


def test_setuid_and_setgid_are_stripped(tmp_path: Path) -> None:
    """A setuid file arrives without its setuid/setgid bits, keeping the rest."""
    (tmp_path / "suid").write_text("x")
    (tmp_path / "suid").chmod(0o6755)
    (tmp_path / "out").mkdir()
    copy(tmp_path, ["suid"], tmp_path / "out", ".")
    assert stat.S_IMODE((tmp_path / "out" / "suid").stat().st_mode) == 0o755
    errors = feed(tmp_path / "out", ".", file_entries("peer-suid", b"y", 0o4777))
    assert errors == []
    assert stat.S_IMODE((tmp_path / "out" / "peer-suid").stat().st_mode) == 0o777


def test_cp_semantics_into_dir_as_name_and_atomic_replace(tmp_path: Path) -> None:
    """Into an existing dir the source goes inside it; else DEST is the new name; an
    existing file is replaced by rename (a new inode), never rewritten in place."""
    (tmp_path / "conf.yaml").write_text("new\n")
    out = tmp_path / "out"
    out.mkdir()
    copy(tmp_path, ["conf.yaml"], tmp_path, "out")
    assert (out / "conf.yaml").read_text() == "new\n"
    (out / "renamed.yaml").write_text("old\n")
    before = (out / "renamed.yaml").stat().st_ino
    copy(tmp_path, ["conf.yaml"], tmp_path, "out/renamed.yaml")
    assert (out / "renamed.yaml").read_text() == "new\n"
    assert (out / "renamed.yaml").stat().st_ino != before
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("x")
    copy(tmp_path, ["d"], tmp_path, "out/newdir")
    assert (out / "newdir" / "x").read_text() == "x"


def test_directory_needs_recursive_and_many_sources_need_a_directory(tmp_path: Path) -> None:
    """Without -r a directory is reported and skipped; several sources need a dir DEST."""
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_text("f")
    (tmp_path / "out").mkdir()
    _, _, errors = copy(tmp_path, ["d", "f"], tmp_path / "out", ".", recursive=False)
    assert errors == ["d: is a directory (not copied without -r)"]
    assert (tmp_path / "out" / "f").exists() and not (tmp_path / "out" / "d").exists()
    with pytest.raises(FileNotFoundError):
        copy(tmp_path, ["d", "f"], tmp_path / "out", "missing")


@pytest.mark.parametrize("openat2", RESOLVERS)
@pytest.mark.parametrize("path", ["/etc/evil", "../evil", "a/../../evil", "a/\0b", "a//b",
                                  "./evil"])
def test_hostile_paths_refused_and_nothing_written_outside(tmp_path: Path, path: str,
                                                           openat2: bool) -> None:
    """Absolute, '..', NUL and empty components in a peer's entry are refused."""
    root = tmp_path / "root"
    root.mkdir()
    errors = feed(root, ".", [dir_entry("a"), *file_entries(path, b"pwned")],
                  openat2=openat2)
    assert len(errors) == 1
    assert not (tmp_path / "evil").exists()
    assert [p.name for p in root.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("openat2", RESOLVERS)
@pytest.mark.parametrize("target", ["/", "../..", "..", "/etc", "../../etc"])
def test_symlink_out_of_tree_refused_and_never_written_through(tmp_path: Path, target: str,
                                                               openat2: bool) -> None:
    """A tree whose symlink points to / or ../.. gets no link, and a later file 'through'
    it lands nowhere."""
    root = tmp_path / "root"
    root.mkdir()
    entries = [dir_entry("t"), link_entry("t/evil", target),
               *file_entries("t/evil/pwned", b"x")]
    errors = feed(root, ".", entries, openat2=openat2)
    assert any("outside the copied tree" in e or "absolute" in e for e in errors)
    assert not (root / "t" / "evil").exists() and not (root / "t" / "evil").is_symlink()
    assert not list(tmp_path.rglob("pwned"))


def test_symlinks_are_created_last(tmp_path: Path) -> None:
    """A link inside the tree, sent before a file of the same directory path, cannot
    redirect that file: links exist only after every file is written."""
    root = tmp_path / "root"
    (root / "t" / "real").mkdir(parents=True)
    entries = [dir_entry("t"), link_entry("t/sub", "real"), dir_entry("t/sub"),
               *file_entries("t/sub/f", b"x")]
    errors = feed(root, ".", entries)
    assert (root / "t" / "sub").is_dir() and not (root / "t" / "sub").is_symlink()
    assert (root / "t" / "sub" / "f").read_bytes() == b"x"
    assert not (root / "t" / "real" / "f").exists()
    assert any("directory" in e for e in errors)  # the link could not replace the dir


@pytest.mark.parametrize("kind", ["chardev", "blockdev", "fifo", "socket", "hardlink"])
def test_special_kinds_refused(tmp_path: Path, kind: str) -> None:
    """Device nodes, FIFOs and sockets in a peer's listing are refused; nothing made."""
    errors = feed(tmp_path, ".", [("header", {"path": "dev", "kind": kind, "size": 0,
                                              "mode": 0o666})])
    assert errors and "not copied" in errors[0]
    assert not (tmp_path / "dev").exists()


def test_reader_reports_fifo_and_device_without_opening_them(tmp_path: Path) -> None:
    """A FIFO in a source tree is skipped with an error (opening it would block)."""
    src = tmp_path / "src" / "t"
    src.mkdir(parents=True)
    os.mkfifo(src / "pipe")
    os.mknod(src / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    (src / "ok").write_text("ok")
    (tmp_path / "out").mkdir()
    _, _, errors = copy(tmp_path / "src", ["t"], tmp_path / "out", ".")
    assert sorted(errors) == ["t/null: character device not copied", "t/pipe: FIFO not copied"]
    assert (tmp_path / "out" / "t" / "ok").read_text() == "ok"


def test_caps_on_files_bytes_and_depth(tmp_path: Path) -> None:
    """max_files and max_bytes abort the copy; a too-deep path is refused."""
    limits = CopyLimits(max_files=2, max_bytes=10, max_depth=3)
    with pytest.raises(CopyAborted, match="more than 2 files"):
        feed(tmp_path, ".", [dir_entry("a"), dir_entry("a/b"), dir_entry("a/b/c")],
             limits=limits)
    with pytest.raises(CopyAborted, match="cap of 10 bytes"):
        feed(tmp_path, ".", file_entries("big", b"x" * 11), limits=limits)
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "big").exists()
    errors = feed(tmp_path, ".", [dir_entry("d"), *file_entries("d/e/f/g", b"x")],
                  limits=CopyLimits(max_depth=3))
    assert "deeper than 3" in errors[0]


def test_damaged_data_leaves_nothing(tmp_path: Path) -> None:
    """A digest or size mismatch fails the file and removes its temporary file; the old
    file at the destination stays as it was."""
    (tmp_path / "f").write_text("old")
    entries = file_entries("f", b"new data")
    entries[1] = ("data", b"NEW data")
    errors = feed(tmp_path, ".", entries)
    assert "SHA-256 mismatch" in errors[0]
    entries = file_entries("f", b"new data")
    entries[2] = ("end", {"size": 3, "sha256": entries[2][1]["sha256"]})
    assert "size mismatch" in feed(tmp_path, ".", entries)[0]
    too_much = file_entries("f", b"abc")
    too_much.insert(2, ("data", b"more"))
    assert "more data than its declared size" in feed(tmp_path, ".", too_much)[0]
    assert (tmp_path / "f").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_interrupted_file_leaves_no_partial_file(tmp_path: Path) -> None:
    """A stream that stops mid-file (closed) leaves no temporary or partial file."""
    root = SafeRoot.at(str(tmp_path))
    writer = TreeWriter(root, ".")
    writer.header({"path": "big", "kind": "file", "size": 100, "mode": 0o644})
    writer.data(b"x" * 50)
    assert len(list(tmp_path.iterdir())) == 1  # the temporary file
    writer.close()
    root.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("openat2", RESOLVERS)
def test_destination_symlink_refused(tmp_path: Path, openat2: bool) -> None:
    """A destination that is a symlink (to /etc, outside) is refused, not written through."""
    (tmp_path / "outside").mkdir()
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(str(tmp_path / "outside"), root / "dest")
    (tmp_path / "f").write_text("x")
    with pytest.raises(PathRefused, match="symlink"):
        copy(tmp_path, ["f"], root, "dest", openat2=openat2)
    assert list((tmp_path / "outside").iterdir()) == []


@pytest.mark.parametrize("openat2", RESOLVERS)
def test_paths_resolve_inside_the_root(tmp_path: Path, openat2: bool) -> None:
    """In a container root, /etc/x and a link to /etc mean the container's /etc."""
    root = tmp_path / "container"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hosts").write_text("inside\n")
    os.symlink("/etc", root / "etc-link")
    os.symlink("../../../../etc/hosts", root / "up")
    r = SafeRoot.at(str(root), openat2)
    try:
        for path in ("/etc/hosts", "etc-link/hosts", "/etc-link/../etc/hosts", "up"):
            fd = r.open(path, os.O_RDONLY)
            assert os.read(fd, 100) == b"inside\n", path
            os.close(fd)
    finally:
        r.close()


@pytest.mark.parametrize("openat2", RESOLVERS)
def test_race_symlink_swapped_for_directory_while_writing(tmp_path: Path,
                                                          openat2: bool) -> None:
    """While files are written into t/sub, another process keeps swapping t/sub for a
    symlink to a directory outside: nothing ever lands outside."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "t").mkdir(parents=True)
    outside.mkdir()
    stop = threading.Event()
    sub = root / "t" / "sub"

    def swapper() -> None:
        deadline = time.monotonic() + 10
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                if sub.is_dir() and not sub.is_symlink():
                    os.rename(sub, root / "t" / "moved")
                    os.symlink(str(outside), sub)
                elif sub.is_symlink():
                    os.unlink(sub)
                    os.rename(root / "t" / "moved", sub)
            except OSError:
                pass

    entries = [dir_entry("t"), dir_entry("t/sub")]
    for i in range(300):
        entries += file_entries(f"t/sub/f{i}", b"x")
    thread = threading.Thread(target=swapper)
    r = SafeRoot.at(str(root), openat2)
    writer = TreeWriter(r, ".")
    try:
        thread.start()
        for kind, payload in entries:
            getattr(writer, kind)(payload)
        writer.finish()
    finally:
        stop.set()
        thread.join()
        writer.close()
        r.close()
    assert list(outside.iterdir()) == []


def test_race_reader_never_follows_a_swapped_link(tmp_path: Path) -> None:
    """While a tree is read, a directory in it keeps being swapped for a link to a
    secret outside: the secret is never read (it may be sent as a link, never as data)."""
    src, secret = tmp_path / "src", tmp_path / "secret"
    (src / "t" / "sub").mkdir(parents=True)
    secret.mkdir()
    (secret / "key").write_text("SECRET")
    for i in range(50):
        (src / "t" / "sub" / f"f{i}").write_text("ok")
    stop = threading.Event()
    sub = src / "t" / "sub"

    def swapper() -> None:
        deadline = time.monotonic() + 10
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                if not sub.is_symlink():
                    os.rename(sub, src / "t" / "moved")
                    os.symlink(str(secret), sub)
                else:
                    os.unlink(sub)
                    os.rename(src / "t" / "moved", sub)
            except OSError:
                pass

    async def read_all() -> list[bytes]:
        root = SafeRoot.at(str(src))
        worker = FileWorker()
        data: list[bytes] = []

        async def emit(kind, payload):
            if kind == "data":
                data.append(payload)

        try:
            for _ in range(30):
                await stream_tree(worker, TreeReader(root, recursive=True), ["t"], emit)
        finally:
            worker.close()
            root.close()
        return data

    thread = threading.Thread(target=swapper)
    thread.start()
    try:
        data = asyncio.run(read_all())
    finally:
        stop.set()
        thread.join()
    assert b"SECRET" not in b"".join(data)


def test_openat2_is_used_where_the_kernel_has_it() -> None:
    """This kernel has openat2: the in-root resolution is the kernel's own."""
    assert safepath.openat2_available()


def test_small_files_become_visible_only_once_synced(tmp_path: Path) -> None:
    """Small files are synced in batches: until the batch is synced and renamed none of
    them is at its name, and a copy that stops before leaves neither them nor temps."""
    root = SafeRoot.at(str(tmp_path))
    writer = TreeWriter(root, ".")
    for i in range(50):
        for kind, payload in file_entries(f"f{i}", b"x" * i):
            getattr(writer, kind)(payload)
    assert not any(p.name.startswith("f") for p in tmp_path.iterdir())
    writer.close()
    root.close()
    assert list(tmp_path.iterdir()) == []
    errors = feed(tmp_path, ".", [e for i in range(50) for e in file_entries(f"f{i}", b"y")])
    assert errors == [] and len(list(tmp_path.iterdir())) == 50


def test_a_batch_is_renamed_only_after_its_sync_and_a_stop_mid_sync_leaves_no_temp(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While one batch syncs the next is written; the synced batch is in place, the one
    still syncing when the copy stops is removed, temporary files and all."""
    import rune.files.writer as writer_module

    monkeypatch.setattr(writer_module, "BATCH_FILES", 10)
    root = SafeRoot.at(str(tmp_path))
    writer = TreeWriter(root, ".")
    for i in range(25):
        for kind, payload in file_entries(f"f{i:02d}", b"z" * i):
            getattr(writer, kind)(payload)
    writer.close()
    root.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"f{i:02d}" for i in range(10)]
    assert all((tmp_path / f"f{i:02d}").read_bytes() == b"z" * i for i in range(10))
