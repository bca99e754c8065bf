"""What the recipe trains: MoE adapters or plain PEFT LoRA, behind one small interface.

A method adds its trainable parameters to a freshly loaded base model, says what it built, writes and
reads its trained tensors (the final adapter and every checkpoint), may add a loss term (the MoE router
losses) and may bring hooks that act between steps (dynamic allocation). The trainer (``training/trainer.py``)
takes the method as an object and drives every method the same way, so ``compare`` measures them under
identical data, steps and schedule. New methods are registered in ``METHODS``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from ..config import ExpertConfig
from ..errors import ConfigError
from ..metrics.plots import save_allocation_plot, save_domain_heatmap, save_usage_heatmap
from ..metrics.routing import expert_usage_by_domain
from ..files import atomic_write_text
from ..integration import peft_lora
from ..integration.adapter_files import (MIX_REPORT, expert_names, load_adapter_weights, read_adapter_config,
                                         save_adapter, saved_expert_config)
from ..integration.surgery import adapters, augment_model, parameter_report, weighted_router_loss
from ..modeling import check_config
from ..modeling.allocation import grows_in_training
from ..modeling.registry import Registry
from ..options import option
from .balance_window import BalanceWindowState
from .dynamic import DynamicAllocation
from .hooks import TrainingHook

METHODS = Registry("training method", "--method")  # train's own flag: no settings field stores the method


class TrainingMethod:
    """The interface the recipe drives; subclasses fill in what differs."""

    name: str = ""
    quantization_4bit: bool = False
    # the ExpertConfig fields (flags of ``train``) the method reads; ``train`` refuses a flag the method ignores
    config_fields: Tuple[str, ...] = ()

    @classmethod
    def from_expert_config(cls, config: ExpertConfig) -> "TrainingMethod":
        """The method as the ``train`` command builds it: every flag lives in ExpertConfig."""
        raise NotImplementedError

    @classmethod
    def from_adapter(cls, start: "AdapterStart", training: Optional[dict] = None) -> "TrainingMethod":
        """The method that continues the adapter in ``start.init_adapter``, whose settings it keeps except where
        ``training`` (ExpertConfig fields) says how to train it."""
        raise ConfigError(f"--method {cls.name} cannot start from an adapter; drop --init-adapter.")

    def check(self) -> None:
        """Fail before any model is loaded when the settings cannot work."""

    def reads(self) -> List[str]:
        """Folders the method reads (an adapter it starts from): the run's output folder must stay out of them."""
        return []

    def add_to(self, model):
        """Add the trainable parameters to ``model`` (base frozen); return the model to train."""
        raise NotImplementedError

    def describe(self, model) -> str:
        raise NotImplementedError

    def parameter_groups(self, model, learning_rate: float) -> Optional[List[dict]]:
        """AdamW parameter groups for ``model`` built by ``add_to``, or None: one group at ``learning_rate``."""
        return None

    def save(self, model, folder: Path) -> None:
        """Write the trained tensors (and the config that rebuilds them) to ``folder``."""
        raise NotImplementedError

    def load(self, model, folder: Path) -> None:
        """Load the trained tensors of ``folder`` into ``model`` built by ``add_to`` (resume)."""
        raise NotImplementedError

    def extra_loss(self, model) -> Tuple[object, Dict[str, torch.Tensor]]:
        """(term added to the LM loss, values to log), read after each forward pass; nothing by default."""
        return 0.0, {}

    def settings(self) -> dict:
        raise NotImplementedError

    def hooks(self, seed: int) -> List[TrainingHook]:
        """What acts between steps (``training/hooks.py``); none by default."""
        return []

    def after_training(self, model, eval_windows: torch.Tensor, output_dir: Path, steps: int,
                       progress: bool = True, domains: Optional[torch.Tensor] = None,
                       domain_names: Optional[List[str]] = None) -> None:
        """Write method-specific measurements beside the adapter (``domains`` labels each window)."""


TRAIN_ONLY = {"router": ("router.",)}  # --train-only PART: the adapter parameters (by name prefix) that still train


@dataclass
class AdapterStart:
    """Where an MoE run starts: fresh adapters (the default), or an adapter already trained, whole or in part."""
    init_adapter: Optional[str] = option(None, "start from this adapter folder (an MoE adapter, e.g. a mix; with "
                                               "--method lora, a LoRA): its settings replace the expert flags")
    train_only: Optional[str] = option(None, "with --init-adapter: train only this part, the rest frozen as it is "
                                             "(router: calibrate a mix's routing)", choices=list(TRAIN_ONLY))

    def check(self) -> None:
        if self.train_only is not None and self.init_adapter is None:
            raise ConfigError(f"--train-only {self.train_only} trains part of an adapter already trained: give it "
                              f"with --init-adapter DIR (fresh experts output zero, so training their router alone "
                              f"does nothing).")


