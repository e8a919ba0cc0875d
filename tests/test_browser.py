"""JupyterLab in a real browser: a notebook opened in JupyterLab, run from the Run menu by headless
Chromium (Debian's chromium + chromium-driver, installed by ``.ci/setup``), must finish without an
error output and show its figures. A notebook with a failing cell must be caught (negative control).

Locally the tests skip when Chromium is not installed; under CI (``CI=true``) a missing browser is a
failure, so the check cannot silently disappear.
"""

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")

pytestmark = pytest.mark.slow


def _require_browser():
    missing = [name for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if path is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip)")
    if missing:
        message = f"{', '.join(missing)} not installed (bash .ci/setup installs them)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path):
    """A JupyterLab server on 127.0.0.1 serving ``tmp_path / "root"``; yields (url, token, root)."""
    _require_browser()
    root, settings = tmp_path / "root", tmp_path / "lab-settings"
    root.mkdir()
    (settings / "@jupyterlab" / "apputils-extension").mkdir(parents=True)
    # no news/update prompt over the page
    (settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(settings), "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "ws"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         "--LabApp.expose_app_in_browser=True", "--allow-root"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    else:
        server.kill()
        pytest.fail("JupyterLab did not start within 90 s")
    try:
        yield url, token, root
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.fixture
def browser():
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


# the notebook's cells as the app holds them (not the DOM): execution counts and outputs
CELLS_JS = """
const panel = window.jupyterapp && window.jupyterapp.shell.currentWidget;
if (!panel || !panel.content || !panel.content.widgets) { return null; }
return panel.content.widgets.filter(c => c.model.type === 'code').map(c => ({
    count: c.model.executionCount, outputs: c.model.outputs.toJSON()}));
"""


def _status(driver) -> str:
    from selenium.webdriver.common.by import By

    return " ".join(e.text for e in driver.find_elements(By.CSS_SELECTOR, "#jp-main-statusbar .jp-StatusBar-TextItem"))


def _run_all_in_jupyterlab(driver, url: str, token: str, name: str, timeout: float = 240) -> list[dict]:
    """Open ``name``, run all cells from the Run menu, wait until the kernel is done; the code cells."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{url}/lab/tree/{name}?token={token}")
    wait = WebDriverWait(driver, timeout, poll_frequency=0.5)
    wait.until(lambda d: "Idle" in _status(d) and d.execute_script(CELLS_JS))  # a kernel exists and is idle
    run_menu = next(e for e in driver.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-itemLabel") if e.text == "Run")
    run_menu.click()
    driver.find_element(By.CSS_SELECTOR, "li.lm-Menu-item[data-command='runmenu:run-all']").click()

    def finished(d):
        cells = d.execute_script(CELLS_JS)
        failed = any(o.get("output_type") == "error" for c in cells for o in c["outputs"])
        busy = any("[*]" in e.text for e in d.find_elements(By.CSS_SELECTOR, ".jp-InputPrompt"))
        return cells if "Idle" in _status(d) and not busy and (failed or all(c["count"] for c in cells)) else False

    time.sleep(1)  # let the queued run start before the first check
    return wait.until(finished)


def _errors(cells: list[dict]) -> list[str]:
    return [f"{o.get('ename')}: {o.get('evalue')}" for c in cells for o in c["outputs"] if o.get("output_type") == "error"]


def test_a_notebook_runs_from_the_run_menu_in_jupyterlab(jupyterlab, browser, tmp_path):
    from selenium.webdriver.common.by import By

    url, token, root = jupyterlab
    name = "05_ablation_epsilon.ipynb"  # smoke: trains part B of the smoke study, one figure
    shutil.copy(REPO / "notebooks" / name, root / name)
    started = time.monotonic()
    cells = _run_all_in_jupyterlab(browser, url, token, name)
    assert _errors(cells) == []
    assert all(c["count"] for c in cells), "some cells never ran"
    images = [img for img in browser.find_elements(
        By.CSS_SELECTOR, ".jp-OutputArea-output[data-mime-type='image/png'] img")
        if browser.execute_script("return arguments[0].naturalWidth", img) > 0]
    expected = sum("image/png" in o.get("data", {}) for c in cells for o in c["outputs"])
    assert expected >= 1 and len(images) == expected, (len(images), expected)
    shot = tmp_path / "jupyterlab-05.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    print(f"JupyterLab run of {name}: {time.monotonic() - started:.0f} s, {len(images)} figure(s), screenshot {shot}")


def test_a_failing_cell_is_caught_in_jupyterlab(jupyterlab, browser):
    url, token, root = jupyterlab
    notebook = {"cells": [
        {"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [], "source": ["x = 1"]},
        {"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [],
         "source": ["raise RuntimeError('deliberate failure')"]},
        {"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [], "source": ["y = 2"]}],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "nbformat": 4, "nbformat_minor": 5}
    (root / "failing.ipynb").write_text(json.dumps(notebook))
    cells = _run_all_in_jupyterlab(browser, url, token, "failing.ipynb", timeout=120)
    assert _errors(cells) == ["RuntimeError: deliberate failure"]
    assert cells[2]["count"] is None  # the run stopped at the failure
