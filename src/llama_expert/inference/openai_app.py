"""The OpenAI-compatible FastAPI application of ``serve``: the routes, and the Service behind them (the model,
its tokenizer and the batching engine), which turns request bodies into answers.

A request that cannot be served gets an HTTP 4xx with an OpenAI-style body ``{"error": {"message", "type",
"param", "code"}}`` and the server keeps serving: malformed JSON or a bad field (400), a wrong API key (401),
an unknown model (404), a prompt that does not fit the context with ``max_tokens`` (400), a body over
``--max-body-bytes`` (413). With an API key every ``/v1`` request must send ``Authorization: Bearer KEY``
(compared in constant time), and ``/docs`` and ``/openapi.json`` are off (they would answer without it).

Hostile or careless clients must not stall the others: the event loop only moves bytes (parsing the JSON,
tokenizing and generating run on other threads), a body is refused as soon as it passes the size cap, and a
client that leaves (a stream closed early, a timeout) has its batch row ended at the next decoding step.
``/health`` counts requests served, batches, requests ``aborted`` that way, and ``tokens_generated``.

Beside the OpenAI routes: ``POST /v1/routing`` (``{"text": ...}``: the expert each layer chose for each token, run as
a ``Job`` on the batching worker; under the API key like every ``/v1`` route) and ``GET /``, the page that shows it
(``inference.routing_view``).
"""

import asyncio  # no "from __future__ import annotations": FastAPI reads the route handlers' annotations at runtime
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, List, Optional, Union

import torch

from ..errors import ConfigError
from ..integration.base_models import context_length
from ..integration.surgery import is_augmented
from ..metrics.routing import token_routing
from .batching import BatchEngine, Job, Request
from .generation import check_text, has_chat_template
from .openai_fields import RequestError, flag, number, refuse_unsupported, stops
from .routing_view import expert_labels, page_html, routing_answer, token_pieces


@dataclass
class Call:
    """A validated request: what the engine generates, and how the answer is sent."""
    request: Request
    chat: bool
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the token counts


