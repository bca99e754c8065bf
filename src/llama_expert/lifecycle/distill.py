"""``distill``: train a dense PEFT LoRA to reproduce an MoE-augmented model, so that it can be merged.

Teacher: the frozen base with the MoE adapters. Student: the same base with a plain LoRA of rank ``r`` on the
MLP projections (where the MoE adapters act). Loss: the KL divergence from the teacher's next-token
distribution to the student's, ``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))`` per token (Hinton et al.),
averaged over tokens, on calibration text; no labels are needed. The LoRA is written in PEFT's format, so
``export --merge`` folds it into the base and any engine serves the result at the base's speed.

By default the rank is the largest whose LoRA is not larger than the MoE adapters (``--rank`` sets it).
Distillation runs are short and are not resumable: an interrupted run writes nothing and starts over.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import ConfigError, LlamaExpertError
from ..integration.adapter_files import adapter_kind, load_augmented_model, recorded_base
from ..integration.base_models import check_within_context, load_base_model, load_tokenizer, parse_dtype
from ..integration.surgery import adapter_parameters
from ..options import option
from .arguments import AdapterCommandArguments
from ..progress import progress_bar
from ..integration.peft_lora import add_lora, lora_parameters_per_rank, save_lora
from ..training.schedule import cosine_with_warmup
from .calibration import calibration_windows
from .output import check_output, locked_output, write_outputs


@dataclass
class DistillArguments(AdapterCommandArguments):
    adapter: Optional[str] = option(None, "the MoE adapter folder to distil (the teacher)")
    output_dir: Optional[str] = option(None, "folder for the distilled LoRA (PEFT format)")
    rank: Optional[int] = option(None, "LoRA rank of the student (default: the largest not above the MoE size)")
    calibration: str = option("embedded", "calibration text: dataset(s) as `train --dataset` takes them")
    max_tokens: int = option(262144, "calibration tokens per dataset")
    steps: int = option(200, "optimiser steps")
    batch_size: int = option(4, "windows per step")
    seq_len: int = option(512, "window length")
    learning_rate: float = option(2e-3, "peak learning rate (cosine schedule, 5% warm-up)")
    temperature: float = option(1.0, "softmax temperature of both distributions")
    held_out: int = option(4, "calibration windows kept out of training to measure the KL before and after")
    dtype: Optional[str] = option(None, "base weights dtype (float32, bfloat16; default float32)")
    seed: int = option(0, "seed of the window order and the LoRA initialisation")
    progress: bool = option(True, "no progress bars")

    def validate(self) -> None:
        self.require_paths("distill", "the MoE adapter folder to distil", "where to write the distilled LoRA")
        checks = [(self.rank is None or self.rank >= 1, f"--rank must be >= 1, got {self.rank}."),
                  (self.steps >= 1, f"--steps must be >= 1, got {self.steps}."),
                  (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}."),
                  (self.seq_len >= 2, f"--seq-len must be >= 2, got {self.seq_len}."),
                  (self.held_out >= 1, f"--held-out must be >= 1, got {self.held_out}."),
                  (math.isfinite(self.learning_rate) and self.learning_rate > 0,
                   f"--learning-rate must be a finite number > 0, got {self.learning_rate}."),
                  (math.isfinite(self.temperature) and self.temperature > 0,
                   f"--temperature must be a finite number > 0, got {self.temperature}.")]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(p_teacher || p_student)`` per token, averaged over tokens (float32)."""
    vocab = student_logits.shape[-1]
    student = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature ** 2


@torch.no_grad()
def mean_kl(student, teacher, windows: torch.Tensor, temperature: float) -> float:
    values = [float(distillation_loss(student(input_ids=w.unsqueeze(0)).logits,
                                      teacher(input_ids=w.unsqueeze(0)).logits, temperature)) for w in windows]
    return sum(values) / len(values)


class DistillationFailed(LlamaExpertError):
    """The student ended further from the teacher than it started: worse than no distillation."""


