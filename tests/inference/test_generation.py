"""generate_text, the interactive session (in-process and through a pseudo-terminal), model resolution for
the CLI, and the `inference` command."""

import io
import os
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llama_expert import ConfigError, ExpertConfig, augment_model, load_tokenizer, save_adapter
from llama_expert.inference.chat import PROMPT_MARKER, interactive_session, trim_history
from llama_expert.inference.generation import encode_prompt, generate_text, make_streamer
from llama_expert.integration.loading import load_model_and_tokenizer as load_model_for_cli


class CharTokenizer:
    """One token per character (code point mod 128), no chat template: fits the tiny Llama."""

    pad_token_id = eos_token_id = 0
    chat_template = None

    def __call__(self, text, return_attention_mask=True, **kwargs):
        return {"input_ids": [ord(c) % 128 for c in text]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(int(i)) for i in ids)


class Lines:
    """An ``input_fn`` that replays lines, then raises ``end`` (EOFError by default)."""

    def __init__(self, *lines, end=EOFError):
        self.lines, self.end, self.prompts = list(lines), end, []

    def __call__(self, prompt):
        self.prompts.append(prompt)
        if not self.lines:
            raise self.end()
        return self.lines.pop(0)


class Chunks(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, text):
        self.writes.append(text)
        return super().write(text)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture
def chat_folder(tmp_path, tokenizer):
    """A tiny random Llama with the embedded model's vocabulary and tokenizer, saved as a local base."""
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    folder = tmp_path / "tiny-chat"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------- generate_text
def test_temperature_zero_is_greedy_and_streams(smollm):
    model, tok = smollm
    out = Chunks()
    text = generate_text(model, tok, "Name a colour.", max_new_tokens=8, temperature=0,
                         streamer=make_streamer(tok, out))
    ids = encode_prompt(tok, "Name a colour.")
    assert tok.decode(ids[0]).startswith("<|im_start|>system")  # the chat template was used
    greedy = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8)
    assert text == tok.decode(greedy[0, ids.shape[1]:], skip_special_tokens=True)
    assert text and out.getvalue().strip() == text.strip()
    assert len([w for w in out.writes if w]) > 1  # the text arrived in pieces, not at the end


def test_no_chat_template_and_sampling_seed(tiny_model):
    tok = CharTokenizer()
    ids = encode_prompt(tok, "abc", use_chat_template=True)  # no template: plain text
    assert ids.tolist() == [[97, 98, 99]]
    greedy = tiny_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=5, pad_token_id=0, eos_token_id=None)
    assert generate_text(tiny_model, tok, "abc", max_new_tokens=5, temperature=0) == tok.decode(greedy[0, 3:])
    torch.manual_seed(1)
    first = generate_text(tiny_model, tok, "abc", max_new_tokens=5, temperature=0.9, top_p=0.95)
    torch.manual_seed(1)
    assert generate_text(tiny_model, tok, "abc", max_new_tokens=5, temperature=0.9, top_p=0.95) == first
    with pytest.raises(ConfigError, match="temperature must be >= 0"):
        generate_text(tiny_model, tok, "abc", temperature=-1)


def test_too_long_prompt_is_a_clear_error(tiny_model):
    with pytest.raises(ConfigError) as info:
        generate_text(tiny_model, CharTokenizer(), "x" * 250, max_new_tokens=10)
    message = str(info.value)
    for words in ("250 tokens", "--max-new-tokens is 10", "holds 256 tokens", "at most 246", "Shorten the prompt"):
        assert words in message


# ---------------------------------------------------------------------------------------------- interactive
def test_trim_history_keeps_system_and_latest_turn(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(6):
        messages += [{"role": "user", "content": f"question {i} " * 10},
                     {"role": "assistant", "content": f"answer {i} " * 10}]
    messages.append({"role": "user", "content": "last question"})
    full = encode_prompt(tokenizer, messages).shape[1]
    kept, ids = trim_history(tokenizer, messages, budget=full - 1)
    assert kept[0] == messages[0] and kept[-1] == messages[-1]
    assert kept[1]["role"] == "user" and len(kept) == len(messages) - 2  # the oldest exchange went
    assert ids.shape[1] <= full - 1
    kept, ids = trim_history(tokenizer, messages, budget=10)  # nothing fits: system + latest remain
    assert kept == [messages[0], messages[-1]]


def test_interactive_session_keeps_history_and_quits(smollm):
    model, tok = smollm
    out = io.StringIO()
    lines = Lines("Say hi.", "", "Again.", "quit", "never read")
    assert interactive_session(model, tok, max_new_tokens=3, temperature=0, input_fn=lines, output=out) == 0
    assert lines.lines == ["never read"] and set(lines.prompts) == {PROMPT_MARKER}
    assert "interactive mode: chat" in out.getvalue()


@pytest.mark.parametrize("end", [EOFError, KeyboardInterrupt])
def test_interactive_session_leaves_on_ctrl_d_and_ctrl_c(tiny_model, end):
    out = io.StringIO()
    lines = Lines("ab", end=end)
    assert interactive_session(tiny_model, CharTokenizer(), max_new_tokens=2, temperature=0, input_fn=lines,
                               output=out) == 0
    assert "plain text continuation" in out.getvalue()


def test_ctrl_c_during_a_reply_stops_only_the_reply(tiny_model, monkeypatch):
    import llama_expert.inference.chat as generate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "generate_ids", interrupted)
    out = io.StringIO()
    assert interactive_session(tiny_model, CharTokenizer(), input_fn=Lines("ab", "exit"), output=out) == 0
    assert "[reply stopped]" in out.getvalue()


