"""`llama-expert serve`: a real server process on the tiny trained base, spoken to with the official `openai`
client (streaming and not) and with raw HTTP for what a client library would refuse to send."""

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

from llama_expert.inference.generation import generate_ids
from llama_expert.integration.base_models import load_base_model, load_tokenizer

KEY = "test-key-123"
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(*model_args):
    """(process, url) of a `serve` process for ``model_args`` that answers /health."""
    port = _free_port()
    env = {**os.environ, "LLAMA_EXPERT_API_KEY": KEY, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "llama_expert.cli", "serve", *model_args, "--port",
                                str(port), "--served-model-name", "tiny", "--batch-wait-ms", "50"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            pytest.fail(f"the server did not start:\n{process.stdout.read()}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def server(trained_base, tmp_path_factory):
    folder, _ = trained_base
    base = tmp_path_factory.mktemp("served") / "base"
    shutil.copytree(folder, base)
    tokenizer = load_tokenizer(str(base))
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(base)
    process, url = _launch("--model", str(base))
    yield url, base
    process.terminate()
    process.wait(timeout=30)


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


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server):
    url, base = server
    prompts = [f"The {word}" for word in ("quick", "lazy", "brown", "fox", "dog", "jumps")]
    answers = {}

    def ask(prompt):
        answers[prompt] = _client(url).completions.create(model="tiny", prompt=prompt, max_tokens=6,
                                                          temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(answers) == set(prompts)
    health = httpx.get(f"{url}/health").json()
    assert health["largest_batch"] > 1  # some of them were generated together
    for prompt in prompts:  # left padding in a batch does not change a greedy answer
        assert answers[prompt] == _greedy(base, prompt, 6), prompt


def test_a_peft_lora_folder_is_served_as_peft_computes_it(trained_base, lora_on_trained_base):
    """`serve --adapter` with what `train --method lora` and `distill` write: a PEFT LoRA folder."""
    from peft import PeftModel

    folder, lora = trained_base[0], lora_on_trained_base
    process, url = _launch("--adapter", str(lora))
    try:
        reply = _client(url).completions.create(model="tiny", prompt="The quick", max_tokens=8, temperature=0)
    finally:
        process.terminate()
        process.wait(timeout=30)
    model = PeftModel.from_pretrained(load_base_model(str(folder)), str(lora)).eval()
    tokenizer = load_tokenizer(str(folder))
    ids = torch.tensor([tokenizer("The quick")["input_ids"]])
    expected = tokenizer.decode(generate_ids(model, tokenizer, ids, 8, temperature=0), skip_special_tokens=True)
    assert reply.choices[0].text == expected != _greedy(folder, "The quick", 8)
