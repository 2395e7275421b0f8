"""The dashboard over HTTP against a real stack: sign-in, CSRF, RBAC, search paging, SSE resume.

The same checks a browser relies on, without one: what a request without a
session, without the CSRF token or from another origin gets; that the audit
search pages with its cursor and exports exactly the filter; that the live
stream resumes after Last-Event-ID; hostile input; plaintext off loopback.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import uuid

import aiohttp
import pytest

from tests.conftest import ROOT
from tests.dashboard_stack import signed_in_stack  # noqa: F401 - the stack fixture
from tests.test_auth_e2e import _make_ca


async def sign_in(base: str, token: str) -> tuple[aiohttp.ClientSession, str]:
    """A client session signed in with `token`, and the page's CSRF token."""
    client = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    async with client.get(base + "/login") as r:
        form_csrf = re.search(r'name="csrf" value="([^"]+)"', await r.text()).group(1)
    async with client.post(base + "/login", data={"csrf": form_csrf, "token": token},
                           allow_redirects=False) as r:
        assert r.status == 303, await r.text()
    async with client.get(base + "/") as r:
        csrf = re.search(r'name="csrf-token" content="([^"]+)"', await r.text()).group(1)
    return client, csrf


def rune_exec(stack, token_file, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rune.cli.main", "exec", "--api-server", stack.api_address,
         "--token-file", str(token_file), "-v", *argv], capture_output=True, timeout=60,
        stdin=subprocess.DEVNULL, cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "RUNE_CONFIG": str(stack.state_dir / "none.yaml")})


async def test_without_sign_in_only_the_sign_in_page(signed_in_stack):  # noqa: F811
    """No session: pages redirect to sign-in and the API answers 401, never data."""
    _, base = signed_in_stack
    async with aiohttp.ClientSession() as client:
        async with client.get(base + "/audit", allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"] == "/login"
        for path in ("/api/live", "/api/audit", "/api/recordings",
                     "/api/sessions/" + "a" * 32 + "/observe"):
            async with client.get(base + path) as r:
                assert r.status == 401 and await r.json() == {"error": "not signed in"}
        async with client.get(base + "/", cookies={"rune_dashboard": "forged"}) as r:
            assert r.url.path == "/login"
        async with client.get(base + "/login") as r:
            assert "HttpOnly" in r.headers["Set-Cookie"]
            assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]


async def test_bad_tokens_and_forged_sign_ins_are_refused(signed_in_stack):  # noqa: F811
    """Unknown or hostile tokens, and a sign-in without its CSRF token, get no session."""
    _, base = signed_in_stack
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as client:
        async with client.get(base + "/login") as r:
            csrf = re.search(r'name="csrf" value="([^"]+)"', await r.text()).group(1)
        for token, status in (("rune_not-a-real-token", 401), ("x" * 10000, 400),
                              ("a\x1b[31mb", 400)):
            async with client.post(base + "/login", data={"csrf": csrf, "token": token},
                                   allow_redirects=False) as r:
                assert r.status == status
                assert "rune_dashboard=" not in r.headers.get("Set-Cookie", "")
        async with client.post(base + "/login", data={"token": "whatever"}) as r:
            assert r.status == 403
        async with client.post(base + "/login", data={"csrf": csrf, "token": "t"},
                               headers={"Origin": "http://evil.example"}) as r:
            assert r.status == 403


