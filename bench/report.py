"""The bench's outputs: a markdown table (stdout) and a JSON file, with date and machine."""

from __future__ import annotations

import datetime
import json
import os
import platform
import socket
from pathlib import Path

from bench.rows import OK


def machine() -> dict:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return {"hostname": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(),
            "mem_gib": round(mem_kib / 1024 / 1024, 1), "kernel": platform.release(),
            "python": platform.python_version(), "load_avg": list(os.getloadavg())}


def _num(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.2f}" if abs(value) < 10 \
        else f"{value:.1f}"


def _versus(row: dict) -> str:
    ratio = row.get("advantage")
    if ratio is None:
        return "reference" if row.get("is_ref") else "—"
    if row.get("versus_idle"):
        return f"{ratio:.2f}× the idle setup latency"
    if row.get("versus"):
        return f"{ratio:.2f}× {row['versus']}"
    if row.get("floor"):
        if row["better"] == "higher":
            return f"floor: rune gets 1/{1 / ratio:.1f} of it"
        return f"floor: rune takes {1 / ratio:.1f}× it"
    if ratio >= 1:
        return f"rune {ratio:.2f}× faster" if row["unit"] in ("ms", "MB/s") \
            else f"rune {ratio:.2f}× better"
    return f"rune {1 / ratio:.2f}× slower" if row["unit"] in ("ms", "MB/s") \
        else f"rune {1 / ratio:.2f}× worse"


def markdown(rows: list[dict], meta: dict) -> str:
    """One table: each figure beside its baselines, ratios against the rune row they name."""
    refs = {row.get("ref") for row in rows}
    lines = [f"Rune bench, {meta['date']}, {meta['machine']['cpu']} "
             f"({meta['machine']['cores']} cores), {'quick' if meta['quick'] else 'full'} run, "
             f"{meta['duration_s']:.0f} s, load average "
             f"{meta['machine']['load_avg'][0]:.1f} at the end",
             "",
             "| section | measurement | p50 / value | p99 | n | vs rune |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        row["is_ref"] = row["id"] in refs
        if row["status"] == OK:
            value = f"{_num(row['value'])} {row['unit']}"
            p99 = f"{_num(row['p99'])} {row['unit']}" if "p99" in row else "—"
            n = str(row.get("n", "—"))
        else:
            value, p99, n = f"{row['status']}: {row['reason']}", "—", "—"
        lines.append(f"| {row['section']} | {row['name']} | {value} | {p99} | {n} | "
                     f"{_versus(row)} |")
    return "\n".join(lines)


def meta_for(quick: bool, duration: float) -> dict:
    return {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(), "quick": quick, "duration_s": duration}


def write_json(path: Path, rows: list[dict], meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
