"""FastAPI application: a JSON API under /api (documented at /docs) and the page at /. Who may use
it is access.py's business; its middleware runs before anything else."""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI, File, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from ..edit import METHODS, EditDelta, EditRequest
from ..edit.delta import EditFileError
from ..errors import FacteditError
from ..tokens import PromptError, check_prompt_length, prompt_token_limit, tokenize_prompt
from ..trace.heatmap import expand_kinds
from ..trace.tracing import check_trace_options
from .access import Access
from .workbench import Busy, Workbench

MAX_BODY_BYTES = 64 * 1024  # JSON requests
MAX_UPLOAD_BYTES = 32 * 1024 * 1024  # edit files (a ROME edit of a small model is a few KB)


class TraceIn(BaseModel):
    prompt: str = Field(min_length=1, max_length=1000)
    subject: str = Field(min_length=1, max_length=300)
    kinds: str = "all"
    samples: int = Field(10, ge=1, le=50)
    window: int = Field(10, ge=1, le=100)
    seed: int = 0
    approx: str | None = Field(None, description='null: exact causal tracing (one restoration run per cell, '
                                                 'tens of seconds); "atp": attribution-patching estimates of every '
                                                 'cell from one forward and backward pass (about a second)')


class EditIn(BaseModel):
    prompt: str = Field(min_length=1, max_length=1000, description="template with {} or a prompt containing the subject")
    subject: str = Field(min_length=1, max_length=300)
    target: str = Field(min_length=1, max_length=200)
    target_true: str | None = Field(None, max_length=200)
    method: str = "rome"
    layer: int | None = None
    paraphrases: list[str] = Field(default_factory=list, max_length=10)


class PromptIn(BaseModel):
    prompt: str = Field(min_length=1, max_length=1000)
    max_new: int = Field(20, ge=1, le=100)


def create_app(bench: Workbench, access: Access | None = None) -> FastAPI:
    """The workbench's app; `access` says who may use it (default: loopback and same-origin, no token)."""
    app = FastAPI(title="factedit workbench", description="Trace, edit and compare a model's facts.")
    _add_guards(app, access or Access())
    _add_model_routes(app, bench)
    _add_job_routes(app, bench)
    _add_applied_edit_routes(app, bench)
    return app


def _add_guards(app: FastAPI, access: Access) -> None:
    """What every request passes first (who may ask, how large a body may be) and how errors answer."""

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        limit = MAX_UPLOAD_BYTES if request.url.path == "/api/edits/upload" else MAX_BODY_BYTES
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return JSONResponse({"detail": f"request too large: {length} bytes, at most {limit}"}, status_code=413)
        return await call_next(request)

    @app.middleware("http")  # added last, so it runs first: nothing is read before access is checked
    async def check_access(request: Request, call_next):
        refusal = access.refusal(request)
        if refusal is not None:
            return refusal
        response = await call_next(request)
        offered = request.query_params.get("token")
        if offered and access.is_token(offered):  # the page's own later requests carry it from now on
            response.set_cookie(access.cookie_name(request), offered, httponly=True, samesite="strict",
                                secure=request.url.scheme == "https")
        return response

    @app.exception_handler(FacteditError)
    async def user_error(request: Request, err: FacteditError):
        # Only user errors; any other exception is a bug and becomes a 500 (with its traceback logged).
        return JSONResponse({"detail": str(err)}, status_code=400)

    @app.exception_handler(Busy)
    async def busy(request: Request, err: Busy):
        return JSONResponse({"detail": str(err)}, status_code=503, headers={"Retry-After": str(err.retry_after)})


def _add_model_routes(app: FastAPI, bench: Workbench) -> None:
    """The page, what the model is, and its predictions and generations (answered at once)."""
    page_html = resources.files("factedit.server").joinpath("static/index.html").read_text()

    # The cheap reads are `async def`: they run on the event loop, never wait for the model lock and
    # need no worker thread, so they answer at once however many requests wait for the model.
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return page_html

    @app.get("/api/model")
    async def model_info():
        return {**bench.info(), "methods": {name: m.description for name, m in METHODS.items() if name != "none"}}

    @app.post("/api/predict")
    def predict(body: PromptIn):
        return {"predictions": bench.predictions(body.prompt)}

    @app.post("/api/generate")
    def generate(body: PromptIn):
        return {"prompt": body.prompt, "continuation": bench.generate(body.prompt, body.max_new)}


