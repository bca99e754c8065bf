"""``python -m llama_expert.cli`` is the ``llama-expert`` command (``compare`` runs its children so)."""

import sys

from . import main

sys.exit(main())
