"""Requests that arrive together are generated together: one worker thread owns the model.

The worker takes the oldest waiting request, waits up to ``batch_wait`` seconds for more with the same
sampling settings (temperature, top_p) up to ``max_batch_size``, left-pads their prompts and runs one
``model.generate`` over the batch. Each request keeps its own limits: a per-row stopping criterion ends a
row at its own ``max_tokens`` or stop string (generation ends when every row has ended), and a streamer
splits every decoding step's tokens by row and sends each request its new text as soon as it decodes
(text is held back while it ends in an incomplete UTF-8 character or in what may begin a stop string).
A request whose client has gone is ``cancel()``-ed: its row ends at the next decoding step (or it is dropped
before its batch starts), so a client that leaves does not keep the worker busy; the rest of its batch goes
on. Why not continuous batching: a request that arrives mid-batch waits for the next one; Transformers'
continuous-batching manager needs paged attention of its own and does not host a model whose MLPs were
replaced, so this is the batching it allows. Work on the model that is not generation (``Job``: the routing of a
text for the server's ``/v1/routing``) waits in the same queue and runs alone, between batches, on the same thread.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple, Union

import torch

from .generation import generation_config
from ..integration.kv_cache_choice import generation_cache_kwargs


@dataclass(kw_only=True)
class Submission:
    """What ``BatchEngine.submit`` takes: its ``listener`` (given to ``submit``) receives its events, called on the
    worker thread (the server hands them to its event loop); ``cancel()`` says nobody wants the rest."""
    listener: Optional[Callable[[tuple], None]] = None
    cancelled: bool = False

    def send(self, event: tuple) -> None:
        self.listener(event)

    def cancel(self) -> None:
        """Nobody wants the rest (the client left): the worker ends a request's row at its next decoding step."""
        self.cancelled = True


