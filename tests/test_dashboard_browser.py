"""The ops dashboard in a real browser (Debian's chromium via chromium-driver) on a real stack.

Sign in, a `rune exec` session appearing live, observing its output, killing it
with a reason, finding it in the audit search, playing its recording; a token
without `audit` sees nothing. Set RUNE_SCREENSHOTS=DIR to keep screenshots.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from rune.cli.devstack import Stack, wait_until

from tests.conftest import ROOT
from tests.dashboard_stack import signed_in_stack  # noqa: F401 - the stack fixture
from tests.test_audit_e2e import session_id_of

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT = 30.0  # generous: the 2-core machine may be busy


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is missing: apt-get install chromium chromium-driver"
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    reason = _browser_missing()
    if reason:
        if os.environ.get("CI") == "true" or os.environ.get("RUNE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"browser tests are required here: {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                "--window-size=1400,900",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def until(driver, condition, what: str, timeout: float = WAIT):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition, message=what)


def shoot(driver, name: str) -> None:
    folder = os.environ.get("RUNE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / f"{name}.png"))


def sign_in(driver, base: str, token: str) -> None:
    from selenium.webdriver.common.by import By

    driver.delete_all_cookies()
    driver.get(base + "/")
    until(driver, lambda d: d.current_url.endswith("/login"), "redirect to sign-in")
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "signin").click()
    until(driver, lambda d: d.current_url.rstrip("/") == base, "signed in")


def live_row(driver, sid: str):
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, f'#live tr[data-session="{sid}"]')
    return found[0] if found else None


def start_ticker(stack: Stack, token_file: Path, marker: str) -> tuple[subprocess.Popen, str]:
    """A TTY session that prints a numbered line twice a second until it is ended."""
    script = f"i=0; while true; do i=$((i+1)); echo {marker}-$i; sleep 0.5; done"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rune.cli.main", "exec", "--api-server", stack.api_address,
         "--token-file", str(token_file), "-v", "-t", "api", "sh", "-c", script],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
        env={**os.environ, "RUNE_CONFIG": str(stack.state_dir / "no-config.yaml")})
    line = b""
    deadline = time.monotonic() + WAIT
    while b" on instance" not in line and time.monotonic() < deadline:
        line = proc.stderr.readline()
    return proc, session_id_of(line)


def test_live_observe_kill_search_play(browser, signed_in_stack):  # noqa: F811
    """Sign in; an exec appears live; observe it; kill it with a reason; search; play it."""
    from selenium.webdriver.common.by import By

    stack, base = signed_in_stack
    driver = browser
    sign_in(driver, base, stack.admin_token)
    until(driver, lambda d: d.find_element(By.ID, "status").text == "live", "live stream")
    marker = f"tick{uuid.uuid4().hex[:6]}"
    proc, sid = start_ticker(stack, stack.token_files[stack.admin], marker)
    try:
        row = until(driver, lambda d: live_row(d, sid), "the new session in the live table")
        cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
        assert cells[0] == stack.admin and cells[1] == "default"
        assert cells[2].startswith("api-instance-") and marker in cells[4] and cells[5] == "yes"
        driver.get(base + "/")  # a fresh load, timed from navigation start
        row = until(driver, lambda d: live_row(d, sid), "the session after a reload")
        first_paint = driver.execute_script("return window.runeFirstPaint")
        print(f"\nlive table first paint: {first_paint:.0f} ms after navigation")
        shoot(driver, "live")

        row.find_element(By.CSS_SELECTOR, "button.observe").click()
        until(driver, lambda d: f"{marker}-3" in d.find_element(By.ID, "terminal").text,
              "the observed output in the terminal")
        shoot(driver, "observe")

        live_row(driver, sid).find_element(By.CSS_SELECTOR, "button.kill").click()
        confirm = driver.find_element(By.ID, "kill-confirm")
        confirm.click()  # no reason yet: refused in the page, the session goes on
        assert proc.poll() is None
        driver.find_element(By.ID, "kill-reason").send_keys("disk maintenance")
        shoot(driver, "kill")
        confirm.click()
        assert proc.wait(timeout=WAIT) == 255
        stderr = proc.stderr.read().decode()
        assert f"Error: session ended by {stack.admin}: disk maintenance" in stderr
        until(driver, lambda d: live_row(d, sid) is None, "the killed session leaves the table")
        until(driver, lambda d: "session over" in d.find_element(By.ID, "observe-status").text,
              "the observer is told the session ended")
    finally:
        if proc.poll() is None:
            proc.kill()

    driver.get(base + "/audit")
    instance = cells[2]
    driver.find_element(By.NAME, "instance").send_keys(instance)
    driver.find_element(By.NAME, "user").send_keys(stack.admin)
    driver.find_element(By.ID, "search").click()

    def kinds(d):
        rows = d.find_elements(By.CSS_SELECTOR, f'#results tr[data-session="{sid}"]')
        return {r.get_attribute("data-event") for r in rows}

    until(driver, lambda d: {"session.started", "session.observed", "session.killed",
                             "session.failed"} <= kinds(d), "the session's events in search")
    shoot(driver, "audit")

    driver.get(f"{base}/play?session={sid}")
    until(driver, lambda d: f"{marker}-3" in d.find_element(By.ID, "player").text,
          "the recording plays")
    shoot(driver, "play")


def test_fanout_members_are_grouped_and_argv_is_escaped(browser, signed_in_stack):  # noqa: F811
    """A fan-out's members sit under one group row; control characters show as \\xNN."""
    from selenium.webdriver.common.by import By

    stack, base = signed_in_stack
    driver = browser
    sign_in(driver, base, stack.admin_token)
    until(driver, lambda d: d.find_element(By.ID, "status").text == "live", "live stream")
    marker = f"fan{uuid.uuid4().hex[:6]}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rune.cli.main", "exec", "--api-server", stack.api_address,
         "--token-file", str(stack.token_files[stack.admin]), "api", "--all", "sh", "-c",
         "sleep 30", f"{marker}\x1b[31mred"], stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
        env={**os.environ, "RUNE_CONFIG": str(stack.state_dir / "no-config.yaml")})
    try:
        def group(d):
            for body in d.find_elements(By.CSS_SELECTOR, "#live tbody.fanout"):
                members = body.find_elements(By.CSS_SELECTOR, "tr[data-session]")
                # textContent: the command cell may be cut short on screen (ellipsis).
                if len(members) == 2 and marker in members[0].get_attribute("textContent"):
                    return body, members
            return None

        body, members = until(driver, group, "both members under one fan-out group")
        head = body.find_element(By.CSS_SELECTOR, "tr.fanout-head").text
        assert "2 instances" in head
        argv = members[0].find_elements(By.TAG_NAME, "td")[4].get_attribute("textContent")
        assert f"{marker}\\x1b[31mred" in argv  # shown escaped, never interpreted
        instances = sorted(m.find_elements(By.TAG_NAME, "td")[2].text for m in members)
        assert instances == ["api-instance-a1-0", "api-instance-a1-1"]
        shoot(driver, "fanout")
    finally:
        proc.kill()
        proc.wait()


