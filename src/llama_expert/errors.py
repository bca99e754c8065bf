"""Errors a user can act on. The CLI prints their message without a traceback."""


class LlamaExpertError(Exception):
    """Base class: the message names the problem and the fix."""


class ConfigError(LlamaExpertError, ValueError):
    """An ExpertConfig (or training setting) that cannot work."""


class ModelLoadError(LlamaExpertError, OSError):
    """A base model that cannot be found, reached or read."""


class AdapterError(LlamaExpertError, ValueError):
    """An adapter folder that is missing, corrupt or made for another base model."""


class DataError(LlamaExpertError, ValueError):
    """A dataset that cannot be found or is empty."""
