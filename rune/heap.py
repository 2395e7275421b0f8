"""Keeps freed buffers in the process, so ~1 MiB output and copy chunks reuse warm pages.

glibc serves an allocation of 128 KiB or more with a fresh mmap, and returns the top of
the heap to the kernel as soon as it is free: every chunk then costs its own page faults,
which on a virtual machine are slower than the copy itself (measured: a 1 MiB copy into
fresh pages 2-7 ms, into reused ones 0.1 ms). With fixed thresholds, chunks come from
the heap and what was freed is kept for the next one, up to TRIM_THRESHOLD.
"""

from __future__ import annotations

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's cap for this setting
TRIM_THRESHOLD = 128 * 1024 * 1024  # free memory kept at most, beyond what is live

_kept: bool | None = None  # set by the first call: whether the thresholds took


def keep_freed_buffers() -> bool:
    """Sets the thresholds once per process; False where the C library has no mallopt."""
    global _kept
    if _kept is not None:
        return _kept
    import ctypes  # here: a command that never moves much data does not load it

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        _kept = False
        return _kept
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    _kept = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _kept
