"""`llama-expert serve`: a real server process on the tiny trained base, spoken to with the official `openai`
client (streaming and not) and with raw HTTP for what a client library would refuse to send; a second one on a
deliberately slow model for clients that leave mid-answer; the CLI itself for what happens before serving."""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch

from transformers import LlamaConfig, LlamaForCausalLM

from llama_expert.cli import main
from llama_expert.inference.generation import generate_ids
from llama_expert.integration.base_models import load_base_model, load_tokenizer

KEY = "test-key-123"
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"


@pytest.fixture(scope="module")
def server(trained_base, tmp_path_factory, serve_process):
    folder, _ = trained_base
    base = tmp_path_factory.mktemp("served") / "base"
    shutil.copytree(folder, base)
    tokenizer = load_tokenizer(str(base))
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(base)
    for url in serve_process(base, "--served-model-name", "tiny", "--batch-wait-ms", "50", key=KEY):
        yield url, base


@pytest.fixture(scope="module")
def slow_server(trained_base, tmp_path_factory, serve_process):
    """A random 16-layer model (~15 ms a token here) with a 4096-token context that never writes its end token:
    a 2000-token answer keeps the server busy for half a minute unless it is stopped."""
    tokenizer = load_tokenizer(str(trained_base[0]))
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=16, num_attention_heads=4,
                         num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=4096,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] = 0  # logit 0 never beats the largest of 256 random logits
    folder = tmp_path_factory.mktemp("slow") / "slow"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    yield from serve_process(folder, "--served-model-name", "slow", "--max-tokens-limit", "2000")


def _client(url, key=KEY):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def _greedy(base, prompt, tokens):
    """What the library itself generates for ``prompt`` (greedy), for comparison."""
    model, tokenizer = load_base_model(str(base)), load_tokenizer(str(base))
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    return tokenizer.decode(generate_ids(model, tokenizer, ids, tokens, temperature=0), skip_special_tokens=True)


def test_models_and_greedy_completion_match_the_library(server):
    url, base = server
    client = _client(url)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    reply = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=12, temperature=0)
    assert reply.choices[0].text == _greedy(base, "The quick brown", 12)
    assert reply.usage.completion_tokens == 12 and reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens == len(load_tokenizer(str(base))("The quick brown")["input_ids"])


