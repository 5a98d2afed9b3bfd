"""Who may use the workbench (factedit.server.app.Access, `factedit serve`): trusted Host headers only
(DNS rebinding), no state-changing requests from other origins (cross-site request forgery), a token
where one is set. FastAPI's test client on the tiny Llama, and one real server for the Host check."""

import io
import re

import httpx
import pytest
import torch
from bad_edits import write_edit_file
from browser import served
from click.testing import CliRunner
from fastapi.testclient import TestClient
from tiny import tiny_model, word_tokenizer

from factedit.cli import main
from factedit.errors import InputError
from factedit.models import from_model
from factedit.server.access import Access
from factedit.server.app import create_app
from factedit.server.workbench import Workbench

HERE = "http://127.0.0.1:8000"  # the address the test clients reach the workbench at


@pytest.fixture()
def bench(word_corpus):
    lm = from_model(tiny_model("llama"), word_tokenizer(), name="tiny")
    return Workbench(lm, stats_corpus=str(word_corpus), stats_tokens=200)


@pytest.fixture()
def edit_file(bench, tmp_path) -> bytes:
    return write_edit_file(tmp_path / "edit.safetensors", bench.lm.fingerprint).read_bytes()


def weights(bench) -> dict:
    return {k: v.clone() for k, v in bench.lm.model.state_dict().items()}


def unchanged(bench, before: dict) -> bool:
    return not bench.edits and all(torch.equal(before[k], v) for k, v in bench.lm.model.state_dict().items())


def upload(client, blob: bytes, **headers):
    return client.post("/api/edits/upload", files={"file": ("e.safetensors", io.BytesIO(blob))}, headers=headers)


def test_only_trusted_hosts_are_answered(bench, edit_file):
    before = weights(bench)
    with TestClient(create_app(bench), base_url=HERE) as client:
        for host in ("127.0.0.1:8000", "localhost:8000", "LOCALHOST", "localhost.", "[::1]:8000", "127.0.0.5",
                     "[::ffff:127.0.0.1]:8000"):
            response = client.get("/api/model", headers={"Host": host})
            assert response.status_code == 200, (host, response.text)
        for host in ("evil.example:8000", "evil.example", "127.0.0.1.evil.example", "localhost.evil.example",
                     "10.0.0.1:8000", "[::1", "localhost:port", ""):
            response = client.get("/api/model", headers={"Host": host})
            assert response.status_code == 400 and "untrusted Host header" in response.text, (host, response.text)
        # A rebinding page drives the API with its own name: refused before anything runs.
        refused = upload(client, edit_file, Host="evil.example:8000")
        assert refused.status_code == 400 and unchanged(bench, before)
        assert client.get("/", headers={"Host": "evil.example:8000"}).status_code == 400

    # The address a request arrived at is trusted (a bind to 0.0.0.0 is reached at the machine's address).
    with TestClient(create_app(bench), base_url="http://10.1.2.3:8000") as client:
        assert client.get("/api/model").status_code == 200
        assert client.get("/api/model", headers={"Host": "10.1.2.4:8000"}).status_code == 400
    access = Access(allowed_hosts=["workbench.example.org", "::2"])
    with TestClient(create_app(bench, access), base_url="http://workbench.example.org") as client:
        assert client.get("/api/model").status_code == 200
        assert client.get("/api/model", headers={"Host": "Workbench.Example.Org.:443"}).status_code == 200
        assert client.get("/api/model", headers={"Host": "[::2]:8000"}).status_code == 200
        assert client.get("/api/model", headers={"Host": "example.org"}).status_code == 400


def test_a_real_server_checks_the_host_header(bench):
    """uvicorn tells the app the address each connection arrived at; a foreign Host is refused."""
    with served(bench) as url:
        port = url.rsplit(":", 1)[1]
        assert httpx.get(f"{url}/api/model").status_code == 200
        assert httpx.get(f"{url}/api/model", headers={"Host": f"localhost:{port}"}).status_code == 200
        response = httpx.get(f"{url}/api/model", headers={"Host": f"evil.example:{port}"})
        assert response.status_code == 400 and "untrusted Host header 'evil.example:" in response.text


