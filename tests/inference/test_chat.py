"""The interactive session, in process: what each turn's prompt holds (history, /reset, trimmed to the context),
how it leaves (quit, Ctrl-D, Ctrl-C), and the lines it survives (too long, not UTF-8)."""

import io

import pytest
import torch
from transformers import LlamaForCausalLM

from llama_expert.inference.chat import PROMPT_MARKER, interactive_session, trim_history
from llama_expert.inference.generation import encode_prompt

from ..conftest import CharTokenizer


class Lines:
    """An ``input_fn`` that replays lines, then raises ``end`` (EOFError by default)."""

    def __init__(self, *lines, end=EOFError):
        self.lines, self.end, self.prompts = list(lines), end, []

    def __call__(self, prompt):
        self.prompts.append(prompt)
        if not self.lines:
            raise self.end()
        return self.lines.pop(0)


@pytest.fixture
def tokenizer(embedded_tokenizer):
    return embedded_tokenizer


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


def test_the_interactive_session_survives_a_line_that_is_not_utf8():
    lines = iter([b"caf\xe9".decode("utf-8", errors="surrogateescape"), "exit"])
    out = io.StringIO()

    class Tokenizer:
        chat_template = None

    code = interactive_session(model=type("M", (), {"config": None})(), tokenizer=Tokenizer(),
                               input_fn=lambda prompt: next(lines), output=out)
    assert code == 0
    assert "error: the prompt is not valid UTF-8" in out.getvalue()
