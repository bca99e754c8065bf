"""Rows of a dataset as training text: a ``text`` string, chat ``messages`` rendered by the chat template,
or a question-answer pair (GSM8K's ``question``/``answer``) rendered as ``Question: ...\nAnswer: ...``."""

from __future__ import annotations

from ..errors import DataError


def row_text(row: dict, tokenizer, where: str) -> str:
    if not isinstance(row, dict):
        raise DataError(f"{where}: each row must be a JSON object with a 'text' string or a 'messages' list, "
                        f"got a {type(row).__name__}.")
    if isinstance(row.get("text"), str):
        return row["text"]
    if isinstance(row.get("question"), str) and isinstance(row.get("answer"), str):
        return f"Question: {row['question']}\nAnswer: {row['answer']}"
    if isinstance(row.get("messages"), list):
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{where} holds chat messages but the tokenizer has no chat template; "
                            f"use a model with one or give plain 'text' rows.")
        return tokenizer.apply_chat_template(row["messages"], tokenize=False)
    raise DataError(f"{where}: each row needs a 'text' string, a 'messages' list or 'question' and 'answer' "
                    f"strings, got keys {sorted(row)}.")
