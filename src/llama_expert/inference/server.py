"""``serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over a base or MoE-augmented model.

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (the
tokenizer's chat template; ``"stream": true`` sends server-sent events ending in ``data: [DONE]``), and beside them
``POST /v1/routing`` (the expert each layer chose for each token of a text) and ``GET /``, a page that colours a text
by expert beside a chat box (``inference.routing_view``). Requests
that arrive together are generated together (``inference.batching``); the application is
``inference.openai_app``. With an API key (``--api-key`` or the ``LLAMA_EXPERT_API_KEY`` environment variable,
which keeps it out of the process list) every ``/v1`` request must send ``Authorization: Bearer KEY``.

This module is light on purpose (the CLI imports it to build its flags): the port is opened before
Transformers and FastAPI are imported and before the model loads, so a busy port fails at once. A host that
other machines can reach, without an API key, gets a warning.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import asdict, dataclass
from typing import Dict, Optional

from ..errors import ConfigError
from ..options import option
from ..integration.kv_cache_choice import KV_CACHE_CHOICES
from .listening import listen, open_to_others

API_KEY_ENV = "LLAMA_EXPERT_API_KEY"


@dataclass
class ServeArguments:
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = option(8000, "TCP port")
    served_model_name: Optional[str] = option(None, "the model id clients send (default: the adapter's folder "
                                                    "name, else the base model's name)")
    api_key: Optional[str] = option(None, f"require 'Authorization: Bearer KEY' (better: set {API_KEY_ENV})")
    max_batch_size: int = option(8, "most requests generated together")
    batch_wait_ms: float = option(5.0, "how long the first request of a batch waits for others (ms)")
    max_tokens_limit: int = option(1024, "largest max_tokens a request may ask for")
    kv_cache: str = option("none", "key/value cache: none, int8 or int4 (KVCacheCompressor)",
                           choices=KV_CACHE_CHOICES)
    compiled_decode: bool = option(True, "on CUDA, decode with a dynamic KV cache and no compilation instead of "
                                         "a static cache replayed as CUDA graphs (a CPU never compiles)")
    max_body_bytes: int = option(4 * 1024 * 1024, "largest request body in bytes, larger ones get HTTP 413 (4 MiB: "
                                                   "room for a 128k-token prompt)")
    max_routing_tokens: int = option(4096, "most tokens of text /v1/routing routes at once (and at most the model's "
                                           "context)")

    def validate(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be in 1..65535, got {self.port}.")
        if self.max_batch_size < 1:
            raise ConfigError(f"--max-batch-size must be >= 1, got {self.max_batch_size}.")
        if not self.batch_wait_ms >= 0:
            raise ConfigError(f"--batch-wait-ms must be >= 0, got {self.batch_wait_ms}.")
        if self.max_tokens_limit < 1:
            raise ConfigError(f"--max-tokens-limit must be >= 1, got {self.max_tokens_limit}.")
        if self.max_routing_tokens < 1:
            raise ConfigError(f"--max-routing-tokens must be >= 1, got {self.max_routing_tokens}.")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"--max-body-bytes must be >= 1024, got {self.max_body_bytes}.")


def api_key(args: ServeArguments) -> Optional[str]:
    return args.api_key or os.environ.get(API_KEY_ENV) or None


def served_name(model_args, info: Dict) -> str:
    adapter = info.get("adapter")
    return os.path.basename(str(adapter).rstrip("/")) if adapter else str(info.get("base_model") or model_args.model)


def run_server(model_args, args: ServeArguments) -> None:
    """The ``serve`` command: open the port, load the model, then serve until interrupted."""
    args.validate()
    if not all(importlib.util.find_spec(name) for name in ("fastapi", "uvicorn")):
        raise ConfigError("serve needs FastAPI and uvicorn: pip install 'llama-expert[serve]'")
    sock = listen(args.host, args.port)
    key = api_key(args)
    if open_to_others(args.host) and not key:
        print(f"warning: --host {args.host} lets other machines reach this server and no API key is set: anyone "
              f"who can reach port {args.port} can use it. Set {API_KEY_ENV} (or --api-key), or serve on "
              f"127.0.0.1.", file=sys.stderr, flush=True)
    with sock:
        import uvicorn

        from ..integration.loading import load_model_and_tokenizer
        from .openai_app import Service, build_app

        model, tokenizer, info = load_model_and_tokenizer(**asdict(model_args))
        model.eval()
        tokenizer.padding_side = "left"
        name = args.served_model_name or served_name(model_args, info)
        service = Service(model, tokenizer, name, args, key, info.get("adapter"))
        print(f"serving '{name}' on http://{args.host}:{args.port}/v1 (OpenAI-compatible), and a routing page at "
              f"http://{args.host}:{args.port}/{'; API key required' if key else ''}", flush=True)
        uvicorn.Server(uvicorn.Config(build_app(service), log_level="warning")).run(sockets=[sock])
