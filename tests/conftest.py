"""Shared fixtures: a tiny random Llama (seconds), the embedded SmolLM2-135M (loaded once per session), the
shared data folder, a Hub that cannot be reached, and two guards that keep the test run honest:

- a test that loads the embedded SmolLM2-135M must be marked ``@pytest.mark.slow`` (the ``smollm`` fixture or
  any in-process load of the model fails an unmarked test);
- a test that needs ``<repo>/../shared/data`` skips with the missing path in the summary, and fails instead
  when ``CI`` is set (CI has the data, so a skip there would hide a broken test).
"""

import os
from pathlib import Path

# The Hub is unreachable from the test machines; offline mode makes every Hub lookup fail at once.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

# <repo root>/../shared/data: WikiText-2 and the other shared data sets.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
EMBEDDED_MODEL_NAME = "smollm2-135m"


def pytest_configure(config):
    # Show skip reasons in the short summary (`-q` alone prints only a count), so a missing shared data
    # folder is visible: "SKIPPED [1] tests/data/test_sources.py:..: shared data missing: /path".
    chars = config.option.reportchars or ""
    if not any(c in chars for c in "saAN"):
        config.option.reportchars = chars + "s"


def running_on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_shared_data(relative: str = "", who: str = "") -> Path:
    """``SHARED_DATA / relative``; skips naming the path when it is missing, or fails when ``CI`` is set."""
    path = SHARED_DATA / relative if relative else SHARED_DATA
    if not path.exists():
        message = f"{who + ': ' if who else ''}shared data missing: {path}"
        if running_on_ci():
            pytest.fail(f"{message} (CI is set, and CI has the shared data: this must not be skipped)")
        pytest.skip(message)
    return path


@pytest.fixture
def shared_data(request):
    """``shared_data("wikitext-2-raw")`` -> that path under ``<repo>/../shared/data`` (skip or, on CI, fail)."""
    return lambda relative="": require_shared_data(relative, who=request.node.name)


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
    """(model, tokenizer) of the embedded default model, loaded once per session. Tests using it are slow."""
    from llama_expert import load_base_model, load_tokenizer

    return load_base_model(EMBEDDED_MODEL_NAME), load_tokenizer()


@pytest.fixture(scope="session")
def embedded_tokenizer():
    """The embedded model's tokenizer alone (no model weights in memory): tests using only it are not slow."""
    from llama_expert import load_tokenizer

    return load_tokenizer(EMBEDDED_MODEL_NAME)


@pytest.fixture
def chat_folder(tmp_path, embedded_tokenizer):
    """A tiny random Llama with the embedded model's vocabulary and tokenizer (chat template included), saved
    as a local base model: chat and CLI tests in seconds, without loading SmolLM2-135M."""
    tokenizer = embedded_tokenizer
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    folder = tmp_path / "tiny-chat"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _loads_embedded_model(args, kwargs) -> bool:
    """An AutoModelForCausalLM.from_pretrained call that loads the embedded model's weights into memory.

    The one-time GGUF conversion (``gguf_file=``) is left out: ``load_tokenizer()`` runs it on a fresh cache.
    """
    if kwargs.get("gguf_file"):
        return False
    location = str(args[0] if args else kwargs.get("pretrained_model_name_or_path", ""))
    return "smollm2-135m" in location.lower()


@pytest.fixture(autouse=True)
def _slow_marker_is_honest(request, monkeypatch):
    """Fail an unmarked test that loads the embedded SmolLM2-135M in this process (subprocesses are not seen)."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    if "smollm" in request.fixturenames:
        pytest.fail("this test uses the `smollm` fixture (the embedded SmolLM2-135M): mark it @pytest.mark.slow")
    loads = []
    original = AutoModelForCausalLM.from_pretrained

    def guarded(*args, **kwargs):
        if _loads_embedded_model(args, kwargs):
            loads.append(str(args[0] if args else kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", guarded)
    yield
    if loads:
        pytest.fail(f"this test loaded the embedded SmolLM2-135M ({loads[0]}): mark it @pytest.mark.slow")


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


# ---------------------------------------------------------------------------------------------- a tiny trained base
TINY_TEXT = ("The quick brown fox jumps over the lazy dog. " * 8 + "\n") * 60


def byte_tokenizer():
    """A byte-level tokenizer built here (257 tokens, no download): real tokenising for tiny models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<eos>")


