"""Fan-out output: per-instance prefixed lines or JSON records, the summary, the progress bar."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, TextIO

from rune.rollout import NEVER_RAN, MemberStatus

# As `docker compose logs`: one colour per instance, cycling.
COLOURS = ("36", "33", "32", "35", "34", "96", "93", "92", "95", "94")
MAX_PARTIAL = 64 * 1024  # a line longer than this is written in pieces


@dataclass
class InstanceResult:
    instance_id: str
    service: str = ""
    agent: str = ""
    host: str = ""
    status: str = "pending"  # a rune.rollout.MemberStatus, or pending
    code: int = 0
    signal: int = 0
    duration: float = 0.0
    error: str = ""

    @property
    def exit_status(self) -> int | None:
        """As a shell reports it (128+N for a signal); None for an instance never run."""
        if self.status == MemberStatus.EXITED:
            return 128 + self.signal if self.signal else self.code
        if self.status in NEVER_RAN:
            return None
        return self.code or 255

    @property
    def ok(self) -> bool:
        return self.status == MemberStatus.EXITED and self.exit_status == 0


def overall_exit(results: list[InstanceResult]) -> int:
    """0 if all exited 0; 255 if any was unreachable; else the highest exit status (as pdsh)."""
    if any(r.status in ("unreachable", "pending") for r in results):
        return 255
    return max((r.exit_status or 0 for r in results), default=0)


class LineSplitter:
    """Holds each (instance, stream)'s partial line so lines of different instances never mix."""

    def __init__(self) -> None:
        self._partial: dict[tuple[str, str], bytes] = {}

    def feed(self, key: tuple[str, str], data: bytes) -> list[bytes]:
        buffered = self._partial.pop(key, b"") + data
        cut = buffered.rfind(b"\n") + 1
        lines = buffered[:cut].splitlines(keepends=True)
        rest = buffered[cut:]
        while len(rest) > MAX_PARTIAL:
            lines.append(rest[:MAX_PARTIAL] + b"\n")
            rest = rest[MAX_PARTIAL:]
        if rest:
            self._partial[key] = rest
        return lines

    def rest(self, key: tuple[str, str]) -> bytes:
        """The unterminated last line, with a newline added, or b''."""
        rest = self._partial.pop(key, b"")
        return rest + b"\n" if rest else b""


class LineWriter:
    """Writes whole lines, each led by its aligned instance id (coloured on a terminal)."""

    def __init__(self, ids: list[str], out: BinaryIO, err: BinaryIO, prefix: bool = True,
                 colour_out: bool = False, colour_err: bool = False,
                 before_write: Callable[[], None] = lambda: None) -> None:
        self.out, self.err = out, err
        self.prefix = prefix
        self.before_write = before_write
        self.splitter = LineSplitter()
        width = max((len(i) for i in ids), default=0)
        self._prefixes: dict[tuple[str, bool], bytes] = {}
        for n, instance in enumerate(ids):
            plain = f"{instance:<{width}} | "
            colour = COLOURS[n % len(COLOURS)]
            self._prefixes[(instance, False)] = plain.encode()
            self._prefixes[(instance, True)] = f"\x1b[{colour}m{plain}\x1b[0m".encode()
        self._width = width
        self._colour = {"stdout": colour_out, "stderr": colour_err}

    def _prefix(self, instance: str, stream: str) -> bytes:
        if not self.prefix:
            return b""
        coloured = self._colour[stream]
        found = self._prefixes.get((instance, coloured))
        return found if found is not None else f"{instance:<{self._width}} | ".encode()

    def _write(self, instance: str, stream: str, lines: list[bytes]) -> None:
        if not lines:
            return
        self.before_write()
        head = self._prefix(instance, stream)
        target = self.out if stream == "stdout" else self.err
        target.write(b"".join(head + line for line in lines))
        target.flush()

    def output(self, instance: str, stream: str, data: bytes) -> None:
        self._write(instance, stream, self.splitter.feed((instance, stream), data))

    def end(self, instance: str) -> None:
        for stream in ("stdout", "stderr"):
            rest = self.splitter.rest((instance, stream))
            if rest:
                self._write(instance, stream, [rest])

    def result(self, result: InstanceResult) -> None:
        pass


class JsonWriter:
    """One JSON record per line: one per output chunk, and a final one per instance."""

    def __init__(self, out: BinaryIO, hosts: dict[str, str]) -> None:
        self.out = out
        self.hosts = hosts

    def _record(self, record: dict) -> None:
        self.out.write(json.dumps(record, separators=(",", ":")).encode() + b"\n")
        self.out.flush()

    def targets(self, instances: list[dict]) -> None:
        """The resolved target set, first: who should answer, before anyone has."""
        self._record({"type": "targets", "instances": instances})

    def output(self, instance: str, stream: str, data: bytes) -> None:
        record = {"type": "output", "instance": instance, "host": self.hosts.get(instance, ""),
                  "stream": stream}
        try:
            record["data"] = data.decode()
        except UnicodeDecodeError:
            record["data_base64"] = base64.b64encode(data).decode()
        self._record(record)

    def end(self, instance: str) -> None:
        pass

    def result(self, r: InstanceResult) -> None:
        self._record({"type": "result", "instance": r.instance_id, "service": r.service,
                      "agent": r.agent, "host": r.host, "status": r.status,
                      "exit_code": r.exit_status, "signal": r.signal,
                      "duration": round(r.duration, 6), "error": r.error or None})