async def test_state_changes_need_the_csrf_token(signed_in_stack):  # noqa: F811
    """Kill and sign-out without the CSRF token (or from another origin) are refused."""
    stack, base = signed_in_stack
    client, csrf = await sign_in(base, stack.admin_token)
    async with client:
        sid = "b" * 32
        async with client.post(f"{base}/api/sessions/{sid}/kill", json={"reason": "x"}) as r:
            assert r.status == 403 and "CSRF" in (await r.json())["error"]
        async with client.post(f"{base}/api/sessions/{sid}/kill", json={"reason": "x"},
                               headers={"X-CSRF-Token": "wrong"}) as r:
            assert r.status == 403
        async with client.post(f"{base}/api/sessions/{sid}/kill", json={"reason": "x"},
                               headers={"X-CSRF-Token": csrf,
                                        "Origin": "http://evil.example"}) as r:
            assert r.status == 403
        async with client.post(f"{base}/logout") as r:
            assert r.status == 403
        headers = {"X-CSRF-Token": csrf}
        async with client.post(f"{base}/api/sessions/{sid}/kill", json={"reason": ""},
                               headers=headers) as r:
            assert r.status == 400 and "reason is required" in (await r.json())["error"]
        async with client.post(f"{base}/api/sessions/{sid}/kill", json={"reason": "x"},
                               headers=headers) as r:
            assert r.status == 404  # the CSRF check passed; there is no such session
        async with client.post(f"{base}/api/sessions/..%2Fx/kill", json={"reason": "x"},
                               headers=headers) as r:
            assert r.status in (400, 404)
        async with client.post(f"{base}/logout", headers=headers) as r:
            assert r.status == 200
        async with client.get(f"{base}/api/audit") as r:
            assert r.status == 401  # signed out means the server forgot the token


async def test_rbac_stays_with_the_apiserver(signed_in_stack):  # noqa: F811
    """The `dev` token may not observe, kill or read recordings; the apiserver says why."""
    stack, base = signed_in_stack
    client, csrf = await sign_in(base, stack.token_files["dev"].read_text().strip())
    async with client:
        async with client.get(f"{base}/api/recordings") as r:
            assert r.status == 403 and "permission denied" in (await r.json())["error"]
        async with client.get(f"{base}/api/audit", params={"namespace": "default"}) as r:
            assert r.status == 403
        async with client.get(f"{base}/api/audit") as r:
            assert r.status == 200 and (await r.json())["events"] == []
        admin = stack.token_files[stack.admin]
        proc = subprocess.Popen(
            [sys.executable, "-m", "rune.cli.main", "exec", "--api-server", stack.api_address,
             "--token-file", str(admin), "-v", "api", "sleep", "60"], cwd=ROOT,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env={"PATH": "/usr/bin:/bin", "RUNE_CONFIG": str(stack.state_dir / "none.yaml")})
        try:
            found = None
            while found is None:  # -v says which rule chose the TTY first, then the session
                line = await asyncio.to_thread(proc.stderr.readline)
                assert line, "the exec ended before it started"
                found = re.search(rb"session ([0-9a-f]{32}) on instance", line)
            sid = found.group(1).decode()
            async with client.get(f"{base}/api/sessions/{sid}/observe") as r:
                events = await read_events(r, lambda ev: any(e[1] == "failure" for e in ev))
            assert "may not observe" in events[-1][2]["error"]
            async with client.post(f"{base}/api/sessions/{sid}/kill", json={"reason": "no"},
                                   headers={"X-CSRF-Token": csrf}) as r:
                assert r.status == 403 and "may not admin" in (await r.json())["error"]
            assert proc.poll() is None  # still running: nothing was done to it
        finally:
            proc.kill()
            proc.wait()