class Service:
    """The model, its tokenizer and the batching engine; turns request bodies into answers."""

    def __init__(self, model, tokenizer, name: str, args, api_key: Optional[str], adapter: Optional[str] = None):
        """``args``: the ServeArguments; ``api_key``: the key every /v1 request must send, or None; ``adapter``: the
        adapter folder (where a mix names its experts)."""
        self.model, self.tokenizer, self.name, self.args, self.api_key = model, tokenizer, name, args, api_key
        self.labels = expert_labels(model, adapter) if is_augmented(model) else []
        self.engine = BatchEngine(model, tokenizer, args.max_batch_size, args.batch_wait_ms / 1000, args.kv_cache,
                                  args.compiled_decode)
        self.context = context_length(model.config)
        self.created = int(time.time())

    def check_key(self, authorization: Optional[str]) -> None:
        """``Authorization: Bearer KEY``; the scheme is case-insensitive (RFC 7235) and required."""
        if self.api_key is None:
            return
        scheme, _, given = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise RequestError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'.", None,
                               "invalid_api_key", "authentication_error")

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                            "owned_by": "llama-expert"}]}

    def parse(self, raw: bytes, chat: bool) -> Call:
        """The request body's bytes -> a Call (or RequestError). Parses and tokenizes: run it off the event loop."""
        body = _json_object(raw)
        stream, options = flag(body, "stream"), body.get("stream_options")
        if options is not None and (not isinstance(options, dict) or not stream):
            raise RequestError(400, "'stream_options' must be an object, and only with \"stream\": true.",
                               "stream_options")
        include_usage = flag(options or {}, "include_usage", "stream_options.include_usage")
        return Call(self.request(body, chat), chat, stream, include_usage)

    def check_model(self, model) -> None:
        if model != self.name:
            raise RequestError(404, f"the model '{model}' does not exist; this server serves '{self.name}'.",
                               "model", "model_not_found")

    def request(self, body: dict, chat: bool) -> Request:
        """Validate an OpenAI request body (a dict) and build the engine's Request (or raise RequestError)."""
        self.check_model(body.get("model"))
        if number(body, "n", 1, 1, 1, integer=True) != 1:
            raise RequestError(400, "'n' must be 1.", "n")
        refuse_unsupported(body)
        limit = self.args.max_tokens_limit
        max_tokens = number(body, "max_completion_tokens" if chat and "max_completion_tokens" in body
                             else "max_tokens", 16 if not chat else min(256, limit), 1, limit, integer=True)
        temperature = float(number(body, "temperature", 1.0, 0, 2))
        top_p = float(number(body, "top_p", 1.0, 0, 1))
        if top_p == 0:
            raise RequestError(400, "'top_p' must be greater than 0.", "top_p")
        ids = self._chat_ids(body.get("messages")) if chat else self._prompt_ids(body.get("prompt"))
        if self.context is not None and len(ids) + max_tokens > self.context:
            raise RequestError(400, f"the prompt has {len(ids)} tokens and max_tokens is {max_tokens}, more than the "
                                    f"model's context of {self.context} tokens; shorten the prompt or lower max_tokens.",
                               "messages" if chat else "prompt", "context_length_exceeded")
        return Request(ids=ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stops(body))

    def _prompt_ids(self, prompt: Union[str, List[str], None]) -> List[int]:
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise RequestError(400, "'prompt' must be a non-empty string.", "prompt")
        return self.tokenizer(prompt)["input_ids"]

    def _chat_ids(self, messages) -> List[int]:
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise RequestError(400, "'messages' must be a non-empty list of {role, content} objects with string "
                                    "content.", "messages")
        if not has_chat_template(self.tokenizer):
            raise RequestError(400, "this model's tokenizer has no chat template: use /v1/completions.", "messages")
        for m in messages:
            try:
                check_text(m["content"], "a message")
            except ConfigError as exc:
                raise RequestError(400, str(exc), "messages") from None
        text = self.tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                                  tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def parse_routing(self, raw: bytes) -> Job:
        """A ``/v1/routing`` body ``{"text": ..., "model": optional}`` -> the Job that routes the text on the worker
        (or RequestError). Parses and tokenizes: run it off the event loop."""
        body = _json_object(raw)
        if not self.labels:
            raise RequestError(400, "this server's model has no MoE adapter, so no token is routed: serve one with "
                                    "--adapter FOLDER (a llama-expert MoE adapter).", None, "no_adapter")
        if "model" in body:
            self.check_model(body["model"])
        text = body.get("text")
        if not isinstance(text, str) or not text:
            raise RequestError(400, "'text' must be a non-empty string.", "text")
        try:
            check_text(text, "'text'")
        except ConfigError as exc:
            raise RequestError(400, str(exc), "text") from None
        ids = self.tokenizer(text)["input_ids"]
        limit = min(self.args.max_routing_tokens, self.context or self.args.max_routing_tokens)
        if len(ids) > limit:
            raise RequestError(400, f"the text has {len(ids)} tokens, more than the {limit} this server routes at once "
                                    f"(the model's context, or --max-routing-tokens); shorten the text.", "text",
                               "context_length_exceeded")
        pieces = token_pieces(self.tokenizer, text, ids)
        return Job(lambda: {"model": self.name, "tokens": pieces, "token_ids": ids,
                            **routing_answer(token_routing(self.model, torch.tensor(ids)), self.labels)})

    async def run(self, job: Job):
        """``job``'s result, run on the batching worker (the thread that owns the model) and awaited without holding
        the event loop; a failure is an HTTP 500."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def listener(event: tuple) -> None:  # on the worker thread
            try:
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(event))
            except RuntimeError:  # the event loop has closed: the server is stopping
                pass

        self.engine.submit(job, listener)
        try:
            kind, value = await done
        except asyncio.CancelledError:
            job.cancel()
            raise
        if kind == "error":
            raise RequestError(500, f"routing failed: {value}", kind="server_error")
        return value

    # ------------------------------------------------------------------ answers
    async def events(self, request: Request) -> AsyncIterator[tuple]:
        """The engine's events for ``request``, awaited without holding the event loop (the caller cancels the
        request if it stops listening early)."""
        loop, inbox = asyncio.get_running_loop(), asyncio.Queue()

        def listener(event: tuple) -> None:  # on the worker thread
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, event)
            except RuntimeError:  # the event loop has closed: the server is stopping
                request.cancel()

        self.engine.submit(request, listener)
        while True:
            event = await inbox.get()
            yield event
            if event[0] in ("done", "error"):
                return

    async def complete(self, call: Call, disconnected) -> dict:
        """The whole answer. ``disconnected()`` returns when the client leaves (a timeout, say): then the request
        is cancelled, so the worker ends its row at the next decoding step instead of finishing it for nobody."""
        request, chat = call.request, call.chat

        async def cancel_when_gone():
            await disconnected()
            request.cancel()

        watch = asyncio.ensure_future(cancel_when_gone())
        text, finish, produced = "", None, 0
        try:
            async for event in self.events(request):
                if event[0] == "text":
                    text += event[1]
                elif event[0] == "done":
                    finish, produced = event[1], event[2]
                else:
                    raise RequestError(500, event[1], kind="server_error")
        finally:
            watch.cancel()
        choice = {"index": 0, "finish_reason": finish}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text, "logprobs": None})
        return {"id": _id(chat), "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": self.name, "choices": [choice],
                "usage": _usage(request, produced)}

    async def stream(self, call: Call) -> AsyncIterator[str]:
        """Server-sent events. When the client leaves, Starlette stops this generator, whose ``finally`` cancels
        the request: the worker ends its row at the next decoding step."""
        request, chat = call.request, call.chat
        ident, created = _id(chat), int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list, **extra) -> str:
            data = {"id": ident, "object": kind, "created": created, "model": self.name, "choices": choices}
            if call.include_usage:
                data["usage"] = None  # as OpenAI: null on every chunk but the last
            return f"data: {json.dumps({**data, **extra})}\n\n"

        def choice(delta: Optional[str], finish: Optional[str] = None, first: bool = False) -> list:
            if chat:
                content = {"role": "assistant", "content": ""} if first else ({"content": delta} if delta else {})
                return [{"index": 0, "delta": content, "finish_reason": finish}]
            return [{"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}]

        produced = 0
        try:
            if chat:
                yield chunk(choice(None, first=True))
            async for event in self.events(request):
                if event[0] == "text":
                    yield chunk(choice(event[1]))
                elif event[0] == "done":
                    produced = event[2]
                    yield chunk(choice(None, event[1]))
                else:
                    yield f"data: {json.dumps(RequestError(500, event[1], kind='server_error').body())}\n\n"
        finally:
            request.cancel()  # nothing left to do once it is done
        if call.include_usage:
            yield chunk([], usage=_usage(request, produced))
        yield "data: [DONE]\n\n"


def _json_object(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the request body is not valid JSON ({exc}).") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object.")
    return body


def _id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def _usage(request: Request, produced: int) -> dict:
    return {"prompt_tokens": len(request.ids), "completion_tokens": produced,
            "total_tokens": len(request.ids) + produced}


async def read_body(http, limit: int) -> bytes:
    """The body's bytes, refused with 413 past ``limit``: the declared Content-Length first (nothing is read),
    then the bytes counted as they arrive (a chunked body declares no length)."""
    too_large = RequestError(413, f"the request body is larger than this server's limit of {limit} bytes; send a "
                                  f"shorter request, or start the server with a larger --max-body-bytes.",
                             None, "request_too_large")
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for piece in http.stream():
        size += len(piece)
        if size > limit:
            raise too_large
        chunks.append(piece)
    return b"".join(chunks)


def build_app(service: Service):
    """The FastAPI application over ``service``."""
    from fastapi import FastAPI, Request as HTTPRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    hidden = {"docs_url": None, "redoc_url": None, "openapi_url": None} if service.api_key else {}
    app = FastAPI(title="llama-expert", version="1", **hidden)  # with a key, no page answers without it

    @app.exception_handler(RequestError)
    async def request_error(_, exc: RequestError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        return JSONResponse(RequestError(400, f"invalid request: {exc.errors()[:1]}").body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_, exc: HTTPException):
        return JSONResponse(RequestError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.get("/health")
    async def health():
        engine = service.engine
        return {"status": "ok", "model": service.name, "requests_served": engine.requests_served,
                "batches": engine.batches, "largest_batch": engine.largest_batch, "aborted": engine.aborted,
                "tokens_generated": engine.tokens_generated}

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        service.check_key(request.headers.get("authorization"))
        return service.models()

    async def answer(http: HTTPRequest, chat: bool):
        service.check_key(http.headers.get("authorization"))
        raw = await read_body(http, service.args.max_body_bytes)
        call = await run_in_threadpool(service.parse, raw, chat)  # JSON and tokenizing: off the event loop
        if call.stream:
            return StreamingResponse(service.stream(call), media_type="text/event-stream")
        return JSONResponse(await service.complete(call, lambda: _disconnect(http)))

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await answer(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        return await answer(request, chat=True)

    @app.post("/v1/routing")
    async def routing(http: HTTPRequest):
        service.check_key(http.headers.get("authorization"))
        raw = await read_body(http, service.args.max_body_bytes)
        job = await run_in_threadpool(service.parse_routing, raw)  # JSON and tokenizing: off the event loop
        return JSONResponse(await service.run(job))

    page = page_html(service.name, service.api_key is not None)  # holds no data: the page asks /v1 with the key

    @app.get("/")
    async def routing_page():
        return HTMLResponse(page)

    return app


async def _disconnect(http) -> None:
    """Returns when the client has gone (the body is read: the server's next message is the disconnect)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass
