"""The interactive chat: read a prompt, stream the reply, keep the conversation within the context.

``interactive_session`` keeps the conversation (trimmed, oldest turns first, to fit the context) when the
tokenizer has a chat template, and leaves cleanly on ``exit``/``quit``, Ctrl-D, or Ctrl-C at the prompt;
Ctrl-C while a reply streams stops that reply only.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, TextIO, Tuple

import torch

from ..errors import ConfigError
from ..integration.base_models import context_length
from ..integration.loading import ModelArguments, load_model_and_tokenizer
from ..options import option
from ..integration.kv_cache_choice import KV_CACHE_CHOICES
from .generation import (check_sampling, encode_prompt, generate_ids, generate_text,
                         has_chat_template, make_streamer)

PROMPT_MARKER = ">>> "
EXIT_COMMANDS = ("exit", "quit")
RESET_COMMAND = "/reset"


def trim_history(tokenizer, messages: List[Dict[str, str]], budget: int) -> Tuple[List[Dict[str, str]], torch.Tensor]:
    """Drop the oldest turns (a leading system message stays) until the rendered chat fits ``budget``.

    Returns the kept messages and their input ids. When even the latest user message alone does not
    fit, the ids returned are still too long and ``check_prompt_fits`` reports it.
    """
    messages = list(messages)
    while True:
        ids = encode_prompt(tokenizer, messages)
        first = 1 if messages and messages[0]["role"] == "system" else 0
        if ids.shape[1] <= budget or len(messages) - first <= 1:
            return messages, ids
        del messages[first]  # oldest turn: a user message, then its reply on the next pass
        while len(messages) - first > 1 and messages[first]["role"] != "user":
            del messages[first]


def interactive_session(model, tokenizer, max_new_tokens: int = 128, temperature: float = 0.7, top_p: float = 0.9,
                        use_chat_template: bool = True, input_fn: Callable[[str], str] = input,
                        output: Optional[TextIO] = None, system_prompt: Optional[str] = None,
                        kv_cache: str = "none", compiled_decode: bool = True) -> int:
    """Read prompts with ``input_fn`` and stream each reply to ``output``; returns 0 when the user leaves.

    With a chat template the conversation is kept and trimmed (oldest turns first) to fit the context
    minus ``max_new_tokens``; without one every line is a fresh prompt continued as plain text.
    Leaves on ``exit``/``quit``, Ctrl-D (EOFError) or Ctrl-C at the prompt; Ctrl-C during a reply
    stops the reply. ``/reset`` forgets the conversation. ``output`` defaults to the current ``sys.stdout``.
    """
    output = sys.stdout if output is None else output
    chat = use_chat_template and has_chat_template(tokenizer)
    limit = context_length(model.config)
    budget = (limit - max_new_tokens) if limit is not None else sys.maxsize
    base_history = [{"role": "system", "content": system_prompt}] if (chat and system_prompt) else []
    history: List[Dict[str, str]] = list(base_history)
    mode = "chat (the conversation is kept; /reset forgets it)" if chat else "plain text continuation (no history)"
    output.write(f"llama-expert interactive mode: {mode}. Type 'exit' or 'quit', or press Ctrl-D, to leave; "
                 f"Ctrl-C stops a reply.\n")
    output.flush()
    while True:
        try:
            line = input_fn(PROMPT_MARKER)
        except (EOFError, KeyboardInterrupt):
            output.write("\n")
            output.flush()
            return 0
        except UnicodeDecodeError:
            output.write("error: that line is not valid UTF-8; check the terminal's encoding.\n")
            output.flush()
            continue
        text = line.strip()
        if not text:
            continue
        if text.lower() in EXIT_COMMANDS:
            return 0
        if text == RESET_COMMAND:
            history = list(base_history)
            output.write("(conversation cleared)\n")
            output.flush()
            continue
        try:
            if chat:
                kept, input_ids = trim_history(tokenizer, history + [{"role": "user", "content": text}], budget)
            else:
                kept, input_ids = [], encode_prompt(tokenizer, text, use_chat_template=False)
            new_ids = generate_ids(model, tokenizer, input_ids, max_new_tokens, temperature, top_p, kv_cache=kv_cache,
                                   streamer=make_streamer(tokenizer, output), compiled_decode=compiled_decode)
        except ConfigError as exc:
            output.write(f"error: {exc}\n")
            output.flush()
            continue
        except KeyboardInterrupt:
            output.write("\n[reply stopped]\n")
            output.flush()
            continue  # the interrupted turn is not kept in the history
        output.write("\n")
        output.flush()
        if chat:
            history = kept + [{"role": "assistant", "content": tokenizer.decode(new_ids, skip_special_tokens=True)}]


@dataclass
class GenerationArguments:
    prompt: Optional[str] = option(None, "generate once for this prompt; without it: interactive mode")
    max_new_tokens: int = option(128, "tokens to generate per reply")
    temperature: float = option(0.7, "0 means greedy decoding")
    top_p: float = option(0.9, "nucleus sampling threshold")
    chat_template: bool = option(True, "continue the prompt as plain text instead of using the tokenizer's chat "
                                       "template", flag="--no-chat-template")
    system_prompt: Optional[str] = option(None, "system message for the chat (interactive mode)")
    seed: Optional[int] = option(None, "random seed for sampling")
    kv_cache: str = option("none", "key/value cache: none (full precision), int8 or int4 (KIVI-style "
                                   "KVCacheCompressor)", choices=KV_CACHE_CHOICES)
    compiled_decode: bool = option(True, "on CUDA, decode with a dynamic KV cache and no compilation instead of "
                                         "a static cache replayed as CUDA graphs (a CPU never compiles)")


def run_inference(model_args: ModelArguments, args: GenerationArguments) -> int:
    """The ``inference`` command: load the model, then answer ``args.prompt`` once or chat interactively."""
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}.")
    check_sampling(args.temperature, args.top_p)
    if args.seed is not None:
        from transformers import set_seed

        set_seed(args.seed)
    model, tokenizer, info = load_model_and_tokenizer(**asdict(model_args), augmented=False)
    what = f"adapter {info['adapter']} on {info['base_model']}" if info["adapter"] else \
        f"base model {info['base_model']} (no adapter given)"
    print(f"loaded {what}", file=sys.stderr)
    if args.prompt is not None:
        generate_text(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_p,
                      use_chat_template=args.chat_template, streamer=make_streamer(tokenizer), kv_cache=args.kv_cache,
                      compiled_decode=args.compiled_decode)
        sys.stdout.write("\n")
        sys.stdout.flush()
        return 0
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    return interactive_session(model, tokenizer, args.max_new_tokens, args.temperature, args.top_p,
                               use_chat_template=args.chat_template, system_prompt=args.system_prompt,
                               kv_cache=args.kv_cache, compiled_decode=args.compiled_decode)
