"""Without a network, loading from the Hub fails in seconds with the local forms that work (not a minute of
retries). The Hub here is a closed local port: one refused connection decides it."""

import time

import pytest

from llama_expert import ModelLoadError, load_base_model, load_tokenizer
from llama_expert.data import load_text_dataset
from llama_expert.errors import DataError
from llama_expert.network import hub_offline_reason


@pytest.fixture
def unreachable_hub(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens


def test_the_probe_reports_why(unreachable_hub):
    reason = hub_offline_reason()
    assert reason.startswith("cannot connect to 127.0.0.1:9")


def test_offline_mode_is_honoured_without_a_probe(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_offline_reason() == "HF_HUB_OFFLINE is set"


@pytest.mark.parametrize("load", [lambda: load_base_model("some-org/some-model"),
                                  lambda: load_tokenizer("meta-llama/Llama-3.2-1B")])
def test_a_model_not_in_the_cache_fails_fast_naming_local_forms(unreachable_hub, load):
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load()
    assert time.perf_counter() - started < 15
    message = str(info.value)
    assert "is not in the local Hugging Face cache" in message and "cannot connect to 127.0.0.1:9" in message
    assert "a local folder written by save_pretrained, a .gguf file, or 'smollm2-135m'" in message


def test_a_dataset_not_in_the_cache_fails_fast_naming_local_forms(unreachable_hub):
    started = time.perf_counter()
    with pytest.raises(DataError) as info:
        load_text_dataset("some-org/some-data")
    assert time.perf_counter() - started < 15
    assert "the Hub cannot be used (cannot connect to 127.0.0.1:9" in str(info.value)
    assert "--dataset embedded" in str(info.value)
