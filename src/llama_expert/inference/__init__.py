"""Floor 3: text generation, the interactive chat and the OpenAI-compatible server."""