def test_too_long_message_in_session_is_reported_and_session_goes_on(tiny_model):
    out = io.StringIO()
    lines = Lines("y" * 300, "exit")
    assert interactive_session(tiny_model, CharTokenizer(), max_new_tokens=8, input_fn=lines, output=out) == 0
    assert "error: the prompt has 300 tokens" in out.getvalue() and not lines.lines


# ---------------------------------------------------------------------------------------------- model resolution
def test_load_model_for_cli_resolves_bases_and_adapters(chat_folder, tmp_path):
    model, tok, info = load_model_for_cli(str(chat_folder), augmented=False)
    assert info == {"base_model": str(chat_folder), "adapter": None, "augmented": False, "fresh_adapter": False}
    assert not hasattr(model, "expert_config") and len(tok) == model.config.vocab_size

    model, _, info = load_model_for_cli(str(chat_folder))
    assert info["fresh_adapter"] and model.expert_config == ExpertConfig()

    trained = augment_model(LlamaForCausalLM.from_pretrained(chat_folder),
                            ExpertConfig(num_experts=4, top_k=2, expert_allocation="uniform"))
    with torch.no_grad():
        trained.model.layers[1].mlp.experts.up.fill_(0.5)
    adapter = save_adapter(trained, tmp_path / "adapter", base_model_name_or_path=str(chat_folder))
    for args in [(str(adapter),), (str(chat_folder), str(adapter)), (None, str(adapter))]:
        model, _, info = load_model_for_cli(*args)
        assert info["adapter"] == str(adapter) and info["base_model"] == str(chat_folder)
        assert not info["fresh_adapter"] and model.expert_config.num_experts == 4
        assert torch.all(model.model.layers[1].mlp.experts.up == 0.5)
    with pytest.raises(ConfigError, match="is an adapter folder"):
        load_model_for_cli(str(adapter), adapter=str(adapter))


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_one_prompt(chat_folder, capsys):
    from llama_expert.cli import main

    rc = main(["inference", "--model-path", str(chat_folder), "--prompt", "Hello", "--max-new-tokens", "4",
               "--temperature", "0", "--seed", "0"])
    captured = capsys.readouterr()
    assert rc == 0
    assert "base model" in captured.err and "no adapter given" in captured.err
    assert captured.out.endswith("\n")


def test_cli_missing_adapter_is_a_clear_error(tmp_path, capsys):
    from llama_expert.cli import main

    rc = main(["inference", "--adapter", str(tmp_path / "missing"), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("error: adapter folder not found") and "Traceback" not in err


def _spawn_interactive():
    pexpect = pytest.importorskip("pexpect")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TERM="dumb")
    child = pexpect.spawn(sys.executable, ["-m", "llama_expert.cli", "inference", "--model-path", "smollm2-135m",
                                           "--max-new-tokens", "8", "--temperature", "0"],
                          env=env, encoding="utf-8", timeout=90)
    child.expect_exact(PROMPT_MARKER)
    return pexpect, child


def test_interactive_terminal_streams_and_exits_on_ctrl_d():
    pexpect, child = _spawn_interactive()
    try:
        child.sendline("What is the capital of France?")
        child.expect_exact(PROMPT_MARKER)
        reply = child.before.replace("\r", "").split("What is the capital of France?", 1)[-1].strip()
        assert reply, child.before
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0 and child.signalstatus is None
    assert "Traceback" not in (child.before or "")


def test_interactive_terminal_exits_on_ctrl_c():
    pexpect, child = _spawn_interactive()
    try:
        child.sendintr()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0 and child.signalstatus is None
    assert "Traceback" not in (child.before or "")