def test_streaming_completion_and_chat_send_the_same_text_as_whole_answers(server):
    url, _ = server
    client = _client(url)
    whole = client.completions.create(model="tiny", prompt="The lazy", max_tokens=10, temperature=0)
    pieces = list(client.completions.create(model="tiny", prompt="The lazy", max_tokens=10, temperature=0,
                                            stream=True))
    assert "".join(p.choices[0].text for p in pieces) == whole.choices[0].text
    assert pieces[-1].choices[0].finish_reason == "length"
    messages = [{"role": "user", "content": "The quick"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    stream = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in stream) == chat.choices[0].message.content
    assert stream[-1].choices[0].finish_reason == "length"


def test_stop_strings_end_the_answer_and_are_never_sent(server):
    url, _ = server
    client = _client(url)
    free = client.completions.create(model="tiny", prompt="The quick", max_tokens=30, temperature=0).choices[0].text
    stop = free[8:12]  # a piece of what the model will write
    want = free[:free.index(stop)]
    reply = client.completions.create(model="tiny", prompt="The quick", max_tokens=30, temperature=0, stop=[stop])
    assert reply.choices[0].text == want and reply.choices[0].finish_reason == "stop"
    pieces = list(client.completions.create(model="tiny", prompt="The quick", max_tokens=30, temperature=0,
                                            stop=[stop], stream=True))
    assert "".join(p.choices[0].text for p in pieces) == want  # not even the stop string's first characters


def test_requests_that_cannot_be_served_get_openai_errors(server):
    url, _ = server
    client = _client(url)
    with pytest.raises(openai.AuthenticationError):
        _client(url, key="wrong").models.list()
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="hi", max_tokens=0)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt="word " * 200, max_tokens=4)  # the context is 128 tokens
    assert err.value.body["code"] == "context_length_exceeded"
    raw = httpx.post(f"{url}/v1/completions", content=b"{not json", timeout=10,
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert raw.status_code == 400 and "not valid JSON" in raw.json()["error"]["message"]
    assert _client(url).completions.create(model="tiny", prompt="The", max_tokens=2).choices  # still serving


def test_a_malformed_request_is_refused_while_a_stream_completes(server):
    url, _ = server
    client = _client(url)
    stream = client.completions.create(model="tiny", prompt="The quick", max_tokens=60, temperature=0, stream=True)
    first = next(iter(stream))
    bad = httpx.post(f"{url}/v1/chat/completions", timeout=10, headers={"Authorization": f"Bearer {KEY}"},
                     json={"model": "tiny", "messages": "not a list"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
    rest = list(stream)
    assert rest[-1].choices[0].finish_reason in ("length", "stop")
    assert len(first.choices[0].text + "".join(c.choices[0].text for c in rest)) > 0


def _ask_together(url, prompts, max_tokens):
    """{prompt: greedy completion} of ``prompts`` sent at once, one thread each (so the server may batch them)."""
    answers = {}

    def ask(prompt):
        answers[prompt] = _client(url).completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens,
                                                          temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server):
    url, base = server
    prompts = [f"The {word}" for word in ("quick", "lazy", "brown", "fox", "dog", "jumps")]
    answers = _ask_together(url, prompts, max_tokens=6)
    assert set(answers) == set(prompts)
    health = httpx.get(f"{url}/health").json()
    assert health["largest_batch"] > 1  # some of them were generated together
    for prompt in prompts:  # left padding in a batch does not change a greedy answer
        assert answers[prompt] == _greedy(base, prompt, 6), prompt


# ---------------------------------------------------------------------------------------------- hostile clients
def _raw(url, path, body, key=KEY, **headers):
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json", **headers}
    return httpx.post(f"{url}{path}", content=json.dumps(body) if isinstance(body, dict) else body, timeout=10,
                      headers=headers)


def test_fields_must_have_their_json_types(server):
    url, _ = server
    reply = _raw(url, "/v1/completions", {"model": "tiny", "prompt": "The", "max_tokens": 2, "stream": "false"})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "stream"
    assert "true or false" in reply.json()["error"]["message"]
    reply = _raw(url, "/v1/completions", {"model": "tiny", "prompt": "The", "max_tokens": 2, "stream": True,
                                          "stream_options": {"include_usage": "yes"}})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "stream_options.include_usage"
    reply = _raw(url, "/v1/completions", {"model": "tiny", "prompt": "The", "max_tokens": 2,
                                          "stream_options": {"include_usage": True}})  # without "stream": true
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "stream_options"


def test_stream_options_include_usage_sends_a_last_chunk_with_the_counts(server):
    url, _ = server
    client = _client(url)
    chunks = list(client.completions.create(model="tiny", prompt="The quick", max_tokens=7, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 7
    assert last.usage.total_tokens == last.usage.prompt_tokens + 7 and last.usage.prompt_tokens > 0
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-2].choices[0].finish_reason == "length"
    chat = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "The"}],
                                               max_tokens=5, temperature=0, stream=True,
                                               stream_options={"include_usage": True}))
    assert chat[-1].choices == [] and chat[-1].usage.completion_tokens == 5
    plain = list(client.completions.create(model="tiny", prompt="The", max_tokens=3, stream=True))
    assert all(c.usage is None and c.choices for c in plain)  # without the option: no usage chunk


def test_logprobs_are_refused_rather_than_silently_left_out(server):
    url, _ = server
    client = _client(url)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt="The", max_tokens=2, logprobs=2)
    assert err.value.body["param"] == "logprobs" and "not supported" in err.value.body["message"]
    messages = [{"role": "user", "content": "The"}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, logprobs=True)
    assert err.value.body["param"] == "logprobs"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, top_logprobs=3)
    assert err.value.body["param"] == "top_logprobs"
    assert client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, logprobs=False).choices
    assert _raw(url, "/v1/completions", {"model": "tiny", "prompt": "The", "max_tokens": 2,
                                         "logprobs": None}).status_code == 200


