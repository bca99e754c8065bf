"""The trainer: one training run as named steps, driven by Hugging Face Accelerate.

    setup       plan the schedule, build the optimiser, shard or wrap the model, resume a checkpoint
    step        one optimiser step over the micro-batches of a global batch, with the NaN/inf guard
    evaluate    validation perplexity, every rank measuring its share of the windows
    checkpoint  the trained tensors and the training state, written whole or not at all
    stop        Ctrl-C / SIGTERM or ``--stop-after-steps`` end the run after a step, with a checkpoint

``train`` runs them in order. What is trained, how it is saved and any loss it adds come from the training
method (``training/methods.py``), passed as an object; what acts between steps comes from the method's hooks
(``training/hooks.py``). The trainer trains whatever parameters require grad, so the PEFT LoRA baseline runs
through the very same steps as the MoE adapters. ``accelerate launch`` gives DDP (or FSDP2) with no launcher of
our own. Data order is a pure function of (seed, epoch) (``training/schedule.py``), so a checkpoint that stores
the step, the optimiser, the schedule and every rank's RNG resumes exactly.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..errors import ConfigError, LlamaExpertError
from ..files import remove_stale_staging
from ..integration.surgery import domain_labels
from ..metrics.memory import peak_memory
from ..metrics.perplexity import evaluate_perplexity
from ..progress import progress_bar
from .accelerator import autocast_dtype, make_accelerator
from .arguments import TrainingArguments
from .checkpoints import STAGING_PREFIXES, rng_state, save_training_state, set_rng_state, write_checkpoint
from .compilation import compile_for_training
from .loggers import TrainingLoggers
from .optimizer import build_optimizer, rebuild_optimizer
from .resume import check_optimizer_fits, load_latest
from .schedule import Schedule
from .sharding import average_gradients, fsdp_requested, shard_frozen_base
from .stopping import StopRequests


class TrainingDiverged(LlamaExpertError):
    """The loss, the gradients or the weights became NaN/inf."""


class TrainingInterrupted(LlamaExpertError):
    """SIGINT or SIGTERM stopped the run after a step; a checkpoint of that step was saved."""

    exit_code = 130


@dataclass
class TrainResult:
    output_dir: str
    steps: int
    tokens: int
    seconds: float
    initial_eval: Optional[Dict[str, float]] = None
    final_eval: Optional[Dict[str, float]] = None
    best_eval: Optional[Dict[str, float]] = None
    history: List[dict] = field(default_factory=list)
    stopped_early: bool = False
    test: Optional[dict] = None  # test perplexity before/after, when a test set was given
    peak_memory: Optional[dict] = None  # {"bytes", "kind"}: CUDA peak allocated, or the process's peak RSS

    def summary(self) -> str:
        lines = [f"trained {self.steps} steps, {self.tokens:,} tokens in {self.seconds:.0f} s "
                 f"({self.tokens / max(self.seconds, 1e-9):,.0f} tokens/s)"]
        if self.initial_eval and self.final_eval:
            a, b = self.initial_eval["perplexity"], self.final_eval["perplexity"]
            lines.append(f"validation perplexity {a:.3f} -> {b:.3f} ({100 * (b - a) / a:+.1f}%) on "
                         f"{self.final_eval['tokens']:,} tokens")
        if self.best_eval:
            lines.append(f"best validation perplexity {self.best_eval['perplexity']:.3f} at step "
                         f"{self.best_eval['step']}")
        lines.append(f"adapter: {self.output_dir}")
        return "\n".join(lines)


@dataclass
class RunState:
    """Where the run stands: what a checkpoint keeps besides tensors, optimiser and RNG."""
    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0  # seconds of training before this process started (earlier runs of a resumed run)
    history: List[dict] = field(default_factory=list)
    best: Optional[dict] = None
    initial_eval: Optional[dict] = None


def finite(params) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in params)


class Trainer:
    """Train every parameter of ``model`` that requires grad on ``train_blocks`` ([n, seq_len]) with ``method``.

    ``run_config`` holds the settings that made the run (method, model, data); with the training arguments they
    are stored in every checkpoint, and ``--resume`` refuses a checkpoint whose result-changing settings differ.
    ``domains`` / ``eval_domains`` ([n] each, optional) label every block and validation window with its domain:
    each forward pass (and its backward, which gradient checkpointing may recompute) gets its rows' labels through
    ``integration.surgery.domain_labels``, which only a router that routes by the label reads (oracle).
    """

    def __init__(self, model, method, train_blocks: torch.Tensor, eval_windows: Optional[torch.Tensor],
                 args: TrainingArguments, run_config: Optional[dict] = None, accelerator=None,
                 domains: Optional[torch.Tensor] = None, eval_domains: Optional[torch.Tensor] = None):
        args.validate()
        self.model = self.unwrapped = model
        self.method, self.blocks, self.eval_windows, self.args = method, train_blocks, eval_windows, args
        self.domains, self.eval_domains = domains, eval_domains
        self.accelerator = accelerator or make_accelerator(args)
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.main = self.accelerator.is_main_process
        self.device, self.autocast = self.accelerator.device, autocast_dtype(self.accelerator)
        self.run_config = {**(run_config or {}), **asdict(args)}
        self.hooks = list(method.hooks(args.seed))
        self.output_dir = Path(args.output_dir)
        self.last_dir = self.output_dir / "checkpoints" / "last"
        self.best_dir = self.output_dir / "checkpoints" / "best"
        self.state = RunState()
        self.resumed_from: Optional[Path] = None
        self.saved_hook_states: Dict[str, dict] = {}
        self.sharded = False
        self.started: Optional[float] = None  # when this process's training steps began
        self.final_eval: Optional[dict] = None

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Plan the schedule, build the optimiser, shard or wrap the model, then resume a checkpoint if asked."""
        from accelerate.utils import set_seed

        set_seed(self.args.seed)
        self._check_launch()
        self.schedule = Schedule.plan(self.args, self.blocks.shape[0], self.world)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError("the model has no trainable parameters; augment it (or add LoRA) first.")
        compile_for_training(self.unwrapped, self.args.compile)  # in place: parameters and names stay
        self.optimizer, self.scheduler = build_optimizer(
            self.params, self.method.parameter_groups(self.model, self.args.learning_rate), self.args.learning_rate,
            self.args.weight_decay, self.schedule)
        self._wrap()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.args.resume:
            self._resume()
        if self.main:
            remove_stale_staging(self.output_dir / "checkpoints", STAGING_PREFIXES)

    def _check_launch(self) -> None:
        deepspeed = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if deepspeed is not None and getattr(deepspeed, "zero_stage", 0) == 3:
            raise ConfigError("DeepSpeed ZeRO-3 partitions the adapters' parameters, and llama-expert's checkpoints "
                              "are plain tensors: use ZeRO-2, or FSDP2 to shard the base "
                              "(examples/accelerate/fsdp2.yaml).")
        single = [hook.name for hook in self.hooks if hook.single_process]
        if single and self.world > 1:
            raise ConfigError(f"{single[0]} expert allocation runs in a single process; use a fixed allocation with "
                              f"accelerate launch (or train on one process).")

    def _wrap(self) -> None:
        """FSDP2 on the frozen base with the adapters replicated (training/sharding.py says why), else Accelerate's
        DDP wrapper."""
        self.sharded = fsdp_requested(self.accelerator)
        if not self.sharded:
            self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
            return
        from ..integration.surgery import adapter_parameters

        if self.accelerator.mixed_precision == "fp16":  # the optimiser is not Accelerate's: no loss scaler
            raise ConfigError("FSDP sharding trains in bfloat16 or float32: use --mixed-precision bf16 (or no).")
        shard_frozen_base(self.model, replicated=[*self.params, *adapter_parameters(self.model)], device=self.device)

    def _rebuild_optimizer(self, transfers=()) -> None:
        """After a hook replaced trainable parameters: the optimiser moves onto them, in place (optimizer.py)."""
        self.params = [p for p in self.unwrapped.parameters() if p.requires_grad]
        rebuild_optimizer(self.optimizer, self.params,
                          self.method.parameter_groups(self.unwrapped, self.args.learning_rate),
                          self.args.learning_rate, self.args.weight_decay, transfers)

    def _resume(self) -> None:
        folder, saved = load_latest(self.output_dir, self.run_config, self.world,
                                    lambda folder: self.method.load(self.unwrapped, folder), self._say)
        if self.hooks:  # the checkpoint's parameters may differ from the start's (dynamic allocation)
            self._rebuild_optimizer()
            hook_states = saved.get("hooks")
            if hook_states is None and "structure" in saved:  # written before hooks had names
                hook_states = {"dynamic": saved["structure"]}
            self.saved_hook_states = hook_states or {}
        check_optimizer_fits(folder, saved["optimizer"], self.optimizer)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"][self.rank])
        self.state = RunState(saved["step"], saved["tokens"], saved["elapsed"], saved["history"], saved["best"],
                              saved["initial_eval"])
        self.resumed_from = folder
        self._say(f"resumed from {folder} at step {self.state.step}")

    def _say(self, text: str) -> None:
        if self.main:
            print(text)

    # ------------------------------------------------------------------------------------------------- step
    def step(self) -> dict:
        """One optimiser step over ``--gradient-accumulation`` micro-batches; returns its log record."""
        args, step = self.args, self.state.step
        started = time.perf_counter()
        terms: Dict[str, float] = {}
        for micro in range(args.gradient_accumulation_steps):
            last_micro = micro == args.gradient_accumulation_steps - 1
            rows = self.schedule.rows(step, micro, self.rank)
            batch = self.blocks[rows].to(self.device)
            with (nullcontext() if last_micro else self.accelerator.no_sync(self.model)), \
                    domain_labels(self.unwrapped, self.domains[rows] if self.domains is not None else None):
                for name, value in self._forward_backward(batch, step).items():
                    terms[name] = terms.get(name, 0.0) + value / args.gradient_accumulation_steps
        grad_norm = self._clip_gradients(step)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step = step = step + 1
        tokens = args.batch_size * args.seq_len * args.gradient_accumulation_steps * self.world
        self.state.tokens += tokens
        for hook in self.hooks:
            event = hook.after_step(self.unwrapped, step)
            if event is not None:
                if "transfers" in event:
                    self._rebuild_optimizer(event.pop("transfers"))
                self.loggers.log(event)
        return {"step": step, **terms, "lr": self.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                "tokens": self.state.tokens, "tokens_per_s": tokens / (time.perf_counter() - started)}

    def _forward_backward(self, batch: torch.Tensor, step: int) -> Dict[str, float]:
        with self.accelerator.autocast():
            lm_loss = self.model(input_ids=batch, labels=batch).loss
            added, extra = self.method.extra_loss(self.unwrapped)
            loss = lm_loss + added
        if not self._finite_everywhere(loss):
            shown = loss.item() if self.world == 1 else "NaN/inf"
            raise TrainingDiverged(f"the loss became {shown} at step {step + 1}; training stopped. "
                                   f"{self._good_checkpoint()} Lower --learning-rate, or use --mixed-precision no.")
        self.accelerator.backward(loss / self.args.gradient_accumulation_steps)
        return {name: value.item() if torch.is_tensor(value) else float(value)
                for name, value in {"lm_loss": lm_loss, "loss": loss, **extra}.items()}

    def _finite_everywhere(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every rank: all ranks must stop together (backward is collective)."""
        ok = torch.isfinite(loss.detach()).float().reshape(1)
        if self.world == 1:
            return bool(ok.item())
        return bool(self.accelerator.reduce(ok, reduction="sum").item() == self.world)

    def _clip_gradients(self, step: int) -> torch.Tensor:
        if self.sharded:
            average_gradients(self.params)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.args.max_grad_norm)
        else:
            grad_norm = self.accelerator.clip_grad_norm_(self.params, self.args.max_grad_norm)
        if grad_norm is None:  # DeepSpeed clips inside its own step and returns no norm
            return torch.tensor(float("nan"))
        if self.accelerator.mixed_precision != "fp16" and not torch.isfinite(grad_norm):
            raise TrainingDiverged(f"the gradients became {grad_norm.item()} at step {step + 1}; training stopped. "
                                   f"{self._good_checkpoint()} Lower --learning-rate.")
        return grad_norm

    # --------------------------------------------------------------------------------------------- evaluate
    def evaluate(self) -> Optional[dict]:
        """Validation perplexity at the current step (None without validation windows). Hooks pause meanwhile:
        validation text must not vote on, say, the expert allocation."""
        if self.eval_windows is None:
            return None
        for hook in self.hooks:
            hook.pause(self.unwrapped)
        try:
            return self._measure()
        finally:
            for hook in self.hooks:
                hook.resume(self.unwrapped)

    def _measure(self) -> dict:
        # Sharded, every rank runs every window: each forward pass is collective (all-gathers of the base).
        share = slice(None) if self.sharded else slice(self.rank, None, self.world)
        mine = self.eval_windows[share]
        labels = self.eval_domains[share] if self.eval_domains is not None else None
        result = evaluate_perplexity(self.unwrapped, mine, autocast_dtype=self.autocast,
                                     progress=self.args.progress and self.main, domains=labels) if len(mine) else \
            {"nll": 0.0, "tokens": 0}
        totals = torch.tensor([result["nll"] * result["tokens"], float(result["tokens"])], device=self.device,
                              dtype=torch.float64)
        if not self.sharded:
            totals = self.accelerator.reduce(totals, reduction="sum")
        nll = (totals[0] / totals[1]).item()
        return {"step": self.state.step, "perplexity": math.exp(nll), "nll": nll, "tokens": int(totals[1].item())}

    def _consider_best(self, result: Optional[dict]) -> None:
        """A finite validation better than the best so far makes this step's weights ``best``."""
        best = self.state.best
        if result and math.isfinite(result["perplexity"]) and (best is None or result["perplexity"] < best["perplexity"]):
            self.state.best = result
            self.checkpoint(self.best_dir)

    def _log_eval(self, result: dict) -> None:
        self.loggers.log({"event": "eval", "step": result["step"],
                          **{f"eval_{k}": v for k, v in result.items() if k != "step"}})

    # ------------------------------------------------------------------------------------------- checkpoint
    def checkpoint(self, folder: Path) -> None:
        """Write ``folder`` after checking the weights: a NaN adapter is never called a good checkpoint. Every rank
        stops together if the write fails (the next step is a collective operation)."""
        from accelerate.utils import gather_object

        if not finite(self.params):
            raise TrainingDiverged(f"the weights became NaN/inf at step {self.state.step}; training stopped without "
                                   f"saving them. {self._good_checkpoint()} Lower --learning-rate.")
        rngs = gather_object([rng_state()])  # every rank's RNG, so each resumes its own stream
        failure = None
        if self.main:
            try:
                write_checkpoint(folder, lambda tmp: self._fill_checkpoint(tmp, rngs))
            except OSError as exc:
                failure = f"{exc.strerror or exc} ({exc.filename or folder})"
        if self.world > 1:
            failed = self.accelerator.reduce(torch.tensor([float(failure is not None)], device=self.device),
                                             reduction="sum")
            failure = failure or ("on the main process" if failed.item() > 0 else None)
        if failure:
            raise LlamaExpertError(f"cannot write the checkpoint {folder}: {failure}. Free disk space or fix the "
                                   f"folder's permissions, then rerun with --resume.")

    def _fill_checkpoint(self, folder: Path, rngs: list) -> None:
        self.method.save(self.unwrapped, folder)
        state = self.state
        save_training_state(folder, {
            "step": state.step, "tokens": state.tokens, "elapsed": self._elapsed(), "history": state.history,
            "best": state.best, "initial_eval": state.initial_eval, "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "rng": rngs, "world_size": self.world,
            "run_config": self.run_config, "hooks": {hook.name: hook.state(self.unwrapped) for hook in self.hooks}})

    def _good_checkpoint(self) -> str:
        for folder in (self.last_dir, self.best_dir):
            if folder.is_dir():
                return f"The last good checkpoint is in {folder}."
        return "No checkpoint was written before that."

    def _elapsed(self) -> float:
        """Seconds of training so far, earlier processes of a resumed run included (the first validation is not
        training)."""
        return self.state.elapsed + (time.perf_counter() - self.started if self.started is not None else 0.0)

    # ------------------------------------------------------------------------------------------------- stop
    def stop(self, requests: StopRequests, saved: bool, end_step: int) -> None:
        """After a step: a signal ends the run here, with a checkpoint of this step (a stop in the last step just
        ends the run)."""
        step = self.state.step
        if step >= end_step or not requests.requested():
            return
        if not saved:
            self.checkpoint(self.last_dir)
        self.loggers.log({"event": "interrupted", "step": step, "signal": requests.signal_name})
        raise TrainingInterrupted(f"{requests.signal_name} stopped training after step {step} of "
                                  f"{self.schedule.total_steps}; a checkpoint of that step is in {self.last_dir}. Add "
                                  f"--resume to the same command to continue exactly where it stopped.")

    # ------------------------------------------------------------------------------------------------ train
    def train(self) -> TrainResult:
        """Setup, then steps (each followed by evaluation, checkpoint and stop when due) until the end."""
        self.setup()
        self.loggers = TrainingLoggers(self.args, self.main, self.run_config)
        self.loggers.log({"event": "resume", "step": self.state.step, "checkpoint": str(self.resumed_from)}
                         if self.resumed_from else {"event": "start", "step": 0, "resume": bool(self.args.resume)})
        if self.state.initial_eval is None:
            self._first_evaluation()
        self.started = time.perf_counter()
        total = self.schedule.total_steps
        stop_after = self.args.stop_after_steps
        end_step = total if stop_after is None else min(total, self.state.step + stop_after)
        bar = progress_bar(total=total, initial=self.state.step, desc="training", unit="step",
                           enabled=self.main and self.args.progress, leave=True)
        try:
            self._start_hooks()
            self.model.train()
            with StopRequests(world_size=self.world, reduce=self.accelerator.reduce, device=self.device,
                              announce=self.main) as requests:
                while self.state.step < end_step:
                    record = self.step()
                    self._report(record, bar, end_step)
                    self._evaluate_when_due(bar)
                    saved = self._checkpoint_when_due(end_step)
                    self.stop(requests, saved, end_step)
            self._final_evaluation()  # before the hooks finish: evaluation resumes them when it ends
        finally:
            bar.close()
            self.loggers.close()
            for hook in self.hooks:
                hook.finish(self.unwrapped)
        return self._finish()

    def _first_evaluation(self) -> None:
        """Validation before training; the untrained adapter is a ``best`` candidate (training can make it worse)."""
        self.state.initial_eval = self.evaluate()
        if self.state.initial_eval:
            self._log_eval(self.state.initial_eval)
        self._consider_best(self.state.initial_eval)

    def _start_hooks(self) -> None:
        for hook in self.hooks:
            events = hook.start(self.unwrapped, self.state.step, self.saved_hook_states.get(hook.name))
            for event in events if self.main else []:
                self.loggers.log(event)

    def _report(self, record: dict, bar, end_step: int) -> None:
        if record["step"] % self.args.log_every == 0 or record["step"] == end_step:
            self.loggers.log(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", aux=f"{record.get('aux_loss', 0):.3f}",
                        z=f"{record.get('z_loss', 0):.2f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        bar.update(1)

    def _evaluate_when_due(self, bar) -> None:
        step, every = self.state.step, self.args.eval_every
        if not every or (step % every and step != self.schedule.total_steps):
            return
        result = self.evaluate()
        if result:
            self.state.history.append(result)
            self._log_eval(result)
            if self.main:
                bar.write(f"step {step}: validation perplexity {result['perplexity']:.3f}")
            self._consider_best(result)
        self.final_eval = result

    def _checkpoint_when_due(self, end_step: int) -> bool:
        step = self.state.step
        every = self.args.save_every or self.args.eval_every or self.schedule.total_steps
        due = step % every == 0 or step == end_step
        if due:
            self.checkpoint(self.last_dir)
        return due

    def _final_evaluation(self) -> None:
        """The last validation, if the run reached its end and none ran at this step."""
        final, step = self.final_eval, self.state.step
        if (final is None or final["step"] != step) and step == self.schedule.total_steps:
            self.final_eval = self.evaluate()
            self._consider_best(self.final_eval)

    def _finish(self) -> TrainResult:
        """The adapter and the result."""
        step, total, final = self.state.step, self.schedule.total_steps, self.final_eval
        self.accelerator.wait_for_everyone()
        if not finite(self.params):
            raise TrainingDiverged(f"the weights became NaN/inf; the adapter was not saved. {self._good_checkpoint()} "
                                   f"Lower --learning-rate.")
        if self.main:
            self.method.save(self.unwrapped, self.output_dir)
        return TrainResult(output_dir=str(self.output_dir), steps=step, tokens=self.state.tokens,
                           seconds=self._elapsed(), initial_eval=self.state.initial_eval, final_eval=final,
                           best_eval=self.state.best, history=self.state.history, stopped_early=step < total,
                           peak_memory=peak_memory(self.device))


def train_model(model, method, train_blocks: torch.Tensor, eval_windows: Optional[torch.Tensor],
                args: TrainingArguments, run_config: Optional[dict] = None, accelerator=None,
                domains: Optional[torch.Tensor] = None, eval_domains: Optional[torch.Tensor] = None) -> TrainResult:
    """``Trainer(...).train()``: train ``model`` with ``method`` (a ``training.methods.TrainingMethod``)."""
    return Trainer(model, method, train_blocks, eval_windows, args, run_config, accelerator, domains,
                   eval_domains).train()
