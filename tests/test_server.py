"""The workbench's JSON API on a tiny model (FastAPI's test client)."""

import io
import math
import threading
import time

import pytest
import torch
from bad_edits import BAD_EDIT_FILES, MISFIT_EDIT_FILES, write_edit_file
from fastapi.testclient import TestClient
from tiny import tiny_model, word_tokenizer

from factedit.edit import EditDelta
from factedit.models import from_model
from factedit.server.app import create_app
from factedit.server.workbench import Workbench

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"


@pytest.fixture()
def client(word_corpus):
    lm = from_model(tiny_model("llama"), word_tokenizer(), name="tiny")
    bench = Workbench(lm, stats_corpus=str(word_corpus), stats_tokens=500)
    with TestClient(create_app(bench)) as c:
        c.bench = bench
        yield c


def wait(client, job, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/api/jobs/{job['id']}").json()
        if job["status"] in ("done", "error", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError("job did not finish")


def test_page_and_openapi(client):
    page = client.get("/")
    assert page.status_code == 200 and "factedit workbench" in page.text and "/api/trace" in page.text
    schema = client.get("/openapi.json").json()
    assert {"/api/trace", "/api/edit", "/api/edits", "/api/edits/upload", "/api/jobs/{job_id}"} <= set(schema["paths"])
    info = client.get("/api/model").json()
    assert info["n_layers"] == 3 and "rome" in info["methods"] and "none" not in info["methods"]
    assert info["architecture"]["mlp_out"] == "model.layers.N.mlp.down_proj"


def test_trace_job_reports_heatmaps(client):
    job = client.post("/api/trace", json={"prompt": PROMPT, "subject": SUBJECT, "samples": 2})
    assert job.status_code == 202
    done = wait(client, job.json())
    assert done["status"] == "done" and done["done"] == done["total"] == 3 * 9 * 3
    result = done["result"]
    assert set(result["heatmaps"]) == {"hidden", "mlp", "attn"} and result["subject_range"] == [0, 3]
    assert len(result["heatmaps"]["hidden"]["scores"]) == 9 and len(result["predictions"]) == 10
    assert result["approx"] is None and all(m["approx"] is None for m in result["heatmaps"].values())


def test_estimate_job_has_the_exact_jobs_shape_marked_as_estimates(client):
    """approx="atp": attribution-patching estimates, the same run (seed) and result shape as the exact trace."""
    body = {"prompt": "Michael Jordan plays basketball " + PROMPT, "subject": SUBJECT, "samples": 2}
    exact = wait(client, client.post("/api/trace", json=body).json())
    job = client.post("/api/trace", json={**body, "approx": "atp"})
    assert job.status_code == 202, job.text
    estimate = wait(client, job.json())
    assert estimate["status"] == "done", estimate["error"]
    assert estimate["done"] == estimate["total"] == 1  # one forward and backward pass, not a run per cell
    exact, estimate = exact["result"], estimate["result"]
    assert estimate["approx"] == "atp" and exact["approx"] is None
    assert set(estimate) == set(exact) and set(estimate["heatmaps"]) == set(exact["heatmaps"]) == {"hidden", "mlp", "attn"}
    for key in ("answer", "p_clean", "p_corrupt", "tokens", "subject_range", "predictions"):
        assert estimate[key] == exact[key], key
    start = estimate["subject_range"][0]
    assert start == 4
    for kind, mine in estimate["heatmaps"].items():
        theirs = exact["heatmaps"][kind]
        assert mine["approx"] == "atp" and mine["window"] == theirs["window"]
        assert [len(row) for row in mine["scores"]] == [len(row) for row in theirs["scores"]] == [3] * 13
        assert all(math.isfinite(v) for row in mine["scores"] for v in row)
        # Nothing before the subject was corrupted: restoring it changes nothing, in both.
        for row in mine["scores"][:start]:
            assert row == [estimate["p_corrupt"]] * 3, (kind, row)
    # Restoring the last token's last hidden state gives the clean run; the estimate moves that way.
    hidden = estimate["heatmaps"]["hidden"]["scores"]
    assert hidden[-1][-1] > estimate["p_corrupt"] and exact["heatmaps"]["hidden"]["scores"][-1][-1] == pytest.approx(
        exact["p_clean"], rel=1e-4)


def test_a_queued_trace_can_be_cancelled(client):
    release = threading.Event()
    blocker = client.bench.submit("test", lambda job: release.wait(10) and {})  # holds the single worker
    try:
        job = client.post("/api/trace", json={"prompt": PROMPT, "subject": SUBJECT, "samples": 2}).json()
        cancelled = client.post(f"/api/jobs/{job['id']}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "queued"
        assert client.post(f"/api/jobs/{blocker.id}/cancel").status_code == 409  # only traces
        assert client.post("/api/jobs/nope/cancel").status_code == 404
    finally:
        release.set()
    done = wait(client, job)
    assert done["status"] == "cancelled" and done["result"] is None and done["done"] == 0


def test_edit_undo_download_upload(client):
    weights = {k: v.clone() for k, v in client.bench.lm.model.state_dict().items()}
    job = client.post("/api/edit", json={"prompt": "{} is located in the city of", "subject": SUBJECT,
                                         "target": "Rome", "target_true": "Paris", "method": "ft",
                                         "paraphrases": ["The Space Needle . The Eiffel Tower is in the city of"]})
    assert job.status_code == 202, job.text
    done = wait(client, job.json())
    assert done["status"] == "done", done["error"]
    rows = done["result"]["rows"]
    assert [row["label"] for row in rows] == ["prompt", "paraphrase"] + ["prefixed (sampled)"] * 2
    assert rows[0]["new_after"] > rows[0]["old_after"] and rows[0]["new_before"] < rows[0]["old_before"]
    edit_id = done["result"]["edit"]["id"]
    assert [e["id"] for e in client.get("/api/edits").json()["edits"]] == [edit_id]
    assert not all(torch.equal(weights[k], v) for k, v in client.bench.lm.model.state_dict().items())

    data = client.get(f"/api/edits/{edit_id}/file")
    assert data.status_code == 200 and len(data.content) > 100
    assert client.delete(f"/api/edits/{edit_id}").status_code == 200
    assert all(torch.equal(weights[k], v) for k, v in client.bench.lm.model.state_dict().items())
    assert client.delete(f"/api/edits/{edit_id}").status_code == 404

    uploaded = client.post("/api/edits/upload", files={"file": ("mine.safetensors", io.BytesIO(data.content))})
    assert uploaded.status_code == 200 and len(uploaded.json()["edits"]) == 1
    assert "mine.safetensors" in uploaded.json()["applied"]["label"]


def test_bad_input_is_a_4xx_and_leaves_the_model(client, tmp_path):
    weights = {k: v.clone() for k, v in client.bench.lm.model.state_dict().items()}
    cases = [
        ("/api/trace", {"prompt": PROMPT, "subject": "Louvre"}, "does not occur"),
        ("/api/trace", {"prompt": PROMPT}, "Field required"),
        ("/api/trace", {"prompt": "", "subject": "x"}, "at least 1"),
        ("/api/trace", {"prompt": "x" * 5000, "subject": "x"}, "at most 1000"),
        ("/api/trace", {"prompt": PROMPT, "subject": SUBJECT, "kinds": "neurons"}, "unknown trace kind"),
        ("/api/trace", {"prompt": PROMPT, "subject": SUBJECT, "approx": "magic"}, "unknown approximation"),
        ("/api/trace", {"prompt": PROMPT, "subject": SUBJECT, "approx": ""}, "unknown approximation"),
        ("/api/trace", {"prompt": PROMPT, "subject": SUBJECT, "kinds": "hidden,hidden_no_mlp", "approx": "atp"},
         "estimates the kinds hidden, mlp, attn, not 'hidden_no_mlp'"),
        ("/api/trace", {"prompt": PROMPT, "subject": "Louvre", "approx": "atp"}, "does not occur"),
        ("/api/edit", {"prompt": "{} is in", "subject": SUBJECT, "target": " "}, "new target is empty"),
        ("/api/edit", {"prompt": "{} is in", "subject": SUBJECT, "target": "Rome", "method": "magic"}, "unknown method"),
        ("/api/edit", {"prompt": "{} is in", "subject": SUBJECT, "target": "Rome", "layer": 99}, "out of range"),
    ]
    for path, body, message in cases:
        response = client.post(path, json=body)
        assert 400 <= response.status_code < 500, (path, body, response.text)
        assert message in response.text, (message, response.text)
    huge = client.post("/api/trace", content=b"{" + b" " * 100_000 + b"}", headers={"Content-Type": "application/json"})
    assert huge.status_code == 413
    for content in (b"not a safetensors file", b""):
        bad = client.post("/api/edits/upload", files={"file": ("x.safetensors", io.BytesIO(content))})
        assert bad.status_code == 400 and "not a valid" in bad.json()["detail"]
    other = from_model(tiny_model("llama", seed=1), word_tokenizer())
    foreign = EditDelta("ft", other.fingerprint, {"model.layers.1.mlp.down_proj": {"dense": torch.zeros(32, 48)}})
    blob = foreign.save(tmp_path / "foreign.safetensors").read_bytes()
    refused = client.post("/api/edits/upload", files={"file": ("f.safetensors", io.BytesIO(blob))})
    assert refused.status_code == 400 and "refusing to apply" in refused.json()["detail"]
    assert client.get("/api/jobs/nope").status_code == 404
    assert all(torch.equal(weights[k], v) for k, v in client.bench.lm.model.state_dict().items())


def test_bad_edit_files_are_a_400_and_leave_the_model(client, tmp_path):
    weights = {k: v.clone() for k, v in client.bench.lm.model.state_dict().items()}
    cases = {name: (tensors, metadata, message) for name, (tensors, metadata, message) in BAD_EDIT_FILES.items()}
    cases.update({name: (tensors, {}, message) for name, (tensors, message) in MISFIT_EDIT_FILES.items()})
    for name, (tensors, metadata, message) in cases.items():
        path = write_edit_file(tmp_path / f"{name}.safetensors", client.bench.lm.fingerprint, tensors, **metadata)
        response = client.post("/api/edits/upload", files={"file": ("bad.safetensors", io.BytesIO(path.read_bytes()))})
        assert response.status_code == 400, (name, response.status_code, response.text)
        assert message in response.json()["detail"], (name, response.text)
        assert "upload.safetensors" not in response.text, response.text  # the server's temporary file is not named
    assert client.get("/api/edits").json()["edits"] == []
    assert all(torch.equal(weights[k], v) for k, v in client.bench.lm.model.state_dict().items())


def test_the_api_answers_while_a_job_runs_and_an_upload_waits_for_it(client, tmp_path):
    """An upload must wait for the model lock off the event loop: meanwhile every other request answers."""
    started, release = threading.Event(), threading.Event()

    def long_job(job):
        started.set()
        release.wait(10)
        return {"finished": True}

    job = client.bench.submit("test", long_job)  # holds the model lock, as a running edit does
    assert started.wait(10)
    blob = write_edit_file(tmp_path / "edit.safetensors", client.bench.lm.fingerprint).read_bytes()
    uploads = []
    uploader = threading.Thread(target=lambda: uploads.append(
        client.post("/api/edits/upload", files={"file": ("e.safetensors", io.BytesIO(blob))})))
    safety = threading.Timer(5, release.set)  # unblocks everything if the server hangs
    safety.start()
    try:
        uploader.start()
        time.sleep(0.5)  # the upload is now waiting for the lock
        for path in ("/api/model", f"/api/jobs/{job.id}", "/api/edits"):
            start = time.perf_counter()
            response = client.get(path)
            seconds = time.perf_counter() - start
            assert response.status_code == 200 and seconds < 1, (path, seconds)
        assert client.get(f"/api/jobs/{job.id}").json()["status"] == "running"
        assert not uploads  # still waiting for the job
    finally:
        release.set()
        safety.cancel()
        uploader.join(30)
    assert uploads and uploads[0].status_code == 200, uploads
    assert wait(client, job.view())["result"] == {"finished": True}
    assert len(client.get("/api/edits").json()["edits"]) == 1


def test_waiting_for_the_model_is_bounded_and_the_cheap_reads_never_wait(client):
    """The issue's case: 50 predictions queued behind a job once took every server thread, and
    GET /api/model timed out. Now at most max_model_waiters wait; the rest get a 503 at once."""
    started, release = threading.Event(), threading.Event()

    def long_job(job):
        started.set()
        release.wait(20)
        return {}

    job = client.bench.submit("test", long_job)  # holds the model lock, as a running edit does
    assert started.wait(10)
    answers = []

    def predict():
        began = time.perf_counter()
        response = client.post("/api/predict", json={"prompt": PROMPT})
        answers.append((response, time.perf_counter() - began))

    requests = [threading.Thread(target=predict) for _ in range(50)]
    safety = threading.Timer(15, release.set)  # unblocks everything if the server hangs
    safety.start()
    try:
        for thread in requests:
            thread.start()
        waiters = client.bench.max_model_waiters
        deadline = time.time() + 10
        while len(answers) < 50 - waiters and time.time() < deadline:
            time.sleep(0.02)
        refused = [(response, seconds) for response, seconds in answers if response.status_code == 503]
        assert len(answers) == len(refused) == 50 - waiters, [r.status_code for r, _ in answers]
        for response, seconds in refused:
            assert seconds < 3 and response.headers["retry-after"] == "5", (seconds, response.headers)
            assert response.json()["detail"].startswith(f"the model is busy: {waiters} requests already wait")
        for path in ("/api/model", f"/api/jobs/{job.id}", "/api/edits", "/"):
            began = time.perf_counter()
            response = client.get(path)
            assert response.status_code == 200 and time.perf_counter() - began < 0.5, path
        assert client.post("/api/generate", json={"prompt": PROMPT}).status_code == 503
        assert client.delete("/api/edits/1").status_code == 503  # reverting and uploading wait for the model too
    finally:
        release.set()
        safety.cancel()
        for thread in requests:
            thread.join(30)
    waited = [response for response, _ in answers if response.status_code != 503]
    assert len(waited) == waiters and all(r.status_code == 200 and r.json()["predictions"] for r in waited)
    assert client.post("/api/predict", json={"prompt": PROMPT}).status_code == 200  # the slots are free again


def test_the_job_queue_is_bounded(word_corpus):
    lm = from_model(tiny_model("llama"), word_tokenizer(), name="tiny")
    bench = Workbench(lm, stats_corpus=str(word_corpus), stats_tokens=500, max_queued_jobs=3)
    started, release = threading.Event(), threading.Event()
    with TestClient(create_app(bench)) as client:
        blocker = bench.submit("test", lambda job: started.set() or release.wait(10) and {})
        assert started.wait(10)  # running: no longer queued
        trace = {"prompt": PROMPT, "subject": SUBJECT, "samples": 1, "kinds": "hidden"}
        try:
            queued = [client.post("/api/trace", json=trace) for _ in range(3)]
            assert [r.status_code for r in queued] == [202] * 3
            full = client.post("/api/trace", json=trace)
            assert full.status_code == 503 and full.headers["retry-after"] == "10"
            assert full.json()["detail"] == ("3 jobs already wait for the model; wait for them to finish (or cancel "
                                             "some), then try again")
            edit = client.post("/api/edit", json={"prompt": "{} is in", "subject": SUBJECT, "target": "Rome"})
            assert edit.status_code == 503
            assert client.post(f"/api/jobs/{queued[0].json()['id']}/cancel").status_code == 200
            assert client.post("/api/trace", json=trace).status_code == 202  # a cancelled job frees its place
            assert client.get("/api/model").status_code == 200
        finally:
            release.set()
        statuses = [wait(client, r.json())["status"] for r in queued]
        assert statuses == ["cancelled", "done", "done"] and wait(client, blocker.view())["status"] == "done"
        assert client.post("/api/trace", json=trace).status_code == 202