async def test_search_pages_with_the_cursor_and_exports_the_filter(signed_in_stack):  # noqa: F811
    """Pages of a filtered search join up without gaps or repeats; export is the same set."""
    stack, base = signed_in_stack
    marker = uuid.uuid4().hex[:8]
    admin = stack.token_files[stack.admin]
    for i in range(6):
        result = await asyncio.to_thread(rune_exec, stack, admin, "api", "sh", "-c",
                                         f"exit {i % 2}", marker)
        assert result.returncode == i % 2
    denied = await asyncio.to_thread(rune_exec, stack, stack.token_files["dev"], "-n", "prod",
                                     "db", "true")
    assert denied.returncode == 255
    client, _ = await sign_in(base, stack.admin_token)
    async with client:
        async def page(**params):
            async with client.get(f"{base}/api/audit", params=params) as r:
                assert r.status == 200, await r.text()
                return await r.json()

        async def everything(**params):
            found, cursor = [], ""
            for _ in range(100):
                reply = await page(**params, cursor=cursor, limit="3")
                assert len(reply["events"]) <= 3
                found += reply["events"]
                cursor = reply["next_cursor"]
                if not cursor:
                    return found
            raise AssertionError("paging never ended")

        deadline = time.monotonic() + 20
        while True:
            ended = [e for e in await everything(event="session.ended")
                     if marker in e.get("argv", [])]
            if len(ended) == 6 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert len(ended) == 6
        seqs = [e["seq"] for e in ended]
        assert seqs == sorted(set(seqs))
        ones = [e for e in await everything(event="session.ended", exit_code="1")
                if marker in e["argv"]]
        assert len(ones) == 3 and all(e["exit_code"] == 1 for e in ones)
        denials = await everything(denied_only="1", user="dev")
        assert denials and all(e["event"] == "session.denied" for e in denials)
        assert denials[-1]["namespace"] == "prod"
        later = await page(since=str(time.time() + 3600))
        assert later["events"] == [] and later["next_cursor"] == ""
        async with client.get(f"{base}/api/audit/export",
                              params={"event": "session.ended", "exit_code": "1"}) as r:
            assert r.headers["Content-Type"].startswith("application/x-ndjson")
            lines = (await r.text()).splitlines()
        exported = [json.loads(x) for x in lines]
        assert [e["id"] for e in exported if marker in e["argv"]] == [e["id"] for e in ones]
        for bad in ({"cursor": "../1"}, {"event": "session.bogus"}, {"exit_code": "one"},
                    {"since": "yesterday"}, {"denied_only": "1", "event": "session.ended"}):
            async with client.get(f"{base}/api/audit", params=bad) as r:
                assert r.status == 400, bad


