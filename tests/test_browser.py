"""The sample notebook's prompt panel in a real JupyterLab, driven through Debian's Chromium by Playwright.

The test starts and stops its own JupyterLab server (127.0.0.1, a random port, a token) and browser, each
bounded in time. It waits on conditions (the panel's first generation done), never on fixed budgets behind
slow cells, and keeps screenshots of the panel at 1400 and 800 px (and after an error) under tests/output/.
"""

import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import tiny_train_config

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("NBGPT_CHROMIUM", "/usr/bin/chromium")
OUTPUT = ROOT / "tests" / "output"

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                                 reason=f"no Chromium at {CHROMIUM}: `make browser` installs Debian's chromium "
                                        f"(needs root or sudo)")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory, char_data):
    """A trained tiny checkpoint, the parameterised sample notebook, and a JupyterLab server over them."""
    import papermill
    from papermill.parameterize import parameterize_notebook

    from nbgpt.train import Trainer

    root = tmp_path_factory.mktemp("lab")
    # Big enough that 2000 tokens take seconds on a CPU, so there is a long generation to Stop.
    trainer = Trainer(tiny_train_config(char_data, root / "run", max_steps=40, eval_interval=0, block_size=128,
                                        n_layer=4, n_head=4, n_embd=256, total_batch_tokens=8 * 128))
    trainer.fit()
    trainer.close()
    notebook = papermill.iorw.load_notebook_node(str(ROOT / "notebooks" / "05_sample.ipynb"))
    # Short generations in the notebook's own cells: the long one is asked for in the panel.
    notebook = parameterize_notebook(notebook, {"run_dir": str(root / "run"), "overrides": {
        "max_new_tokens": 40, "num_return_sequences": 1, "precision": "fp32"}})
    papermill.iorw.write_ipynb(notebook, str(root / "sample.ipynb"))
    # No "get notified about news?" toast: it would cover the panel in the screenshots.
    settings = root / "lab-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    token, port = secrets.token_hex(16), free_port()
    OUTPUT.mkdir(parents=True, exist_ok=True)
    log = open(OUTPUT / "jupyterlab.log", "wb")  # the server's log, kept with the screenshots (a pipe could fill)
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.open_browser=False", "--allow-root",
         "--LabApp.news_url=", f"--LabApp.user_settings_dir={root / 'lab-settings'}",
         f"--LabApp.workspaces_dir={root / 'workspaces'}",  # the default layout, not one a previous run left
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "JUPYTER_PLATFORM_DIRS": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("JupyterLab did not start within 180 s")
        yield {"url": f"{base}/lab/tree/sample.ipynb?token={token}", "root": root}
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


LAST_OUTPUT = "[...document.querySelectorAll('pre.nbgpt-output')].pop().textContent"
LAST_STATUS = "([...document.querySelectorAll('.nbgpt-status')].pop() || {textContent: ''}).textContent"
TRACEBACK = "[...document.querySelectorAll('.jp-OutputArea-output')].some(o => o.textContent.includes('Traceback'))"
# Run All has finished when the panel's own first generation (the notebook's last cell) reports done.
PANEL_READY = f"() => {TRACEBACK} || {LAST_STATUS}.startsWith('done')"


def status_text(page) -> str:
    return page.locator(".nbgpt-status").last.inner_text()


def not_squeezed(button) -> bool:
    """The button's label fits: nothing cut to an ellipsis."""
    return button.evaluate("b => b.scrollWidth <= b.clientWidth && b.getBoundingClientRect().width >= 80")


def shoot(page, panel, name: str, width: int) -> None:
    page.set_viewport_size({"width": width, "height": 1000})
    page.wait_for_function(f"() => document.documentElement.clientWidth === {width}")
    panel.scroll_into_view_if_needed()
    panel.screenshot(path=str(OUTPUT / f"{name}_{width}px.png"))


