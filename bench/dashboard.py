"""The dashboard under load: N live TTY sessions and M audit events; first paint and RSS.

    python bench/dashboard.py                      # 500 sessions, 100,000 events
    python bench/dashboard.py --sessions 50 --events 5000

Starts its own stack on loopback (nats-server, apiserver, one agent, the dashboard,
authentication on), stores M audit events in the audit stream, holds N `cat`
sessions open with a remote TTY, then drives Debian's headless chromium: first paint
of the live table with all N rows, the first page of an audit search, a sparse
search over the whole stream; and samples the dashboard's RSS meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

from rune.cli.client import ApiClient, ExecOptions, ExecStream
from rune.cli.devstack import Stack, free_port

from rune import audit as schema
from rune.errors import Unavailable
from rune.natsconn import connect
from rune.subjects import Subjects

STREAMS_PER_CHANNEL = 100
OPEN_PARALLEL = 8


def rss_mib(pid: int) -> tuple[float, float]:
    """(current, peak) resident set size of PID in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


async def store_events(stack: Stack, count: int) -> float:
    """Publishes `count` schema-valid events to the audit stream; seconds it took."""
    subjects = Subjects()
    nc = await connect(stack.nats_url, "bench-dashboard", stack.nkey("apiserver"),
                       inbox_prefix=subjects.inbox("apiserver"))
    js = nc.jetstream()
    began = time.perf_counter()
    try:
        for start in range(0, count, 1000):
            batch = []
            for i in range(start, min(count, start + 1000)):
                event = schema.make_event(
                    schema.ENDED, source="apiserver", user=f"user{i % 50}", groups=[],
                    namespace="default", target="api", argv=["sh", "-c", f"job {i}"],
                    tty=False, workdir="", env_keys=[], session_id=uuid.uuid4().hex,
                    instance=f"api-instance-a1-{i % 2}", service="api", agent="a1",
                    host="bench", runner="process", duration=0.1, bytes_in=0,
                    bytes_out=10, exit_code=i % 3, signal=0)
                batch.append(js.publish(subjects.audit("default", schema.ENDED),
                                        schema.encode(event), timeout=30))
            await asyncio.gather(*batch)
    finally:
        await nc.drain()
    return time.perf_counter() - began


async def hold_sessions(stack: Stack, count: int) -> tuple[list[ExecStream], list[ApiClient]]:
    options = ExecOptions(target="api", command=["cat"], tty=True, width=80, height=24,
                          timeout=3600)
    clients = [ApiClient(stack.api_address, token=stack.admin_token)
               for _ in range((count + STREAMS_PER_CHANNEL - 1) // STREAMS_PER_CHANNEL)]
    gate = asyncio.Semaphore(OPEN_PARALLEL)

    async def open_one(client: ApiClient) -> ExecStream:
        async with gate:
            for attempt in range(3):  # a busy 2-core machine may miss the open timeout
                stream = client.exec_stream()
                try:
                    await stream.start(options)
                    return stream
                except Unavailable:
                    stream.cancel()
                    if attempt == 2:
                        raise
                    await asyncio.sleep(1.0)
        raise AssertionError("unreachable")

    held = await asyncio.gather(*(open_one(clients[i // STREAMS_PER_CHANNEL])
                                  for i in range(count)))
    return list(held), clients


def browser(profile: Path):  # noqa: ANN201 - selenium's type
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                "--window-size=1400,900", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))


def measure_pages(base: str, token: str, sessions: int, profile: Path) -> dict:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser(profile)
    out: dict = {}
    try:
        driver.get(base + "/login")
        driver.find_element(By.ID, "token").send_keys(token)
        driver.find_element(By.ID, "signin").click()
        wait = WebDriverWait(driver, 60, poll_frequency=0.05)
        paints = []
        for _ in range(3):
            driver.get(base + "/")
            wait.until(lambda d: d.find_element(By.ID, "count").text == str(sessions))
            paints.append(driver.execute_script("return window.runeFirstPaint"))
        out["live_first_paint_ms"] = sorted(paints)[1]
        out["live_rows"] = len(driver.find_elements(By.CSS_SELECTOR, "#live tr[data-session]"))
        began = time.perf_counter()
        driver.get(base + "/audit")
        wait.until(lambda d: "matching events" in d.find_element(By.ID, "summary").text)
        out["audit_first_page_ms"] = (time.perf_counter() - began) * 1000
        form = driver.find_element(By.NAME, "user")
        form.send_keys("nobody-at-all")
        driver.execute_script("document.querySelector('[name=since]').value = ''")
        began = time.perf_counter()
        driver.find_element(By.ID, "search").click()
        wait.until(lambda d: d.find_element(By.ID, "summary").text.startswith("0 matching"))
        out["sparse_search_page_ms"] = (time.perf_counter() - began) * 1000
        out["sparse_search_summary"] = driver.find_element(By.ID, "summary").text
    finally:
        driver.quit()
    return out


async def load_and_measure(stack: Stack, base: str, sessions: int, events: int,
                           profile: Path) -> dict:
    pid = stack.procs["dashboard"].pid
    result: dict = {"sessions": sessions, "events": events,
                    "dashboard_rss_idle_mib": rss_mib(pid)[0]}
    result["store_events_s"] = await store_events(stack, events)
    began = time.perf_counter()
    held, clients = await hold_sessions(stack, sessions)
    try:
        result["open_sessions_s"] = time.perf_counter() - began
        result.update(await asyncio.to_thread(measure_pages, base, stack.admin_token,
                                              sessions, profile))
        result["dashboard_rss_mib"], result["dashboard_rss_peak_mib"] = rss_mib(pid)
    finally:
        for stream in held:
            stream.cancel()
        for client in clients:
            await client.close()
    return result


def run(sessions: int, events: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench-dashboard-"))
    stack = Stack(tmp, nats_port=free_port(), api_port=free_port())
    stack.secure(["a1"], admin="ops")
    port = free_port()
    try:
        stack.start_nats()
        stack.start_apiserver({"limits": {"max_sessions_per_user": sessions + 50,
                                          "max_sessions_per_agent": sessions + 50}})
        stack.start_agent("a1", [{"name": "api", "namespace": "default", "replicas": 2,
                                  "command": ["sh", "-c", "exec sleep 2147483647"]}],
                          {"max_sessions": sessions + 50})
        stack.start_dashboard(port)
        return asyncio.run(load_and_measure(stack, f"http://127.0.0.1:{port}", sessions,
                                            events, tmp / "profile"))
    finally:
        stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=500)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    result = run(args.sessions, args.events)
    for key, value in result.items():
        print(f"{key:28} {value:.1f}" if isinstance(value, float) else f"{key:28} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