def test_the_bearer_scheme_is_case_insensitive_and_required(server):
    url, _ = server
    models = f"{url}/v1/models"
    assert httpx.get(models, headers={"Authorization": f"bearer {KEY}"}).status_code == 200
    assert httpx.get(models, headers={"Authorization": f"BEARER {KEY}"}).status_code == 200
    assert httpx.get(models, headers={"Authorization": KEY}).status_code == 401  # the bare key
    assert httpx.get(models, headers={"Authorization": f"Basic {KEY}"}).status_code == 401


def test_with_an_api_key_the_api_description_is_not_served(server):
    url, _ = server
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(f"{url}{path}").status_code == 404, path


def _health_latencies(url, stop: threading.Event, into: list):
    while not stop.is_set():
        start = time.monotonic()
        httpx.get(f"{url}/health", timeout=30)
        into.append(time.monotonic() - start)
        time.sleep(0.02)


def test_a_body_over_the_cap_is_refused_at_once_while_health_answers(server):
    url, _ = server
    big = json.dumps({"model": "tiny", "prompt": "word " * ((6 << 20) // 5), "stream": True}).encode()  # 6 MiB
    stop, latencies = threading.Event(), []
    watcher = threading.Thread(target=_health_latencies, args=(url, stop, latencies))
    watcher.start()
    try:
        start = time.monotonic()
        declared = _raw(url, "/v1/completions", big)  # with a Content-Length
        declared_s = time.monotonic() - start
        start = time.monotonic()
        chunked = _raw(url, "/v1/completions", iter([big[i:i + (1 << 20)] for i in range(0, len(big), 1 << 20)]))
        chunked_s = time.monotonic() - start
        time.sleep(0.2)
    finally:
        stop.set()
        watcher.join()
    print(f"413 after {declared_s:.2f} s (Content-Length) and {chunked_s:.2f} s (chunked); /health answered "
          f"{len(latencies)} times meanwhile, slowest {max(latencies):.3f} s")
    for reply in (declared, chunked):
        assert reply.status_code == 413, reply.text[:200]
        assert reply.json()["error"]["code"] == "request_too_large" and "--max-body-bytes" in reply.text
    assert declared_s < 2 and chunked_s < 2 and max(latencies) < 1
    assert _client(url).completions.create(model="tiny", prompt="The", max_tokens=2).choices  # still serving


def _ask_briefly(url):
    """Seconds until a 2-token request is answered (the client gives up after 10 s)."""
    start = time.monotonic()
    reply = httpx.post(f"{url}/v1/completions", json={"model": "slow", "prompt": "Hi", "max_tokens": 2}, timeout=10)
    assert reply.status_code == 200
    return time.monotonic() - start


def test_a_client_that_leaves_a_stream_stops_its_generation(slow_server):
    url = slow_server
    before = httpx.get(f"{url}/health").json()
    stream = _client(url, "none").completions.create(model="slow", prompt="The quick", max_tokens=2000,
                                                     temperature=0, stream=True)
    for _, _chunk in zip(range(3), stream):
        pass
    stream.close()  # the client leaves after 3 chunks of a 2000-token answer (~30 s of work)
    waited = _ask_briefly(url)
    after = httpx.get(f"{url}/health").json()
    made = after["tokens_generated"] - before["tokens_generated"] - 2
    print(f"next request answered in {waited:.2f} s; the gone client's row made {made} of its 2000 tokens")
    assert waited < 5 and after["aborted"] == before["aborted"] + 1 and made < 300


def test_a_client_that_times_out_stops_its_generation(slow_server):
    url = slow_server
    before = httpx.get(f"{url}/health").json()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=1.0)
    with pytest.raises(openai.APITimeoutError):
        client.completions.create(model="slow", prompt="The quick", max_tokens=2000, temperature=0)
    waited = _ask_briefly(url)
    after = httpx.get(f"{url}/health").json()
    made = after["tokens_generated"] - before["tokens_generated"] - 2
    print(f"next request answered in {waited:.2f} s; the gone client's row made {made} of its 2000 tokens")
    assert waited < 5 and after["aborted"] == before["aborted"] + 1 and made < 500


# ---------------------------------------------------------------------------------------------- before serving
def test_a_busy_port_fails_at_once_before_the_model_loads(tmp_path):
    """In a fresh interpreter: the port is tried before Transformers, FastAPI or the model are loaded."""
    script = ("import sys\nfrom llama_expert.cli import main\ncode = main(sys.argv[1:])\n"
              "print([m for m in ('transformers', 'fastapi') if m in sys.modules])\nsys.exit(code)")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        start = time.monotonic()
        done = subprocess.run([sys.executable, "-c", script, "serve", "--model", str(tmp_path / "no-such-model"),
                               "--port", str(port)], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    print(f"a busy port failed after {time.monotonic() - start:.2f} s (a fresh interpreter)")
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1 and len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"port {port}" in errors[0] and "already in use" in errors[0] and "--port" in errors[0]
    assert done.stdout.strip() == "[]"  # neither Transformers nor FastAPI was imported before the port was tried


def test_a_non_loopback_host_without_an_api_key_warns(capsys, monkeypatch, tmp_path, free_port):
    monkeypatch.delenv("LLAMA_EXPERT_API_KEY", raising=False)
    missing = str(tmp_path / "no-such-model")  # the warning comes before the model loads (which then fails)
    for host, key, warned in (("0.0.0.0", None, True), ("127.0.0.1", None, False), ("0.0.0.0", "k", False)):
        if key:
            monkeypatch.setenv("LLAMA_EXPERT_API_KEY", key)
        assert main(["serve", "--model", missing, "--host", host, "--port", str(free_port())]) != 0
        err = capsys.readouterr().err
        assert ("warning: --host 0.0.0.0" in err and "LLAMA_EXPERT_API_KEY" in err) == warned, err


def test_a_peft_lora_folder_is_served_as_peft_computes_it(trained_base, lora_on_trained_base, serve_process):
    """`serve --adapter` with what `train --method lora` and `distill` write: a PEFT LoRA folder."""
    from peft import PeftModel

    folder, lora = trained_base[0], lora_on_trained_base
    for url in serve_process(folder, "--adapter", str(lora), "--served-model-name", "tiny", key=KEY):
        reply = _client(url).completions.create(model="tiny", prompt="The quick", max_tokens=8, temperature=0)
    model = PeftModel.from_pretrained(load_base_model(str(folder)), str(lora)).eval()
    tokenizer = load_tokenizer(str(folder))
    ids = torch.tensor([tokenizer("The quick")["input_ids"]])
    expected = tokenizer.decode(generate_ids(model, tokenizer, ids, 8, temperature=0), skip_special_tokens=True)
    assert reply.choices[0].text == expected != _greedy(folder, "The quick", 8)


def test_a_sequence_routed_adapter_answers_concurrent_requests_as_it_answers_each_alone(trained_base, tmp_path,
                                                                                      serve_process):
    """`serve` on an adapter whose router routes by the sequence (sequence_aux_free): prompts of different lengths,
    batched together (left-padded; each row's running sums on that batch's KV cache), each get the library's own
    single-request greedy answer, and so does the same batch again (nothing is left over from the first)."""
    from llama_expert import load_augmented_model

    from ..conftest import moe_adapter_folder

    base, _, folder = moe_adapter_folder(trained_base, tmp_path / "moe", 0.3, router_type="sequence_aux_free")
    model, _ = load_augmented_model(adapter_path=folder)
    tokenizer = load_tokenizer(str(base))
    prompts = ["The", "The quick brown fox", "lazy dog jumps over", "The quick brown fox jumps over the lazy dog. T"]
    alone = {prompt: tokenizer.decode(generate_ids(model, tokenizer, torch.tensor([tokenizer(prompt)["input_ids"]]), 8,
                                                   temperature=0), skip_special_tokens=True) for prompt in prompts}
    for url in serve_process(folder, "--served-model-name", "tiny", "--batch-wait-ms", "300", key=KEY):
        for _ in range(2):
            assert _ask_together(url, prompts, max_tokens=8) == alone
        assert httpx.get(f"{url}/health").json()["largest_batch"] > 1  # they were generated together
