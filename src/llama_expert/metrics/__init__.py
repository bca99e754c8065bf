"""Floor 2: what training, evaluation and the lifecycle commands measure alike: perplexity, memory, routing
statistics, and the figures that show them."""