def run_distill(args: DistillArguments) -> Path:
    """The ``distill`` command: check the output, train the student, write the LoRA and ``distill_summary.json``
    only when the student got closer to the teacher on the held-out windows."""
    args.validate()
    output = Path(args.output_dir)
    if adapter_kind(Path(args.adapter)) != "moe":
        raise ConfigError(f"{args.adapter} holds a dense LoRA already: export it directly (llama-expert export "
                          f"--adapter {args.adapter} --merge --output-dir DIR).")
    base = args.model or recorded_base(args.adapter)
    check_output(output, "distill", args.overwrite, args.inputs(base))
    with locked_output(output, "distill"):
        student, s = distilled_student(args, base)
        before, after = s["held_out_kl_before"], s["held_out_kl_after"]
        if not after < before:  # the student starts as the base (LoRA B = 0): it ended worse than the base
            raise DistillationFailed(
                f"distillation left the student further from {args.adapter} on the {args.held_out} held-out windows "
                f"(KL {before:.4f} -> {after:.4f}; training loss {s['loss_first']:.4f} -> {s['loss_last']:.4f}), so "
                f"nothing was written to {output}; lower --learning-rate (now {args.learning_rate:g}) or raise "
                f"--steps, and rerun.")
        write_outputs(output, "distill_summary.json", s, lambda staging: save_lora(student, staging))
    print(f"distilled {args.adapter} ({s['teacher_parameters']:,} parameters) into a rank-{s['rank']} LoRA "
          f"({s['student_parameters']:,}); held-out KL {before:.4f} -> {after:.4f}; wrote {output}")
    return output


def distilled_student(args: DistillArguments, base: Optional[str]):
    """(the student LoRA model trained on the teacher's distributions, the summary of the run)."""
    dtype = parse_dtype(args.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # as `train`: the GPU when there is one
    teacher, _ = load_augmented_model(base, adapter_path=args.adapter, use_auth_token=args.auth_token, dtype=dtype,
                                      device=device)
    moe_size = sum(p.numel() for p in adapter_parameters(teacher) if p.requires_grad)  # trainable, as reported
    teacher.eval().requires_grad_(False)
    check_within_context(teacher.config, args.seq_len, "--seq-len")
    torch.manual_seed(args.seed)
    student_base = load_base_model(base, auth_token=args.auth_token, dtype=dtype, device=device)
    rank = args.rank or max(1, moe_size // lora_parameters_per_rank(student_base))
    student = add_lora(student_base, rank, dropout=0.0).to(device)
    windows = calibration_windows(load_tokenizer(base, auth_token=args.auth_token), args.calibration, args.seq_len,
                                  args.max_tokens, args.progress)
    if windows.shape[0] <= args.held_out:
        raise ConfigError(f"the calibration text gives {windows.shape[0]} windows of {args.seq_len} tokens, not "
                          f"more than --held-out {args.held_out}; give more text or lower --seq-len.")
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(windows.shape[0], generator=generator)
    held_out, train = windows[order[:args.held_out]].to(device), windows[order[args.held_out:]].to(device)
    kl_before = mean_kl(student.eval(), teacher, held_out, args.temperature)
    started = time.perf_counter()
    losses = train_student(student, teacher, train, args, generator, device, dtype)
    summary = {"adapter": str(args.adapter), "base_model": base, "rank": rank,
               "student_parameters": sum(p.numel() for p in student.parameters() if p.requires_grad),
               "teacher_parameters": moe_size, "held_out_kl_before": kl_before,
               "held_out_kl_after": mean_kl(student.eval(), teacher, held_out, args.temperature),
               "loss_first": losses[0], "loss_last": losses[-1], "seconds": time.perf_counter() - started,
               "settings": {k: v for k, v in asdict(args).items() if k != "auth_token"}}
    return student, summary


def train_student(student, teacher, train: torch.Tensor, args: DistillArguments, generator, device, dtype):
    """``args.steps`` AdamW steps on the distillation loss over random batches of ``train``; the losses."""
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(args.steps,
                                                                               max(1, round(0.05 * args.steps))))
    student.train()
    losses = []
    autocast = dict(device_type=device, dtype=dtype, enabled=dtype in (torch.bfloat16, torch.float16))
    with progress_bar(args.steps, "distilling", "step", args.progress) as bar, torch.enable_grad():
        for _ in range(args.steps):
            rows = torch.randint(0, train.shape[0], (args.batch_size,), generator=generator).to(device)
            batch = train[rows]
            with torch.autocast(**autocast):
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=batch).logits
                loss = distillation_loss(student(input_ids=batch).logits, teacher_logits, args.temperature)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            bar.update(1)
    student.eval()
    return losses
