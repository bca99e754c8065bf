"""Floor 4: compare, which trains MoE adapters and a LoRA baseline (training) and measures them side by side
(evaluation): the one workflow built on both."""
