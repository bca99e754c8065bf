"""The OpenAI-compatible FastAPI application of ``serve``: the routes, and the Service behind them (the model,
its tokenizer and the batching engine), which turns request bodies into answers.

A request that cannot be served gets an HTTP 4xx with an OpenAI-style body ``{"error": {"message", "type",
"param", "code"}}`` and the server keeps serving: malformed JSON or a bad field (400), a wrong API key (401),
an unknown model (404), a prompt that does not fit the context with ``max_tokens`` (400). With an API key
every ``/v1`` request must send ``Authorization: Bearer KEY``; keys are compared in constant time.
"""

import hmac  # no "from __future__ import annotations": FastAPI reads the route handlers' annotations at runtime
import json
import time
import uuid
from typing import Iterator, List, Optional, Union

from ..errors import ConfigError
from ..integration.base_models import context_length
from .batching import BatchEngine, Request
from .generation import check_text, has_chat_template
from .openai_fields import RequestError, number, stops


class Service:
    """The model, its tokenizer and the batching engine; turns request bodies into answers."""

    def __init__(self, model, tokenizer, name: str, args, api_key: Optional[str]):
        """``args``: the ServeArguments; ``api_key``: the key every /v1 request must send, or None."""
        self.model, self.tokenizer, self.name, self.args, self.api_key = model, tokenizer, name, args, api_key
        self.engine = BatchEngine(model, tokenizer, args.max_batch_size, args.batch_wait_ms / 1000, args.kv_cache)
        self.context = context_length(model.config)
        self.created = int(time.time())

    def check_key(self, authorization: Optional[str]) -> None:
        if self.api_key is None:
            return
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise RequestError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'.", None,
                               "invalid_api_key", "authentication_error")

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                            "owned_by": "llama-expert"}]}

    def request(self, body: dict, chat: bool) -> Request:
        """Validate an OpenAI request body and build the engine's Request (or raise RequestError)."""
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object.")
        model = body.get("model")
        if model != self.name:
            raise RequestError(404, f"the model '{model}' does not exist; this server serves '{self.name}'.",
                               "model", "model_not_found")
        if number(body, "n", 1, 1, 1, integer=True) != 1:
            raise RequestError(400, "'n' must be 1.", "n")
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

    # ------------------------------------------------------------------ answers
    def events(self, request: Request) -> Iterator[tuple]:
        self.engine.submit(request)
        while True:
            event = request.events.get()
            yield event
            if event[0] in ("done", "error"):
                return

    def complete(self, body: dict, chat: bool) -> dict:
        request = self.request(body, chat)
        text, finish, produced = "", None, 0
        for event in self.events(request):
            if event[0] == "text":
                text += event[1]
            elif event[0] == "done":
                finish, produced = event[1], event[2]
            else:
                raise RequestError(500, event[1], kind="server_error")
        choice = {"index": 0, "finish_reason": finish}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text, "logprobs": None})
        return {"id": _id(chat), "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": self.name, "choices": [choice],
                "usage": {"prompt_tokens": len(request.ids), "completion_tokens": produced,
                          "total_tokens": len(request.ids) + produced}}

    def stream(self, body: dict, chat: bool) -> Iterator[str]:
        """Validate first (errors become a 4xx before streaming starts), then server-sent events."""
        request = self.request(body, chat)
        ident, created = _id(chat), int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: Optional[str], finish: Optional[str] = None, first: bool = False) -> str:
            if chat:
                content = {"role": "assistant", "content": ""} if first else ({"content": delta} if delta else {})
                choice = {"index": 0, "delta": content, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            data = {"id": ident, "object": kind, "created": created, "model": self.name, "choices": [choice]}
            return f"data: {json.dumps(data)}\n\n"

        def generate() -> Iterator[str]:
            if chat:
                yield chunk(None, first=True)
            for event in self.events(request):
                if event[0] == "text":
                    yield chunk(event[1])
                elif event[0] == "done":
                    yield chunk(None, event[1])
                else:
                    yield f"data: {json.dumps(RequestError(500, event[1], kind='server_error').body())}\n\n"
            yield "data: [DONE]\n\n"

        return generate()


def _id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def build_app(service: Service):
    """The FastAPI application over ``service``."""
    from fastapi import FastAPI, Request as HTTPRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    app = FastAPI(title="llama-expert", version="1")

    @app.exception_handler(RequestError)
    async def request_error(_, exc: RequestError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        return JSONResponse(RequestError(400, f"invalid request: {exc.errors()[:1]}").body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_, exc: HTTPException):
        return JSONResponse(RequestError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    async def body_of(request: HTTPRequest) -> dict:
        service.check_key(request.headers.get("authorization"))
        raw = await request.body()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(400, f"the request body is not valid JSON ({exc}).") from None

    @app.get("/health")
    async def health():
        engine = service.engine
        return {"status": "ok", "model": service.name, "requests_served": engine.requests_served,
                "batches": engine.batches, "largest_batch": engine.largest_batch}

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        service.check_key(request.headers.get("authorization"))
        return service.models()

    async def answer(request: HTTPRequest, chat: bool):
        body = await body_of(request)
        if isinstance(body, dict) and body.get("stream"):
            events = service.stream(body, chat)  # raises RequestError before any byte is sent
            return StreamingResponse(events, media_type="text/event-stream")
        return JSONResponse(await run_in_threadpool(service.complete, body, chat))

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await answer(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        return await answer(request, chat=True)

    return app
