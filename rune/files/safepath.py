"""Opening paths inside a root so that no symlink, `..` or mount trick can leave it.

Two ways of resolving, both ending in a descriptor on which the I/O is then done (so
nothing can be swapped in between a check and a use):

- `SafeRoot.open(path)`: a path a user gave (`/etc/hosts` in a container) is resolved as
  if the root were `/`: absolute symlinks and `..` stay inside it. The kernel does this
  with openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS); where it lacks openat2, a walk
  of one component at a time, each opened with O_NOFOLLOW and symlinks expanded by hand.
- `open_beneath(dirfd, relpath)`: a path that came from a peer (an entry of a tree) is
  opened below a directory with no symlink at all on the way (RESOLVE_BENEATH |
  RESOLVE_NO_SYMLINKS, or the same walk refusing every link).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat

O_PATH = getattr(os, "O_PATH", 0o10000000)
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10
SYS_OPENAT2 = 437  # the same number on every architecture (unified syscall table)
MAX_LINKS = 40  # as the kernel's own limit on symlinks in one lookup

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


class PathRefused(OSError):
    """A path that would leave its root, or is not allowed at all."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EPERM, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


_openat2_works: bool | None = None


def _openat2(dirfd: int, path: str, flags: int, mode: int, resolve: int) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, mode if flags & os.O_CREAT else 0, resolve)
    fd = _libc.syscall(SYS_OPENAT2, dirfd, os.fsencode(path), ctypes.byref(how),
                       ctypes.sizeof(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


def openat2_available() -> bool:
    global _openat2_works
    if _openat2_works is None:
        try:
            os.close(_openat2("/", ".", O_PATH, 0, RESOLVE_IN_ROOT))
            _openat2_works = True
        except OSError as exc:
            _openat2_works = exc.errno not in (errno.ENOSYS, errno.EPERM, errno.EINVAL)
    return _openat2_works


def split_path(path: str) -> list[str]:
    """The components of a path; '.' and empty ones dropped."""
    return [part for part in path.split("/") if part and part != "."]


_libc.readlinkat.restype = ctypes.c_ssize_t


class SafeRoot:
    """A directory that every path is resolved inside, as if it were `/`."""

    def __init__(self, fd: int, use_openat2: bool | None = None) -> None:
        self.fd = fd
        self.use_openat2 = openat2_available() if use_openat2 is None else use_openat2

    @classmethod
    def at(cls, path: str, use_openat2: bool | None = None) -> SafeRoot:
        return cls(os.open(path, O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), use_openat2)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def open(self, path: str, flags: int = O_PATH, mode: int = 0,
             follow: bool = True) -> int:
        """A descriptor for `path` inside the root; the last component is followed only
        with `follow` (else a symlink there gives a descriptor of the link itself)."""
        if "\0" in path:
            raise PathRefused(f"{path!r}: path contains a NUL byte")
        if not follow:
            flags |= os.O_NOFOLLOW
        if self.use_openat2:
            return _openat2(self.fd, path.lstrip("/") or ".", flags, mode,
                            RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
        return self._walk(path, flags, mode, follow)

    def _walk(self, path: str, flags: int, mode: int, follow: bool) -> int:
        """RESOLVE_IN_ROOT by hand: one component at a time, never following a link."""
        pending = split_path(path)
        stack: list[int] = []  # descriptors of the directories below the root
        links = 0
        try:
            while True:
                here = stack[-1] if stack else self.fd
                if not pending:
                    return os.open(".", (flags & ~os.O_NOFOLLOW) | os.O_CLOEXEC, dir_fd=here)
                name = pending.pop(0)
                if name == "..":
                    if stack:
                        os.close(stack.pop())
                    continue
                last = not pending
                try:
                    fd = os.open(name, O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=here)
                except FileNotFoundError:
                    if last and flags & os.O_CREAT:
                        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                                       dir_fd=here)
                    raise
                st = os.fstat(fd)
                if stat.S_ISLNK(st.st_mode) and (follow or not last):
                    target = os.readlink(name, dir_fd=here)
                    os.close(fd)
                    links += 1
                    if links > MAX_LINKS:
                        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
                    if target.startswith("/"):
                        while stack:
                            os.close(stack.pop())
                    pending[:0] = split_path(target) if target.strip("/") else []
                    continue
                if last:
                    # O_NOFOLLOW again: a link swapped in since the check fails with ELOOP.
                    os.close(fd)
                    return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                                   dir_fd=here)
                if not stat.S_ISDIR(st.st_mode):
                    os.close(fd)
                    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
                stack.append(fd)
        finally:
            for fd in stack:
                os.close(fd)


def open_beneath(dirfd: int, relpath: str, flags: int, mode: int = 0,
                 use_openat2: bool | None = None) -> int:
    """Opens a peer's relative path below `dirfd` with no symlink anywhere on the way."""
    parts = split_path(relpath)
    if not parts or any(p == ".." for p in parts):
        raise PathRefused(f"{relpath!r}: not a plain relative path")
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC
    if use_openat2 if use_openat2 is not None else openat2_available():
        try:
            return _openat2(dirfd, "/".join(parts), flags, mode,
                            RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EXDEV):
                raise PathRefused(f"{relpath}: a symlink is in the way; refusing to "
                                  "write through it") from None
            raise
    here = dirfd
    opened: list[int] = []
    try:
        for name in parts[:-1]:
            try:
                here = os.open(name, O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                               dir_fd=here)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link(name, here):
                    raise PathRefused(f"{relpath}: a symlink is in the way; refusing to "
                                      "write through it") from None
                raise
            opened.append(here)
        return os.open(parts[-1], flags, mode, dir_fd=here)
    finally:
        for fd in opened:
            os.close(fd)


def _is_link(name: str, dirfd: int) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dirfd).st_mode)
    except OSError:
        return False


def reopen(fd: int, flags: int) -> int:
    """A real descriptor for what an O_PATH descriptor names: the same inode, no lookup."""
    return os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)


def readlink_fd(fd: int) -> str:
    """The target of the symlink an O_PATH|O_NOFOLLOW descriptor names."""
    buf = ctypes.create_string_buffer(4096)
    n = _libc.readlinkat(fd, b"", buf, 4096)
    if n < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return os.fsdecode(buf.raw[:n])
