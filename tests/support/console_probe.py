#!/usr/bin/env python3
"""Drives the web console in headless Chromium (Debian's chromium and chromium-driver) with
Selenium, against a server the Rust test started and filled (tests/console.rs).

Usage: console_probe.py '<json settings>'; the settings name the server, the users, the device
and its token, the MQTT port and where screenshots go. Every wait has a deadline; nothing sleeps
for a fixed time. On success the last line printed is a JSON object the Rust test checks further
over the API ({"alarm": "<id acknowledged in the console>"}); on failure it exits non-zero after
saving a screenshot of the page it was on.

To see the console lose its server and recover, the probe prints {"step": "stop-server"} and
waits for the line "stopped" on its standard input, then {"step": "start-server"} and waits for
"started" (the Rust test starts the server again on the same ports).
"""

import json
import os
import subprocess
import sys
import time

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

S = json.loads(sys.argv[1])
BASE = S["base"]
SHOTS = S["screenshots"]
os.makedirs(SHOTS, exist_ok=True)


def log(message):
    print(f"[console_probe] {message}", flush=True)


def browser():
    options = Options()
    options.binary_location = S.get("chromium", "/usr/bin/chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,800", "--force-prefers-reduced-motion"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=S.get("chromedriver", "/usr/bin/chromedriver"))
    return webdriver.Chrome(service=service, options=options)


def wait(driver, what, condition, timeout=10):
    try:
        # The page re-renders lists as data arrives: an element read mid-render is read again.
        return WebDriverWait(driver, timeout, poll_frequency=0.02,
                             ignored_exceptions=(StaleElementReferenceException,)).until(lambda d: condition(d))
    except TimeoutException:
        raise AssertionError(f"timed out after {timeout} s waiting for: {what}") from None


def shot(driver, name):
    path = os.path.join(SHOTS, f"{name}.png")
    driver.save_screenshot(path)
    log(f"screenshot {path}")


def exists(driver, css):
    return len(driver.find_elements(By.CSS_SELECTOR, css)) > 0


def texts(driver, css):
    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, css)]


def sign_in(driver, username, password):
    wait(driver, "the sign-in form", lambda d: exists(d, "#username"))
    user = driver.find_element(By.ID, "username")
    user.clear()
    user.send_keys(username)
    driver.find_element(By.ID, "password").send_keys(password)
    driver.find_element(By.ID, "signin").click()
    wait(driver, "signed in", lambda d: exists(d, "#top:not([hidden])") and not exists(d, "#username"))


def server_step(step, answer):
    print(json.dumps({"step": step}), flush=True)
    line = sys.stdin.readline().strip()
    assert line == answer, f"asked to {step}, got {line!r}"


def banner(driver):
    found = driver.find_elements(By.ID, "banner")
    return found[0].text if found and found[0].is_displayed() else ""


def shown_devices(driver):
    return driver.execute_script(
        "return [...document.querySelectorAll('#devices tbody tr')].map((r) => r.dataset.device)")


def publish(payload):
    """QoS 0, so mosquitto_pub returns without waiting for the batch commit."""
    subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(S["mqttPort"]), "-q", "0",
         "-i", S["device"], "-u", S["device"], "-P", S["deviceToken"],
         "-t", f"devices/{S['device']}/telemetry", "-m", json.dumps(payload)],
        check=True, timeout=10, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def chart_points(driver, metric):
    found = driver.find_elements(By.CSS_SELECTOR, f'.chart[data-metric="{metric}"]')
    return int(found[0].get_attribute("data-points") or 0) if found else 0


def severe_console_messages(driver):
    """Script errors and CSP violations; answers such as a 404 for a device without a shadow
    are expected and handled by the page."""
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"
            and "Failed to load resource" not in e["message"]
            # While the server is stopped on purpose.
            and "WebSocket connection to" not in e["message"]]


