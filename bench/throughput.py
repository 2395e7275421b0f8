"""Section 2: stdout throughput of a big stream, non-TTY and TTY, rune beside its baselines."""

from __future__ import annotations

from bench import rows
from bench.context import BenchContext
from bench.procs import drain, drain_local_pty

SECTION = "2. stdout throughput"


def run(ctx: BenchContext) -> list[dict]:
    size = ctx.sizes.stream_bytes
    produce = ["head", "-c", str(size), "/dev/zero"]
    label = _size_label(size)
    out: list[dict] = []
    for tty in (False, True):
        mode = "TTY" if tty else "non-TTY"
        rune_id = f"stream.{mode.lower().replace('-', '')}.rune"
        contenders = [
            (rune_id, f"rune exec {'-t' if tty else '--no-tty'}, {label} ({mode})",
             lambda tty=tty: drain(ctx.rune_argv("--tty" if tty else "--no-tty", ctx.target,
                                                 *produce), size, ctx.env,
                                   log=ctx.workdir / "rune-cli.log"), None),
            (f"{rune_id[:-5]}.ssh", f"ssh{' -tt' if tty else ''}, {label} ({mode})",
             (lambda tty=tty: drain(ctx.sshd.argv(*produce, tty=tty), size)) if ctx.sshd
             else None, ctx.sshd_reason),
            (f"{rune_id[:-5]}.docker", f"docker exec{' -t' if tty else ''}, {label} ({mode})",
             (lambda tty=tty: drain(ctx.docker.argv(*produce, tty=tty), size)) if ctx.docker
             else None, ctx.docker_reason),
            (f"{rune_id[:-5]}.local", f"local {'PTY' if tty else 'pipe'}, {label}",
             (lambda: drain_local_pty(produce, size)) if tty else (lambda: drain(produce, size)),
             None),
        ]
        for row_id, name, measure, reason in contenders:
            row = _measure(row_id, name, measure, reason, size,
                           None if row_id == rune_id else rune_id)
            out.append(row | {"floor": True} if row_id.endswith(".local") else row)
    return out


def _measure(row_id: str, name: str, measure: object, reason: str | None, size: int,
             ref: str | None) -> dict:
    if measure is None:
        return rows.absent(row_id, SECTION, name, rows.SKIPPED, reason or "unavailable")
    try:
        return rows.throughput(row_id, SECTION, name, size, measure(), ref=ref)
    except Exception as exc:
        return rows.absent(row_id, SECTION, name, rows.ERROR, f"{type(exc).__name__}: {exc}")


def _size_label(size: int) -> str:
    return f"{size >> 30} GiB" if size >= 1 << 30 else f"{size >> 20} MiB"
