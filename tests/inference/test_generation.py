"""generate_text: greedy at temperature 0 and streamed, plain text without a chat template, seeded sampling; prompts
and sampling settings a user can get wrong are clear errors instead of a misleading TypeError. The interactive
session: tests/inference/test_chat.py; the `inference` command itself, through a pseudo-terminal too:
tests/cli/test_inference.py."""

import io
import math

import pytest
import torch

from llama_expert import ConfigError
from llama_expert.inference.generation import check_sampling, encode_prompt, generate_text, make_streamer

from ..conftest import CharTokenizer


class Chunks(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, text):
        self.writes.append(text)
        return super().write(text)


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


@pytest.mark.parametrize("temperature, top_p", [(math.nan, 0.9), (math.inf, 0.9), (-0.1, 0.9), (0.7, math.nan),
                                                (0.7, 0.0), (0.7, 1.5)])
def test_sampling_settings_that_cannot_work(temperature, top_p):
    with pytest.raises(ConfigError, match="--temperature|--top-p"):
        check_sampling(temperature, top_p)


def test_a_prompt_with_bytes_that_are_not_utf8_names_the_encoding():
    prompt = b"caf\xe9".decode("utf-8", errors="surrogateescape")  # how Python hands over such an argv
    with pytest.raises(ConfigError, match="not valid UTF-8 .*character 3"):
        encode_prompt(object(), prompt)