@METHODS.register("moe")
class MoEMethod(TrainingMethod):
    name = "moe"
    config_fields = tuple(f.name for f in dataclasses.fields(ExpertConfig))  # every one

    def __init__(self, config: Optional[ExpertConfig] = None, start: Optional[AdapterStart] = None):
        self.config = config or ExpertConfig()
        self.start = start or AdapterStart()
        self.quantization_4bit = self.config.quantization_4bit

    @classmethod
    def from_expert_config(cls, config: ExpertConfig) -> "MoEMethod":
        return cls(config)

    @classmethod
    def from_adapter(cls, start: AdapterStart, training: Optional[dict] = None) -> "MoEMethod":
        """The method that continues the adapter in ``start.init_adapter``, with the settings it records and
        ``training``, the ExpertConfig fields that say how to train it (gradient checkpointing, loss weights, ...)."""
        start.check()
        if peft_lora.holds_lora(start.init_adapter):
            raise ConfigError(f"{start.init_adapter} holds a PEFT LoRA; continue it with --method lora.")
        config = saved_expert_config(read_adapter_config(start.init_adapter), start.init_adapter)
        if start.train_only is not None and grows_in_training(config.expert_allocation):
            raise ConfigError(f"--train-only {start.train_only} keeps the experts as they are, but "
                              f"{start.init_adapter} grows its experts in training (--expert-allocation "
                              f"{config.expert_allocation}); train it whole, without --train-only.")
        return cls(dataclasses.replace(config, **(training or {})), start)

    def check(self) -> None:
        check_config(self.config)  # strategy names, before the base loads; types and ranges: ExpertConfig

    def reads(self) -> List[str]:
        return [self.start.init_adapter] if self.start.init_adapter is not None else []

    def add_to(self, model):
        """Fresh adapters, or (``--init-adapter``) the given adapter's, of which ``--train-only`` keeps only that
        part trainable."""
        augment_model(model, self.config)
        if self.start.init_adapter is not None:
            load_adapter_weights(model, self.start.init_adapter)
        if self.start.train_only is not None:
            trained = TRAIN_ONLY[self.start.train_only]
            for _, adapter in adapters(model):
                for name, p in adapter.named_parameters():
                    if not name.startswith(trained):
                        p.requires_grad_(False)
        return model

    def describe(self, model) -> str:
        return parameter_report(model)

    def parameter_groups(self, model, learning_rate: float) -> Optional[List[dict]]:
        """The routers at ``learning_rate * router_lr_multiplier``, everything else at ``learning_rate``.

        None (one group, as before) when the multiplier is 1, so such runs and their checkpoints are unchanged.
        """
        if self.config.router_lr_multiplier == 1.0:
            return None
        routers = {id(p) for _, adapter in adapters(model) for p in adapter.router.parameters()}
        trainable = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in trainable if id(p) not in routers], "lr": learning_rate},
                  {"params": [p for p in trainable if id(p) in routers],
                   "lr": learning_rate * self.config.router_lr_multiplier}]
        return [group for group in groups if group["params"]]

    def save(self, model, folder: Path) -> None:
        """The adapter, and for a run from a mix the names of its experts (the branches), which training keeps."""
        save_adapter(model, folder)
        if self.start.init_adapter is not None:
            count = max(adapter.router.real_experts for _, adapter in adapters(model))
            names = expert_names(self.start.init_adapter, count)
            if names:
                atomic_write_text(Path(folder) / MIX_REPORT, json.dumps({"experts": names, "trained_from":
                                                                         self.start.init_adapter}, indent=1) + "\n")

    def load(self, model, folder: Path) -> None:
        """Load a checkpoint's tensors; under dynamic allocation its layers may hold other expert counts than
        the model now, so each layer is first given the checkpoint's count (the tensors are then overwritten)."""
        counts = read_adapter_config(folder)["expert_config"]["expert_allocation"]
        if isinstance(counts, list):
            for (_, adapter), count in zip(adapters(model), counts):
                if adapter.num_experts != count:
                    adapter.select_experts([e % adapter.num_experts for e in range(count)])
        load_adapter_weights(model, folder)

    def hooks(self, seed: int) -> List[TrainingHook]:
        """The growth policy of a dynamic allocation (``training/dynamic.py``), if that is the allocation, and the
        routers' balancing windows (``training/balance_window.py``), if there are any."""
        hooks: List[TrainingHook] = []
        if grows_in_training(self.config.expert_allocation):
            hooks.append(DynamicAllocation(self.config, seed))
        if self.config.balance_window > 0:
            hooks.append(BalanceWindowState())
        return hooks

    def extra_loss(self, model):
        return weighted_router_loss(model)

    def settings(self) -> dict:
        return {"expert_config": self.config.to_dict(), **dataclasses.asdict(self.start)}

    def after_training(self, model, eval_windows: torch.Tensor, output_dir: Path, steps: int,
                       progress: bool = True, domains: Optional[torch.Tensor] = None,
                       domain_names: Optional[List[str]] = None) -> None:
        usage = expert_usage_by_domain(model, eval_windows, domains, domain_names, progress=progress)
        atomic_write_text(output_dir / "expert_usage.json", json.dumps(usage, indent=1) + "\n")
        if domain_names and len(domain_names) > 1:
            try:
                save_domain_heatmap(usage, output_dir / "domain_expert_usage.png",
                                    title=f"Domain x expert usage after {steps} steps")
            except ImportError:
                print("matplotlib is not installed: skipped domain_expert_usage.png (pip install matplotlib)")
        try:
            save_usage_heatmap(usage, output_dir / "expert_usage.png", title=f"Expert usage after {steps} steps")
        except ImportError:
            print("matplotlib is not installed: skipped expert_usage.png (pip install matplotlib)")
        events = allocation_events(output_dir / "train_log.jsonl")
        if events:
            try:
                save_allocation_plot(events, output_dir / "allocation.png")
            except ImportError:
                print("matplotlib is not installed: skipped allocation.png (pip install matplotlib)")


