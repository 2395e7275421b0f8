"""Writes a peer's stream of entries below a destination, trusting nothing in it.

Every file goes to a temporary name in its own directory (O_EXCL, mode 0600), is
fsynced, has its size and SHA-256 checked, and only then is renamed over the final
name: a reader of the destination sees the old file or the whole new one, and a copy
that fails leaves no partial file. Small files are made durable in batches, one syncfs
each, on a thread of its own while the next batch is written; a batch is renamed into
place only once its syncfs returned. Directories are opened below the destination with
no symlink on the way (rune/files/safepath.py), symlinks are created last, and modes,
times and owners are applied last, deepest first. The calls block: run them on a thread.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import secrets
import stat
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from rune.files import safepath
from rune.files.entries import CopyLimits, EntryRefused, Header, Manifest, parse_end, parse_header
from rune.files.pack import PackRefused, unpacked
from rune.files.safepath import O_PATH, PathRefused, SafeRoot

SETID = stat.S_ISUID | stat.S_ISGID
WRITEBACK_EVERY = 8 * 1024 * 1024
SYNC_ALONE = 8 * 1024 * 1024  # files this large get an fsync of their own
BATCH_FILES = 1000
BATCH_BYTES = 64 * 1024 * 1024
SYNC_FILE_RANGE_WRITE = 2
_libc = ctypes.CDLL(None, use_errno=True)
_libc.sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                  ctypes.c_uint)


def _sync_file_range(fd: int, offset: int, nbytes: int, flags: int) -> None:
    _libc.sync_file_range(fd, offset, nbytes, flags)  # a hint: failure costs only speed


class CopyAborted(Exception):
    """The whole copy must stop (a cap was passed, or the stream itself is broken)."""


class CapExceeded(CopyAborted):
    """The copy passed one of its caps (bytes, files)."""


class FileFailed(Exception):
    """One entry could not be written; the copy goes on with the next one."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.reason = message


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc) if not isinstance(exc, PathRefused) else exc.message


@dataclass
class _Open:
    header: Header
    parent: int
    name: str
    temp: str
    fd: int
    hasher: object = field(default_factory=hashlib.sha256)
    written: int = 0
    flushed: int = 0


