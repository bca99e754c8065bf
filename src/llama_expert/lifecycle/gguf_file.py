"""Write a Llama-architecture Transformers model and its BPE tokenizer as one GGUF file (the ``gguf`` package).

Why not llama.cpp's ``convert_hf_to_gguf.py``: it is a script in the llama.cpp repository, not an installable
package; the ``gguf`` package it builds on is, and this module does the little it does for Llama:

- tensor names through ``gguf.get_tensor_name_map`` (``model.layers.3.mlp.up_proj`` -> ``blk.3.ffn_up``);
- the query and key rows permuted from Transformers' rotate-half RoPE layout to GGUF's interleaved one, as
  llama.cpp's converter does and Transformers' GGUF loader undoes;
- no ``output.weight`` when the embeddings are tied (llama.cpp reuses ``token_embd``);
- the tokenizer: tokens, their types (control for special tokens, user-defined for other added ones),
  merges, special ids and the chat template (``gguf.SpecialVocab``). ``tokenizer.ggml.pre``, which names
  llama.cpp's pre-tokenizer, is copied from the base's own GGUF file when it came from one; otherwise it is
  left out, and llama.cpp falls back to its default pre-tokenizer (it says so when it loads the file).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from ..errors import ConfigError

TENSOR_TYPES = ("f32", "f16", "q8_0")


def _permute_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """[heads * head_dim, in]: within each head, rows (0..d/2, d/2..d) become interleaved pairs."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _vocabulary(tokenizer, vocab_size: int):
    """(tokens, token types) for ids 0..vocab_size-1, as llama.cpp's converter lists them."""
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    special = set(tokenizer.all_special_tokens)
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if token in special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _tokenizer_model(tokenizer) -> str:
    state = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    if state.get("model", {}).get("type") != "BPE":
        raise ConfigError("GGUF export writes byte-level BPE tokenizers (Llama 3, SmolLM2, GPT-2 style); this "
                          "model's tokenizer is not one. Export with --format hf instead.")
    return "gpt2"


def _pre_tokenizer(source_gguf: Optional[str]) -> Optional[str]:
    if not source_gguf:
        return None
    import gguf

    field = gguf.GGUFReader(source_gguf).fields.get("tokenizer.ggml.pre")
    return field.contents() if field is not None else None


def write_llama_gguf(model, tokenizer, tokenizer_folder: Path, path: Path, tensor_type: str = "f16",
                     source_gguf: Optional[str] = None, name: Optional[str] = None) -> Path:
    """Write ``model`` (a Transformers Llama) and ``tokenizer`` (saved in ``tokenizer_folder``) to ``path``."""
    import gguf
    import numpy as np

    if tensor_type not in TENSOR_TYPES:
        raise ConfigError(f"--gguf-type must be one of {', '.join(TENSOR_TYPES)}, got {tensor_type!r}.")
    config = model.config
    if config.model_type != "llama":
        raise ConfigError(f"GGUF export supports the Llama architecture; this model is '{config.model_type}'.")
    arch = gguf.MODEL_ARCH.LLAMA
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name or "llama-expert export")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None)
                                    or (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_types[tensor_type])

    writer.add_tokenizer_model(_tokenizer_model(tokenizer))
    pre = _pre_tokenizer(source_gguf)
    if pre:
        writer.add_tokenizer_pre(pre)
    tokens, types = _vocabulary(tokenizer, config.vocab_size)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(str(tokenizer_folder), load_merges=True, n_vocab=config.vocab_size)
    if not special.merges:  # GGUF cannot say "no merges" (empty arrays are dropped): readers would guess them
        raise ConfigError("this tokenizer is a BPE without merges, which a GGUF file cannot describe; export "
                          "with --format hf instead.")
    special.add_to_gguf(writer)

    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        data = tensor.detach().to(torch.float32).cpu()
        if hf_name.endswith("self_attn.q_proj.weight"):
            data = _permute_rope_rows(data, config.num_attention_heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            data = _permute_rope_rows(data, config.num_key_value_heads)
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConfigError(f"no GGUF name for tensor {hf_name}: is this a plain Llama model?")
        array = data.numpy()
        if array.ndim == 1 or tensor_type == "f32":  # norms stay float32, as llama.cpp writes them
            writer.add_tensor(gguf_name, array.astype(np.float32))
        elif tensor_type == "f16":
            writer.add_tensor(gguf_name, array.astype(np.float16))
        else:
            quantized = gguf.quants.quantize(array.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name, quantized, raw_shape=quantized.shape,
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
