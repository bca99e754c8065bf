"""Floor 2: the adapters on a Transformers model: surgery, base-model loading, adapter files (MoE and PEFT LoRA),
devices, the compressed KV cache."""