def _add_job_routes(app: FastAPI, bench: Workbench) -> None:
    """Traces and edits, which run as jobs (202 and a job to poll); their input is checked first."""

    @app.post("/api/trace", status_code=202)
    def trace(body: TraceIn):
        kinds = expand_kinds(body.kinds)
        check_trace_options(kinds, body.approx)
        tokenize_prompt(bench.lm.tokenizer, body.prompt, body.subject,  # bad input: 400 now, not a failed job
                        max_tokens=prompt_token_limit(bench.lm.model))
        return bench.trace_job(body.prompt, body.subject, kinds, body.samples, body.window, body.seed,
                               body.approx).view()

    @app.post("/api/edit", status_code=202)
    def edit(body: EditIn):
        if body.method not in METHODS or body.method == "none":
            raise HTTPException(400, f"unknown method {body.method!r}; choose from "
                                     f"{', '.join(m for m in METHODS if m != 'none')}")
        if body.layer is not None:
            bench.lm.check_layer(body.layer)
        request = EditRequest.create(body.prompt, body.subject, body.target, body.target_true or None)
        tokenize_prompt(bench.lm.tokenizer, request.text, request.subject, occurrence=request.subject_occurrence,
                        max_tokens=prompt_token_limit(bench.lm.model))
        paraphrases = [p for p in body.paraphrases if p.strip()]
        for i, paraphrase in enumerate(paraphrases):
            check_prompt_length(bench.lm, paraphrase, f"paraphrase {i + 1}")
        return bench.edit_job(request, body.method, body.layer, paraphrases).view()

    @app.get("/api/jobs/{job_id}")
    async def job(job_id: str):
        found = bench.jobs.get(job_id)
        if found is None:
            raise HTTPException(404, f"no job {job_id}")
        return found.view()

    @app.post("/api/jobs/{job_id}/cancel")
    def cancel(job_id: str):
        """Stop a trace job (the page cancels its previous trace when a new one starts)."""
        job = bench.jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        if job.kind != "trace":
            raise HTTPException(409, f"only trace jobs can be cancelled, not {job.kind} jobs")
        return bench.cancel(job).view()


def _add_applied_edit_routes(app: FastAPI, bench: Workbench) -> None:
    """The edits applied to the model: list, revert, download as a file, apply an uploaded file."""

    @app.get("/api/edits")
    async def edits():
        return {"edits": bench.list_edits()}

    @app.delete("/api/edits/{edit_id}")
    def revert(edit_id: int):
        try:
            return {"reverted": bench.revert(edit_id), "edits": bench.list_edits()}
        except KeyError as err:
            raise HTTPException(404, str(err.args[0])) from None

    @app.get("/api/edits/{edit_id}/file")
    def download(edit_id: int):
        import tempfile
        from pathlib import Path

        try:
            applied = bench.get_edit(edit_id)
        except KeyError as err:
            raise HTTPException(404, str(err.args[0])) from None
        with tempfile.TemporaryDirectory() as folder:
            data = applied.delta.save(Path(folder) / "edit.safetensors").read_bytes()
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="edit-{edit_id}.safetensors"'})

    @app.post("/api/edits/upload")
    def upload(file: UploadFile = File(...)):
        # A plain `def`: FastAPI runs it in its threadpool. Applying the edit waits for the model lock,
        # which a running job holds for minutes; waiting on the event loop would stall every request.
        # Only a few requests may wait so (Workbench.max_model_waiters); the next is a 503 at once.
        import tempfile
        from pathlib import Path

        data = file.file.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            raise HTTPException(413, f"edit file too large (at most {MAX_UPLOAD_BYTES} bytes)")
        with tempfile.TemporaryDirectory() as folder:  # a server-chosen name, never the client's
            path = Path(folder) / "upload.safetensors"
            path.write_bytes(data)
            try:
                delta = EditDelta.load(path)
            except EditFileError as err:  # name the upload, not the server's temporary file
                raise HTTPException(400, str(err).replace(str(path), "the uploaded file")) from None
        try:
            return {"applied": bench.upload(delta, Path(file.filename or "upload").name), "edits": bench.list_edits()}
        except EditFileError as err:
            raise HTTPException(400, str(err)) from None


__all__ = ["Access", "create_app", "PromptError"]
