"""Floor 3: text generation and the interactive chat."""