def test_changes_from_other_origins_are_refused(bench, edit_file):
    before = weights(bench)
    with TestClient(create_app(bench), base_url=HERE) as client:
        foreign = [{"Origin": "http://localhost:9000"}, {"Origin": "http://127.0.0.1:9001"},
                   {"Origin": "http://evil.example"}, {"Origin": "null"}, {"Origin": "file://"},
                   {"Referer": "http://localhost:9000/attack.html"}, {"Referer": "http://127.0.0.1:8000.evil.example/"}]
        for headers in foreign:
            response = upload(client, edit_file, **headers)
            assert response.status_code == 403, (headers, response.text)
            assert "accepts changes only from its own page" in response.json()["detail"]
        evil = {"Origin": "http://evil.example"}
        fact = {"prompt": "{} is in", "subject": "The Eiffel Tower"}
        for method, path, body in (("POST", "/api/predict", {"prompt": "The Eiffel Tower is"}),
                                   ("POST", "/api/edit", {**fact, "target": "Rome"}), ("POST", "/api/trace", fact),
                                   ("DELETE", "/api/edits/1", None), ("PUT", "/api/edits/1", None),
                                   ("PATCH", "/api/edits/1", None)):
            response = client.request(method, path, json=body, headers=evil)
            assert response.status_code == 403, (method, path, response.text)
        assert unchanged(bench, before) and not bench.jobs
        # Reads are not refused: without CORS headers, no other origin's page can read the answer.
        read = client.get("/api/model", headers=evil)
        assert read.status_code == 200 and "access-control-allow-origin" not in read.headers

        # The workbench's own page, and scripts (no Origin, no Referer: curl, httpx, notebooks), may.
        assert upload(client, edit_file, Origin=HERE).status_code == 200
        assert upload(client, edit_file, Referer=f"{HERE}/").status_code == 200
        assert upload(client, edit_file, Origin="http://localhost:8000", Host="localhost:8000").status_code == 200
        assert upload(client, edit_file).status_code == 200
        assert client.delete("/api/edits/1", headers={"Origin": HERE}).status_code == 200
        assert [e["id"] for e in client.get("/api/edits").json()["edits"]] == [2, 3, 4]
    with TestClient(create_app(bench), base_url="http://localhost") as client:  # default ports
        assert upload(client, edit_file, Origin="http://localhost:80").status_code == 200
        assert upload(client, edit_file, Origin="http://localhost:8000").status_code == 403


def test_a_token_is_required_where_set(bench, edit_file):
    before = weights(bench)
    with TestClient(create_app(bench, Access(token="s3cret")), base_url=HERE) as client:
        for path in ("/", "/api/model", "/api/edits", "/docs", "/openapi.json"):
            response = client.get(path)
            assert response.status_code == 401 and "needs its token" in response.text, (path, response.text)
        assert client.get("/api/model").headers["www-authenticate"] == "Bearer"
        for headers in ({"Authorization": "Bearer wrong"}, {"Authorization": "Basic czNjcmV0"},
                        {"Authorization": "s3cret"}, {"Authorization": "Bearer s3cr\u00e9t".encode("latin-1")},
                        {"Cookie": "factedit-token-9000=s3cret"}):  # another port's workbench's cookie
            assert client.get("/api/model", headers=headers).status_code == 401, headers
        refused = upload(client, edit_file)
        assert refused.status_code == 401 and unchanged(bench, before)
        wrong = client.get("/api/model", params={"token": "wrong"})
        assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
        for headers in ({"Authorization": "Bearer s3cret"}, {"Authorization": "token s3cret"}):
            assert client.get("/api/model", headers=headers).status_code == 200, headers
        # The token does not make another origin's request acceptable.
        assert upload(client, edit_file, Authorization="Bearer s3cret", Origin="http://evil.example").status_code == 403
        assert not client.cookies

        # ?token= opens the page and sets a cookie that the page's own requests carry from then on.
        page = client.get("/", params={"token": "s3cret"})
        assert page.status_code == 200 and "factedit workbench" in page.text
        cookie = page.headers["set-cookie"]
        assert cookie.startswith("factedit-token-8000=s3cret;"), cookie
        assert {"HttpOnly", "Path=/", "SameSite=strict"} <= {part.strip() for part in cookie.split(";")}, cookie
        assert client.get("/api/model").status_code == 200
        applied = upload(client, edit_file, Origin=HERE)
        assert applied.status_code == 200 and len(bench.edits) == 1


