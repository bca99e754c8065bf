"""What the lifecycle commands (prune, distill, export) share: an adapter in, a folder out, the base and its
token, and no overwriting of a folder that holds something unless asked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import ConfigError
from ..options import option


@dataclass
class AdapterCommandArguments:
    model: Optional[str] = option(None, "base model (default: the one the adapter records)")
    auth_token: Optional[str] = option(None, "Hugging Face token for a gated or private base")
    overwrite: bool = option(False, "replace an existing, non-empty --output-dir")

    def require_paths(self, command: str, adapter_what: str, output_what: str) -> None:
        """One line naming the flag when ``--adapter`` or ``--output-dir`` is missing (subclasses define both)."""
        if not getattr(self, "adapter", None):
            raise ConfigError(f"{command} needs --adapter DIR: {adapter_what}.")
        if not getattr(self, "output_dir", None):
            raise ConfigError(f"{command} needs --output-dir DIR: {output_what}.")
