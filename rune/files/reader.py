"""Reads sources inside a root as a stream of entries (rune/files/entries.py).

Each source is opened inside the root without following a link that is not asked for,
and every read is done on that descriptor; a directory is walked by descriptor too, one
O_NOFOLLOW open per name, so a symlink swapped in mid-walk is read as the link it now
is, never followed out. Devices, FIFOs and sockets are reported, never opened. The
generator blocks: advance it on a thread.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from rune.files import safepath
from rune.files.entries import MODE_BITS, Header
from rune.files.safepath import O_PATH, SafeRoot

CHUNK = 1020 * 1024  # frames.MAX_DATA: one chunk is one data frame
SETID = stat.S_ISUID | stat.S_ISGID


@dataclass
class ReadError:
    path: str
    message: str


Event = tuple[str, object]  # ("header", Header) | ("data", bytes) | ("end", dict) |
#                             ("error", ReadError)


def _kind(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return None


def _what(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def top_name(path: str) -> str:
    parts = safepath.split_path(path)
    return parts[-1] if parts else ""


class TreeReader:
    def __init__(self, root: SafeRoot, recursive: bool = False, follow: bool = False,
                 chunk: int = CHUNK) -> None:
        self.root = root
        self.recursive = recursive
        self.follow = follow
        self.chunk = chunk

    def read(self, sources: list[str]) -> Iterator[Event]:
        for source in sources:
            name = top_name(source)
            if not name or name == "..":
                yield "error", ReadError(source, "not a file or directory name to copy")
                continue
            if ".." in safepath.split_path(source):
                yield "error", ReadError(source, "'..' is not allowed in a path")
                continue
            try:
                # Without -r a link given by name is followed (as cp does); with -r it is
                # copied as a link unless -L.
                fd = self.root.open(source, O_PATH, follow=self.follow or not self.recursive)
            except OSError as exc:
                yield "error", ReadError(source, safepath_reason(exc))
                continue
            yield from self._entry(fd, name, source, set())

    def _entry(self, fd: int, path: str, shown: str, ancestors: set) -> Iterator[Event]:
        try:
            st = os.fstat(fd)
            kind = _kind(st.st_mode)
            if kind is None:
                yield "error", ReadError(shown, f"{_what(st.st_mode)} not copied")
            elif kind == "symlink":
                target = safepath.readlink_fd(fd)
                yield "header", Header(path, "symlink", 0, 0o777, st.st_mtime, target)
            elif kind == "dir":
                if not self.recursive:
                    yield "error", ReadError(shown, "is a directory (not copied without -r)")
                else:
                    yield from self._dir(fd, path, shown, st, ancestors)
            else:
                yield from self._file(fd, path, shown, st)
        finally:
            os.close(fd)

    def _file(self, fd: int, path: str, shown: str, st: os.stat_result) -> Iterator[Event]:
        try:
            rfd = safepath.reopen(fd, os.O_RDONLY | os.O_NOCTTY)
        except OSError as exc:
            yield "error", ReadError(shown, safepath_reason(exc))
            return
        try:
            yield "header", Header(path, "file", st.st_size, st.st_mode & MODE_BITS & ~SETID,
                                   st.st_mtime)
            hasher = hashlib.sha256()
            left, sent = st.st_size, 0
            while left > 0:
                try:
                    data = os.read(rfd, min(self.chunk, left))
                except OSError as exc:
                    # The receiver drops a file whose end never comes with a valid digest.
                    yield "end", {"size": -1, "sha256": "", "error": safepath_reason(exc)}
                    yield "error", ReadError(shown, safepath_reason(exc))
                    return
                if not data:
                    break  # it shrank while we read: send what it holds now
                hasher.update(data)
                left -= len(data)
                sent += len(data)
                yield "data", data
            yield "end", {"size": sent, "sha256": hasher.hexdigest()}
        finally:
            os.close(rfd)

    def _dir(self, fd: int, path: str, shown: str, st: os.stat_result,
             ancestors: set) -> Iterator[Event]:
        key = (st.st_dev, st.st_ino)
        if key in ancestors:
            yield "error", ReadError(shown, "directory loop (a link back to its parent)")
            return
        try:
            dfd = safepath.reopen(fd, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            yield "error", ReadError(shown, safepath_reason(exc))
            return
        try:
            names = sorted(os.listdir(dfd))
        except OSError as exc:
            os.close(dfd)
            yield "error", ReadError(shown, safepath_reason(exc))
            return
        yield "header", Header(path, "dir", 0, st.st_mode & MODE_BITS & ~SETID, st.st_mtime)
        try:
            for name in names:
                child = f"{path}/{name}"
                shown_child = f"{shown.rstrip('/')}/{name}"
                try:
                    cfd = os.open(name, O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
                    if self.follow and stat.S_ISLNK(os.fstat(cfd).st_mode):
                        os.close(cfd)
                        cfd = self.root.open(shown_child, O_PATH, follow=True)
                except OSError as exc:
                    yield "error", ReadError(shown_child, safepath_reason(exc))
                    continue
                yield from self._entry(cfd, child, shown_child, ancestors | {key})
        finally:
            os.close(dfd)


def safepath_reason(exc: OSError) -> str:
    if isinstance(exc, safepath.PathRefused):
        return exc.message
    if exc.errno == errno.ELOOP:
        return "too many levels of symbolic links"
    return exc.strerror or str(exc)