def test_access_settings_are_checked():
    for name in ("http://workbench.example.org", "workbench.example.org:80", "a/b", "user@host", ""):
        with pytest.raises(InputError, match="is not a host name or address"):
            Access(allowed_hosts=[name])
    with pytest.raises(InputError, match="token is empty"):
        Access(token=" ")
    assert Access(allowed_hosts=["::1", "Name.Example."]).allowed_hosts == {"::1", "name.example"}


@pytest.fixture()
def serve(tiny_folder, monkeypatch):
    """Run `factedit serve ARGS` up to the server start; the result and the app it would serve."""
    started = {}
    monkeypatch.setattr("uvicorn.run", lambda app, **options: started.update(app=app, **options))
    monkeypatch.delenv("FACTEDIT_TOKEN", raising=False)

    def run(*args: str, env: dict | None = None):
        started.clear()
        result = CliRunner().invoke(main, ["serve", "--model", str(tiny_folder), *args], env=env)
        return result, started.get("app")

    return run


def test_serve_asks_for_a_token_and_warns_beyond_loopback(serve):
    result, app = serve()  # loopback: no token, no warning, usable by scripts as before
    assert result.exit_code == 0, result.output
    assert "on http://127.0.0.1:8000/  (API" in result.stderr and "WARNING" not in result.stderr
    with TestClient(app, base_url=HERE) as client:
        assert client.get("/api/model").status_code == 200

    result, app = serve("--host", "0.0.0.0", "--port", "8123")
    assert result.exit_code == 0, result.output
    token = re.search(r"on http://127\.0\.0\.1:8123/\?token=([\w-]+) ", result.stderr).group(1)
    assert len(token) >= 40
    warning = result.stderr.split("WARNING: ", 1)[1]
    assert warning.startswith("the workbench listens on 0.0.0.0 (every network interface), not on loopback")
    with TestClient(app, base_url="http://192.168.1.5:8123") as client:
        assert client.get("/api/model").status_code == 401
        assert client.get("/api/model", params={"token": token}).status_code == 200
        assert client.get("/api/model", headers={"Host": "myhost:8123"}).status_code == 400

    result, app = serve("--host", "0.0.0.0", "--allow-host", "myhost")
    new_token = re.search(r"\?token=([\w-]+) ", result.stderr).group(1)
    assert new_token != token  # a fresh one each time
    with TestClient(app, base_url="http://192.168.1.5:8000", headers={"Host": "myhost:8000"}) as client:
        assert client.get("/api/model", params={"token": token}).status_code == 401
        assert client.get("/api/model", headers={"Authorization": f"Bearer {new_token}"}).status_code == 200
        assert client.get("/api/model", headers={"Host": "otherhost:8000"}).status_code == 400

    result, app = serve("--token", env={"FACTEDIT_TOKEN": "mine"})  # on loopback too; its value from the env
    assert "on http://127.0.0.1:8000/?token=mine " in result.stderr and "WARNING" not in result.stderr
    with TestClient(app, base_url=HERE) as client:
        assert client.get("/api/model").status_code == 401
        assert client.get("/api/model", headers={"Authorization": "token mine"}).status_code == 200

    result, app = serve("--host", "0.0.0.0", "--no-token")
    assert "?token=" not in result.stderr and "WARNING" in result.stderr and "ANYONE who can reach it" in result.stderr
    with TestClient(app, base_url="http://192.168.1.5:8000") as client:
        assert client.get("/api/model").status_code == 200

    result, app = serve("--allow-host", "http://myhost:8000")
    assert result.exit_code == 2 and app is None
    assert "error: allowed host 'http://myhost:8000' is not a host name or address" in result.output, result.output