def allocation_events(log: Path) -> List[dict]:
    """The ``allocation`` events of a training log (dynamic allocation), by step; [] when there are none. The log
    is appended to across resumes, so a step logged twice (redone after a resume) keeps its last record."""
    if not log.is_file():
        return []
    events = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    by_step = {e["step"]: e for e in events if e.get("event") == "allocation"}
    return [by_step[step] for step in sorted(by_step)]


@METHODS.register("lora")
class LoRAMethod(TrainingMethod):
    """PEFT LoRA on the MLP projections: fresh, or (``--init-adapter``) a LoRA already trained, trained further (a
    LoRA trained domain after domain, the forgetting baseline of docs/design.md section 8)."""

    name = "lora"
    config_fields = ("lora_r", "lora_alpha", "lora_dropout", "quantization_4bit", "use_gradient_checkpointing")

    def __init__(self, rank: int = 8, alpha: Optional[float] = None, dropout: float = 0.05,
                 quantization_4bit: bool = False, gradient_checkpointing: bool = False,
                 start: Optional[AdapterStart] = None):
        self.rank, self.alpha, self.dropout = rank, alpha or 2 * rank, dropout
        self.quantization_4bit, self.gradient_checkpointing = quantization_4bit, gradient_checkpointing
        self.start = start or AdapterStart()

    @classmethod
    def from_expert_config(cls, config: ExpertConfig) -> "LoRAMethod":
        return cls(config.lora_r, config.lora_alpha, config.lora_dropout, config.quantization_4bit,
                   config.use_gradient_checkpointing)

    @classmethod
    def from_adapter(cls, start: AdapterStart, training: Optional[dict] = None) -> "LoRAMethod":
        start.check()
        if start.train_only is not None:
            raise ConfigError(f"--train-only {start.train_only} names a part of an MoE adapter; a LoRA trains whole: "
                              f"drop --train-only.")
        saved, training = peft_lora.read_lora_config(start.init_adapter), training or {}
        return cls(saved.r, saved.lora_alpha, training.get("lora_dropout", saved.lora_dropout),
                   training.get("quantization_4bit", False), training.get("use_gradient_checkpointing", False), start)

    def reads(self) -> List[str]:
        return [self.start.init_adapter] if self.start.init_adapter is not None else []

    def add_to(self, model):
        if self.gradient_checkpointing:  # as the MoE adapters do (integration.surgery.augment_model)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.start.init_adapter is not None:
            return peft_lora.continue_lora(model, self.start.init_adapter, self.dropout)
        return peft_lora.add_lora(model, self.rank, self.alpha, self.dropout)

    def describe(self, model) -> str:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        return (f"LoRA r={self.rank} on {', '.join(peft_lora.LORA_TARGETS)}: {trainable:,} trainable of {total:,} "
                f"({100 * trainable / total:.4f}%)")

    def save(self, model, folder: Path) -> None:
        peft_lora.save_lora(model, folder)

    def load(self, model, folder: Path) -> None:
        peft_lora.load_lora_weights(model, folder)

    def settings(self) -> dict:
        return {"lora": {"r": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                         "targets": list(peft_lora.LORA_TARGETS)}, **dataclasses.asdict(self.start)}