def summary(results: list[InstanceResult]) -> str:
    """The closing table: instance, host, exit code, duration, and what went wrong."""
    rows = [("INSTANCE", "HOST", "EXIT", "DURATION", "STATUS")]
    for r in results:
        status = r.status if not r.error else f"{r.status}: {r.error}"
        code = "-" if r.exit_status is None else str(r.exit_status)
        rows.append((r.instance_id, r.host, code, f"{r.duration:.2f}s", status))
    widths = [max(len(row[c]) for row in rows) for c in range(4)]
    lines = ["  ".join([*(v.ljust(w) for v, w in zip(row[:4], widths, strict=True)),
                        row[4]]).rstrip() for row in rows]
    counts: dict[str, int] = {}
    for r in results:
        key = f"exited {r.exit_status}" if r.status == "exited" else r.status
        counts[key] = counts.get(key, 0) + 1
    tally = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    lines.append(rollout_counts(results))
    lines.append(f"{len(results)} instance{'s' if len(results) != 1 else ''}: {tally}")
    return "\n".join(lines) + "\n"


def rollout_counts(results: list[InstanceResult]) -> str:
    """targeted / ok / failed / timed out / unreachable / skipped, every one said."""
    def count(*statuses: str) -> int:
        return sum(1 for r in results if r.status in statuses)

    ok = sum(1 for r in results if r.ok)
    failed = count(MemberStatus.FAILED, MemberStatus.KILLED, "pending") + sum(
        1 for r in results if r.status == MemberStatus.EXITED and not r.ok)
    return (f"targeted {len(results)}, ok {ok}, failed {failed}, "
            f"timed out {count(MemberStatus.TIMED_OUT)}, "
            f"unreachable {count(MemberStatus.UNREACHABLE)}, "
            f"skipped {count(MemberStatus.SKIPPED, MemberStatus.CANCELLED)}")


class GroupWriter:
    """`--group`: each instance's output kept, identical ones printed once at the end with
    the instances that produced them (as `dshbak -c`): which hosts differ?"""

    LIMIT = 1024 * 1024  # per instance; past it the rest is cut (and said)

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.kept: dict[str, bytearray] = {}
        self.cut: set[str] = set()

    def output(self, instance: str, stream: str, data: bytes) -> None:
        kept = self.kept.setdefault(instance, bytearray())
        room = self.LIMIT - len(kept)
        if len(data) > room:
            self.cut.add(instance)
        kept += data[:max(room, 0)]

    def end(self, instance: str) -> None:
        self.kept.setdefault(instance, bytearray())

    def result(self, result: InstanceResult) -> None:
        pass

    def close(self) -> None:
        groups: dict[bytes, list[str]] = {}
        for instance, data in self.kept.items():
            key = bytes(data) + (b"\n[output cut at 1 MiB]\n" if instance in self.cut else b"")
            groups.setdefault(key, []).append(instance)
        for data, members in sorted(groups.items(), key=lambda g: (-len(g[1]), g[1])):
            rule = b"-" * 16 + b"\n"
            head = f"{','.join(sorted(members))} ({len(members)})\n".encode()
            body = data if not data or data.endswith(b"\n") else data + b"\n"
            self.out.write(rule + head + rule + body)
        self.out.flush()


def render_bar(done: int, total: int, failed: int, elapsed: float, width: int = 30) -> str:
    filled = width * done // total if total else width
    bar = "#" * filled + "-" * (width - filled)
    failures = f", {failed} failed" if failed else ""
    return f"[{bar}] {done}/{total} done{failures} {elapsed:.1f}s"


class Progress:
    """A one-line bar on a terminal's stderr, shown once a fan-out takes a while."""

    SHOW_AFTER = 0.5
    REDRAW_EVERY = 0.1

    def __init__(self, stream: TextIO, total: int, enabled: bool) -> None:
        self.stream = stream
        self.total = total
        self.enabled = enabled
        self.done = 0
        self.failed = 0
        self.visible = False
        self._began = time.monotonic()
        self._drawn = 0.0

    def clear(self) -> None:
        if self.visible:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.visible = False

    def refresh(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._began < self.SHOW_AFTER or self.done >= self.total:
            return
        if not force and self.visible and now - self._drawn < self.REDRAW_EVERY:
            return
        self._drawn = now
        self.stream.write("\r\x1b[K" + render_bar(self.done, self.total, self.failed,
                                                  now - self._began))
        self.stream.flush()
        self.visible = True
