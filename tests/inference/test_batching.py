"""The batching engine on its own: a cancelled request's row ends at once while the rest of its batch goes on; a Job
runs on the worker thread, alone, in its turn."""

import queue
import threading
import time

from llama_expert.inference.batching import BatchEngine, Job, Request
from llama_expert.integration.base_models import load_base_model, load_tokenizer


def _submit(engine: BatchEngine, request: Request) -> queue.Queue:
    """Submit ``request`` with a listener that puts its events into the queue returned."""
    events: queue.Queue = queue.Queue()
    engine.submit(request, events.put)
    return events


def _drain(events: queue.Queue, timeout: float = 30):
    seen = []
    deadline = time.monotonic() + timeout
    while not seen or seen[-1][0] not in ("done", "error"):
        seen.append(events.get(timeout=max(0.1, deadline - time.monotonic())))
    return seen


def test_a_cancelled_row_ends_at_the_next_step_and_its_batch_goes_on(trained_base):
    folder, _ = trained_base
    tokenizer = load_tokenizer(str(folder))
    tokenizer.padding_side = "left"
    engine = BatchEngine(load_base_model(str(folder)).eval(), tokenizer, max_batch_size=2, batch_wait=0.5)
    left = Request(ids=tokenizer("The quick")["input_ids"], max_tokens=100, temperature=0)
    left_events = _submit(engine, left)
    stays = _submit(engine, Request(ids=tokenizer("The lazy")["input_ids"], max_tokens=100, temperature=0))
    assert left_events.get(timeout=30)[0] == "text"
    left.cancel()  # its client has gone
    gone, kept = _drain(left_events), _drain(stays)
    assert gone[-1][:2] == ("done", "cancelled") and gone[-1][2] < 20
    assert kept[-1] == ("done", "length", 100)  # the other row of the same batch finished
    deadline = time.monotonic() + 10
    while engine.batches < 1 and time.monotonic() < deadline:  # counted once generate() has returned
        time.sleep(0.01)
    assert engine.largest_batch == 2 and engine.aborted == 1 and engine.requests_served == 1
    assert engine.tokens_generated == gone[-1][2] + kept[-1][2]  # each row's tokens, counted once
    waiting = Request(ids=tokenizer("The")["input_ids"], max_tokens=100, temperature=0)
    waiting.cancel()  # gone before its batch started: never generated
    assert _drain(_submit(engine, waiting)) == [("done", "cancelled", 0)] and engine.aborted == 2


def test_a_job_runs_on_the_worker_thread_after_the_batch_being_formed(trained_base):
    """A Job queued while a batch gathers runs right after that batch (requests that join the batch meanwhile go
    with it, as a request of other sampling settings waits), on the thread that generates, the one that uses the
    model; a Job's failure is reported to its listener and the worker goes on."""
    folder, _ = trained_base
    tokenizer = load_tokenizer(str(folder))
    tokenizer.padding_side = "left"
    engine = BatchEngine(load_base_model(str(folder)).eval(), tokenizer, max_batch_size=4, batch_wait=0.5)
    events: queue.Queue = queue.Queue()

    def listener(name):
        return lambda event: events.put((name, event))

    def request(prompt):
        return Request(ids=tokenizer(prompt)["input_ids"], max_tokens=3, temperature=0)

    engine.submit(request("The quick"), listener("first"))
    engine.submit(Job(lambda: (threading.current_thread().name, engine.batches)), listener("job"))
    engine.submit(request("The lazy"), listener("joins"))
    engine.submit(Job(lambda: 1 / 0), listener("failing"))
    ends = []
    while len(ends) < 4:
        name, event = events.get(timeout=30)
        if event[0] in ("done", "error"):
            ends.append((name, event))
    assert {name for name, _ in ends[:2]} == {"first", "joins"} and engine.largest_batch == 2
    assert ends[2] == ("job", ("done", ("llama-expert-batching", 1)))  # on the worker, after the batch
    assert ends[3][0] == "failing" and ends[3][1][0] == "error" and "ZeroDivisionError" in ends[3][1][1]
    assert engine.thread.is_alive()