def run(driver):
    device = S["device"]
    started = time.monotonic()

    # Sign-in: a deep link while signed out goes to sign-in and comes back after it.
    driver.get(f"{BASE}/#/devices?type={S['deviceType']}")
    wait(driver, "the sign-in form", lambda d: exists(d, "#username"))
    ready_ms = driver.execute_script("return performance.now()")
    # What the first load transferred: the page and every file it loaded (gzipped, headers
    # included), from the browser's Resource Timing.
    first_load = driver.execute_script("""
        const entries = [...performance.getEntriesByType('navigation'), ...performance.getEntriesByType('resource')];
        return entries.filter((e) => !new URL(e.name).pathname.startsWith('/api/'))
                      .reduce((n, e) => n + (e.transferSize || 0), 0);""")
    log(f"first load: {first_load / 1024:.1f} KiB transferred, sign-in form shown after {ready_ms:.0f} ms")
    assert 0 < first_load < 300 * 1024, f"the first load transferred {first_load} bytes"
    shot(driver, "signin")
    sign_in(driver, S["admin"], S["adminPassword"])
    wait(driver, "the filtered device list", lambda d: d.execute_script("return location.hash").startswith("#/devices?type=")
         and shown_devices(d) == [device])
    log("signed in; the list filtered by type shows only " + device)

    # Filtering with the form: a tag no device has, then the tag of the other device.
    driver.find_element(By.ID, "filter-type").clear()
    tag = driver.find_element(By.ID, "filter-tag")
    tag.send_keys(S["otherTag"])
    driver.find_element(By.ID, "apply-filters").click()
    wait(driver, "the list filtered by tag", lambda d: shown_devices(d) == [S["otherDevice"]])
    tag.clear()
    tag.send_keys("no-such-tag")
    driver.find_element(By.ID, "apply-filters").click()
    wait(driver, "the empty state", lambda d: exists(d, "#device-list .empty"))
    tag.clear()
    driver.find_element(By.ID, "apply-filters").click()
    wait(driver, "every device", lambda d: len(shown_devices(d)) == 2)
    shot(driver, "devices")

    # Register a device: its token is shown once; then delete it, confirming.
    driver.find_element(By.ID, "register-open").click()
    wait(driver, "the register form", lambda d: exists(d, "#reg-id"))
    driver.find_element(By.ID, "reg-id").send_keys("valve-9")
    driver.find_element(By.ID, "reg-type").send_keys("valve")
    driver.find_element(By.ID, "register-submit").click()
    wait(driver, "the token shown once",
         lambda d: exists(d, "#device-token") and d.find_element(By.ID, "device-token").get_attribute("value").startswith("dvt_"))
    shot(driver, "register-token")
    driver.find_element(By.CSS_SELECTOR, '[data-testid="token-done"]').click()
    wait(driver, "the new device listed", lambda d: "valve-9" in shown_devices(d))
    driver.find_element(By.CSS_SELECTOR, '#devices tr[data-device="valve-9"] [data-action="delete"]').click()
    wait(driver, "the confirmation", lambda d: exists(d, '[data-testid="confirm-delete"]'))
    driver.find_element(By.CSS_SELECTOR, '[data-testid="confirm-delete"]').click()
    wait(driver, "the device gone", lambda d: "valve-9" not in shown_devices(d) and len(shown_devices(d)) == 2)

    # A reading published over MQTT is on the device's live chart within a second.
    driver.get(f"{BASE}/#/devices/{device}")
    # The page is loaded (it asked to watch the device before loading the rest), and every
    # subscription request it sent is answered, the last one including the device.
    def watching(d):
        pending, devices = d.execute_script(
            "return [document.body.dataset.watchPending, document.body.dataset.watching || '']")
        return pending == "0" and device in devices.split(" ")

    wait(driver, "the live stream watching the device", lambda d: exists(d, "#shadow-version") and watching(d))
    before = chart_points(driver, "pressure")
    sent = time.monotonic()
    publish({"metrics": {"pressure": 3.5}})
    wait(driver, "the reading on the chart", lambda d: chart_points(d, "pressure") > before
         and "3.5" in " ".join(texts(d, '#latest tr[data-metric="pressure"] td')), timeout=5)
    elapsed = time.monotonic() - sent
    log(f"mosquitto_pub to chart: {elapsed * 1000:.0f} ms")
    assert elapsed < 1.0, f"the reading took {elapsed:.2f} s to reach the chart"
    # Its audit entries (an admin reads them); too few points for analytics yet: the panel stays hidden.
    wait(driver, "the device's audit entries", lambda d: exists(d, '#device-audit-table tr[data-action="device.register"]'))
    assert exists(driver, "#analytics") and not driver.find_element(By.ID, "analytics").is_displayed(), \
        "the analytics panel shows without enough data"
    shot(driver, "device")

    # The time-range picker reads aggregates from /api/telemetry.
    Select(driver.find_element(By.ID, "range")).select_by_value("1h")
    wait(driver, "the hourly range, aggregated", lambda d: chart_points(d, "pressure") >= 1
         and not d.find_element(By.ID, "agg").get_attribute("disabled"))
    Select(driver.find_element(By.ID, "range")).select_by_value("live")
    wait(driver, "live again", lambda d: d.find_element(By.ID, "agg").get_attribute("disabled") is not None)

    # Tags and metadata edited (a key removed, one added).
    driver.find_element(By.ID, "edit-device").click()
    wait(driver, "the edit dialog", lambda d: exists(d, "#edit-metadata"))
    tags = driver.find_element(By.ID, "edit-tags")
    tags.clear()
    tags.send_keys("south, line-2")
    driver.execute_script("arguments[0].value = arguments[1]", driver.find_element(By.ID, "edit-metadata"), '{"floor": 3}')
    driver.find_element(By.ID, "edit-save").click()
    wait(driver, "the edited device", lambda d: "line-2" in d.find_element(By.CSS_SELECTOR, ".facts").text
         and "floor" in d.find_element(By.CSS_SELECTOR, ".facts").text and "plant-a" not in d.find_element(By.CSS_SELECTOR, ".facts").text)

    # The rule fires: the alarm appears live in the alarms console; acknowledging it there.
    driver.get(f"{BASE}/#/alarms")
    wait(driver, "the alarms console", lambda d: exists(d, "#alarm-list .empty") or exists(d, "#alarms"))
    publish({"metrics": {"pressure": 42}})
    row_css = f'#alarms tr[data-status="ACTIVE_UNACK"] a[href="#/devices/{device}"]'
    wait(driver, "the alarm in the console", lambda d: exists(d, row_css))
    row = driver.find_element(By.CSS_SELECTOR, row_css).find_element(By.XPATH, "./ancestor::tr")
    alarm = row.get_attribute("data-alarm")
    row.find_element(By.CSS_SELECTOR, 'button[data-action="ack"]').click()
    wait(driver, "the alarm acknowledged",
         lambda d: exists(d, f'#alarms tr[data-alarm="{alarm}"][data-status="ACTIVE_ACK"]'))
    shot(driver, "alarms")
    driver.find_element(By.CSS_SELECTOR, f'#alarms tr[data-alarm="{alarm}"] [data-action="history"]').click()
    wait(driver, "the alarm's history", lambda d: len(d.find_elements(By.CSS_SELECTOR, "#alarm-events tbody tr")) >= 2)
    shot(driver, "alarm-history")
    driver.find_element(By.CSS_SELECTOR, '[data-testid="history-close"]').click()
    wait(driver, "the history closed", lambda d: not exists(d, "#alarm-history"))

    # Rules: an expression error is shown at its line and column; disabling a rule.
    driver.get(f"{BASE}/#/rules")
    wait(driver, "the rule list", lambda d: exists(d, "#rules tr[data-rule]"))
    rule_row = '#rules tr[data-rule]'
    driver.find_element(By.CSS_SELECTOR, f'{rule_row} [data-action="edit"]').click()
    wait(driver, "the rule editor", lambda d: exists(d, "#rule-json"))
    body = json.loads(driver.find_element(By.ID, "rule-json").get_attribute("value"))
    body["condition"] = "pressure > 10 &&\n  pressure <"
    driver.execute_script("arguments[0].value = arguments[1]", driver.find_element(By.ID, "rule-json"), json.dumps(body, indent=2))
    driver.find_element(By.ID, "rule-save").click()
    wait(driver, "the expression error marked", lambda d: exists(d, "#rule-marker"))
    marker = driver.find_element(By.ID, "rule-marker").text
    assert marker.startswith("condition, line 2:"), marker
    shot(driver, "rule-error")
    body["condition"] = "pressure > 20"
    driver.execute_script("arguments[0].value = arguments[1]", driver.find_element(By.ID, "rule-json"), json.dumps(body, indent=2))
    driver.find_element(By.ID, "rule-save").click()
    wait(driver, "the rule saved", lambda d: not exists(d, "#rule-json") and "Rule saved." in d.find_element(By.ID, "main").text)
    driver.find_element(By.CSS_SELECTOR, f'{rule_row} [data-action="toggle"]').click()
    wait(driver, "the rule disabled", lambda d: d.find_element(By.CSS_SELECTOR, f'{rule_row} [data-action="toggle"]').text == "Enable")

    # Notification channels: the server's validation message, then created, tested, edited.
    wait(driver, "the channel list", lambda d: exists(d, "#channel-list .empty") or exists(d, "#channels"))
    driver.find_element(By.ID, "channel-new").click()
    wait(driver, "the channel editor", lambda d: exists(d, "#channel-json"))
    channel = {"name": "console-hook", "type": "webhook", "url": "ftp://example.com/x"}
    driver.execute_script("arguments[0].value = arguments[1]", driver.find_element(By.ID, "channel-json"), json.dumps(channel))
    driver.find_element(By.ID, "channel-save").click()
    wait(driver, "the channel refused", lambda d: "url" in d.find_element(By.ID, "channel-problems").text)
    log("channel refused: " + driver.find_element(By.ID, "channel-problems").text)
    channel["url"] = S["hookUrl"]
    driver.execute_script("arguments[0].value = arguments[1]", driver.find_element(By.ID, "channel-json"), json.dumps(channel))
    driver.find_element(By.ID, "channel-save").click()
    channel_row = '#channels tr[data-channel="console-hook"]'
    wait(driver, "the channel listed", lambda d: exists(d, channel_row) and not exists(d, "#channel-json"))
    driver.find_element(By.CSS_SELECTOR, f'{channel_row} [data-action="test"]').click()
    wait(driver, "the test delivered", lambda d: "delivered" in d.find_element(By.ID, "channel-message").text)
    shot(driver, "channels")

    # Administration: an API key created (shown once) and revoked; the actor tree.
    driver.get(f"{BASE}/#/admin")
    wait(driver, "the admin page", lambda d: exists(d, "#key-form") and exists(d, "#tenant-actors tbody tr"))
    driver.find_element(By.ID, "key-name").send_keys("console-key")
    Select(driver.find_element(By.ID, "key-role")).select_by_value("operator")
    driver.find_element(By.CSS_SELECTOR, "#key-form button[type=submit]").click()
    wait(driver, "the key shown once",
         lambda d: exists(d, "#new-key") and d.find_element(By.ID, "new-key").get_attribute("value").startswith("drv_"))
    driver.find_element(By.CSS_SELECTOR, '[data-testid="key-done"]').click()
    key_row = '#key-table tr[data-key="console-key"]'
    wait(driver, "the key listed", lambda d: exists(d, f'{key_row} [data-action="revoke"]'))
    driver.find_element(By.CSS_SELECTOR, f'{key_row} [data-action="revoke"]').click()
    wait(driver, "the confirmation", lambda d: exists(d, '[data-testid="confirm-revoke"]'))
    driver.find_element(By.CSS_SELECTOR, '[data-testid="confirm-revoke"]').click()
    wait(driver, "the key revoked", lambda d: exists(d, key_row) and not exists(d, f'{key_row} [data-action="revoke"]'))
    # The actor tree: every kind, this tab's own live session among them.
    wait(driver, "the actor tree", lambda d: len(d.find_elements(By.CSS_SELECTOR, "#singleton-actors tbody tr")) == 7
         and "Campaign runner" in d.find_element(By.ID, "singleton-actors").text
         and "Batch job runner" in d.find_element(By.ID, "singleton-actors").text
         and len(d.find_elements(By.CSS_SELECTOR, "#session-actors tbody tr")) >= 1
         and exists(d, "#rule-actors tbody tr") and exists(d, "#writer-actors tbody tr"))
    driver.execute_script("document.getElementById('actors').scrollIntoView()")
    shot(driver, "admin")

    # A platform admin acts in another tenant, and back.
    Select(driver.find_element(By.ID, "tenant-switch")).select_by_value(S["otherTenant"])
    wait(driver, "acting in the other tenant", lambda d: d.execute_script("return document.body.dataset.tenant") == S["otherTenant"])
    driver.get(f"{BASE}/#/devices")
    wait(driver, "the other tenant's devices", lambda d: shown_devices(d) == [S["otherTenantDevice"]])
    wait(driver, "its live stream", lambda d: d.execute_script("return document.body.dataset.live") == "open")
    shot(driver, "other-tenant")
    Select(driver.find_element(By.ID, "tenant-switch")).select_by_value("default")
    wait(driver, "back in the default tenant", lambda d: d.execute_script("return document.body.dataset.tenant") == "default")

    # The overview, at desktop and at phone width.
    driver.get(f"{BASE}/#/")
    wait(driver, "the overview's counts", lambda d: d.find_element(By.ID, "registered").text == "2")
    wait(driver, "the active alarm counted", lambda d: exists(d, '.severity[data-severity="major"] .count')
         and d.find_element(By.CSS_SELECTOR, '.severity[data-severity="major"] .count').text == "1")
    for value in (1, 2, 3):
        publish({"metrics": {"pressure": value}})
    wait(driver, "the busiest devices", lambda d: exists(d, f'#busiest-devices tr[data-device="{device}"]'), timeout=15)
    driver.execute_script("document.getElementById('busiest').scrollIntoView({block: 'center'})")
    shot(driver, "overview-busiest")
    shot(driver, "overview")
    # Phone width, in the dark theme.
    driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    driver.set_window_size(390, 844)
    driver.get(f"{BASE}/#/devices/{device}")
    wait(driver, "the device page at phone width", lambda d: chart_points(d, "pressure") >= 2)
    driver.execute_script("document.getElementById('charts').scrollIntoView()")
    shot(driver, "device-phone-dark")
    driver.get(f"{BASE}/#/devices")
    wait(driver, "the device list at phone width", lambda d: len(shown_devices(d)) == 2)
    # Keyboard: what Tab reaches shows its focus.
    ActionChains(driver).send_keys(Keys.TAB, Keys.TAB, Keys.TAB).perform()
    wait(driver, "a visible focus", lambda d: d.execute_script(
        "const e = document.activeElement; return e !== document.body && getComputedStyle(e).outlineStyle !== 'none'"))
    shot(driver, "devices-phone-dark")
    driver.set_window_size(1280, 800)
    driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
    driver.get(f"{BASE}/#/devices/{device}")

    # The shadow editor: a change of desired state reaches the device, subscribed over MQTT,
    # as a delta; an edit of a version changed meanwhile is refused as a conflict.
    sub = subprocess.Popen(
        # Line-buffered: its debug lines (the SUBACK) arrive as they are printed.
        ["stdbuf", "-oL", "mosquitto_sub", "-h", "127.0.0.1", "-p", str(S["mqttPort"]), "-d", "-q", "1", "-C", "1", "-W", "20",
         "-i", device, "-u", device, "-P", S["deviceToken"], "-t", f"devices/{device}/shadow/update/delta"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 10
        for line in sub.stdout:
            if "SUBACK" in line:
                break
            assert time.monotonic() < deadline, "mosquitto_sub did not subscribe"
        wait(driver, "the shadow editor", lambda d: exists(d, "#desired-editor"))
        editor = driver.find_element(By.ID, "desired-editor")
        editor.clear()
        editor.send_keys('{"led": "on"')
        wait(driver, "the editor's validation", lambda d: exists(d, "#shadow-message .note.error")
             and d.find_element(By.ID, "desired-save").get_attribute("disabled") is not None)
        editor.send_keys("}")
        wait(driver, "valid again", lambda d: d.find_element(By.ID, "desired-save").get_attribute("disabled") is None)
        driver.find_element(By.ID, "desired-save").click()
        wait(driver, "the saved shadow", lambda d: d.find_element(By.ID, "shadow-version").text.startswith("Version 1")
             and '"led"' in d.find_element(By.ID, "shadow-delta").text)
        delta = None
        for line in sub.stdout:
            if line.startswith("{"):
                delta = json.loads(line)
                break
            assert time.monotonic() < deadline + 10, "no delta reached the device"
        assert delta and delta["state"] == {"led": "on"}, f"the device got {delta}"
        log("the device got the delta " + json.dumps(delta["state"]))
    finally:
        sub.kill()
        sub.wait()
    driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch('/api/devices/%s/shadow', {method: 'PATCH', headers: {'Content-Type': 'application/json',
          Authorization: 'Bearer ' + sessionStorage.getItem('drover.token')},
          body: JSON.stringify({state: {desired: {fan: 2}}})}).then(r => done(r.status));
    """ % device)
    editor = driver.find_element(By.ID, "desired-editor")
    editor.clear()
    editor.send_keys('{"led": "off"}')
    driver.find_element(By.ID, "desired-save").click()
    wait(driver, "the version conflict", lambda d: "changed since it was loaded" in d.find_element(By.ID, "shadow-message").text)
    shot(driver, "shadow-conflict")

    # The server stops: the page says it is reconnecting; it comes back on its own, watching the
    # device again, and the next reading is on the chart.
    wait(driver, "watching before the outage", lambda d: watching(d))
    server_step("stop-server", "stopped")
    wait(driver, "the reconnecting banner", lambda d: "reconnecting" in banner(d)
         and d.execute_script("return document.body.dataset.live") == "reconnecting", timeout=15)
    shot(driver, "reconnecting")
    server_step("start-server", "started")
    wait(driver, "the stream back", lambda d: "resumed" in banner(d) or d.execute_script("return document.body.dataset.live") == "open", timeout=30)
    wait(driver, "watching again", lambda d: watching(d), timeout=10)
    publish({"metrics": {"pressure": 7.25}})
    wait(driver, "a reading after the outage", lambda d: "7.25" in " ".join(texts(d, '#latest tr[data-metric="pressure"] td')), timeout=5)
    log("reconnected after the server restarted")

    # An expired or revoked token: back to sign-in, then to the page the user was on.
    driver.execute_script("sessionStorage.setItem('drover.token', 'not-a-valid-token')")
    driver.get(f"{BASE}/#/alarms")
    wait(driver, "sign-in after a refused token", lambda d: exists(d, "#username"))
    sign_in(driver, S["viewer"], S["viewerPassword"])
    wait(driver, "back on the alarms page", lambda d: d.execute_script("return location.hash") == "#/alarms"
         and exists(d, "#alarms"))

    # A viewer sees no write controls.
    assert not exists(driver, '#alarms [data-action="ack"], #alarms [data-action="clear"]'), "a viewer sees ack/clear buttons"
    assert not driver.find_element(By.CSS_SELECTOR, '[data-nav="admin"]').is_displayed(), "a viewer sees Admin"
    driver.get(f"{BASE}/#/rules")
    wait(driver, "the rules for a viewer", lambda d: exists(d, "#rules tr[data-rule]"))
    assert not exists(driver, "#rule-new") and not exists(driver, "#rules button"), "a viewer sees rule controls"
    wait(driver, "the channels for a viewer", lambda d: exists(d, '#channels tr[data-channel="console-hook"]'))
    assert not exists(driver, "#channel-new") and not exists(driver, "#channels button"), "a viewer sees channel controls"
    assert not driver.find_element(By.ID, "tenant-box").is_displayed(), "a viewer sees the tenant switch"
    driver.get(f"{BASE}/#/devices")
    wait(driver, "the device list for a viewer", lambda d: len(shown_devices(d)) == 2)
    assert not exists(driver, "#register-open"), "a viewer sees the register button"
    assert not exists(driver, '[data-action="delete"]'), "a viewer sees delete buttons"
    driver.get(f"{BASE}/#/devices/{device}")
    wait(driver, "the shadow for a viewer", lambda d: exists(d, "#shadow-desired"))
    assert not exists(driver, "#desired-editor"), "a viewer sees the shadow editor"
    assert not exists(driver, "#delete-device, #edit-device, #rotate-token"), "a viewer sees device controls"
    shot(driver, "viewer-device")

    problems = severe_console_messages(driver)
    assert not problems, f"the browser reported errors: {problems}"
    log(f"done in {time.monotonic() - started:.1f} s")
    print(json.dumps({"alarm": alarm}), flush=True)


def main():
    driver = browser()
    try:
        run(driver)
    except Exception:
        try:
            shot(driver, "failure")
            for entry in driver.get_log("browser"):
                log(f"browser: {entry.get('level')} {entry.get('message')}")
        except Exception:
            pass
        raise
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