@dataclass
class Request(Submission):
    """One prompt to complete. Its listener receives ("text", delta) events and then one ("done", finish_reason,
    completion_tokens) or ("error", message). Finish reasons: "stop", "length", or "cancelled" after ``cancel()``."""
    ids: List[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: List[str] = field(default_factory=list)

    @property
    def sampling(self) -> Tuple[float, float]:
        return (self.temperature, self.top_p if self.temperature > 0 else 1.0)


@dataclass
class Job(Submission):
    """Work on the model that is not generation (``work()``, run on the worker thread, alone, between batches: the
    model is never used by two threads at once). Its listener receives ("done", result) or ("error", message)."""
    work: Callable[[], object]

    def run(self) -> None:
        try:
            result = self.work()
        except Exception as exc:  # reported to the waiting client; the worker keeps serving
            self.send(("error", f"{type(exc).__name__}: {exc}"))
        else:
            self.send(("done", result))


class _Row:
    """What one batch row has produced, and when it must stop."""

    def __init__(self, request: Request, tokenizer, eos: set, engine: "BatchEngine"):
        self.request, self.tokenizer, self.eos, self.engine = request, tokenizer, eos, engine
        self.ids: List[int] = []
        self.sent = 0  # characters of the text already sent
        self.finish: Optional[str] = None

    def add(self, token: int) -> None:
        if self.finish is not None:
            return
        finish = None
        if token in self.eos:
            finish = "stop"
        else:
            self.ids.append(token)
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            cut = min((text.find(s) for s in self.request.stop if s and s in text), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
            elif len(self.ids) >= self.request.max_tokens:
                finish = "length"
            ready = len(text) if finish is not None else self._ready(text)
            if ready > self.sent:
                self.request.send(("text", text[self.sent:ready]))
                self.sent = ready
        if finish is not None:
            self.end(finish)

    def end(self, finish: str) -> None:
        """The row is over: its tokens are counted (once, here, not at every step) and its client told."""
        self.finish = finish
        self.engine.tokens_generated += len(self.ids)
        self.request.send(("done", finish, len(self.ids)))

    def cancel_if_asked(self) -> bool:
        """End the row now if its request was cancelled; True when it did."""
        if self.finish is not None or not self.request.cancelled:
            return False
        self.end("cancelled")
        return True

    def _ready(self, text: str) -> int:
        """How much of ``text`` can be sent: not an incomplete UTF-8 character at the end, nor an ending that
        may be the start of a stop string (a stop string is never sent, not even in part)."""
        if text.endswith("\ufffd"):
            return self.sent
        held = max((k for s in self.request.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return len(text) - held


def _joins(request: Union[Request, Job], first: Request) -> bool:
    """Whether ``request`` may be generated in ``first``'s batch: a request with the same sampling settings."""
    return isinstance(request, Request) and request.sampling == first.sampling


class BatchEngine:
    """Serve ``Request`` objects from a background thread, batching the ones that arrive together."""

    def __init__(self, model, tokenizer, max_batch_size: int = 8, batch_wait: float = 0.005, kv_cache: str = "none",
                 compiled_decode: bool = True):
        self.model, self.tokenizer, self.kv_cache = model, tokenizer, kv_cache
        self.compiled_decode = compiled_decode  # on CUDA: a static cache in CUDA graphs (kv_cache_choice)
        self.max_batch_size, self.batch_wait = max_batch_size, batch_wait
        self.waiting: "queue.Queue[Union[Request, Job]]" = queue.Queue()
        self.held: List[Union[Request, Job]] = []  # taken from the queue, not of this batch: the next ones
        self.requests_served, self.largest_batch, self.batches = 0, 0, 0
        self.aborted, self.tokens_generated = 0, 0  # requests cancelled before their end; every ended row's tokens
        self.thread = threading.Thread(target=self._run, name="llama-expert-batching", daemon=True)
        self.thread.start()

    def submit(self, request: Union[Request, Job], listener: Callable[[tuple], None]) -> Union[Request, Job]:
        """Queue ``request`` (or a ``Job``); ``listener`` receives its events on the worker thread."""
        request.listener = listener
        self.waiting.put(request)
        return request

    def _next_batch(self) -> List[Union[Request, Job]]:
        """The oldest waiting request and those that may join it; a Job is a batch of its own."""
        first = self.held.pop(0) if self.held else self.waiting.get()
        if isinstance(first, Job):
            return [first]
        batch, deadline = [first], time.monotonic() + self.batch_wait
        keep = []
        for request in self.held:  # held requests first, oldest first
            (batch if _joins(request, first) and len(batch) < self.max_batch_size else keep).append(request)
        self.held = keep
        while len(batch) < self.max_batch_size:
            try:
                request = self.waiting.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            (batch if _joins(request, first) else self.held).append(request)
        return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if isinstance(batch[0], Job):
                if not batch[0].cancelled:
                    batch[0].run()
                continue
            for request in [r for r in batch if r.cancelled]:  # its client left while it waited
                request.send(("done", "cancelled", 0))
                self.aborted += 1
            batch = [r for r in batch if not r.cancelled]
            if not batch:
                continue
            aborted = self.aborted
            try:
                self.generate(batch)
            except Exception as exc:  # report to every waiting client; the server keeps serving
                for request in batch:
                    request.send(("error", f"generation failed: {exc}"))
            self.requests_served += len(batch) - (self.aborted - aborted)
            self.largest_batch = max(self.largest_batch, len(batch))
            self.batches += 1

    @torch.no_grad()
    def generate(self, batch: List[Request]) -> None:
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        tokenizer, model, engine = self.tokenizer, self.model, self
        config = generation_config(model, tokenizer, max(r.max_tokens for r in batch), *batch[0].sampling)
        eos = config.eos_token_id
        rows = [_Row(r, tokenizer, set(eos if isinstance(eos, list) else [eos] if eos is not None else []), engine)
                for r in batch]
        length = max(len(r.ids) for r in batch)
        pad = config.pad_token_id
        device = next(model.parameters()).device
        ids = torch.tensor([[pad] * (length - len(r.ids)) + r.ids for r in batch], device=device)
        mask = torch.tensor([[0] * (length - len(r.ids)) + [1] * len(r.ids) for r in batch], device=device)

        class Rows(BaseStreamer):
            prompt_seen = False

            def put(self, value):
                if not self.prompt_seen:  # generate() first puts the prompt
                    self.prompt_seen = True
                    return
                for row, token in zip(rows, value.reshape(-1).tolist()):
                    row.add(token)

            def end(self):
                for row in rows:
                    if row.finish is None:
                        row.end("length")

        class Finished(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                engine.aborted += sum(row.cancel_if_asked() for row in rows)
                return torch.tensor([row.finish is not None for row in rows], device=input_ids.device)

        model.generate(input_ids=ids, attention_mask=mask, generation_config=config, streamer=Rows(),
                       stopping_criteria=StoppingCriteriaList([Finished()]),
                       **generation_cache_kwargs(model, self.kv_cache, self.compiled_decode))