def run_all_and_wait_for_panel(page, url: str):
    page.goto(url)
    page.locator(".jp-Notebook").first.wait_for()
    page.locator(".jp-NotebookPanel-toolbar").first.wait_for()
    # Close the file browser, as one does on a narrow screen: the notebook gets the window's width.
    sidebar = page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current")
    if sidebar.count():
        sidebar.first.click()
        sidebar.wait_for(state="detached")
    # Run the cells only once the kernel has started and reports Idle in the status bar.
    page.locator("#jp-main-statusbar", has_text=re.compile(r"\| Idle")).wait_for(timeout=120_000)
    page.locator("li.lm-MenuBar-item", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).first.click()
    # However slow the machine, the cells before the panel end; a hang is what the generous bound catches.
    page.wait_for_function(PANEL_READY, timeout=600_000)
    assert not page.evaluate(TRACEBACK), "a cell failed: see tests/output/failure.png"
    return page.locator(".widget-vbox", has=page.locator(".nbgpt-status")).last


def test_prompt_panel_in_jupyterlab(lab):
    OUTPUT.mkdir(parents=True, exist_ok=True)
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, timeout=60_000, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.set_default_timeout(60_000)
            panel = run_all_and_wait_for_panel(page, lab["url"])
            # The widgets render: text area, sliders, seed box, buttons, and the first generation.
            assert panel.locator("textarea").count() == 1
            assert panel.locator(".widget-slider").count() >= 4
            generate = panel.locator("button", has_text="Generate")
            stop = panel.locator("button", has_text="Stop")
            assert generate.is_visible() and stop.is_visible() and not_squeezed(generate)
            first_seed = re.search(r"seed (\d+)", status_text(page)).group(1)

            # Move the temperature slider with the keyboard: the generator must receive the new value.
            temperature = panel.locator(".widget-slider", has_text="Temperature")
            before = float(temperature.locator(".widget-readout").inner_text())
            temperature.locator(".noUi-handle").focus()
            for _ in range(3):
                page.keyboard.press("ArrowRight")
            after = float(temperature.locator(".widget-readout").inner_text())
            assert after == pytest.approx(before + 0.15)
            tokens = panel.locator(".widget-slider", has_text="Max new tokens")
            tokens.locator(".noUi-handle").focus()
            page.keyboard.press("End")
            assert tokens.locator(".widget-readout").inner_text().replace(",", "") == "2000"

            # Type a prompt, Generate, and let it stream; then Stop halts the long (2000-token) generation.
            panel.locator("textarea").fill("JULIET:")
            generate.click()
            output = panel.locator("pre.nbgpt-output")
            # The widget re-renders its <pre> and status <span> on each update: query them afresh every poll.
            page.wait_for_function(f"() => {LAST_OUTPUT}.startsWith('JULIET:') && {LAST_OUTPUT}.length > 27",
                                   timeout=60_000)
            first = output.inner_text()
            page.wait_for_function(f"() => {LAST_OUTPUT}.length > {len(first)}", timeout=30_000)  # still streaming
            assert panel.locator("pre.nbgpt-output span.nbgpt-prompt").inner_text() == "JULIET:"
            stop.click()
            page.wait_for_function(f"() => {LAST_STATUS}.startsWith('stopped')", timeout=30_000)
            final = status_text(page)
            produced = int(re.search(r"stopped: (\d+) tokens", final).group(1))
            assert 0 < produced < 2000
            assert f"temperature {after:.2f}" in final and "tokens/s" in final
            assert re.search(r"seed (\d+)", final).group(1) != first_seed  # a fresh seed for each Generate
            frozen = output.inner_text()
            page.wait_for_timeout(500)
            assert output.inner_text() == frozen, "text kept arriving after Stop"
            style = output.evaluate("e => [getComputedStyle(e).whiteSpace, getComputedStyle(e).wordBreak]")
            assert style == ["pre-wrap", "normal"]  # wraps at spaces, words kept whole
            shoot(page, panel, "prompt_panel", 1400)
            shoot(page, panel, "prompt_panel", 800)
            assert not_squeezed(generate) and not_squeezed(stop)

            # A bad seed is named in the status line, on its own row: the buttons keep their size.
            panel.locator(".widget-text", has_text="Seed").locator("input").fill("lucky")
            generate.click()
            page.wait_for_function(f"() => {LAST_STATUS}.includes('is not a number')")
            assert not_squeezed(generate) and not_squeezed(stop)
            shoot(page, panel, "prompt_panel_error", 800)
        except Exception:
            page.screenshot(path=str(OUTPUT / "failure.png"), full_page=True)  # what the browser showed
            raise
        finally:
            browser.close()
    for name in ("prompt_panel_1400px", "prompt_panel_800px", "prompt_panel_error_800px"):
        assert (OUTPUT / f"{name}.png").stat().st_size > 10_000
