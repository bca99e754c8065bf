"""Text generation: a reply to one prompt, streamed as it comes (``inference.chat`` keeps a conversation).

``generate_text`` wraps ``model.generate`` with the three things a user should not have to think about:
the tokenizer's chat template, a clear error when the prompt cannot fit the context, and greedy decoding
when ``temperature == 0``.
"""

from __future__ import annotations

import copy
import math
import sys
from typing import Optional, TextIO

import torch

from ..errors import ConfigError
from ..integration.base_models import context_length
from ..integration.kv_cache_choice import generation_cache_kwargs


# ---------------------------------------------------------------------------------------------- prompts
def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def check_text(text: str, what: str = "the prompt") -> None:
    """Command-line text with bytes that are not UTF-8 arrives with surrogates: say so instead of failing later."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(f"{what} is not valid UTF-8 (character {exc.start} came from a byte that is not UTF-8); "
                          f"check the terminal's or file's encoding.") from None


def encode_prompt(tokenizer, prompt, use_chat_template: bool = True) -> torch.Tensor:
    """``[1, n]`` input ids. ``prompt``: a string, or a list of chat messages (needs a chat template)."""
    for text in ([m.get("content", "") for m in prompt] if isinstance(prompt, list) else [prompt]):
        check_text(text)
    if isinstance(prompt, list):
        if not has_chat_template(tokenizer):
            raise ConfigError("a conversation needs a tokenizer with a chat template; this one has none.")
        messages = prompt
    elif use_chat_template and has_chat_template(tokenizer):
        messages = [{"role": "user", "content": prompt}]
    else:
        ids = tokenizer(prompt, return_attention_mask=False)["input_ids"]
        return torch.tensor([ids], dtype=torch.long)
    # Render to text first: the template already holds the special tokens, so add none when tokenising.
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor([ids], dtype=torch.long)


def check_prompt_fits(model, prompt_len: int, max_new_tokens: int) -> None:
    limit = context_length(model.config)
    if limit is not None and prompt_len + max_new_tokens > limit:
        raise ConfigError(f"the prompt has {prompt_len} tokens and --max-new-tokens is {max_new_tokens}, but the "
                          f"model's context holds {limit} tokens (max_position_embeddings), so the prompt may "
                          f"have at most {max(limit - max_new_tokens, 0)} tokens. Shorten the prompt or lower "
                          f"--max-new-tokens.")


def check_sampling(temperature: float, top_p: float) -> None:
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"--temperature must be a finite number >= 0 (0 means greedy), got {temperature}.")
    if not 0 < top_p <= 1:  # also False for NaN
        raise ConfigError(f"--top-p must be in (0, 1], got {top_p}.")


def generation_config(model, tokenizer, max_new_tokens: int, temperature: float, top_p: float):
    """The model's GenerationConfig with these settings (``temperature == 0``: greedy) and pad/eos filled in."""
    check_sampling(temperature, top_p)
    config = copy.deepcopy(model.generation_config)
    config.max_new_tokens = max_new_tokens
    config.max_length = None
    if temperature == 0:
        config.do_sample, config.temperature, config.top_p, config.top_k = False, None, None, None
    else:
        config.do_sample, config.temperature, config.top_p, config.top_k = True, float(temperature), float(top_p), None
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if config.eos_token_id is None and tokenizer.eos_token_id is not None:
        config.eos_token_id = tokenizer.eos_token_id
    return config


# ---------------------------------------------------------------------------------------------- generation
@torch.no_grad()
def generate_ids(model, tokenizer, input_ids: torch.Tensor, max_new_tokens: int = 128, temperature: float = 0.7,
                 top_p: float = 0.9, streamer=None, kv_cache: str = "none",
                 compiled_decode: bool = True) -> torch.Tensor:
    """The new token ids (1-D) after ``input_ids`` ``[1, n]``; checks that everything fits the context.
    ``kv_cache``: none, int8 or int4 (``integration.kv_cache.KVCacheCompressor``); ``compiled_decode``: on CUDA, a
    static cache and the decode step in CUDA graphs (``integration.kv_cache_choice``; a CPU ignores it)."""
    check_prompt_fits(model, input_ids.shape[1], max_new_tokens)
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                             generation_config=generation_config(model, tokenizer, max_new_tokens, temperature,
                                                                  top_p),
                             **generation_cache_kwargs(model, kv_cache, compiled_decode))
    finally:
        model.train(was_training)
    return out[0, input_ids.shape[1]:].cpu()


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 128, temperature: float = 0.7,
                  top_p: float = 0.9, use_chat_template: bool = True, streamer=None, kv_cache: str = "none",
                  compiled_decode: bool = True) -> str:
    """Generate a reply to ``prompt`` and return only the new text (special tokens dropped).

    The prompt goes through the tokenizer's chat template (as a single user turn) when it has one and
    ``use_chat_template`` is true; otherwise it is continued as plain text. ``temperature=0`` is greedy
    decoding (equal to ``model.generate(do_sample=False)``); otherwise nucleus sampling with ``top_p``.
    A prompt longer than the context minus ``max_new_tokens`` raises ConfigError naming both lengths.
    ``streamer`` (e.g. ``transformers.TextStreamer``) receives the tokens as they come.
    """
    input_ids = encode_prompt(tokenizer, prompt, use_chat_template)
    new_ids = generate_ids(model, tokenizer, input_ids, max_new_tokens, temperature, top_p, streamer, kv_cache,
                           compiled_decode)
    return tokenizer.decode(new_ids, skip_special_tokens=True)


def make_streamer(tokenizer, output: Optional[TextIO] = None):
    """A TextStreamer that writes the reply (not the prompt) to ``output`` (default: the current
    ``sys.stdout``) as soon as text is decodable."""
    from transformers import TextStreamer

    output = sys.stdout if output is None else output

    class _Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            output.write(text)
            output.flush()

    return _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
