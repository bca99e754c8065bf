"""Text generation: one prompt, or an interactive chat that streams tokens as they come.

``generate_text`` wraps ``model.generate`` with the three things a user should not have to think about:
the tokenizer's chat template, a clear error when the prompt cannot fit the context, and greedy decoding
when ``temperature == 0``. ``interactive_session`` keeps the conversation (trimmed, oldest turns first,
to fit the context) and leaves cleanly on ``exit``/``quit``, Ctrl-D, or Ctrl-C at the prompt; Ctrl-C
while a reply streams stops that reply only.

``load_model_for_cli`` resolves ``--model-path``/``--adapter`` for this command and for ``benchmark``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, TextIO, Tuple

import torch

from .errors import ConfigError

PROMPT_MARKER = ">>> "
EXIT_COMMANDS = ("exit", "quit")
RESET_COMMAND = "/reset"


# ---------------------------------------------------------------------------------------------- loading
def is_adapter_folder(path: Optional[str]) -> bool:
    """True when ``path`` is a folder holding an ``adapter_config.json``."""
    from .adapter_files import CONFIG_NAME

    return path is not None and (Path(path).expanduser() / CONFIG_NAME).is_file()


def default_device(device: Optional[str] = None) -> Optional[str]:
    """``device`` if given, else ``"cuda"`` when a GPU is there, else None (the CPU, where models load)."""
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else None


def load_model_for_cli(model_path: Optional[str] = None, adapter: Optional[str] = None, augmented: bool = True,
                       auth_token: Optional[str] = None, device: Optional[str] = None, dtype=None):
    """Resolve the ``--model-path``/``--adapter`` pair of the CLI; return ``(model, tokenizer, info)``.

    ``model_path`` is a base model (Hub id, folder, ``.gguf``, ``"smollm2-135m"``; None means the default,
    or the base an adapter records) or an adapter folder (one holding ``adapter_config.json``).
    ``adapter`` is an adapter folder for the base ``model_path``; an adapter is always loaded.
    Without one the base is augmented with fresh default adapters when ``augmented`` is true (they
    compute exactly the base until trained), else returned as is. The tokenizer is the base's.
    ``info`` says which case happened: ``base_model``, ``adapter``, ``augmented``, ``fresh_adapter``.
    """
    from .adapter_files import load_augmented_model, read_adapter_config
    from .models import DEFAULT_MODEL, load_base_model, load_tokenizer

    if is_adapter_folder(model_path):
        if adapter is not None:
            raise ConfigError(f"--model-path {model_path} is an adapter folder and --adapter {adapter} is given "
                              f"too; pass the base model as --model-path with --adapter, or the "
                              f"adapter folder alone.")
        adapter, model_path = model_path, None
    if adapter is not None:
        meta = read_adapter_config(adapter)  # a missing or broken folder fails here, before any loading
        base = model_path or meta.get("base_model_name_or_path") or DEFAULT_MODEL
        model, _ = load_augmented_model(base, adapter_path=adapter, use_auth_token=auth_token, dtype=dtype,
                                        device=device)
        info = {"base_model": base, "adapter": str(adapter), "augmented": True, "fresh_adapter": False}
    else:
        base = model_path or DEFAULT_MODEL
        if augmented:
            model, _ = load_augmented_model(base, use_auth_token=auth_token, dtype=dtype, device=device)
        else:
            model = load_base_model(base, auth_token=auth_token, dtype=dtype, device=device)
        info = {"base_model": base, "adapter": None, "augmented": bool(augmented), "fresh_adapter": bool(augmented)}
    model.eval()
    tokenizer = load_tokenizer(base, auth_token=auth_token)
    return model, tokenizer, info


# ---------------------------------------------------------------------------------------------- prompts
def context_length(model) -> Optional[int]:
    return getattr(model.config, "max_position_embeddings", None)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer, prompt, use_chat_template: bool = True) -> torch.Tensor:
    """``[1, n]`` input ids. ``prompt``: a string, or a list of chat messages (needs a chat template)."""
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
    limit = context_length(model)
    if limit is not None and prompt_len + max_new_tokens > limit:
        raise ConfigError(f"the prompt has {prompt_len} tokens and --max-new-tokens is {max_new_tokens}, but the "
                          f"model's context holds {limit} tokens (max_position_embeddings), so the prompt may "
                          f"have at most {max(limit - max_new_tokens, 0)} tokens. Shorten the prompt or lower "
                          f"--max-new-tokens.")


def check_sampling(temperature: float, top_p: float) -> None:
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0 (0 means greedy), got {temperature}.")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}.")


def _generation_config(model, tokenizer, max_new_tokens: int, temperature: float, top_p: float):
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
                 top_p: float = 0.9, streamer=None) -> torch.Tensor:
    """The new token ids (1-D) after ``input_ids`` ``[1, n]``; checks that everything fits the context."""
    check_prompt_fits(model, input_ids.shape[1], max_new_tokens)
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                             generation_config=_generation_config(model, tokenizer, max_new_tokens, temperature,
                                                                  top_p))
    finally:
        model.train(was_training)
    return out[0, input_ids.shape[1]:].cpu()


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 128, temperature: float = 0.7,
                  top_p: float = 0.9, use_chat_template: bool = True, streamer=None) -> str:
    """Generate a reply to ``prompt`` and return only the new text (special tokens dropped).

    The prompt goes through the tokenizer's chat template (as a single user turn) when it has one and
    ``use_chat_template`` is true; otherwise it is continued as plain text. ``temperature=0`` is greedy
    decoding (equal to ``model.generate(do_sample=False)``); otherwise nucleus sampling with ``top_p``.
    A prompt longer than the context minus ``max_new_tokens`` raises ConfigError naming both lengths.
    ``streamer`` (e.g. ``transformers.TextStreamer``) receives the tokens as they come.
    """
    input_ids = encode_prompt(tokenizer, prompt, use_chat_template)
    new_ids = generate_ids(model, tokenizer, input_ids, max_new_tokens, temperature, top_p, streamer)
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


# ---------------------------------------------------------------------------------------------- chat
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
                        output: Optional[TextIO] = None, system_prompt: Optional[str] = None) -> int:
    """Read prompts with ``input_fn`` and stream each reply to ``output``; returns 0 when the user leaves.

    With a chat template the conversation is kept and trimmed (oldest turns first) to fit the context
    minus ``max_new_tokens``; without one every line is a fresh prompt continued as plain text.
    Leaves on ``exit``/``quit``, Ctrl-D (EOFError) or Ctrl-C at the prompt; Ctrl-C during a reply
    stops the reply. ``/reset`` forgets the conversation. ``output`` defaults to the current ``sys.stdout``.
    """
    output = sys.stdout if output is None else output
    chat = use_chat_template and has_chat_template(tokenizer)
    limit = context_length(model)
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
        if chat:
            kept, input_ids = trim_history(tokenizer, history + [{"role": "user", "content": text}], budget)
        else:
            kept, input_ids = [], encode_prompt(tokenizer, text, use_chat_template=False)
        try:
            new_ids = generate_ids(model, tokenizer, input_ids, max_new_tokens, temperature, top_p,
                                   streamer=make_streamer(tokenizer, output))
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


# ---------------------------------------------------------------------------------------------- CLI
def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", default=None,
                        help="base model (Hub id, folder, .gguf, 'smollm2-135m') or an adapter folder; default: "
                             "the base an adapter records, else smollm2-135m")
    parser.add_argument("--adapter", default=None, help="adapter folder (written by `train`) for the base model")
    parser.add_argument("--prompt", default=None, help="generate once for this prompt; without it: interactive mode")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate per reply")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 means greedy decoding")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling threshold")
    parser.add_argument("--no-chat-template", action="store_true",
                        help="continue the prompt as plain text instead of using the tokenizer's chat template")
    parser.add_argument("--system-prompt", default=None, help="system message for the chat (interactive mode)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ...; None: cuda when available, else cpu")
    parser.add_argument("--dtype", default=None,
                        help="base weights dtype: float32, bfloat16, float16 or auto; None: float32")
    parser.add_argument("--auth-token", default=None, help="Hugging Face token for gated or private models")


def run_cli(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}.")
    check_sampling(args.temperature, args.top_p)
    if args.seed is not None:
        from transformers import set_seed

        set_seed(args.seed)
    model, tokenizer, info = load_model_for_cli(args.model_path, adapter=args.adapter, augmented=False,
                                                auth_token=args.auth_token, device=default_device(args.device),
                                                dtype=args.dtype)
    what = f"adapter {info['adapter']} on {info['base_model']}" if info["adapter"] else \
        f"base model {info['base_model']} (no adapter given)"
    print(f"loaded {what}", file=sys.stderr)
    use_chat = not args.no_chat_template
    if args.prompt is not None:
        generate_text(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_p,
                      use_chat_template=use_chat, streamer=make_streamer(tokenizer))
        sys.stdout.write("\n")
        sys.stdout.flush()
        return 0
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    return interactive_session(model, tokenizer, args.max_new_tokens, args.temperature, args.top_p,
                               use_chat_template=use_chat, system_prompt=args.system_prompt)