@pytest.fixture(scope="session")
def trained_base(tmp_path_factory):
    """(folder of a tiny Llama that knows TINY_TEXT, with its byte tokenizer; a .txt file holding TINY_TEXT).

    Commands run on it in seconds, through the same code paths as on a real base model; it was trained
    briefly (perplexity ~1.5, not ~uniform) so that a bad adapter visibly hurts it.
    """
    root = tmp_path_factory.mktemp("trained-base")
    tokenizer = byte_tokenizer()
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=128)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    ids = torch.tensor(tokenizer(TINY_TEXT)["input_ids"][: 64 * 32]).view(64, 32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        batch = ids[torch.randint(0, 64, (8,))]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    (root / "train.txt").write_text(TINY_TEXT)
    return root / "base", root / "train.txt"


@pytest.fixture
def cli_error(capsys):
    """``cli_error(argv)``: run ``llama-expert argv``, which must fail with exactly one ``error:`` line and no
    traceback; returns that line."""
    from llama_expert.cli import main

    def run(argv):
        capsys.readouterr()
        assert main(argv) != 0
        err = capsys.readouterr().err
        assert "Traceback" not in err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1, err
        return lines[0]

    return run


@pytest.fixture(scope="session")
def lora_on_trained_base(trained_base, tmp_path_factory):
    """A PEFT LoRA folder (rank 4, random B: it visibly changes the model) on the tiny trained base, written as
    `train --method lora` and `distill` write theirs."""
    from llama_expert.integration.base_models import load_base_model
    from llama_expert.integration.peft_lora import add_lora, save_lora

    model = add_lora(load_base_model(str(trained_base[0])), rank=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.3)
    folder = tmp_path_factory.mktemp("lora-on-trained-base") / "lora"
    save_lora(model, folder)
    return folder


@pytest.fixture
def unreachable_hub(monkeypatch):
    """The Hub as a closed local port: one refused connection decides it is unreachable."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens


# ---------------------------------------------------------------------------------------------- shared helpers
class CharTokenizer:
    """One token per character (code point mod 128), no chat template: a tokenizer that fits the tiny Llama."""

    pad_token_id = eos_token_id = 0
    chat_template = None

    def __call__(self, text, return_attention_mask=True, verbose=True, **kwargs):
        return {"input_ids": [ord(c) % 128 for c in text]}

    def decode(self, ids, skip_special_tokens=False, **kwargs):
        return "".join(chr(int(i)) for i in ids)


def moe_adapter_folder(trained_base, folder, scale, **config):
    """(base folder, its text file, a MoE adapter folder on it whose experts change the base by ``scale``);
    ``config``: other ExpertConfig fields (e.g. ``router_type``)."""
    from llama_expert import ExpertConfig, augment_model, load_base_model, save_adapter
    from llama_expert.integration.surgery import adapters

    base_folder, text = trained_base
    model = augment_model(load_base_model(str(base_folder)), ExpertConfig(num_experts=4, top_k=2,
                                                                          expert_allocation="uniform", **config))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, adapter in adapters(model):
            adapter.experts.up.copy_(torch.randn(adapter.experts.up.shape, generator=generator) * scale)
            adapter.router.weight.copy_(torch.randn(adapter.router.weight.shape, generator=generator))
    save_adapter(model, folder, base_model_name_or_path=str(base_folder))
    return base_folder, text, folder


def smollm2_shaped_base(folder, tied=True, vocab_size=512):
    """One decoder layer of SmolLM2-135M's shape with random weights, saved to ``folder``: 4-bit sizes at its width."""
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=1, num_attention_heads=9,
                                 num_key_value_heads=3, vocab_size=vocab_size,
                                 tie_word_embeddings=tied)).save_pretrained(folder)
    return str(folder)


@pytest.fixture
def quanto():
    """optimum-quanto, or a skip: it is part of the [quanto] extra."""
    return pytest.importorskip("optimum.quanto", reason="optimum-quanto is part of the [quanto] extra")