class TreeWriter:
    """Receives entries for DEST: into it when it is a directory, else as it."""

    def __init__(self, root: SafeRoot, dest: str, multiple: bool = False,
                 limits: CopyLimits | None = None, preserve: bool = False,
                 owner: tuple[int, int] | None = None) -> None:
        self.root = root
        self.limits = limits or CopyLimits()
        self.preserve = preserve
        self.owner = owner
        self.manifest = Manifest()
        self.errors: list[FileFailed] = []
        self._dirs: dict[str, int] = {}  # relative dir -> descriptor (O_PATH)
        self._dir_meta: list[tuple[str, Header]] = []
        self._links: list[Header] = []
        self._current: _Open | None = None
        self._skipping = False
        self._tops: set[str] = set()
        self._unsynced: list[tuple[int, str, str, str, int, str]] = []
        self._unsynced_bytes = 0
        self._sync_fd = -1
        # The batch whose syncfs runs on _syncer: (files, bytes, future)
        self._syncing: tuple[list, int, Future] | None = None
        self._syncer: ThreadPoolExecutor | None = None
        self._base, self._rename = self._destination(dest, multiple)

    # --- where things go --------------------------------------------------------------
    def _destination(self, dest: str, multiple: bool) -> tuple[int, str | None]:
        """The directory entries are written into, and the name the top entry takes
        (None: entries keep their own top names, inside DEST)."""
        if "\0" in dest:
            raise PathRefused("destination contains a NUL byte")
        if ".." in safepath.split_path(dest):
            raise PathRefused(f"{dest}: '..' is not allowed in a destination")
        try:
            fd = self.root.open(dest, O_PATH, follow=False)
        except FileNotFoundError:
            fd = -1
        if fd >= 0:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                return fd, None
            os.close(fd)
            if stat.S_ISLNK(st.st_mode):
                raise PathRefused(f"{dest}: destination is a symlink; refusing to write "
                                  "through it")
            if multiple:
                raise NotADirectoryError(errno.ENOTDIR, f"{dest}: not a directory")
        elif multiple or dest.endswith("/"):
            raise FileNotFoundError(errno.ENOENT, f"{dest}: no such directory")
        parts = safepath.split_path(dest)
        if not parts:
            raise PathRefused(f"{dest}: not a destination")
        parent = "/".join(parts[:-1]) or ("/" if dest.startswith("/") else ".")
        try:
            pfd = self.root.open(parent, O_PATH | os.O_DIRECTORY)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, f"{parent}: no such directory") from None
        except NotADirectoryError:
            raise NotADirectoryError(errno.ENOTDIR, f"{parent}: not a directory") from None
        return pfd, parts[-1]

    def _local(self, path: str) -> list[str]:
        parts = path.split("/")
        self._tops.add(parts[0])
        if self._rename is not None:
            if len(self._tops) > 1:
                raise CopyAborted("several sources need a directory as destination")
            parts[0] = self._rename
        return parts

    def _dir(self, parts: list[str]) -> int:
        """The descriptor of an already written directory (no symlink on the way)."""
        key = "/".join(parts)
        if not parts:
            return self._base
        fd = self._dirs.get(key)
        if fd is None:
            fd = safepath.open_beneath(self._base, key, O_PATH | os.O_DIRECTORY)
            self._dirs[key] = fd
        return fd

    # --- the stream -------------------------------------------------------------------
    def header(self, payload: object) -> None:
        self._abort_current()
        self._skipping = False
        try:
            header = parse_header(payload, self.limits)
        except EntryRefused as exc:
            self._skipping = True
            path = payload.get("path", "?") if isinstance(payload, dict) else "?"
            self._fail(FileFailed(str(path), str(exc).removeprefix(f"{path}: ")))
            return
        if self.manifest.files + len(self._unsynced) + self._syncing_files() \
                >= self.limits.max_files:
            raise CapExceeded(f"more than {self.limits.max_files} files in one copy")
        self._cap(header.size if header.size > 0 else 0)
        parts = self._local(header.path)
        try:
            parent = self._dir(parts[:-1])
            if header.kind == "dir":
                self._mkdir(parent, parts, header)
            elif header.kind == "symlink":
                self._links.append(header)
            else:
                self._begin(parent, parts[-1], header)
        except (OSError, FileFailed) as exc:
            self._skipping = True
            self._fail(exc if isinstance(exc, FileFailed) else FileFailed(header.path, _why(exc)))

    def data(self, chunk: bytes) -> None:
        current = self._current
        if current is None:
            if self._skipping:
                return
            raise CopyAborted("file data outside a file")
        declared = current.header.size
        if declared >= 0 and current.written + len(chunk) > declared:
            self._abort_current()
            self._skipping = True
            self._fail(FileFailed(current.header.path, "more data than its declared size"))
            return
        self._cap(len(chunk) if declared < 0 else 0)
        current.hasher.update(chunk)
        view = memoryview(chunk)
        try:
            while view:
                view = view[os.write(current.fd, view):]
        except OSError as exc:
            self._abort_current()
            self._skipping = True
            self._fail(FileFailed(current.header.path, _why(exc)))
            return
        current.written += len(chunk)
        if current.written - current.flushed >= WRITEBACK_EVERY:
            # Start writing back what is there now, so the closing fsync has little left.
            _sync_file_range(current.fd, current.flushed, current.written - current.flushed,
                             SYNC_FILE_RANGE_WRITE)
            current.flushed = current.written

    def end(self, payload: object) -> None:
        current, self._current = self._current, None
        if current is None:
            if self._skipping:
                return
            raise CopyAborted("end of file outside a file")
        if isinstance(payload, dict) and payload.get("error"):
            # The sender could not finish reading it and reports that itself.
            self._discard(current)
            os.close(current.fd)
            return
        try:
            size, digest = parse_end(payload)
            if size != current.written:
                raise FileFailed(current.header.path, f"size mismatch: received "
                                 f"{current.written} bytes, sender says {size}")
            if digest != current.hasher.hexdigest():
                raise FileFailed(current.header.path, "SHA-256 mismatch: the data was "
                                 "damaged on the way")
            self._finish_file(current, size, digest)
        except (OSError, FileFailed, EntryRefused) as exc:
            self._discard(current)
            if isinstance(exc, OSError):
                exc = FileFailed(current.header.path, _why(exc))
            elif isinstance(exc, EntryRefused):
                exc = FileFailed(current.header.path, str(exc))
            self._fail(exc)
        finally:
            if current.fd >= 0:
                os.close(current.fd)
                current.fd = -1

    def pack(self, entries: object) -> None:
        """A peer's pack: each entry written as its header, data and end would be, with
        the same checks (a lying size or digest fails that file, as it would there)."""
        steps = {"header": self.header, "data": self.data, "end": self.end}
        try:
            for kind, payload in unpacked(entries):
                steps[kind](payload)
        except PackRefused as exc:
            raise CopyAborted(str(exc)) from None

    def finish(self) -> Manifest:
        """Symlinks, then directory modes and times, deepest first; closes everything."""
        self._abort_current()
        try:
            self._flush()
            self._settle()
            for header in self._links:
                try:
                    self._symlink(header)
                    self.manifest.add(header.path, "symlink", 0, header.target)
                except (OSError, FileFailed) as exc:
                    self._fail(exc if isinstance(exc, FileFailed)
                               else FileFailed(header.path, _why(exc)))
            for key, header in sorted(self._dir_meta, key=lambda d: -d[0].count("/")):
                try:
                    self._apply_dir(key, header)
                except OSError as exc:
                    self._fail(FileFailed(header.path, _why(exc)))
        finally:
            self.close()
        return self.manifest

    def close(self) -> None:
        self._abort_current()
        syncing, self._syncing = self._syncing, None
        if syncing is not None:
            wait([syncing[2]])
            self._unsynced = syncing[0] + self._unsynced
        if self._syncer is not None:
            self._syncer.shutdown(wait=True)
            self._syncer = None
        for parent, temp, *_ in self._unsynced:  # never renamed: never there
            _unlink(parent, temp)
        self._unsynced, self._unsynced_bytes = [], 0
        if self._sync_fd >= 0:
            os.close(self._sync_fd)
            self._sync_fd = -1
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()
        if self._base >= 0:
            os.close(self._base)
            self._base = -1

    # --- one entry each ---------------------------------------------------------------
    def _cap(self, size: int) -> None:
        cap = self.limits.max_bytes
        if cap and self.manifest.bytes + self._pending() + size > cap:
            raise CapExceeded(f"copy exceeds its cap of {cap} bytes")

    def _pending(self) -> int:
        return self._unsynced_bytes + (self._syncing[1] if self._syncing else 0) + \
            (self._current.written if self._current else 0)

    def _syncing_files(self) -> int:
        return len(self._syncing[0]) if self._syncing else 0

    def _fail(self, failure: FileFailed) -> None:
        self.errors.append(failure)

    def _mkdir(self, parent: int, parts: list[str], header: Header) -> None:
        name = parts[-1]
        try:
            os.mkdir(name, 0o700, dir_fd=parent)
        except FileExistsError:
            st = os.lstat(name, dir_fd=parent)
            if stat.S_ISLNK(st.st_mode):
                raise FileFailed(header.path, "a symlink is in the way; refusing to write "
                                 "through it") from None
            if not stat.S_ISDIR(st.st_mode):
                raise FileFailed(header.path, "cannot overwrite a non-directory with a "
                                 "directory") from None
        key = "/".join(parts)
        self._dir(parts)
        self._dir_meta.append((key, header))
        self.manifest.add(header.path, "dir", 0, "")

    def _begin(self, parent: int, name: str, header: Header) -> None:
        temp = f".{name[:200]}.rune-{secrets.token_hex(4)}.tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=parent)
        self._current = _Open(header, parent, name, temp, fd)

    def _finish_file(self, current: _Open, size: int, digest: str) -> None:
        header = current.header
        if self.owner is not None:
            os.fchown(current.fd, *self.owner)
        os.fchmod(current.fd, header.mode & ~SETID)
        if self.preserve and header.mtime:
            os.utime(current.fd, (header.mtime, header.mtime))
        if size >= SYNC_ALONE:
            os.fsync(current.fd)
            self._replace(current.parent, current.temp, current.name, header.path)
            self.manifest.add(header.path, "file", size, digest)
            return
        # Small files are made durable together: one syncfs for a batch (an fsync each
        # costs milliseconds), and only then is each renamed into place.
        self._unsynced.append((current.parent, current.temp, current.name, header.path,
                               size, digest))
        self._unsynced_bytes += size
        if self._sync_fd >= 0:
            os.close(self._sync_fd)
        self._sync_fd, current.fd = current.fd, -1
        if len(self._unsynced) >= BATCH_FILES or self._unsynced_bytes >= BATCH_BYTES:
            self._flush()

    def _flush(self) -> None:
        """Starts making the batch durable (syncfs, on a thread of its own: the file
        work goes on meanwhile) once the batch before it is renamed into place."""
        self._settle()
        batch, self._unsynced, self._unsynced_bytes = self._unsynced, [], 0
        fd, self._sync_fd = self._sync_fd, -1
        if not batch:
            if fd >= 0:
                os.close(fd)
            return
        if self._syncer is None:
            self._syncer = ThreadPoolExecutor(1, thread_name_prefix="rune-files-sync")
        self._syncing = (batch, sum(b[4] for b in batch), self._syncer.submit(_syncfs, fd))

    def _settle(self) -> None:
        """Waits for the batch being synced, then renames each of its files into place
        (here, on the thread with the copy's file-system identity)."""
        syncing, self._syncing = self._syncing, None
        if syncing is None:
            return
        batch, _, done = syncing
        try:
            done.result()
        except OSError as exc:
            for parent, temp, _, path, _, _ in batch:
                _unlink(parent, temp)
                self._fail(FileFailed(path, _why(exc)))
            return
        for parent, temp, name, path, size, digest in batch:
            try:
                self._replace(parent, temp, name, path)
                self.manifest.add(path, "file", size, digest)
            except (OSError, FileFailed) as exc:
                _unlink(parent, temp)
                self._fail(exc if isinstance(exc, FileFailed) else FileFailed(path, _why(exc)))

    def _replace(self, parent: int, temp: str, name: str, path: str) -> None:
        """Atomically puts `temp` at `name`; a directory there is never replaced."""
        try:
            st = os.lstat(name, dir_fd=parent)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise FileFailed(path, "cannot overwrite a directory with a non-directory")
        os.rename(temp, name, src_dir_fd=parent, dst_dir_fd=parent)

    def _symlink(self, header: Header) -> None:
        parts = self._local(header.path)
        parent = self._dir(parts[:-1])
        temp = f".{parts[-1][:200]}.rune-{secrets.token_hex(4)}.tmp"
        os.symlink(header.target, temp, dir_fd=parent)
        try:
            if self.owner is not None:
                os.chown(temp, *self.owner, dir_fd=parent, follow_symlinks=False)
            self._replace(parent, temp, parts[-1], header.path)
        except BaseException:
            _unlink(parent, temp)
            raise

    def _apply_dir(self, key: str, header: Header) -> None:
        fd = safepath.reopen(self._dir(key.split("/")), os.O_RDONLY | os.O_DIRECTORY)
        try:
            if self.owner is not None:
                os.fchown(fd, *self.owner)
            os.fchmod(fd, header.mode & ~SETID)
            if self.preserve and header.mtime:
                os.utime(fd, (header.mtime, header.mtime))
        finally:
            os.close(fd)

    def _abort_current(self) -> None:
        current, self._current = self._current, None
        if current is not None:
            self._discard(current)
            if current.fd >= 0:
                os.close(current.fd)
                current.fd = -1

    def _discard(self, current: _Open) -> None:
        _unlink(current.parent, current.temp)


def _syncfs(fd: int) -> None:
    """Everything written so far on fd's file system reaches the disk; closes fd."""
    try:
        if _libc.syncfs(fd) < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def _unlink(parent: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=parent)
    except OSError:
        pass
