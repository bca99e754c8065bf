"""Measure a (base or augmented) model: perplexity, throughput, memory and routing health.

Every section follows docs/design.md section 5 and returns plain Python numbers, so that
``run_full_benchmark()`` is JSON as it stands.

- Perplexity: the split's documents joined with blank lines, tokenised once, cut into non-overlapping
  windows of ``seq_len`` tokens; token-level ``exp(mean NLL)`` over every predicted token. Optionally an
  lm-evaluation-harness style *word* perplexity, a different number (see ``benchmark_perplexity``).
- Throughput: prefill and decode tokens/s at batch 1 and batched, after a warm-up, median of repeats.
- Memory: parameter bytes, KV-cache bytes per token, peak CUDA allocation or peak process RSS.
- Routing health (augmented models): per-layer expert load, router entropy, collapse warnings.

Several comma-separated datasets are domains: each is windowed on its own (up to ``max_tokens`` each), the
perplexity is reported per domain and as the exp of their mean log-perplexity (every domain weighs the
same), and routing health adds, per layer, the normalised mutual information between domain and expert.
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..data import domain_name, load_split, pack_blocks, split_sources, tokenize_documents
from ..errors import ConfigError
from ..files import atomic_write_text, write_problem
from ..options import option
from ..integration.base_models import check_within_context
from ..integration.loading import ModelArguments, is_adapter_folder, load_model_and_tokenizer
from ..integration.surgery import adapters, domain_labels, is_augmented, parameter_counts
from ..metrics.memory import peak_memory
from ..metrics.perplexity import evaluate_perplexity
from ..metrics.routing import domain_specialisation, routing_health
from .reports import format_header, format_section
from .throughput import ThroughputArguments, measure_throughput, model_device, prompt_ids, synchronize


class ExpertModelBenchmark:
    """Benchmarks of one model on one dataset split.

    The model is given either as objects (``model``, ``tokenizer``) or, as in the seed, by name:
    ``ExpertModelBenchmark(model_path="./models/llama-expert", is_augmented=True)`` loads an adapter
    folder (with the base it records) or a base model (Hub id, folder, ``.gguf``, ``smollm2-135m``), which
    ``is_augmented=True`` gives fresh adapters (they compute exactly the base until trained).

    ``dataset``: anything ``load_text_dataset`` accepts (default ``"embedded"``: the offline corpus; a
    folder such as ``../shared/data/wikitext-2-raw``, a ``.txt``/``.jsonl`` file, or a Hub name with
    ``dataset_config``). ``max_tokens`` caps the evaluated tokens (whole windows only). ``windows``
    (``[n, seq_len]`` token ids) replaces the dataset: ``compare`` measures every model on the same ones.
    ``device`` moves the model there; by default it stays where it is. ``progress``: bars on stderr for
    tokenising and for every measuring loop (see ``llama_expert.progress``).
    """

    def __init__(self, model=None, tokenizer=None, dataset: Optional[str] = None, dataset_config: Optional[str] = None,
                 split: str = "test", seq_len: int = 2048, max_tokens: Optional[int] = None, batch_size: int = 1,
                 device: Optional[str] = None, *, model_path: Optional[str] = None,
                 is_augmented: Optional[bool] = None, auth_token: Optional[str] = None, dtype=None,
                 windows: Optional[torch.Tensor] = None, window_domains: Optional[torch.Tensor] = None,
                 progress: bool = True):
        if isinstance(model, (str, Path)):  # ExpertModelBenchmark("./models/llama-expert")
            model, model_path = None, str(model)
        if model is None:
            model, tokenizer = self._load(model_path, is_augmented, auth_token, dtype, device)
        elif tokenizer is None:
            raise ConfigError("ExpertModelBenchmark(model, tokenizer): pass the tokenizer with a model object, or "
                              "pass model_path=... to load both.")
        if seq_len < 2:
            raise ConfigError(f"--seq-len must be >= 2 (a window predicts --seq-len minus 1 tokens), got {seq_len}.")
        if batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {batch_size}.")
        if max_tokens is not None and max_tokens < seq_len:
            raise ConfigError(f"--max-tokens {max_tokens} is less than one window of --seq-len {seq_len}; raise "
                              f"--max-tokens or lower --seq-len.")
        if device is not None:
            model.to(device)
        self.model = model
        self.tokenizer = tokenizer
        self.dataset = dataset or "embedded"
        self.dataset_config = dataset_config
        self.split = split
        self.seq_len = seq_len
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self.progress = progress
        self.device = model_device(model)
        self._ids: Optional[torch.Tensor] = None
        self._windows: Optional[torch.Tensor] = windows
        self._window_domains: Optional[torch.Tensor] = window_domains
        self.sources = split_sources(self.dataset)
        self.domain_names: List[str] = [domain_name(s) for s in self.sources] if len(self.sources) > 1 else []
        if windows is not None and (windows.dim() != 2 or windows.shape[1] != seq_len):
            raise ConfigError(f"windows must be [n, seq_len={seq_len}] token ids, got shape {tuple(windows.shape)}.")
        if self.domain_names and windows is not None and (window_domains is None
                                                          or window_domains.shape != windows.shape[:1]):
            raise ConfigError("with several datasets and given windows, pass window_domains (each window's domain "
                              "index, one per window) too.")

    @staticmethod
    def _load(model_path: Optional[str], augmented: Optional[bool], auth_token, dtype, device):
        if model_path is None:
            raise ConfigError("ExpertModelBenchmark needs a model: pass (model, tokenizer) objects, or "
                              "model_path= an adapter folder or base model id.")
        if augmented is False and is_adapter_folder(model_path):
            raise ConfigError(f"is_augmented=False benchmarks a plain base model, but {model_path} is an adapter "
                              f"folder; pass is_augmented=True (or leave it out), or a base model id.")
        model, tokenizer, _ = load_model_and_tokenizer(model_path, auth_token=auth_token, dtype=dtype, device=device,
                                                       augmented=augmented is not False)
        return model, tokenizer

    # ------------------------------------------------------------------ data
    def _check_seq_len(self) -> None:
        check_within_context(self.model.config, self.seq_len, "--seq-len")

    def token_ids(self) -> torch.Tensor:
        """The whole split tokenised once (cached); with several domains, all of them one after the other."""
        if self._ids is None:
            self._ids = torch.cat([self._source_ids(source) for source in self.sources])
        return self._ids

    def _source_ids(self, source: str) -> torch.Tensor:
        docs = load_split(source, self.dataset_config, self.tokenizer, self.split, hold_out=True)
        return tokenize_documents(docs, self.tokenizer, self.progress)

    def windows(self) -> torch.Tensor:
        """``[n, seq_len]`` non-overlapping evaluation windows within the token cap (cached); with several
        domains, each domain's windows (within the cap each) in turn, labelled by ``window_domains``."""
        self._check_seq_len()
        if self._windows is None:
            if not self.domain_names:
                self._windows = pack_blocks(self.token_ids(), self.seq_len, max_tokens=self.max_tokens)
            else:
                per_domain = [pack_blocks(self._source_ids(s), self.seq_len, max_tokens=self.max_tokens)
                              for s in self.sources]
                self._windows = torch.cat(per_domain)
                self._window_domains = torch.cat([torch.full((len(w),), d) for d, w in enumerate(per_domain)])
        return self._windows

    def window_domains(self) -> Optional[torch.Tensor]:
        """Each window's domain index in ``domain_names`` (None with a single dataset)."""
        self.windows()
        return self._window_domains if self.domain_names else None

    # ------------------------------------------------------------------ sections
    def benchmark_perplexity(self, word_perplexity: bool = False) -> Dict:
        """Token-level perplexity, docs/design.md section 5 (the GPTQ/AWQ protocol).

        With ``word_perplexity=True`` also ``word_perplexity`` = exp(total NLL / number of
        whitespace-separated words of the evaluated text), as lm-evaluation-harness reports for
        WikiText. It is a *different number* from the token-level perplexity (it does not depend on the
        tokenizer, and is much larger); and as the windows here do not overlap it is close to, not
        equal to, the harness's rolling-window value.
        """
        if self.domain_names:
            return self._domain_perplexity(word_perplexity)
        windows = self.windows()
        result = evaluate_perplexity(self.model, windows, batch_size=self.batch_size, progress=self.progress,
                                     domains=self._window_domains)  # given ones too: a domain's own benchmark
        available = int(self.token_ids().numel())
        out = {
            "protocol": "token-level exp(mean NLL) over non-overlapping windows of the split joined with blank "
                        "lines (docs/design.md section 5)",
            "dataset": self.dataset, "dataset_config": self.dataset_config, "split": self.split,
            "perplexity": float(result["perplexity"]), "mean_nll": float(result["nll"]),
            "tokens_evaluated": int(result["tokens"]),  # predicted tokens: windows * (seq_len - 1)
            "tokens_in_windows": int(windows.numel()),
            "tokens_available": available,
            "windows": int(result["windows"]), "seq_len": int(result["seq_len"]),
            "max_tokens": self.max_tokens,
            "capped": int(windows.numel()) < available - available % self.seq_len,
        }
        if word_perplexity:
            text = self.tokenizer.decode(windows.reshape(-1).tolist())
            words = len(text.split())
            total_nll = float(result["nll"]) * int(result["tokens"])
            out["word_perplexity"] = math.exp(total_nll / max(words, 1))
            out["words"] = words
            out["word_perplexity_note"] = ("lm-evaluation-harness style: exp(total NLL / whitespace-separated "
                                           "words of the evaluated text). NOT comparable with the token-level "
                                           "perplexity.")
        return out

    def _domain_perplexity(self, word_perplexity: bool) -> Dict:
        """Each domain measured alone on its windows; the top level holds the exp of their mean log-perplexity."""
        windows, labels = self.windows(), self.window_domains()
        domains = {}
        for index, (name, source) in enumerate(zip(self.domain_names, self.sources)):
            single = ExpertModelBenchmark(self.model, self.tokenizer, dataset=source,
                                          dataset_config=self.dataset_config, split=self.split, seq_len=self.seq_len,
                                          max_tokens=self.max_tokens, batch_size=self.batch_size,
                                          windows=windows[labels == index], window_domains=labels[labels == index],
                                          progress=self.progress)
            domains[name] = single.benchmark_perplexity(word_perplexity)
        mean_nll = sum(d["mean_nll"] for d in domains.values()) / len(domains)
        total = {key: sum(d[key] for d in domains.values())
                 for key in ("tokens_evaluated", "tokens_in_windows", "windows")}
        return {"protocol": "exp of the mean of the domains' log-perplexities (each: token-level exp(mean NLL) "
                            "over its own non-overlapping windows)",
                "dataset": self.dataset, "dataset_config": self.dataset_config, "split": self.split,
                "perplexity": math.exp(mean_nll), "mean_nll": mean_nll, **total, "seq_len": self.seq_len,
                "max_tokens": self.max_tokens, "domains": domains}

    def benchmark_throughput(self, num_samples: int = 5, prompt_len: int = 128, new_tokens: int = 32,
                             batch_sizes: Sequence[int] = (1, 4), kv_cache: str = "none",
                             compiled_decode: bool = True) -> Dict:
        """Prefill and decode tokens/s at each batch size.

        Method: a manual greedy loop with the model's KV cache (not ``model.generate``), so the two
        phases are timed separately and nothing ends a sequence early: prefill = one forward pass over
        ``batch x prompt_len`` random prompt tokens; decode = ``new_tokens`` forward passes of one token
        per sequence. One warm-up run per batch size, then the median of ``num_samples`` repeats; CUDA
        is synchronised around every timed phase. ``kv_cache``: none, int8 or int4 (KVCacheCompressor);
        ``compiled_decode``: on CUDA, the decode steps on a static cache in CUDA graphs (``kv_cache_choice``).
        """
        with domain_labels(self.model, 0):  # random prompts have no domain; an oracle's speed does not depend on it
            result = measure_throughput(self.model, num_samples, prompt_len, new_tokens, batch_sizes, self.progress,
                                        kv_cache, compiled_decode)
        return {**result, "kv_cache": kv_cache}

    @torch.no_grad()
    def benchmark_memory(self) -> Dict:
        """Parameter bytes, KV-cache bytes per token, and the peak memory after one evaluation batch.

        KV-cache bytes per token = 2 (K and V) * layers * kv_heads * head_dim * bytes of the model
        dtype. The peak is CUDA's max allocated (reset before the pass) on a GPU; on the CPU the
        process's peak RSS from ``resource.getrusage``, which cannot be reset and so covers all the
        process did before (loading included).
        """
        self._check_seq_len()
        model, config = self.model, self.model.config
        params = list(model.parameters())  # shared (tied) tensors appear once
        param_bytes = sum(p.numel() * p.element_size() for p in params)
        buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
        adapter_bytes = sum(p.numel() * p.element_size() for _, a in adapters(model)
                            for n, p in a.named_parameters() if not n.startswith("base_mlp."))
        trainable_bytes = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
        layers = int(config.num_hidden_layers)
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        dtype = getattr(model, "dtype", None) or params[0].dtype
        dtype_bytes = torch.empty((), dtype=dtype).element_size()
        kv_per_token = 2 * layers * kv_heads * head_dim * dtype_bytes
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        was_training = model.training
        model.eval()
        try:
            batch = prompt_ids(model, self.batch_size, self.seq_len).to(self.device)
            with domain_labels(model, 0):  # as in benchmark_throughput
                model(input_ids=batch, use_cache=False)
        finally:
            model.train(was_training)
        synchronize(self.device)
        context = getattr(config, "max_position_embeddings", None)
        return {
            "parameter_bytes": int(param_bytes), "parameters": int(sum(p.numel() for p in params)),
            "adapter_parameter_bytes": int(adapter_bytes), "trainable_parameter_bytes": int(trainable_bytes),
            "buffer_bytes": int(buffer_bytes), "dtype": str(dtype).replace("torch.", ""),
            "kv_cache_bytes_per_token": int(kv_per_token),
            "kv_cache_formula": f"2 * {layers} layers * {kv_heads} kv_heads * {head_dim} head_dim * "
                                f"{dtype_bytes} bytes",
            "kv_cache_bytes_per_window": int(kv_per_token * self.seq_len * self.batch_size),
            "kv_cache_bytes_full_context": int(kv_per_token * context) if context else None,
            "peak_measured_after": f"one forward pass of {self.batch_size} x {self.seq_len} tokens",
            "peak": peak_memory(self.device), "device": str(self.device),
        }

    def routing_health(self, max_windows: Optional[int] = 8) -> Dict:
        """Per-layer expert load and router entropy over (up to ``max_windows`` of) the eval windows;
        see ``llama_expert.metrics.routing.routing_health``."""
        if not is_augmented(self.model):
            raise ConfigError("routing_health needs an augmented model (one with MoE adapters); this one has none.")
        windows, labels = self.windows(), self.window_domains()
        if labels is None:
            return routing_health(self.model, windows if max_windows is None else windows[:max_windows],
                                  self.batch_size, self.progress)
        keep = torch.cat([(labels == d).nonzero()[:, 0][:max_windows] for d in range(len(self.domain_names))])
        health = routing_health(self.model, windows[keep], self.batch_size, self.progress, labels[keep])
        for layer, by_domain in zip(health["layers"], domain_specialisation(
                self.model, windows[keep], labels[keep], self.domain_names, self.batch_size, self.progress)):
            layer.update(domains=by_domain["domains"], domain_fractions=by_domain["domain_fractions"],
                         domain_expert_nmi=by_domain["nmi"])
        return health

    def describe(self) -> Dict:
        """What is measured, where and how: the report's ``model``, ``environment`` and ``settings``."""
        model = self.model
        counts = parameter_counts(model)
        return {
            "model": {"name": (getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
                               or type(model).__name__),
                      "augmented": is_augmented(model),
                      "expert_config": model.expert_config.to_dict() if is_augmented(model) else None,
                      "parameters": counts},
            "environment": environment(self.device),
            "settings": {"dataset": self.dataset, "dataset_config": self.dataset_config, "split": self.split,
                         "seq_len": self.seq_len, "max_tokens": self.max_tokens, "batch_size": self.batch_size},
        }

    def run_full_benchmark(self, word_perplexity: bool = False, throughput: bool = True, num_samples: int = 5,
                           prompt_len: int = 128, new_tokens: int = 32, batch_sizes: Sequence[int] = (1, 4),
                           routing_windows: Optional[int] = 8, kv_cache: str = "none", compiled_decode: bool = True,
                           on_section: Optional[Callable[[str, Dict], None]] = None) -> Dict:
        """All sections in one JSON-serialisable dict; ``routing_health`` is None for a base model.

        ``on_section(name, result)`` is called as each section is measured (perplexity, routing_health,
        throughput, memory; skipped sections are not), with the very dict that goes into the report, so a
        caller can show results while the slower sections still run.
        """
        report = self.describe()
        report.update(perplexity=None, routing_health=None, throughput=None, memory=None)  # the JSON's order

        def record(name: str, result: Dict) -> None:
            report[name] = result
            if on_section is not None:
                on_section(name, result)

        record("perplexity", self.benchmark_perplexity(word_perplexity=word_perplexity))
        if is_augmented(self.model):
            record("routing_health", self.routing_health(routing_windows))
        if throughput:
            record("throughput", self.benchmark_throughput(num_samples, prompt_len, new_tokens, batch_sizes, kv_cache,
                                                           compiled_decode))
        record("memory", self.benchmark_memory())
        return report


