"""The real page in headless Chromium (Debian's package, driven by Playwright), on SmolLM2:
trace, edit, see the new target win, undo, see the old one back. Saves a screenshot to docs/."""

import os
from pathlib import Path

import pytest
from browser import CHROMIUM, CHROMIUM_ARGS, require_chromium, served

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(smollm2, data_dir, tmp_path_factory):
    from factedit.server.workbench import Workbench

    require_chromium()
    os.environ["FACTEDIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    bench = Workbench(smollm2, stats_corpus=str(data_dir / "wiki" / "enwiki_sample.jsonl"), stats_tokens=20_000)
    with served(bench) as url:
        yield url, bench
    os.environ.pop("FACTEDIT_CACHE_DIR", None)


def test_trace_edit_undo_in_the_browser(server):
    from playwright.sync_api import expect, sync_playwright

    url, bench = server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
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