def test_token_without_audit_sees_nothing(browser, signed_in_stack):  # noqa: F811
    """The `dev` token (exec and list only) signs in but sees no sessions and no events."""
    from selenium.webdriver.common.by import By

    stack, base = signed_in_stack
    driver = browser
    marker = f"hidden{uuid.uuid4().hex[:6]}"
    proc, sid = start_ticker(stack, stack.token_files[stack.admin], marker)
    try:
        sign_in(driver, base, stack.token_files["dev"].read_text().strip())
        until(driver, lambda d: d.find_element(By.ID, "status").text == "live", "live stream")
        until(driver, lambda d: d.execute_script("return document.body.dataset.painted"),
              "first snapshot")
        time.sleep(0.5)  # a snapshot and any audit event would have arrived by now
        assert live_row(driver, sid) is None
        assert driver.find_element(By.ID, "count").text == "0"
        driver.get(base + "/audit")
        until(driver, lambda d: "that is all" in d.find_element(By.ID, "summary").text,
              "the search finished")
        assert driver.find_elements(By.CSS_SELECTOR, "#results tbody tr") == []
        driver.get(base + "/recordings")
        until(driver, lambda d: "denied" in d.find_element(By.ID, "failure").text,
              "recordings refused")
    finally:
        proc.kill()
        proc.wait()


def test_stack_still_serves_after_browser_tests(signed_in_stack):  # noqa: F811
    """The dashboard answers after everything above (including the hostile requests)."""
    import urllib.request

    _, base = signed_in_stack
    wait_until(lambda: urllib.request.urlopen(base + "/healthz").read() == b"ok", "healthz")


