"""``python -m llama_expert.cli`` is the ``llama-expert`` command."""

import sys

from . import main

if __name__ == "__main__":  # not when multiprocessing's spawn re-imports the main module in a child
    sys.exit(main())
