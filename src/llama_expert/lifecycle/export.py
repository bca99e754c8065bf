"""``export --merge``: fold a dense LoRA into the base weights and write a model any engine loads.

A LoRA adds ``(alpha / r) * B A`` to a frozen ``W``; folding it in (PEFT's ``merge_and_unload``) gives a plain
model of the base architecture: the same logits as base + LoRA (to float rounding), the base's decode speed,
and files that plain ``AutoModelForCausalLM.from_pretrained`` (``--format hf``) or llama.cpp and Transformers'
GGUF loader (``--format gguf``) read. MoE adapters cannot be folded in: which experts act depends on each
token, so no single weight matrix equals them. Distil them into a dense LoRA first (``llama-expert distill``).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import AdapterError, ConfigError
from ..integration.adapter_files import adapter_kind, recorded_base
from ..integration.base_models import load_base_model, load_tokenizer, parse_dtype, resolve_model
from ..options import option
from .arguments import AdapterCommandArguments
from ..integration.peft_lora import load_lora_model
from .gguf_file import TENSOR_TYPES, write_llama_gguf
from .output import check_output, locked_output, write_outputs

FORMATS = ("hf", "gguf")
GGUF_NAME = "model.gguf"


@dataclass
class ExportArguments(AdapterCommandArguments):
    adapter: Optional[str] = option(None, "the adapter folder to export: a dense LoRA (`train --method lora`, or "
                                          "`distill`)")
    output_dir: Optional[str] = option(None, "folder to write (a Transformers model, or one with model.gguf)")
    merge: bool = option(False, "fold the LoRA into the base weights (what export does; required)")
    format: str = option("hf", "hf: a Transformers folder (config, tokenizer, safetensors); gguf: model.gguf",
                         choices=FORMATS)
    gguf_type: str = option("f16", "GGUF tensor type for the matrices: f32, f16 or q8_0 (norms stay f32)",
                            choices=TENSOR_TYPES)
    dtype: str = option("float32", "--format hf: dtype of the written weights (float32, bfloat16, float16)")

    def validate(self) -> None:
        self.require_paths("export", "the LoRA folder to merge", "where to write the merged model")
        if not self.merge:
            raise ConfigError("export writes merged weights: pass --merge (the adapter is folded into the base).")
        if parse_dtype(self.dtype) is None:
            raise ConfigError(f"--dtype must be float32, bfloat16 or float16, got {self.dtype!r}.")


def lora_base(adapter: Path, base: Optional[str] = None) -> str:
    """The base model of the LoRA in ``adapter`` (``base`` when given); a clear error for anything unmergeable."""
    if adapter_kind(adapter) == "moe":
        raise ConfigError(f"{adapter} holds MoE adapters, which cannot be merged (each token picks its experts); "
                          f"distil them into a dense LoRA first: llama-expert distill --adapter {adapter} --rank 8 "
                          f"--output-dir DIR, then export DIR.")
    base = base or recorded_base(adapter)
    if not base:
        raise AdapterError(f"{adapter}/adapter_config.json does not name its base model; pass --model.")
    return base


def merged_model(adapter: Path, base: Optional[str] = None, auth_token: Optional[str] = None):
    """(the base with the LoRA of ``adapter`` folded in, in float32; its tokenizer; the base's name)."""
    base = lora_base(adapter, base)
    model = load_lora_model(load_base_model(base, auth_token=auth_token), adapter).merge_and_unload()
    model.eval()
    return model, load_tokenizer(base, auth_token=auth_token), base


def run_export(args: ExportArguments) -> Path:
    """The ``export`` command: check the output, merge, then write the model and ``export_info.json``."""
    args.validate()
    output = Path(args.output_dir)
    check_output(output, "export", args.overwrite, args.inputs(lora_base(Path(args.adapter), args.model)))
    with locked_output(output, "export"):
        model, tokenizer, base = merged_model(Path(args.adapter), args.model, args.auth_token)
        kind, location = resolve_model(base)
        info = {"exported_by": "llama-expert export --merge", "adapter": str(args.adapter), "base_model": base,
                "format": args.format}

        def fill(staging: Path) -> None:
            if args.format == "hf":
                model.to(parse_dtype(args.dtype)).save_pretrained(staging)
                tokenizer.save_pretrained(staging)
                info["dtype"] = args.dtype
            else:
                with tempfile.TemporaryDirectory() as tokenizer_folder:
                    tokenizer.save_pretrained(tokenizer_folder)
                    write_llama_gguf(model, tokenizer, Path(tokenizer_folder), staging / GGUF_NAME, args.gguf_type,
                                     source_gguf=location if kind in ("embedded", "gguf") else None,
                                     name=f"{Path(str(base)).name} + {Path(args.adapter).name}")
                info["gguf_type"] = args.gguf_type

        write_outputs(output, "export_info.json", info, fill)
    what = output / GGUF_NAME if args.format == "gguf" else output
    print(f"wrote {what}: {base} with {args.adapter} merged in")
    return what
