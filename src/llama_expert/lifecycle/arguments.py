"""What the lifecycle commands (prune, distill, export) share: an adapter in, a folder out, the base and its
token, and no overwriting of a folder that holds something unless asked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

from ..data import split_sources
from ..errors import ConfigError
from ..options import option


@dataclass
class AdapterCommandArguments:
    model: Optional[str] = option(None, "base model (default: the one the adapter records)")
    auth_token: Optional[str] = option(None, "Hugging Face token for a gated or private base")
    overwrite: bool = option(False, "write into an existing, non-empty --output-dir, replacing what this command "
                                    "wrote there before (other files stay)")

    def require_paths(self, command: str, adapter_what: str, output_what: str) -> None:
        """One line naming the flag when ``--adapter`` or ``--output-dir`` is missing (subclasses define both)."""
        if not getattr(self, "adapter", None):
            raise ConfigError(f"{command} needs --adapter DIR: {adapter_what}.")
        if not getattr(self, "output_dir", None):
            raise ConfigError(f"{command} needs --output-dir DIR: {output_what}.")

    def inputs(self, base: Optional[str]) -> Dict[str, List[str]]:
        """What the command reads, by name: its --output-dir may not be, hold or lie inside any of them."""
        found = {"the --adapter folder": [getattr(self, "adapter")], "the base model": [base] if base else []}
        if getattr(self, "calibration", None):
            found["the --calibration source"] = split_sources(getattr(self, "calibration"))
        return found
