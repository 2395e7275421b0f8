"""One result row of the bench table, as a plain dict (it goes straight into the JSON)."""

from __future__ import annotations

from collections.abc import Callable

from bench.stats import summarize_ms

OK, SKIPPED, NOT_LANDED, ERROR = "ok", "skipped", "not landed", "error"


def _row(row_id: str, section: str, name: str, status: str, **fields: object) -> dict:
    return {"id": row_id, "section": section, "name": name, "status": status, "reason": None,
            "unit": None, "value": None, "better": None, "ref": None, **fields}


def latency(row_id: str, section: str, name: str, seconds: list[float],
            ref: str | None = None) -> dict:
    """A latency row: value is the p50 in ms; lower is better."""
    summary = summarize_ms(seconds)
    return _row(row_id, section, name, OK, unit="ms", value=summary["p50"], better="lower",
                ref=ref, n=len(seconds), **summary)


def throughput(row_id: str, section: str, name: str, nbytes: int, seconds: float | list[float],
               ref: str | None = None) -> dict:
    """A throughput row: value is MB/s (10^6 bytes per second); higher is better. Several
    runs: the median's, with every run's figure kept."""
    runs = sorted(seconds) if isinstance(seconds, list) else [seconds]
    middle = runs[len(runs) // 2]
    return _row(row_id, section, name, OK, unit="MB/s", value=nbytes / 1e6 / middle,
                better="higher", ref=ref, bytes=nbytes, seconds=middle, n=len(runs),
                runs_mb_s=[round(nbytes / 1e6 / s, 1) for s in runs])


def figure(row_id: str, section: str, name: str, value: float, unit: str,
           better: str = "lower", ref: str | None = None, **extra: object) -> dict:
    """Any other measured figure (e.g. KiB of RSS per session)."""
    return _row(row_id, section, name, OK, unit=unit, value=value, better=better, ref=ref,
                **extra)


def absent(row_id: str, section: str, name: str, status: str, reason: str) -> dict:
    """A row that has no figure: skipped, not landed, or failed, with the reason."""
    return _row(row_id, section, name, status, reason=reason)


def advantage(row: dict, ref: dict) -> float | None:
    """How many times better the reference (rune) is than this row: > 1 means rune wins."""
    if row["status"] != OK or ref["status"] != OK or not row["value"] or not ref["value"]:
        return None
    if row["better"] == "higher":
        return ref["value"] / row["value"]
    return row["value"] / ref["value"]


def attach_ratios(rows: list[dict]) -> None:
    """Fills each row's `advantage` from the row its `ref` names (same run)."""
    by_id = {row["id"]: row for row in rows}
    for row in rows:
        ref = by_id.get(row.get("ref") or "")
        row["advantage"] = advantage(row, ref) if ref else None


def guarded(row_id: str, section: str, name: str, measure: Callable[[], dict]) -> dict:
    """One failed measurement becomes an error row; the others still run."""
    try:
        return measure()
    except Exception as exc:
        return absent(row_id, section, name, ERROR, f"{type(exc).__name__}: {exc}")
