"""The HTTP layer: OpenAI's chat-completions API over :class:`~.service.CorrectionService`.

Routes: ``POST /v1/chat/completions`` (plain and ``stream: true``), ``GET /v1/models``,
``GET /healthz``; the Gradio app at ``/ui`` when mounted (:func:`mount_ui`). Errors are OpenAI
error objects (``{"error": {"message", "type", "param", "code"}}``) with OpenAI's status codes.
Neither request texts nor keys are logged.
"""
from __future__ import annotations

import hmac
import json
import logging
import time
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import MetaAlignerError
from ..models import display_name
from ..settings import GenerationSettings
from .protocol import (AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice,
                       ChunkChoice, Delta, ErrorDetail, ErrorResponse, MetaAlignerInfo, ModelCard, ModelList,
                       StageUsage, Timings, Usage, completion_id)
from .service import Correction, CorrectionService, RequestError, conversation_query

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 1_000_000


def error_response(status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                   param: str | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(message=message, type=type, code=code, param=param))
    return JSONResponse(body.model_dump(), status_code=status)


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    first = e.errors()[0]
    loc = ".".join(str(x) for x in first.get("loc", ()))
    msg = first.get("msg", "invalid value")
    return (f"{loc}: {msg}" if loc else msg), (loc or None)


