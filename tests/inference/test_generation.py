"""generate_text, the interactive session (in process: what each turn's prompt holds), and model resolution
for the CLI. The `inference` command itself, through a pseudo-terminal too: tests/cli/test_inference.py."""

import io

import pytest
import torch
from transformers import LlamaForCausalLM

from llama_expert import ConfigError, ExpertConfig, augment_model, save_adapter
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


@pytest.fixture
def tokenizer(embedded_tokenizer):
    return embedded_tokenizer


# ---------------------------------------------------------------------------------------------- generate_text
@pytest.mark.slow
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
    with pytest.raises(ConfigError, match="temperature must be .*>= 0"):
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


@pytest.fixture
def recorded_turns(monkeypatch):
    """Every (input ids, new ids) pair the interactive session generates, in order."""
    import llama_expert.inference.chat as chat

    real, turns = chat.generate_ids, []

    def recording(model, tokenizer, input_ids, *args, **kwargs):
        new_ids = real(model, tokenizer, input_ids, *args, **kwargs)
        turns.append((input_ids.clone(), new_ids.clone()))
        return new_ids

    monkeypatch.setattr(chat, "generate_ids", recording)
    return turns


def test_interactive_session_keeps_history_resets_and_quits(chat_folder, tokenizer, recorded_turns):
    model = LlamaForCausalLM.from_pretrained(chat_folder).eval()
    out = io.StringIO()
    lines = Lines("Say hi.", "", "Again.", "/reset", "Third.", "quit", "never read")
    torch.manual_seed(0)  # sampled: the tiny random model's greedy reply is only newlines
    assert interactive_session(model, tokenizer, max_new_tokens=4, temperature=1.0, top_p=1.0, input_fn=lines,
                               output=out) == 0
    assert lines.lines == ["never read"] and set(lines.prompts) == {PROMPT_MARKER}
    assert "interactive mode: chat" in out.getvalue() and "(conversation cleared)" in out.getvalue()
    assert len(recorded_turns) == 3  # the empty line generated nothing

    (first_ids, first_new), (second_ids, _), (third_ids, _) = recorded_turns
    reply = tokenizer.decode(first_new, skip_special_tokens=True)
    assert reply.strip(), "the tiny model's first reply is empty: the history check would prove little"
    assert reply in out.getvalue()  # the reply was streamed to the output
    assert torch.equal(first_ids, encode_prompt(tokenizer, "Say hi."))
    # The second prompt is the whole conversation: the first turn, its reply, then the new message.
    conversation = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": reply},
                    {"role": "user", "content": "Again."}]
    assert torch.equal(second_ids, encode_prompt(tokenizer, conversation))
    text = tokenizer.decode(second_ids[0])
    assert text.index("Say hi.") < text.index(reply) < text.index("Again.")
    assert second_ids.shape[1] > first_ids.shape[1] + first_new.numel()
    # After /reset the conversation starts over.
    assert torch.equal(third_ids, encode_prompt(tokenizer, "Third."))
    assert "Say hi." not in tokenizer.decode(third_ids[0])


def test_history_is_trimmed_to_fit_the_context(chat_folder, tokenizer, recorded_turns):
    """With a context that holds about one exchange, the oldest turns go first and the newest stays."""
    model = LlamaForCausalLM.from_pretrained(chat_folder).eval()
    single = encode_prompt(tokenizer, "message 0 " * 8).shape[1]
    model.config.max_position_embeddings = single + 8 + 12  # room for one message, its reply, a little more
    lines = Lines(*[f"message {i} " * 8 for i in range(3)], "exit")
    assert interactive_session(model, tokenizer, max_new_tokens=8, temperature=0, input_fn=lines,
                               output=io.StringIO()) == 0
    assert len(recorded_turns) == 3
    for i, (input_ids, _) in enumerate(recorded_turns):
        text = tokenizer.decode(input_ids[0])
        assert input_ids.shape[1] <= model.config.max_position_embeddings - 8
        assert f"message {i} " in text  # the newest message is always there
        assert "message 0 " not in text or i == 0  # the oldest went


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
