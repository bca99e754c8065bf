"""The fields of an OpenAI request body, each read with its JSON type and range, or an OpenAI-style error.

A value of the wrong JSON type is refused, never coerced: ``"stream": "false"`` is a string, and a string is
true in Python. A field this server does not implement is refused unless its value asks for nothing, so that a
client never takes a silently ignored setting for an honoured one.
"""

from typing import List, Optional


class RequestError(Exception):
    """An OpenAI-style error answer."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def number(body: dict, name: str, default, low=None, high=None, integer: bool = False):
    value = body.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise RequestError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, got {value!r}.", name)
    if value != value or (low is not None and value < low) or (high is not None and value > high):
        raise RequestError(400, f"'{name}' must be between {low} and {high}, got {value}.", name)
    return value


def stops(body: dict) -> List[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > 4:
        raise RequestError(400, "'stop' must be a string or a list of at most 4 strings.", "stop")
    return stops


def flag(body: dict, name: str, param: Optional[str] = None) -> bool:
    """A true/false field (absent or null: false). JSON types count: the string "false" is not false."""
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise RequestError(400, f"'{param or name}' must be true or false, got {value!r}.", param or name)
    return bool(value)


# Fields this server does not implement, and the values that ask for nothing; any other value is refused
# rather than silently ignored (a client asking for logprobs would otherwise get an answer without them).
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None,)}


def refuse_unsupported(body: dict) -> None:
    for name, harmless in UNSUPPORTED.items():
        value = body.get(name)
        if not any(value is ok for ok in harmless):
            raise RequestError(400, f"'{name}' is not supported by this server; leave it out (or send null).",
                               name, "unsupported_parameter")
