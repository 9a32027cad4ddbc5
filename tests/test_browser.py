"""The sample notebook's prompt panel in a real JupyterLab, driven through Debian's Chromium by Playwright.

The test starts and stops its own JupyterLab server (127.0.0.1, a random port, a token) and browser, each
bounded in time, and saves a screenshot of the panel under tests/output/.
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
    notebook = parameterize_notebook(notebook, {"run_dir": str(root / "run"), "overrides": {
        "max_new_tokens": 2000, "num_return_sequences": 1, "precision": "fp32"}})
    papermill.iorw.write_ipynb(notebook, str(root / "sample.ipynb"))
    token, port = secrets.token_hex(16), free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.open_browser=False", "--allow-root",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "JUPYTER_PLATFORM_DIRS": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("JupyterLab did not start within 90 s")
        yield {"url": f"{base}/lab/tree/sample.ipynb?token={token}", "root": root}
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


LAST_OUTPUT = "[...document.querySelectorAll('pre.nbgpt-output')].pop().textContent"
LAST_STATUS = "[...document.querySelectorAll('.nbgpt-status')].pop().textContent"


def status_text(page) -> str:
    return page.locator(".nbgpt-status").last.inner_text()


def test_prompt_panel_in_jupyterlab(lab):
    OUTPUT.mkdir(parents=True, exist_ok=True)
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, timeout=60_000, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        try:
            page.set_default_timeout(60_000)
            page.goto(lab["url"])
            page.locator(".jp-Notebook").first.wait_for()
            page.locator(".jp-NotebookPanel-toolbar").first.wait_for()
            # Run the cells only once the kernel has started and reports Idle in the status bar.
            page.locator("#jp-main-statusbar", has_text=re.compile(r"\| Idle")).wait_for(timeout=90_000)
            page.locator("li.lm-MenuBar-item", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).first.click()

            # The widgets render: text area, sliders, buttons.
            panel = page.locator(".widget-vbox", has=page.locator(".nbgpt-status")).last
            panel.wait_for(timeout=60_000)
            assert panel.locator("textarea").count() == 1
            assert panel.locator(".widget-slider").count() >= 4
            generate = panel.locator("button", has_text="Generate")
            stop = panel.locator("button", has_text="Stop")
            assert generate.is_visible() and stop.is_visible()

            # Move the temperature slider with the keyboard: the generator must receive the new value.
            temperature = panel.locator(".widget-slider", has_text="Temperature")
            before = float(temperature.locator(".widget-readout").inner_text())
            temperature.locator(".noUi-handle").focus()
            for _ in range(3):
                page.keyboard.press("ArrowRight")
            after = float(temperature.locator(".widget-readout").inner_text())
            assert after == pytest.approx(before + 0.15)

            # Type a prompt, Generate, and let it stream; then Stop halts the long (2000-token) generation.
            box = panel.locator("textarea")
            box.fill("JULIET:")
            generate.click()
            output = panel.locator("pre.nbgpt-output")
            # The widget re-renders its <pre> and status <span> on each update: query them afresh every poll.
            page.wait_for_function(f"() => {LAST_OUTPUT}.length > 'JULIET:'.length + 20", timeout=60_000)
            first = output.inner_text()
            assert first.startswith("JULIET:")
            time.sleep(0.3)
            assert len(output.inner_text()) > len(first), "the output did not keep streaming"
            stop.click()
            page.wait_for_function(f"() => {LAST_STATUS}.startsWith('stopped')", timeout=30_000)
            final = status_text(page)
            produced = int(re.search(r"stopped: (\d+) tokens", final).group(1))
            assert 0 < produced < 2000
            assert f"temperature {after:.2f}" in final
            time.sleep(0.5)
            frozen = output.inner_text()
            time.sleep(0.5)
            assert output.inner_text() == frozen, "text kept arriving after Stop"
            news = page.locator(".jp-toast-button", has_text="No")
            if news.count():
                news.first.click()  # JupyterLab's "get notified about news?" toast would cover the panel
            panel.scroll_into_view_if_needed()
            panel.screenshot(path=str(OUTPUT / "prompt_panel.png"))
        except Exception:
            page.screenshot(path=str(OUTPUT / "failure.png"), full_page=True)  # what the browser showed
            raise
        finally:
            browser.close()
    assert (OUTPUT / "prompt_panel.png").stat().st_size > 10_000
