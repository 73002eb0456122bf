"""``moekit serve``: an OpenAI-compatible completions server on Starlette (ASGI) and uvicorn.

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions`` (``prompt`` a string or a list of
strings, ``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``, ``stream``; ``n`` must be 1). Streaming
answers are server-sent events, ``data: {chunk}`` lines ending with ``data: [DONE]``, as the OpenAI API sends
them. Bad requests get a 4xx JSON body ``{"error": {"message", "type", "param", "code"}}``; the server goes on
serving. Requests are decoded in batches by a :class:`~moekit.serving.batcher.Batcher`.

A prompt longer than ``context - max_tokens`` keeps its last tokens (the model sees at most ``context``).
Needs the ``serve`` extra (starlette, uvicorn).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ..models import LanguageModel
from .batcher import Batcher, Request

__all__ = ["CompletionError", "build_app"]


class CompletionError(Exception):
    """A request the server refuses, with the HTTP status and the parameter at fault."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def _error(message: str, status: int, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status)


def _number(body: dict, name: str, default: float, lo: float, hi: float, integer: bool = False) -> Any:
    value = body.get(name, default)
    if value is None:
        value = default
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise CompletionError(f"{name}={value!r} must be {kind} in [{lo}, {hi}]", name)
    return value


def _parse(body: Any, encode: Callable[[str], list[int]], context: int) -> tuple[list[list[int]], dict]:
    if not isinstance(body, dict):
        raise CompletionError("the request body must be a JSON object")
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise CompletionError("prompt must be a string or a non-empty list of strings", "prompt")
    if body.get("n", 1) not in (1, None):
        raise CompletionError("only n=1 is supported; send several requests instead", "n")
    max_tokens = _number(body, "max_tokens", 16, 0, context - 1, integer=True)
    settings = {"max_tokens": max_tokens,
                "temperature": float(_number(body, "temperature", 1.0, 0.0, 2.0)),
                "top_p": float(_number(body, "top_p", 1.0, 1e-9, 1.0))}
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise CompletionError("stop must be a non-empty string or a list of up to 4 of them", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise CompletionError(f"seed={seed!r} must be an integer", "seed")
    settings.update(stop=stop, seed=seed, stream=bool(body.get("stream", False)),
                    model=str(body.get("model") or "moekit"))
    ids = []
    for p in prompts:
        tokens = encode(p)
        if not tokens:
            raise CompletionError("the prompt encodes to no tokens; send a non-empty prompt", "prompt")
        ids.append(tokens[-(context - max_tokens):])
    return ids, settings


def build_app(model: LanguageModel, encode: Callable[[str], list[int]], decode: Callable[[list[int]], str], *,
              model_name: str = "moekit", max_batch: int = 8) -> Starlette:
    """The ASGI app serving ``model``; the batcher thread starts with the app and stops with it."""
    if not model.supports_kv_cache:
        raise ValueError("this model routes over the whole sequence (depth routing or a Read-ME planner) and has "
                         "no KV cache, which batched serving needs; serve a model without them")
    context = model.config.context
    batcher = Batcher(model, decode, max_batch)
    state: dict[str, Any] = {"requests": 0}

    async def health(request: HTTPRequest) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": model_name, "requests": state["requests"],
                             "batches": batcher.batches, "largest_batch": batcher.largest_batch})

    async def models(request: HTTPRequest) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                                         "owned_by": "moekit"}]})

    async def completions(request: HTTPRequest):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return _error(f"the request body is not valid JSON ({e})", 400)
        try:
            prompts, s = _parse(body, encode, context)
        except CompletionError as e:
            return _error(e.message, e.status, e.param)
        state["requests"] += 1
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        for index, ids in enumerate(prompts):
            batcher.submit(Request(ids, s["max_tokens"], s["temperature"], s["top_p"], s["stop"], s["seed"],
                                   **_callbacks(loop, events, index)))
        ident, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": ident, "object": "text_completion", "created": created, "model": s["model"]}
        prompt_tokens = sum(len(p) for p in prompts)
        if s["stream"]:
            return StreamingResponse(_stream(events, len(prompts), head), media_type="text/event-stream")
        texts, reasons, used = [""] * len(prompts), [None] * len(prompts), 0
        remaining = len(prompts)
        while remaining:
            kind, index, *rest = await events.get()
            if kind == "text":
                texts[index] += rest[0]
            elif kind == "done":
                reasons[index], used, remaining = rest[0], used + rest[1], remaining - 1
            else:
                return _error(rest[0], 500)
        choices = [{"text": t, "index": i, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        return JSONResponse({**head, "choices": choices, "usage": {
            "prompt_tokens": prompt_tokens, "completion_tokens": used, "total_tokens": prompt_tokens + used}})

    async def not_found(request: HTTPRequest, exc: Exception) -> JSONResponse:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        return _error(f"{request.method} {request.url.path}: {getattr(exc, 'detail', 'error')}", status)

    routes = [Route("/health", health), Route("/v1/models", models),
              Route("/v1/completions", completions, methods=["POST"])]
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        batcher.close()

    app = Starlette(routes=routes, exception_handlers={HTTPException: not_found}, lifespan=lifespan)
    app.state.batcher = batcher
    return app


def _callbacks(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, index: int) -> dict[str, Callable]:
    """The batcher thread's callbacks for request ``index``: each puts an event on the asyncio queue."""
    def put(*event: Any) -> None:
        loop.call_soon_threadsafe(events.put_nowait, (event[0], index, *event[1:]))

    def on_text(text: str) -> None:
        put("text", text)

    def on_done(reason: str, tokens: int) -> None:
        put("done", reason, tokens)

    def on_error(message: str) -> None:
        put("error", message)

    return {"on_text": on_text, "on_done": on_done, "on_error": on_error}


async def _stream(events: asyncio.Queue, count: int, head: dict):
    remaining = count
    while remaining:
        kind, index, *rest = await events.get()
        if kind == "error":
            yield f"data: {json.dumps({'error': {'message': rest[0], 'type': 'server_error'}})}\n\n"
            return
        finish = rest[0] if kind == "done" else None
        text = rest[0] if kind == "text" else ""
        remaining -= kind == "done"
        chunk = {**head, "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": finish}]}
        yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"
