"""The real page in headless Chromium (Debian's package, driven by Playwright), on SmolLM2:
trace, edit, see the new target win, undo, see the old one back. Saves a screenshot to docs/."""

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def server(smollm2, data_dir, tmp_path_factory):
    import uvicorn

    from factedit.server.app import create_app
    from factedit.server.workbench import Workbench

    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed (.ci/run installs it: apt-get install chromium)")
    os.environ["FACTEDIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    bench = Workbench(smollm2, stats_corpus=str(data_dir / "wiki" / "enwiki_sample.jsonl"), stats_tokens=20_000)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(create_app(bench), host="127.0.0.1", port=port, log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", bench
    uv.should_exit = True
    thread.join(timeout=10)
    os.environ.pop("FACTEDIT_CACHE_DIR", None)


def test_trace_edit_undo_in_the_browser(server):
    from playwright.sync_api import expect, sync_playwright

    url, bench = server
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        page = browser.new_page(viewport={"width": 1250, "height": 1100})
        page.goto(url)
        expect(page.locator("#model")).to_contain_text("smollm2-135m")

        page.fill("#samples", "3")
        page.click("#trace-button")
        expect(page.locator("#maps svg")).to_have_count(3, timeout=120_000)
        expect(page.locator("#trace-summary")).to_contain_text("Paris")

        page.fill("#target", "Rome")
        page.fill("#target-true", "Paris")
        page.click("#edit-button")
        expect(page.locator("#edit-table")).to_be_visible(timeout=300_000)
        new_after = float(page.locator("#edit-table tr:nth-child(2) [data-role=new-after]").inner_text())
        old_after = float(page.locator("#edit-table tr:nth-child(2) [data-role=old-after]").inner_text())
        assert new_after > old_after, (new_after, old_after)
        expect(page.locator("#generation-after")).to_contain_text("Rome")
        expect(page.locator("#optimisation")).to_contain_text("converged")
        expect(page.locator("#edits li")).to_have_count(1)
        docs = Path(__file__).parents[1] / "docs"
        page.screenshot(path=str(docs / "workbench.png"), full_page=True)

        # Undo: the model is back to Paris.
        page.click("#edits .undo")
        expect(page.locator("#edits")).to_contain_text("no edits applied")
        page.click("#trace-button")
        # The first trace's summary also says Paris: wait until this trace has finished.
        expect(page.locator("#trace-button")).to_be_enabled(timeout=120_000)
        expect(page.locator("#trace-summary")).to_contain_text("Paris")
        assert not bench.edits

        # Bad input is shown in the page, and nothing changes.
        page.fill("#subject", "Louvre")
        page.click("#trace-button")
        expect(page.locator("#error")).to_contain_text("does not occur")
        browser.close()
