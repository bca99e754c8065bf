"""Shim so that `python main.py train ...` works as in the seed; same as the `llama-expert` command."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from llama_expert.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
