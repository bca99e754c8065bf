"""The expert lifecycle after training: prune experts (``prune``), distil MoE adapters into a dense LoRA
(``distill``), merge a dense LoRA into the base and export it (``export``), mix adapters trained apart into one
(``mix``).

Floor 3, beside training, evaluation and inference (docs/design.md section 1).
"""
