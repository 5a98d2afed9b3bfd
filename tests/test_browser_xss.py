"""The workbench page renders file- and model-derived text as text, never as HTML (stored XSS): an
uploaded edit file whose metadata carries markup, and an edit whose targets and prompts carry markup,
must show literally and run no script. Headless Chromium (Debian's package, driven by Playwright) on
the tiny Llama, so it takes seconds."""

import json

import pytest
from bad_edits import REQUEST, write_edit_file
from browser import CHROMIUM, CHROMIUM_ARGS, require_chromium, served
from tiny import tiny_model, word_tokenizer

pytestmark = pytest.mark.slow  # a browser (Debian's chromium): not in the fast tier

TITLE = "factedit workbench"


def payload(where: str) -> str:
    """Markup that retitles the page if it is ever parsed as HTML; `where` names the field it came in."""
    if where == "filename":  # browsers send '"' in a file name as %22: no quotes here
        return "<img src=x alt=pwned-by-the-filename onerror=document.title=this.alt>"
    return f"""<img src=x onerror="document.title='pwned by the {where}'">"""


@pytest.fixture()
def server(word_corpus):
    from factedit.models import from_model
    from factedit.server.workbench import Workbench

    require_chromium()
    lm = from_model(tiny_model("llama"), word_tokenizer(), name="tiny")
    bench = Workbench(lm, stats_corpus=str(word_corpus), stats_tokens=500)
    with served(bench) as url:
        yield url, bench


def settle(page):
    """Let any injected image fail to load and its handler run."""
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(300)


def test_markup_in_files_and_edits_shows_as_text_and_runs_no_script(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, bench = server
    hostile = {**REQUEST, "subject": payload("subject"), "target_new": " " + payload("target")}
    edit_file = write_edit_file(tmp_path / "edit.safetensors", bench.lm.fingerprint, method=payload("method"),
                                requests=json.dumps([hostile]))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(url)
        expect(page.locator("#model")).to_contain_text("tiny")
        assert page.title() == TITLE

        # 1. An uploaded file: subject, target and method from its metadata, and its file name, in the label.
        page.set_input_files("#upload-file", files=[{"name": payload("filename") + ".safetensors",
                                                     "mimeType": "application/octet-stream",
                                                     "buffer": edit_file.read_bytes()}])
        page.click("#upload-button")
        expect(page.locator("#edits li")).to_have_count(1)
        settle(page)
        assert page.title() == TITLE
        label = page.locator("#edits li .label").inner_text()
        for where in ("subject", "target", "method", "filename"):
            assert payload(where) in label, (where, label)
        assert page.locator("#edits img").count() == 0

        # 2. An edit made in the page: the targets go into the table's headers, paraphrases into its rows.
        page.fill("#target", payload("new target"))
        page.fill("#target-true", "Paris")
        page.select_option("#method", "rome")
        page.fill("#paraphrases", payload("paraphrase") + " The Eiffel Tower is in the city of")
        page.click("#edit-button")
        expect(page.locator("#edit-table")).to_be_visible(timeout=120_000)
        settle(page)
        assert page.title() == TITLE
        headers = page.locator("#edit-table tr").first.inner_text()
        assert f"p({payload('new target')}) before" in headers, headers
        assert payload("paraphrase") in page.locator("#edit-table tr").nth(2).inner_text()
        assert page.locator("#edit-result img").count() == 0
        expect(page.locator("#optimisation")).to_contain_text("steps, target NLL")
        expect(page.locator("#generation-after")).to_contain_text("The Eiffel Tower is located in the city of")
        expect(page.locator("#edits li")).to_have_count(2)

        # 3. A trace: token labels and predictions (drawn as SVG text and plain text).
        page.fill("#samples", "2")
        page.click("#trace-button")
        expect(page.locator("#maps svg")).to_have_count(3, timeout=60_000)
        expect(page.locator("#maps svg").first.locator("text").first).to_have_text('"The"*')
        assert page.locator("#maps svg[data-kind=mlp] rect").count() == 9 * 3
        expect(page.locator("#predictions")).to_contain_text("top predictions:")

        # 4. Error messages quote the user's input.
        page.fill("#subject", payload("error"))
        page.click("#trace-button")
        expect(page.locator("#error")).to_contain_text("does not occur")
        settle(page)
        assert page.title() == TITLE
        assert "<img src=x onerror=" in page.locator("#error").inner_text()
        assert page.locator("img").count() == 0
        browser.close()
