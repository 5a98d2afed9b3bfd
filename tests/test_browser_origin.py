"""A page on another origin cannot change the served model (cross-site request forgery), in headless
Chromium (Debian's package, driven by Playwright) on the tiny Llama: the workbench is served at
http://127.0.0.1:PORT, the attacking page at http://localhost:OTHER. It sends an edit file as a
multipart upload, which browsers send to other origins without asking first, by a form it submits
itself and by fetch(mode: "no-cors"); both reach the server and are refused, and the model is
unchanged. The workbench's own page still applies and undoes edits, with and without a token."""

import base64
import http.server
import threading
from contextlib import contextmanager

import pytest
import torch
from bad_edits import write_edit_file
from browser import CHROMIUM, CHROMIUM_ARGS, free_port, require_chromium, served
from tiny import tiny_model, word_tokenizer

pytestmark = pytest.mark.slow  # a browser (Debian's chromium): not in the fast tier

UPLOAD = "/api/edits/upload"


@pytest.fixture()
def bench(word_corpus):
    from factedit.models import from_model
    from factedit.server.workbench import Workbench

    require_chromium()
    lm = from_model(tiny_model("llama"), word_tokenizer(), name="tiny")
    return Workbench(lm, stats_corpus=str(word_corpus), stats_tokens=200)


@pytest.fixture()
def edit_file(bench, tmp_path):
    return write_edit_file(tmp_path / "edit.safetensors", bench.lm.fingerprint)


def attack_page(workbench_url: str, blob: bytes) -> str:
    """A page that tries to apply the edit file `blob` to the workbench at `workbench_url`:
    viaFetch() by fetch without CORS, viaForm() by submitting a form it fills itself."""
    return f"""<!doctype html><html><head><title>attack</title></head><body>
<form id="form" method="post" enctype="multipart/form-data" action="{workbench_url}{UPLOAD}">
  <input type="file" name="file" id="file"></form>
<script>
const bytes = Uint8Array.from(atob("{base64.b64encode(blob).decode()}"), (c) => c.charCodeAt(0));
const file = new File([bytes], "attack.safetensors", {{ type: "application/octet-stream" }});
async function viaFetch() {{
  const form = new FormData(); form.append("file", file);
  await fetch("{workbench_url}{UPLOAD}", {{ method: "POST", mode: "no-cors", body: form, credentials: "include" }});
}}
function viaForm() {{
  const files = new DataTransfer(); files.items.add(file);
  document.getElementById("file").files = files.files;
  document.getElementById("form").submit();
}}
</script></body></html>"""


@contextmanager
def other_origin(html: str):
    """Serve `html` at http://localhost:OTHER/ (another origin, and another site, than 127.0.0.1)."""
    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://localhost:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def attack(browser, workbench_url: str, blob: bytes) -> list[int]:
    """Run both attacks from another origin; the status of each upload request as the network saw it."""
    with other_origin(attack_page(workbench_url, blob)) as url:
        page = browser.new_page()
        page.goto(url)
        assert page.title() == "attack"
        statuses = []
        for how in ("viaFetch()", "viaForm()"):
            with page.expect_response(lambda response: response.url.endswith(UPLOAD)) as response:
                page.evaluate(how)
            statuses.append(response.value.status)
        page.close()
    return statuses


def test_another_origin_cannot_change_the_model_but_the_page_can(bench, edit_file):
    from playwright.sync_api import expect, sync_playwright

    weights = {k: v.clone() for k, v in bench.lm.model.state_dict().items()}
    with served(bench) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        assert attack(browser, url, edit_file.read_bytes()) == [403, 403]  # they reached it, and were refused
        assert not bench.edits
        assert all(torch.equal(weights[k], v) for k, v in bench.lm.model.state_dict().items())

        # The workbench's own page: upload the same file, then undo it.
        page = browser.new_page()
        page.goto(url)
        expect(page.locator("#model")).to_contain_text("tiny")
        page.set_input_files("#upload-file", str(edit_file))
        page.click("#upload-button")
        expect(page.locator("#edits li")).to_have_count(1)
        expect(page.locator("#edits li .label")).to_contain_text("edit.safetensors")
        assert [e.source for e in bench.edits] == ["uploaded"]
        assert not all(torch.equal(weights[k], v) for k, v in bench.lm.model.state_dict().items())
        page.click("#edits .undo")
        expect(page.locator("#edits")).to_contain_text("no edits applied")
        expect(page.locator("#error")).to_have_text("")
        assert not bench.edits
        browser.close()


def test_with_a_token_the_page_works_from_its_url_and_other_origins_still_cannot(bench, edit_file):
    from playwright.sync_api import expect, sync_playwright

    from factedit.server.access import Access

    with served(bench, Access(token="browser-token")) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context()
        page = context.new_page()
        assert page.goto(url).status == 401
        assert page.goto(f"{url}/?token=browser-token").status == 200
        expect(page.locator("#model")).to_contain_text("tiny")  # the page's own requests carry the cookie
        [cookie] = context.cookies()
        assert cookie["value"] == "browser-token" and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        page.set_input_files("#upload-file", str(edit_file))
        page.click("#upload-button")
        expect(page.locator("#edits li")).to_have_count(1)
        page.reload()  # the cookie alone, without ?token=, is enough now
        expect(page.locator("#edits li")).to_have_count(1)

        # Another site's page in the same browser: the SameSite=Strict cookie is not sent, so no token.
        attacker = context.new_page()
        with other_origin(attack_page(url, edit_file.read_bytes())) as other:
            attacker.goto(other)
            with attacker.expect_response(lambda response: response.url.endswith(UPLOAD)) as response:
                attacker.evaluate("viaFetch()")
            assert response.value.status == 401
        assert len(bench.edits) == 1
        browser.close()
