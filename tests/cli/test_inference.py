"""`llama-expert inference`: one prompt, a missing adapter, and the interactive chat through a pseudo-terminal
(the streamed reply text is what the model generates; Ctrl-D and Ctrl-C leave cleanly)."""

import os
import sys

import pytest
from transformers import LlamaForCausalLM

from llama_expert.cli import main
from llama_expert.inference.chat import PROMPT_MARKER
from llama_expert.inference.generation import generate_text


def test_one_prompt_prints_the_greedy_reply(chat_folder, embedded_tokenizer, capsys):
    rc = main(["inference", "--model-path", str(chat_folder), "--prompt", "Hello", "--max-new-tokens", "4",
               "--temperature", "0", "--seed", "0"])
    captured = capsys.readouterr()
    assert rc == 0
    assert "base model" in captured.err and "no adapter given" in captured.err
    model = LlamaForCausalLM.from_pretrained(chat_folder).eval()
    expected = generate_text(model, embedded_tokenizer, "Hello", max_new_tokens=4, temperature=0)
    assert captured.out == expected + "\n"


def test_missing_adapter_is_a_clear_error(tmp_path, capsys):
    rc = main(["inference", "--adapter", str(tmp_path / "missing"), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("error: adapter folder not found") and "Traceback" not in err


def _spawn_interactive(model_path):
    pexpect = pytest.importorskip("pexpect")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TERM="dumb")
    child = pexpect.spawn(sys.executable, ["-m", "llama_expert.cli", "inference", "--model-path", str(model_path),
                                           "--max-new-tokens", "8", "--temperature", "0"],
                          env=env, encoding="utf-8", timeout=120)
    child.expect_exact(PROMPT_MARKER)
    return pexpect, child


@pytest.mark.slow
def test_interactive_terminal_shows_the_reply_and_exits_on_ctrl_d(smollm):
    model, tokenizer = smollm
    question = "What is the capital of France?"
    expected = generate_text(model, tokenizer, question, max_new_tokens=8, temperature=0).strip()
    assert expected
    pexpect, child = _spawn_interactive("smollm2-135m")
    try:
        child.sendline(question)
        child.expect_exact(PROMPT_MARKER)
        shown = child.before.replace("\r", "").split(question, 1)[-1].strip()
        assert shown == expected, child.before
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0 and child.signalstatus is None
    assert "Traceback" not in (child.before or "")


def test_interactive_terminal_exits_on_ctrl_c(chat_folder):
    pexpect, child = _spawn_interactive(chat_folder)
    try:
        child.sendintr()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0 and child.signalstatus is None
    assert "Traceback" not in (child.before or "")
