"""Shared fixtures: a tiny random Llama (seconds) and the embedded SmolLM2-135M (loaded once per session)."""

import os

# The Hub is unreachable from the test machines; offline mode makes every Hub lookup fail at once.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402


@pytest.fixture
def tiny_config():
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)


@pytest.fixture
def tiny_model(tiny_config):
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config).eval()


@pytest.fixture
def tiny_folder(tiny_model, tmp_path):
    """The tiny model written by save_pretrained: a 'local folder' base model."""
    folder = tmp_path / "tiny-base"
    tiny_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm():
    """(model, tokenizer) of the embedded default model, loaded once per session."""
    from llama_expert import load_base_model, load_tokenizer

    return load_base_model("smollm2-135m"), load_tokenizer()


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_tests(request):
    """Tiny tensors run fastest on one thread; with several, a busy CPU makes OpenMP waits 10x slower."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