def create_app(service: CorrectionService, *, api_keys: list[str] | None = None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:
    """The FastAPI app. ``api_keys``: bearer keys accepted on ``/v1``; none: no key checked
    (the command binds such a server to loopback only)."""
    app = FastAPI(title="MetaAligner", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    keys = [k.encode() for k in (api_keys or [])]
    created = int(time.time())

    def authorised(request: Request) -> bool:
        if not keys:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        given = token.strip().encode()
        return any(hmac.compare_digest(given, k) for k in keys)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path.startswith("/v1"):
            if not authorised(request):
                return error_response(401, "Incorrect or missing API key: send Authorization: Bearer KEY",
                                      code="invalid_api_key")
            length = request.headers.get("content-length")
            if length and length.isdigit() and int(length) > max_request_bytes:
                return error_response(413, f"The request body is {length} bytes; this server accepts at most "
                                           f"{max_request_bytes}", code="request_too_large")
        return await call_next(request)

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, e: RequestError):
        return error_response(e.status, str(e), e.type, e.code, e.param)

    @app.exception_handler(MetaAlignerError)
    async def on_user_error(request: Request, e: MetaAlignerError):
        return error_response(400, str(e))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500
                              else "server_error", code="not_found" if e.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def on_crash(request: Request, e: Exception):
        log.error("request failed: %s", type(e).__name__, exc_info=e)
        return error_response(500, f"internal error ({type(e).__name__}); the server log has the details",
                              "server_error")

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", **service.describe()}

    @app.get("/v1/models")
    async def models():
        return ModelList(data=[ModelCard(id=m, created=created) for m in service.policies]).model_dump()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = bytearray()
        async for part in request.stream():  # a chunked upload has no Content-Length to check earlier
            body += part
            if len(body) > max_request_bytes:
                return error_response(413, f"The request body is over {max_request_bytes} bytes",
                                      code="request_too_large")
        try:
            raw = json.loads(bytes(body) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return error_response(400, f"The body is not valid JSON: {e.msg if hasattr(e, 'msg') else e}")
        if not isinstance(raw, dict):
            return error_response(400, "The body must be a JSON object")
        try:
            req = ChatCompletionRequest.model_validate(raw)
        except ValidationError as e:
            message, param = _validation_message(e)
            return error_response(400, message, param=param)
        return await complete(req)

    async def complete(req: ChatCompletionRequest):
        start = time.monotonic()
        service.policy_spec(req.model)  # 404 before any work
        opts = req.metaaligner
        objectives = service.parse_objectives(opts.objectives if opts else None)
        messages = []
        for i, m in enumerate(req.messages):
            if isinstance(m.content, list) and any(p.type != "text" for p in m.content):
                raise RequestError("only text content is supported", param=f"messages.{i}.content")
            messages.append((m.role, m.text()))
        query = conversation_query(messages)
        limit = req.token_limit() or service.max_new_tokens
        try:
            settings = GenerationSettings(max_new_tokens=limit, temperature=req.temperature or 0.0,
                                          top_p=req.top_p if req.top_p is not None else 1.0, seed=req.seed)
        except MetaAlignerError as e:
            raise RequestError(str(e)) from None
        service.check_query(query, objectives, settings)
        draft = await service.draft(req.model, messages, settings)
        result = Correction()
        return_original = opts.return_original if opts else True

        def info() -> MetaAlignerInfo:
            return MetaAlignerInfo(
                original=draft.text if return_original else None, corrected=bool(objectives), policy=req.model,
                aligner=display_name(service.aligner_name), template=service.template,
                objectives=[o.text for o in objectives],
                usage={"draft": StageUsage(prompt_tokens=draft.prompt_tokens, completion_tokens=draft.completion_tokens),
                       "correction": StageUsage(prompt_tokens=result.prompt_tokens,
                                                completion_tokens=result.completion_tokens)},
                timings=Timings(draft_s=round(draft.seconds, 4), correction_s=round(result.seconds, 4),
                                total_s=round(time.monotonic() - start, 4)))

        def usage() -> Usage:
            p = draft.prompt_tokens + result.prompt_tokens
            c = draft.completion_tokens + result.completion_tokens
            return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)

        async def deltas() -> AsyncIterator[str]:
            if not objectives:  # pass-through: the draft is the answer
                result.text = draft.text
                if draft.text:
                    yield draft.text
                return
            async for d in service.correct(query, draft.text, objectives, settings, result):
                yield d

        if not req.stream:
            async for _ in deltas():
                pass
            return ChatCompletion(model=req.model, usage=usage(), metaaligner=info(), choices=[
                Choice(message=AssistantMessage(content=result.text), finish_reason=result.finish_reason)]
            ).model_dump()

        cid, created_at = completion_id(), int(time.time())

        def chunk(**kw) -> str:
            c = ChatCompletionChunk(id=cid, created=created_at, model=req.model, **kw)
            return f"data: {c.model_dump_json(exclude_none=True)}\n\n"

        async def events():
            yield chunk(choices=[ChunkChoice(delta=Delta(role="assistant", content=""))])
            try:
                async for d in deltas():
                    yield chunk(choices=[ChunkChoice(delta=Delta(content=d))])
            except RequestError as e:  # the headers are sent: the error goes in the stream
                err = ErrorResponse(error=ErrorDetail(message=str(e), type=e.type, code=e.code, param=e.param))
                yield f"data: {err.model_dump_json()}\n\n"
                return
            yield chunk(choices=[ChunkChoice(delta=Delta(), finish_reason=result.finish_reason)], metaaligner=info())
            if req.stream_options and req.stream_options.include_usage:
                yield chunk(choices=[], usage=usage())
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def web_app_modules():
    """``(app, webapp.service)`` of the web app, or None when it is not installed. A source
    checkout has ``app.py`` beside the package; it is found there too."""
    import importlib
    import sys
    from pathlib import Path

    try:
        return importlib.import_module("app"), importlib.import_module("webapp.service")
    except ModuleNotFoundError as e:
        if e.name not in ("app", "webapp", "webapp.service"):
            raise
    root = Path(__file__).resolve().parents[2]
    if not (root / "app.py").is_file() or not (root / "webapp").is_dir():
        return None
    sys.path.insert(0, str(root))
    return importlib.import_module("app"), importlib.import_module("webapp.service")


def mount_ui(app: FastAPI, service: CorrectionService, path: str = "/ui", db_url: str | None = None):
    """Mount the Gradio app (``app.py``) at ``path`` on the service's registry, so the page and
    the API share the loaded models; set up as ``app.py`` launches it (model allow-list: the
    server's policies and aligner; private upload folder; first-admin token; bounded queue).
    ``db_url``: the annotation database (default: the app's). Returns the Blocks, or None (and a
    warning) when the web app is not installed."""
    import os

    modules = web_app_modules()
    if modules is None:
        log.warning("the web app (app.py) is not installed; /ui is not served")
        return None
    ui, web = modules
    import gradio as gr

    first, *others = service.policies.values()
    config = ui.AppConfig(policy=first, aligner=service.aligner_name, template=service.template, preload=False,
                          max_new_tokens=min(service.max_new_tokens, web.APP_MAX_NEW_TOKENS), allow_models=others,
                          **({"db_url": db_url} if db_url else {}))
    allow = ui.allow_list(config)
    service.registry.check = lambda kind, name: allow.check(kind, name, config.limits)
    service.registry.allow_list = allow
    if not os.environ.get("GRADIO_TEMP_DIR"):
        ui.private_temp_dir()
    align = web.AlignService(service.registry, policy=first, aligner=service.aligner_name, template=service.template,
                             settings=web.GenerationSettings(max_new_tokens=config.max_new_tokens),
                             db_url=config.db_url)
    demo = ui.build_demo(config, service=align, first_run=ui.first_run_setup(config))
    demo.queue(max_size=config.limits.queue)
    gr.mount_gradio_app(app, demo, path=path, show_error=False, max_file_size=config.limits.upload)
    return demo
