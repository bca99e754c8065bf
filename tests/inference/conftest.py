"""What the inference tests share: a real `llama-expert serve` process, started as a user starts it."""

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_process(folder, *flags, key=None):
    """A `llama-expert serve` process on ``folder`` (an API key only if ``key``): yields its URL once it answers."""
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "LLAMA_EXPERT_API_KEY": key or ""}
    process = subprocess.Popen([sys.executable, "-m", "llama_expert.cli", "serve", "--model", str(folder), "--port",
                                str(port), *flags], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            pytest.fail(f"the server did not start:\n{process.stdout.read()}")
        time.sleep(0.2)
    yield url
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="session")
def free_port():
    """A function: a TCP port free on 127.0.0.1 now."""
    return _free_port


@pytest.fixture(scope="session")
def serve_process():
    """A function: ``yield from serve_process(folder, *flags, key=None)`` runs `llama-expert serve --model folder
    FLAGS` in its own process and yields its URL once it answers (stopped when the generator ends)."""
    return _serve_process
