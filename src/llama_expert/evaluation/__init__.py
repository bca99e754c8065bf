"""Floor 3: the benchmark of one model (perplexity, throughput, memory, routing health) and its report."""