async def read_events(response: aiohttp.ClientResponse, want, timeout: float = 20):
    """SSE events (id, name, data) until `want(events)` holds."""
    events, current = [], {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = await asyncio.wait_for(response.content.readline(), deadline - time.monotonic())
        text = line.decode().rstrip("\n")
        if text == "":
            if "data" in current:
                events.append((current.get("id"), current.get("event"),
                               json.loads(current["data"])))
                if want(events):
                    return events
            current = {}
        elif not text.startswith(":") and ":" in text:
            key, _, value = text.partition(":")
            current[key] = value.lstrip(" ")
    raise AssertionError(f"stream never gave what was wanted: {events[-5:]}")


async def test_live_stream_resumes_after_last_event_id(signed_in_stack):  # noqa: F811
    """Events missed while disconnected come again when the browser sends Last-Event-ID."""
    stack, base = signed_in_stack
    admin = stack.token_files[stack.admin]
    client, _ = await sign_in(base, stack.admin_token)
    async with client:
        async with client.get(f"{base}/api/live") as r:
            assert r.headers["Content-Type"] == "text/event-stream"
            await read_events(r, lambda ev: any(e[1] == "snapshot" for e in ev))
            first = await asyncio.to_thread(rune_exec, stack, admin, "api", "true")
            assert first.returncode == 0
            events = await read_events(r, lambda ev: any(
                e[1] == "audit" and e[2]["event"] == "session.ended" for e in ev))
        last_id = [e[0] for e in events if e[1] == "audit"][-1]
        assert last_id.isdigit()
        # Disconnected: these happen while nobody listens.
        missed = await asyncio.to_thread(rune_exec, stack, admin, "api", "echo", "missed")
        sid = re.search(rb"session ([0-9a-f]{32})", missed.stderr).group(1).decode()
        async with client.get(f"{base}/api/live", headers={"Last-Event-ID": last_id}) as r:
            events = await read_events(r, lambda ev: any(
                e[1] == "audit" and e[2].get("session_id") == sid
                and e[2]["event"] == "session.ended" for e in ev))
        ids = [int(e[0]) for e in events if e[1] == "audit"]
        assert ids == sorted(ids) and ids[0] > int(last_id)
        kinds = [e[2]["event"] for e in events if e[1] == "audit" and e[2]["session_id"] == sid]
        assert kinds == ["session.started", "session.ended"]


def test_plaintext_off_loopback_is_refused(tmp_path):
    """Like the apiserver: no plaintext on a non-loopback address without --insecure."""
    result = subprocess.run([sys.executable, "-m", "rune.dashboard.main", "--listen",
                             "0.0.0.0:1"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("Error: refusing to serve plaintext HTTP on 0.0.0.0:1")


def test_serves_tls_when_given_a_certificate(tmp_path, signed_in_stack):  # noqa: F811
    """With --tls-cert/--tls-key the dashboard speaks HTTPS and marks its cookies Secure."""
    import ssl
    import urllib.request

    from rune.cli.devstack import free_port, stop_pid, wait_until

    stack, _ = signed_in_stack
    paths = _make_ca(tmp_path, "dashboard")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "rune.dashboard.main", "--listen",
                             f"127.0.0.1:{port}", "--api-server", stack.api_address,
                             "--tls-cert", str(paths["cert"]), "--tls-key", str(paths["key"])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        context = ssl.create_default_context(cafile=str(paths["ca"]))
        url = f"https://localhost:{port}/login"
        wait_until(lambda: urllib.request.urlopen(url, context=context).status == 200,
                   "dashboard over TLS", proc=proc)
        with urllib.request.urlopen(url, context=context) as page:
            assert "Secure" in page.headers["Set-Cookie"]
    finally:
        stop_pid(proc.pid, proc=proc)


@pytest.mark.parametrize("path", ["/api/sessions/%00/observe", "/api/recordings/x%0a/cast",
                                  "/api/audit?limit=99999999999999999999"])
async def test_hostile_requests_get_a_clear_refusal(signed_in_stack, path):  # noqa: F811
    """Malformed ids and sizes are refused (or clamped); the server carries on."""
    stack, base = signed_in_stack
    client, _ = await sign_in(base, stack.admin_token)
    async with client:
        async with client.get(base + path) as r:
            assert r.status in (200, 400), await r.text()
        async with client.get(base + "/healthz") as r:
            assert r.status == 200


async def test_observing_a_quiet_session_keeps_the_stream(signed_in_stack):  # noqa: F811
    """Output after a silence longer than the keep-alive interval still reaches the observer."""
    import base64

    stack, base = signed_in_stack
    admin = stack.token_files[stack.admin]
    proc = subprocess.Popen(
        [sys.executable, "-m", "rune.cli.main", "exec", "--api-server", stack.api_address,
         "--token-file", str(admin), "-v", "-t", "api", "sh", "-c",
         "echo early; sleep 12; echo late-output; sleep 60"], cwd=ROOT,
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", "RUNE_CONFIG": str(stack.state_dir / "none.yaml")})
    try:
        found = None
        while found is None:
            line = await asyncio.to_thread(proc.stderr.readline)
            assert line, "the exec ended before it started"
            found = re.search(rb"session ([0-9a-f]{32}) on instance", line)
        sid = found.group(1).decode()
        client, _ = await sign_in(base, stack.admin_token)
        async with client:
            async with client.get(f"{base}/api/sessions/{sid}/observe") as r:
                def seen(events):
                    text = b"".join(base64.b64decode(e[2]["data"]) for e in events
                                    if e[1] == "output")
                    return b"late-output" in text and b"early" in text
                await read_events(r, seen, timeout=40)
    finally:
        proc.kill()
        proc.wait()


async def test_live_table_counts_input_bytes_while_the_session_runs(signed_in_stack):  # noqa: F811
    """Bytes sent to a session's stdin show in the live snapshots before it ends, as output."""
    stack, base = signed_in_stack
    marker = f"stdin-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rune.cli.main", "exec", "--api-server", stack.api_address,
         "--token-file", str(stack.token_files[stack.admin]), "api", "sh", "-c",
         f"echo {marker}; exec cat >/dev/null"], cwd=ROOT,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        env={"PATH": "/usr/bin:/bin", "RUNE_CONFIG": str(stack.state_dir / "none.yaml")})
    try:
        assert marker.encode() in await asyncio.to_thread(proc.stdout.readline)
        proc.stdin.write(b"x" * 10000)
        proc.stdin.flush()  # stdin stays open: the session is live

        def counted(events) -> bool:
            return any(marker in " ".join(row["argv"]) and row["bytes_in"] >= 10000
                       and row["bytes_out"] > len(marker)
                       for _, name, data in events if name == "snapshot"
                       for row in data["sessions"])

        client, _ = await sign_in(base, stack.admin_token)
        async with client:
            async with client.get(f"{base}/api/live") as r:
                await read_events(r, counted, timeout=20)
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