def environment(device: torch.device) -> Dict:
    import transformers

    env = {"device": str(device), "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "platform": platform.platform(),
           "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


@dataclass
class BenchmarkArguments:
    augmented: bool = option(True, "benchmark the plain base model (no fresh adapters) when no adapter is given",
                             flag="--no-augmented")
    dataset: str = option("embedded", "'embedded', a local file or folder (e.g. a WikiText-2 folder), or a Hub "
                                      "dataset; several, comma-separated: each domain, their mean, and the "
                                      "domain-expert mutual information per layer")
    dataset_config: Optional[str] = option(None, "Hub dataset config, e.g. wikitext-2-raw-v1")
    split: str = option("test", "split to evaluate: train, validation or test (of one file: validation is its last 5%, "
                                "which `train` holds out, train the rest, test the whole file)")
    seq_len: int = option(2048, "perplexity window length")
    max_tokens: Optional[int] = option(None, "evaluate at most this many tokens")
    batch_size: int = option(1, "windows per forward pass")
    routing_windows: int = option(8, "eval windows used for routing health")
    word_perplexity: bool = option(False, "also report lm-eval-harness style word perplexity (a different number)")
    output_json: Optional[str] = option(None, "write the full report to this JSON file")
    overwrite: bool = option(False, "replace an existing --output-json file")
    progress: bool = option(True, "no progress bars")


def check_output_json(path: Optional[str], overwrite: bool) -> None:
    """Before the measurements: the report can be written there, and replaces nothing unless asked."""
    if not path:
        return
    if Path(path).is_dir():
        raise ConfigError(f"--output-json {path} is a folder; pass a file name, e.g. {Path(path) / 'report.json'}.")
    if Path(path).exists() and not overwrite:
        raise ConfigError(f"--output-json {path} already exists; pass --overwrite to replace it, or another file.")
    problem = write_problem(Path(path).parent)
    if problem:
        raise ConfigError(f"--output-json {path} cannot be written ({problem}); pass a file in a folder you can "
                          f"write to.")


def run_benchmark(model_args: ModelArguments, args: BenchmarkArguments,
                  throughput: Optional[ThroughputArguments] = None) -> Dict:
    """The ``benchmark`` command: load the model as ``model_args`` says, measure it, print and save the report."""
    throughput = throughput or ThroughputArguments()
    if not args.augmented and (model_args.adapter or is_adapter_folder(model_args.model)):
        raise ConfigError("--no-augmented benchmarks a plain base model, but an adapter was given; drop "
                          "--no-augmented, or pass a base model without --adapter.")
    check_output_json(args.output_json, args.overwrite)
    model, tokenizer, info = load_model_and_tokenizer(**asdict(model_args), augmented=args.augmented)
    bench = ExpertModelBenchmark(model, tokenizer, dataset=args.dataset, dataset_config=args.dataset_config,
                                 split=args.split, seq_len=args.seq_len, max_tokens=args.max_tokens,
                                 batch_size=args.batch_size, progress=args.progress)
    # The report is printed as it is measured: the header now, each section when done (together the same
    # text as format_report), so a long run on a CPU shows its perplexity long before the throughput.
    print(format_header(bench.describe(), info), flush=True)
    report = bench.run_full_benchmark(word_perplexity=args.word_perplexity, throughput=not throughput.skip_throughput,
                                      num_samples=throughput.num_samples, prompt_len=throughput.prompt_len,
                                      new_tokens=throughput.new_tokens, batch_sizes=throughput.throughput_batch_sizes,
                                      routing_windows=args.routing_windows, kv_cache=throughput.kv_cache,
                                      compiled_decode=throughput.compiled_decode,
                                      on_section=lambda name, result: print(format_section(name, result), flush=True))
    report["model"].update({"base_model": info["base_model"], "adapter": info["adapter"],
                            "fresh_adapter": info["fresh_adapter"]})
    if info["fresh_adapter"]:
        report["model"]["note"] = "fresh (untrained) adapters compute exactly the base model"
    if args.output_json:
        path = Path(args.output_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {path}")
    return report
