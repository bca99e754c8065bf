"""Floor 3: perplexity, throughput, memory, routing health, the benchmark, compare, and reports."""
