"""A real HTTP server on 127.0.0.1 that speaks the OpenAI and Anthropic wire formats.

Tests point the official ``openai`` / ``anthropic`` clients at it (``base_url``) so the whole
client path runs: HTTP, JSON, status codes, retries. What it answers is decided by the test:
``reply(request) -> str`` (a fixed rule, or the embedded model), optional ``faults`` (status
codes returned, in order, before normal answers: 429 and 5xx exercise retries) and ``delay``.

Endpoints: ``POST /v1/chat/completions`` (OpenAI, with ``stream: true`` as SSE chunks),
``POST /v1/completions`` (OpenAI-compatible text completions, as vLLM/SGLang/TGI/llama.cpp serve a
raw-prompt model; streamed too) and ``POST /v1/messages`` (Anthropic, non-streamed and streamed).
``max_in_flight`` records the most requests answered at once (concurrency checks).
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


@dataclass
class Call:
    path: str
    body: dict
    headers: dict
    status: int


def prompt_text(body: dict) -> str:
    """The text of the last user message of an OpenAI or Anthropic request body (the raw
    ``prompt`` of a text completion)."""
    if isinstance(body.get("prompt"), str):
        return body["prompt"]
    msgs = body.get("messages") or []
    if not msgs:
        return ""
    content = msgs[-1].get("content", "")
    if isinstance(content, list):  # Anthropic / OpenAI content blocks
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


@dataclass
class FakeProvider:
    reply: Callable[[dict], str] = lambda body: "ok"
    faults: list[int] = field(default_factory=list)
    delay: float = 0.0
    calls: list[Call] = field(default_factory=list)
    max_in_flight: int = 0
    cut_at_max_tokens: bool = False  # cut replies to max_tokens words, with finish_reason "length"

    def __post_init__(self):
        self._lock = threading.Lock()
        self._in_flight = 0
        provider = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out as separate writes

            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except json.JSONDecodeError:
                    return self._json(400, {"error": {"message": "bad json"}})
                with provider._lock:
                    status = provider.faults.pop(0) if provider.faults else 200
                    provider.calls.append(Call(self.path, body, dict(self.headers), status))
                    provider._in_flight += 1
                    provider.max_in_flight = max(provider.max_in_flight, provider._in_flight)
                try:
                    self._answer(body, status)
                finally:
                    with provider._lock:
                        provider._in_flight -= 1

            def _answer(self, body, status):
                if provider.delay:
                    time.sleep(provider.delay)
                if status != 200:
                    return self._json(status, {"error": {"type": "rate_limit_error" if status == 429 else "api_error",
                                                         "message": f"injected {status}"}},
                                      extra={"retry-after": "0"} if status == 429 else None)
                text = provider.reply(body)
                self.finish_reason = "stop"
                limit = body.get("max_tokens") or body.get("max_completion_tokens")
                if provider.cut_at_max_tokens and limit and len(text.split(" ")) > limit:
                    text, self.finish_reason = " ".join(text.split(" ")[:limit]), "length"
                if self.path.rstrip("/").endswith("/chat/completions"):
                    return self._openai(body, text)
                if self.path.rstrip("/").endswith("/completions"):
                    return self._completion(body, text)
                if self.path.rstrip("/").endswith("/messages"):
                    return self._anthropic(body, text)
                return self._json(404, {"error": {"message": f"no route {self.path}"}})

            def _json(self, status, obj, extra=None):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _sse(self, events):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                for event, payload in events:
                    chunk = (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"
                    self.wfile.write(chunk.encode())
                    self.wfile.flush()
                self.close_connection = True

            def _openai(self, body, text):
                model = body.get("model", "fake")
                usage = {"prompt_tokens": len(prompt_text(body).split()), "completion_tokens": len(text.split())}
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                if body.get("stream"):
                    words = text.split(" ")
                    pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
                    events = [(None, json.dumps({"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": model,
                                                  "choices": [{"index": 0, "delta": {"role": "assistant", "content": p},
                                                               "finish_reason": None}]})) for p in pieces]
                    events.append((None, json.dumps({"id": "c1", "object": "chat.completion.chunk", "created": 0,
                                                      "model": model, "choices": [{"index": 0, "delta": {},
                                                                                   "finish_reason": self.finish_reason}]})))
                    events.append((None, "[DONE]"))
                    return self._sse(events)
                return self._json(200, {"id": "c1", "object": "chat.completion", "created": 0, "model": model,
                                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                     "finish_reason": self.finish_reason}], "usage": usage})

            def _completion(self, body, text):
                model = body.get("model", "fake")
                usage = {"prompt_tokens": len(prompt_text(body).split()), "completion_tokens": len(text.split())}
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                if body.get("stream"):
                    words = text.split(" ")
                    events = [(None, json.dumps({"id": "t1", "object": "text_completion", "created": 0, "model": model,
                                                  "choices": [{"index": 0, "text": w if i == 0 else " " + w,
                                                               "logprobs": None, "finish_reason": None}]}))
                              for i, w in enumerate(words)]
                    if provider.cut_at_max_tokens:
                        events.append((None, json.dumps({"id": "t1", "object": "text_completion", "created": 0,
                                                          "model": model, "choices": [{"index": 0, "text": "",
                                                          "logprobs": None, "finish_reason": self.finish_reason}]})))
                    events.append((None, "[DONE]"))
                    return self._sse(events)
                return self._json(200, {"id": "t1", "object": "text_completion", "created": 0, "model": model,
                                        "choices": [{"index": 0, "text": text, "logprobs": None,
                                                     "finish_reason": self.finish_reason}], "usage": usage})

            def _anthropic(self, body, text):
                model = body.get("model", "fake")
                usage = {"input_tokens": len(prompt_text(body).split()), "output_tokens": len(text.split())}
                message = {"id": "msg_1", "type": "message", "role": "assistant", "model": model,
                           "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                           "stop_sequence": None, "usage": usage}
                if body.get("stream"):
                    start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 0}}
                    events = [("message_start", json.dumps({"type": "message_start", "message": start})),
                              ("content_block_start", json.dumps({"type": "content_block_start", "index": 0,
                                                                  "content_block": {"type": "text", "text": ""}}))]
                    for i, w in enumerate(text.split(" ")):
                        events.append(("content_block_delta", json.dumps({
                            "type": "content_block_delta", "index": 0,
                            "delta": {"type": "text_delta", "text": w if i == 0 else " " + w}})))
                    events += [("content_block_stop", json.dumps({"type": "content_block_stop", "index": 0})),
                               ("message_delta", json.dumps({"type": "message_delta",
                                                             "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                                             "usage": {"output_tokens": usage["output_tokens"]}})),
                               ("message_stop", json.dumps({"type": "message_stop"}))]
                    return self._sse(events)
                return self._json(200, message)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "FakeProvider":
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
