"""The real page in headless Chromium (Debian's package, driven by Playwright), on SmolLM2:
trace (the estimate first, then the exact heatmaps; hover values, legend, SVG and PNG downloads),
edit, see the new target win, undo, see the old one back.

The screenshot after the edit goes to the test's tmp_path; the tracked docs/workbench.png is
rewritten only when asked: FACTEDIT_UPDATE_SCREENSHOTS=1 make test (or pytest tests/test_browser.py)."""

import os
import time
from pathlib import Path

import pytest
from browser import CHROMIUM, CHROMIUM_ARGS, require_chromium, served

pytestmark = pytest.mark.slow  # a browser and SmolLM2


@pytest.fixture(scope="module")
def server(smollm2, smollm2_cache, data_dir):
    from factedit.server.workbench import Workbench

    require_chromium()
    os.environ["FACTEDIT_CACHE_DIR"] = str(smollm2_cache)  # the key statistics the other SmolLM2 tests computed
    bench = Workbench(smollm2, stats_corpus=str(data_dir / "wiki" / "enwiki_sample.jsonl"), stats_tokens=20_000)
    with served(bench) as url:
        yield url, bench
    os.environ.pop("FACTEDIT_CACHE_DIR", None)


def test_trace_edit_undo_in_the_browser(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, bench = server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1250, "height": 1100})
        page.goto(url)
        expect(page.locator("#model")).to_contain_text("smollm2-135m")

        page.fill("#samples", "3")
        page.evaluate("""() => {  // record every state the trace label goes through
            const label = document.getElementById("trace-state");
            window.traceStates = [];
            new MutationObserver(() => window.traceStates.push(label.getAttribute("data-state")))
                .observe(label, { attributes: true, attributeFilter: ["data-state"] });
        }""")
        page.click("#trace-button")
        # The estimate first (about a second), labelled as one; then the exact trace replaces it.
        state = page.locator("#trace-state")
        expect(state).to_have_attribute("data-state", "estimate", timeout=60_000)
        expect(state).to_contain_text("estimate (attribution patching)")
        expect(page.locator("#maps svg[data-state=estimate]")).to_have_count(3)
        expect(page.locator("#trace-summary")).to_contain_text("Paris")
        expect(state).to_have_attribute("data-state", "exact", timeout=300_000)
        expect(state).to_contain_text("exact causal trace")
        expect(page.locator("#maps svg[data-state=exact]")).to_have_count(3)
        states = page.evaluate("window.traceStates")
        assert [s for i, s in enumerate(states) if i == 0 or s != states[i - 1]] == ["running", "estimate", "exact"]

        # Each cell says its token, layer and value on hover; the colour legend spans the map's values.
        hidden = page.locator("#maps svg[data-kind=hidden]")
        cell = hidden.locator("rect").nth(5)
        value = float(cell.get_attribute("data-value"))
        title = cell.locator("title").text_content()
        assert title.startswith("token 0 ") and "layer 5: p(answer) " in title, title
        assert abs(float(title.rsplit(" ", 1)[1]) - value) < 1e-4, (title, value)
        cell.hover()
        expect(page.locator("#cell-info")).to_have_text(title)
        expect(hidden.locator(".legend path")).to_have_count(1)
        values = [float(v) for v in hidden.locator("rect").evaluate_all("cells => cells.map(c => c.dataset.value)")]
        assert float(hidden.locator(".legend-max").text_content()) == round(max(values), 4)
        expect(hidden.locator(".legend")).to_contain_text("p(answer)")

        # Saving: an SVG serialised from the page, and a PNG drawn from it.
        with page.expect_download() as download:
            page.click(".map[data-kind=hidden] .save-svg")
        assert download.value.suggested_filename == "factedit-trace-the-eiffel-tower-hidden-exact.svg"
        svg = Path(download.value.path()).read_text()
        assert svg.startswith("<svg") and 'xmlns="http://www.w3.org/2000/svg"' in svg, svg[:200]
        assert "restored hidden state (exact)" in svg and "<title>token 0 " in svg and "linearGradient" in svg
        with page.expect_download() as download:
            page.click(".map[data-kind=mlp] .save-png")
        assert download.value.suggested_filename.endswith("-mlp-exact.png")
        assert Path(download.value.path()).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

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
        shot = page.screenshot(path=str(tmp_path / "workbench.png"), full_page=True)
        assert shot[:8] == b"\x89PNG\r\n\x1a\n"
        if os.environ.get("FACTEDIT_UPDATE_SCREENSHOTS") == "1":  # the README's picture, only when asked
            (Path(__file__).parents[1] / "docs" / "workbench.png").write_bytes(shot)

        # Undo: the model is back to Paris.
        page.click("#edits .undo")
        expect(page.locator("#edits")).to_contain_text("no edits applied")
        page.click("#trace-button")
        # A new trace clears the old one; its estimate (the same run as the exact trace) says Paris.
        expect(state).to_have_attribute("data-state", "estimate", timeout=60_000)
        expect(page.locator("#trace-summary")).to_contain_text("Paris")
        assert not bench.edits

        # Bad input is shown in the page, and nothing changes. The click supersedes the running exact
        # trace: it is cancelled, and nothing of it reaches the page.
        page.fill("#subject", "Louvre")
        page.click("#trace-button")
        expect(page.locator("#error")).to_contain_text("does not occur")
        deadline = time.time() + 60
        while True:  # two traces of two jobs each (estimate, exact); the last one cancelled
            traces = [job for job in list(bench.jobs.values()) if job.kind == "trace"]
            if len(traces) == 4 and traces[-1].status not in ("queued", "running"):
                break
            assert time.time() < deadline, ("the superseded trace was not cancelled", [j.view() for j in traces])
            time.sleep(0.1)
        assert [job.status for job in traces] == ["done", "done", "done", "cancelled"]
        page.wait_for_timeout(1000)  # past the page's next poll
        expect(page.locator("#error")).to_contain_text("does not occur")
        expect(page.locator("#maps svg")).to_have_count(0)
        expect(state).to_have_attribute("data-state", "")
        browser.close()
