"""The HTTP layer: OpenAI's chat-completions API over :class:`~.service.CorrectionService`.

Routes: ``POST /v1/chat/completions`` (plain and ``stream: true``), ``GET /v1/models``,
``GET /v1/models/{id}``, ``GET /healthz``; the Gradio app at ``/ui`` when mounted (:func:`mount_ui`). Errors are OpenAI
error objects (``{"error": {"message", "type", "param", "code"}}``) with OpenAI's status codes.

Every path is guarded by :class:`RequestGuard`: bodies over ``max_request_bytes`` are refused
(413) whatever the path, chunked uploads included, and each request is logged as method, path
(no query string) and status. With API keys, ``/v1`` takes ``Authorization: Bearer KEY`` and
``/ui`` a sign-in whose password is a key (:func:`mount_ui`). Neither request texts nor keys
are logged.

A client that disconnects — streamed or not, during the draft or the correction — cancels its
request: its rows leave the decoding batch at the next step. A stream's first chunk (the role)
is sent at once, before the draft is written.
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
MAX_JSON_DEPTH = 32  # deepest nesting of arrays/objects a request body may have
JSON_CONTENT_TYPES = ("application/json",)
access_log = logging.getLogger("metaaligner_core.serve.access")


def error_response(status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                   param: str | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(message=message, type=type, code=code, param=param))
    return JSONResponse(body.model_dump(), status_code=status)


def _error_bytes(status: int, message: str, code: str | None) -> bytes:
    return ErrorResponse(error=ErrorDetail(message=message, type="invalid_request_error", code=code)
                         ).model_dump_json().encode()


class RequestGuard:
    """ASGI middleware over every path (mounted apps included): the bearer key on ``/v1``
    (``authorised(headers)``), the body size limit and the access log.

    A body announced larger than ``max_bytes`` (``Content-Length``) is refused before it is
    read; a body without a length (chunked) is read up to ``max_bytes`` here and refused as
    soon as it is larger, so no route — the Gradio app's included — ever holds more. Each
    request is logged as ``METHOD /path STATUS``: the query string is left out (it may carry a
    key), and so is the client's address.
    """

    def __init__(self, app, max_bytes: int = DEFAULT_MAX_REQUEST_BYTES, authorised=None):
        self.app, self.max_bytes, self.authorised = app, max_bytes, authorised

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [0]

        async def logged_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, logged_send)
        finally:
            access_log.info("%s %s %s", scope.get("method", "?"), scope.get("path", "?"), status[0] or "-")

    async def _refuse(self, send, status: int, message: str, code: str | None = None) -> None:
        body = _error_bytes(status, message, code)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def _guarded(self, scope, receive, send):
        headers = dict(scope.get("headers") or ())
        path = scope.get("path", "")
        if (path == "/v1" or path.startswith("/v1/")) and self.authorised and not self.authorised(headers):
            return await self._refuse(send, 401, "Incorrect or missing API key: send Authorization: Bearer KEY",
                                      "invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None:
            if not length.strip().isdigit():
                return await self._refuse(send, 400, "Content-Length is not a number")
            if int(length) > self.max_bytes:
                return await self._refuse(send, 413, f"The request body is {int(length)} bytes; this server accepts "
                                                     f"at most {self.max_bytes}", "request_too_large")
            return await self.app(scope, receive, send)
        if b"chunked" not in headers.get(b"transfer-encoding", b"").lower():
            return await self.app(scope, receive, send)
        # No length given: read the body here, never more than the limit, then hand it on.
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._refuse(send, 413, f"The request body is over {self.max_bytes} bytes",
                                          "request_too_large")
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


def json_depth_exceeds(value, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``value`` (parsed JSON) nests arrays/objects deeper than ``limit`` (iterative)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > limit:
                return True
            stack.extend((c, depth + 1) for c in (v.values() if isinstance(v, dict) else v))
    return False


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_json_body(body: bytes):
    """The request body as JSON, or :class:`RequestError` (400): not JSON, ``NaN``/``Infinity``,
    integers too long to parse, or nesting deeper than :data:`MAX_JSON_DEPTH`."""
    try:
        value = json.loads(body or b"null", parse_constant=_reject_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"The body is not valid JSON: {e.msg if hasattr(e, 'msg') else e}") from None
    except RecursionError:  # the parser's own guard, far below the body limit's worth of brackets
        raise RequestError(f"The body nests arrays or objects deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:  # NaN/Infinity, an integer of thousands of digits
        raise RequestError(f"The body is not valid JSON: {str(e).splitlines()[0][:200]}") from None
    if json_depth_exceeds(value):
        raise RequestError(f"The body nests arrays or objects deeper than {MAX_JSON_DEPTH} levels")
    return value


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

    def authorised(headers: dict) -> bool:
        if not keys:
            return True
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        given = token.strip().encode("latin-1")
        return any(hmac.compare_digest(given, k) for k in keys)

    # Outermost: every path, mounted apps included; a plain ASGI middleware, so a client that
    # goes away mid-stream is not an error.
    app.add_middleware(RequestGuard, max_bytes=max_request_bytes, authorised=authorised)

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
    async def healthz():  # open to anyone: names no model, URL or objective
        return {"status": "ok"}

    def card(model_id: str) -> ModelCard:
        return ModelCard(id=model_id, created=created, metaaligner=service.model_info(model_id))

    @app.get("/v1/models")
    async def models():
        return ModelList(data=[card(m) for m in service.policies]).model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        service.policy_spec(model_id)  # 404 in OpenAI's shape for an unknown id
        return card(model_id).model_dump()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in JSON_CONTENT_TYPES:
            return error_response(400, f"Content-Type must be application/json, got {ctype or 'none'}",
                                  param="Content-Type")
        body = bytearray()
        async for part in request.stream():  # a chunked upload has no Content-Length to check earlier
            body += part
            if len(body) > max_request_bytes:
                return error_response(413, f"The request body is over {max_request_bytes} bytes",
                                      code="request_too_large")
        raw = parse_json_body(bytes(body))
        if not isinstance(raw, dict):
            return error_response(400, "The body must be a JSON object")
        try:
            req = ChatCompletionRequest.model_validate(raw)
        except ValidationError as e:
            message, param = _validation_message(e)
            return error_response(400, message, param=param)
        return await complete(req, request)

    async def complete(req: ChatCompletionRequest, request: Request):
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
        await service.check_draft(req.model, messages, settings)  # context errors before any answer starts
        return_original = opts.return_original if opts else True
        stage: dict = {"draft": None, "result": Correction()}

        def info() -> MetaAlignerInfo:
            draft, result = stage["draft"], stage["result"]
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
            """The answer's stage: the correction (its prompt holds the query and the draft), or
            the draft when it is passed through; both stages are in ``metaaligner.usage``."""
            draft, result = stage["draft"], stage["result"]
            answer = result if objectives else draft
            p, c = answer.prompt_tokens, answer.completion_tokens
            return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)

        def finish_reason() -> str:
            return stage["result"].finish_reason if objectives else stage["draft"].finish_reason

        async def deltas() -> AsyncIterator[str]:
            draft = stage["draft"] = await service.draft(req.model, messages, settings)
            result = stage["result"]
            if not objectives:  # pass-through: the draft is the answer
                result.text = draft.text
                if draft.text:
                    yield draft.text
                return
            result.started = time.monotonic()
            async for d in service.correct(query, draft.text, objectives, settings, result):
                yield d

        if not req.stream:
            async def answer():
                async for _ in deltas():
                    pass
                return ChatCompletion(model=req.model, usage=usage(), metaaligner=info(), choices=[
                    Choice(message=AssistantMessage(content=stage["result"].text), finish_reason=finish_reason())]
                ).model_dump()

            return await until_disconnected(request, answer())

        cid, created_at = completion_id(), int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices: list[ChunkChoice], **extra) -> str:
            """A chunk as OpenAI sends it: the choice's ``finish_reason``/``logprobs`` present as null,
            ``usage`` null on every chunk but the last when usage was asked for."""
            c = ChatCompletionChunk(id=cid, created=created_at, model=req.model, choices=choices, **extra)
            data = c.model_dump(exclude_none=True)
            data["system_fingerprint"] = None
            data["choices"] = [{"index": ch.index, "delta": ch.delta.model_dump(exclude_none=True),
                                "logprobs": None, "finish_reason": ch.finish_reason} for ch in choices]
            if include_usage and "usage" not in data:
                data["usage"] = None
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        async def events():
            yield chunk([ChunkChoice(delta=Delta(role="assistant", content=""))])  # at once, before the draft
            try:
                async for d in deltas():
                    yield chunk([ChunkChoice(delta=Delta(content=d))])
            except RequestError as e:  # the headers are sent: the error goes in the stream
                err = ErrorResponse(error=ErrorDetail(message=str(e), type=e.type, code=e.code, param=e.param))
                yield f"data: {err.model_dump_json()}\n\n"
                return
            yield chunk([ChunkChoice(delta=Delta(), finish_reason=finish_reason())], metaaligner=info())
            if include_usage:
                yield chunk([], usage=usage())
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


async def until_disconnected(request: Request, work):
    """Await ``work`` (a coroutine); if the client disconnects first, cancel it (its rows leave the
    batch at the next step) and return an empty 499 response nobody reads."""
    import asyncio

    async def gone():
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(gone())
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if task in done:
        return task.result()
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):  # noqa: BLE001  (nobody is there to answer)
        pass
    log.info("client disconnected; its generation was stopped")
    return JSONResponse({}, status_code=499)


UI_SIGN_IN_MESSAGE = ("This server requires an API key. Sign in with any user name and one of the server's "
                      "API keys as the password; the page keeps the sign-in for the session.")


def key_checker(api_keys: list[str]):
    """Gradio's ``auth`` callable for ``/ui``: any user name, and a server key as the password
    (compared in constant time)."""
    keys = [k.encode() for k in api_keys]

    def check(username: str, password: str) -> bool:
        given = (password or "").strip().encode()
        return bool(given) and any(hmac.compare_digest(given, k) for k in keys)

    return check


def mount_ui(app: FastAPI, service: CorrectionService, path: str = "/ui", db_url: str | None = None,
             api_keys: list[str] | None = None):
    """Mount the web app (:mod:`webapp`, the page ``python app.py`` serves) at ``path`` on the
    service's registry, so the page and the API share the loaded models; set up as ``app.py``
    launches it (model allow-list: the server's policies and aligner; private upload folder;
    first-admin token; bounded queue). ``db_url``: the annotation database (default: the app's).
    ``api_keys``: the page and every Gradio route behind it (``/gradio_api/queue/join``, uploads,
    files, config) require Gradio's sign-in, whose password is one of these keys; it is asked for
    once and kept in a session cookie. Returns the Blocks."""
    import os

    import gradio as gr

    from webapp.align_tab import build_demo
    from webapp.config import AppConfig, allow_list
    from webapp.launch import first_run_setup, private_temp_dir
    from webapp.service import APP_MAX_NEW_TOKENS, AlignService, GenerationSettings

    first, *others = service.policies.values()
    config = AppConfig(policy=first, aligner=service.aligner_name, template=service.template, preload=False,
                       max_new_tokens=min(service.max_new_tokens, APP_MAX_NEW_TOKENS), allow_models=others,
                       **({"db_url": db_url} if db_url else {}))
    allow = allow_list(config)
    service.registry.check = lambda kind, name: allow.check(kind, name, config.limits)
    service.registry.allow_list = allow
    if not os.environ.get("GRADIO_TEMP_DIR"):
        private_temp_dir()
    # The page's local generations stream through each model's StepScheduler (the one /v1 uses,
    # set on the generator by the service), so browser users and API clients share batches.
    align = AlignService(service.registry, policy=first, aligner=service.aligner_name, template=service.template,
                         settings=GenerationSettings(max_new_tokens=config.max_new_tokens), db_url=config.db_url,
                         concurrency=config.concurrency)
    demo = build_demo(config, service=align, first_run=first_run_setup(config))
    demo.queue(max_size=config.limits.queue)
    auth = dict(auth=key_checker(api_keys), auth_message=UI_SIGN_IN_MESSAGE) if api_keys else {}
    gr.mount_gradio_app(app, demo, path=path, show_error=False, max_file_size=config.limits.upload, **auth)
    return demo
