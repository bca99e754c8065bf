"""Prompts and sampling settings a user can get wrong: clear errors instead of a misleading TypeError."""

import io
import math

import pytest

from llama_expert import ConfigError
from llama_expert.inference.chat import interactive_session
from llama_expert.inference.generation import check_sampling, encode_prompt


@pytest.mark.parametrize("temperature, top_p", [(math.nan, 0.9), (math.inf, 0.9), (-0.1, 0.9), (0.7, math.nan),
                                                (0.7, 0.0), (0.7, 1.5)])
def test_sampling_settings_that_cannot_work(temperature, top_p):
    with pytest.raises(ConfigError, match="--temperature|--top-p"):
        check_sampling(temperature, top_p)


def test_a_prompt_with_bytes_that_are_not_utf8_names_the_encoding():
    prompt = b"caf\xe9".decode("utf-8", errors="surrogateescape")  # how Python hands over such an argv
    with pytest.raises(ConfigError, match="not valid UTF-8 .*character 3"):
        encode_prompt(object(), prompt)


def test_the_interactive_session_survives_a_line_that_is_not_utf8():
    lines = iter([b"caf\xe9".decode("utf-8", errors="surrogateescape"), "exit"])
    out = io.StringIO()

    class Tokenizer:
        chat_template = None

    code = interactive_session(model=type("M", (), {"config": None})(), tokenizer=Tokenizer(),
                               input_fn=lambda prompt: next(lines), output=out)
    assert code == 0
    assert "error: the prompt is not valid UTF-8" in out.getvalue()
