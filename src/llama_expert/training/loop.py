"""The training loop: trains whatever requires grad in a model, resumably, through Accelerate.

``train_model`` is a plain loop over pre-packed token blocks, driven by Hugging Face Accelerate so that
``accelerate launch`` gives DDP (or FSDP) with no launcher of our own. It trains whatever parameters
require grad, so the PEFT LoRA baseline of ``compare`` runs through the very same loop.

Data order is a pure function of (seed, epoch): step ``s`` always sees the same blocks, which is what
makes resuming exact: a checkpoint stores the step, the optimizer, scheduler and every rank's RNG.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..errors import ConfigError, LlamaExpertError
from ..progress import progress_bar
from ..evaluation.memory import peak_memory
from ..evaluation.perplexity import evaluate_perplexity
from .arguments import TrainingArguments
from .checkpoints import (CheckpointError, checkpoint_candidates, load_training_state, remove_stale_staging,
                          require_checkpoint, rng_state, save_training_state, set_rng_state, write_checkpoint)
from .loggers import TrainingLoggers
from .stopping import StopRequests
from .sharding import average_gradients, fsdp_requested, shard_frozen_base

# Settings that change neither the trained weights nor the data order: a resumed run may change them.
RESUMABLE_CHANGES = frozenset({"output_dir", "resume", "overwrite", "stop_after_steps", "progress", "use_wandb",
                               "use_tensorboard", "wandb_project", "log_every", "save_every", "eval_every",
                               "eval_dataset", "eval_max_tokens", "test_dataset", "test_max_tokens", "test_seq_len",
                               "use_gradient_checkpointing"})


class TrainingDiverged(LlamaExpertError):
    """The loss, the gradients or the weights became NaN/inf."""


class TrainingInterrupted(LlamaExpertError):
    """SIGINT or SIGTERM stopped the run after a step; a checkpoint of that step was saved."""

    exit_code = 130


def _flat_settings(config: dict, prefix: str = "") -> Dict[str, object]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat_settings(value, f"{prefix}{key}."))
        elif key not in RESUMABLE_CHANGES:
            flat[f"{prefix}{key}"] = value
    return flat


def settings_changes(saved: dict, current: dict) -> List[str]:
    """``key: checkpoint X, now Y`` for every setting that changes the result and differs."""
    before, now = _flat_settings(saved), _flat_settings(current)
    # A setting the checkpoint does not record is newer than it: its default reproduces the old behaviour.
    return [f"{key.split('.')[-1]}: checkpoint {before.get(key)!r}, now {now.get(key)!r}"
            for key in sorted(set(before) | set(now)) if key in before and before.get(key) != now.get(key)]


def _finite(params) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in params)


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


def resolve_mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def make_accelerator(args: TrainingArguments):
    """Accelerate for this loop. Buffers are not broadcast: each rank keeps its own routing statistics."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    return Accelerator(mixed_precision=resolve_mixed_precision(args.mixed_precision),
                       kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])


def autocast_dtype(accelerator) -> Optional[torch.dtype]:
    """The dtype Accelerate's mixed precision autocasts to (None: no autocast), for evaluation passes."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)


def cosine_with_warmup(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def block_rows(step: int, micro: int, accumulation: int, batch_size: int, rank: int, world: int,
               num_blocks: int, seed: int) -> torch.Tensor:
    """Indices of the training blocks for (step, micro-batch, rank): a pure function, hence resumable."""
    per_epoch = num_blocks // (batch_size * world)
    global_micro = step * accumulation + micro
    epoch, within = divmod(global_micro, per_epoch)
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed + epoch))
    start = (within * world + rank) * batch_size
    return order[start:start + batch_size]


def train_model(model, train_blocks: torch.Tensor, eval_windows: Optional[torch.Tensor], args: TrainingArguments,
                save_model: Callable[[object, Path], None], load_model: Callable[[object, Path], None],
                extra_loss: Optional[Callable[[object], Tuple[torch.Tensor, Dict[str, torch.Tensor]]]] = None,
                run_config: Optional[dict] = None, accelerator=None,
                parameter_groups: Optional[List[dict]] = None, structure=None,
                regroup: Optional[Callable[[object], Optional[List[dict]]]] = None) -> TrainResult:
    """Train every parameter of ``model`` that requires grad on ``train_blocks`` ([n, seq_len]).

    ``extra_loss(model)`` returns a term to add to the LM loss and named values to log (the router
    losses, read after each forward pass); ``save_model`` and ``load_model`` write and read the trained
    tensors of a checkpoint folder. ``run_config`` holds the settings that made the run (method, model,
    data); with the training arguments they are stored in every checkpoint, and ``--resume`` refuses a
    checkpoint whose result-changing settings differ. SIGINT/SIGTERM stop the run after the current step
    with a checkpoint of it. ``parameter_groups`` (AdamW groups, e.g. ``TrainingMethod.parameter_groups``: the
    routers at a multiple of the learning rate) must hold every trainable parameter exactly once; without
    them every trainable parameter is in one group at ``args.learning_rate``. The schedule scales every
    group's own learning rate.

    ``structure`` (``training.dynamic.DynamicAllocation``) may change the trainable parameters after a step
    (``after_step`` returns an event with the row ``transfers``); the optimiser is then rebuilt around the new
    parameters (groups from ``regroup(model)``), carrying each row's Adam state and the schedule over, and the
    structure's statistics go into every checkpoint. Single process only.
    """
    from accelerate.utils import gather_object, set_seed

    args.validate()
    accelerator = accelerator or make_accelerator(args)
    set_seed(args.seed)
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    deepspeed = getattr(accelerator.state, "deepspeed_plugin", None)
    if deepspeed is not None and getattr(deepspeed, "zero_stage", 0) == 3:
        raise ConfigError("DeepSpeed ZeRO-3 partitions the adapters' parameters, and llama-expert's checkpoints are "
                          "plain tensors: use ZeRO-2, or FSDP2 to shard the base (examples/accelerate/fsdp2.yaml).")
    output_dir = Path(args.output_dir)
    last_dir, best_dir = output_dir / "checkpoints" / "last", output_dir / "checkpoints" / "best"

    num_blocks = train_blocks.shape[0]
    micro_per_epoch = num_blocks // (args.batch_size * world)
    if micro_per_epoch < args.gradient_accumulation_steps:
        raise ConfigError(f"{num_blocks} training blocks of {args.seq_len} tokens cannot fill one step of "
                          f"{args.batch_size} x {args.gradient_accumulation_steps} x {world} processes; "
                          f"lower --batch-size / --gradient-accumulation or give more data.")
    steps_per_epoch = micro_per_epoch // args.gradient_accumulation_steps
    total_steps = args.max_steps or max(1, math.ceil(args.num_train_epochs * steps_per_epoch))
    warmup_steps = int(args.warmup_ratio * total_steps)

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters; augment it (or add LoRA) first.")
    if parameter_groups is not None:
        grouped = [p for group in parameter_groups for p in group["params"]]
        if len(grouped) != len(params) or {id(p) for p in grouped} != {id(p) for p in params}:
            raise ConfigError("parameter_groups must hold every trainable parameter of the model exactly once.")
    if structure is not None and world > 1:
        raise ConfigError("dynamic expert allocation runs in a single process; use a fixed allocation with "
                          "accelerate launch (or train on one process).")
    optimizer = torch.optim.AdamW(params if parameter_groups is None else parameter_groups, lr=args.learning_rate,
                                  weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total_steps, warmup_steps))
    unwrapped = model
    sharded = fsdp_requested(accelerator)
    if sharded:  # FSDP2 on the frozen base, the adapters replicated (training/sharding.py says why)
        from ..integration.surgery import adapter_parameters

        if accelerator.mixed_precision == "fp16":  # the optimiser is not Accelerate's: no loss scaler to unscale
            raise ConfigError("FSDP sharding trains in bfloat16 or float32: use --mixed-precision bf16 (or no).")

        shard_frozen_base(model, replicated=[*params, *adapter_parameters(model)], device=accelerator.device)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)

    def rebuild_optimizer(transfers=()) -> None:
        """A new optimiser for the model's current trainable parameters: unchanged ones keep their state,
        re-shaped ones take their rows of the old state (``transfers``: (old, new, rows), possibly chained)."""
        nonlocal params, optimizer, scheduler
        old = getattr(optimizer, "optimizer", optimizer)  # Accelerate wraps it
        origin = {}  # id(new parameter) -> (parameter in the old optimiser, its rows)
        for before, after, rows in transfers:
            root, base_rows = origin.get(id(before), (before, None))
            origin[id(after)] = (root, rows if base_rows is None else base_rows.index_select(0, rows))
        params = [p for p in unwrapped.parameters() if p.requires_grad]
        groups = regroup(unwrapped) if regroup is not None else None
        fresh = torch.optim.AdamW(params if groups is None else groups, lr=args.learning_rate,
                                  weight_decay=args.weight_decay)
        for group, previous in zip(fresh.param_groups, old.param_groups):  # the schedule's current rates
            group["lr"], group["initial_lr"] = previous["lr"], previous.get("initial_lr", previous["lr"])
        for p in params:
            if p in old.state:
                fresh.state[p] = old.state[p]
            elif id(p) in origin and origin[id(p)][0] in old.state:
                source, rows = origin[id(p)]
                fresh.state[p] = {k: (v.index_select(0, rows.to(v.device)).clone() if torch.is_tensor(v) and v.dim()
                                      else v.clone() if torch.is_tensor(v) else v) for k, v in old.state[source].items()}
        schedule = scheduler.state_dict()
        scheduler = torch.optim.lr_scheduler.LambdaLR(fresh, cosine_with_warmup(total_steps, warmup_steps))
        scheduler.load_state_dict(schedule)
        optimizer = accelerator.prepare(fresh)
    device = accelerator.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    autocast = autocast_dtype(accelerator)

    start_step, tokens_seen, elapsed_before = 0, 0, 0.0
    history: List[dict] = []
    best: Optional[dict] = None
    initial_eval: Optional[dict] = None
    run_config = {**(run_config or {}), **asdict(args)}
    resumed_from, unreadable, resumed_structure = None, [], None
    if args.resume:
        require_checkpoint(output_dir / "checkpoints")
        for found in checkpoint_candidates(output_dir / "checkpoints"):
            try:
                state = load_training_state(found)
            except CheckpointError as exc:
                unreadable.append(str(exc))
                if main:
                    print(f"warning: {exc}; trying an older checkpoint")
                continue
            changes = settings_changes(state["run_config"], run_config)
            if changes:
                raise ConfigError(f"cannot resume from {found}: these settings differ from the checkpoint's: "
                                  f"{'; '.join(changes)}. Rerun with the checkpoint's settings, or train in a new "
                                  f"--output-dir.")
            if state["world_size"] != world:
                raise ConfigError(f"cannot resume from {found}: it ran on {state['world_size']} processes, "
                                  f"this run has {world}. Resume with accelerate launch --num_processes "
                                  f"{state['world_size']}, or train in a new --output-dir.")
            try:
                load_model(unwrapped, found)
            except LlamaExpertError as exc:
                unreadable.append(f"the adapter in {found} cannot be loaded ({exc})")
                if main:
                    print(f"warning: {unreadable[-1]}; trying an older checkpoint")
                continue
            if structure is not None:  # the checkpoint's allocation may differ from the start: new parameters
                rebuild_optimizer()
                resumed_structure = state["structure"]
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"][rank])
            start_step, tokens_seen, elapsed_before = state["step"], state["tokens"], state["elapsed"]
            history, best, initial_eval = state["history"], state["best"], state["initial_eval"]
            resumed_from = found
            if main:
                print(f"resumed from {found} at step {start_step}")
            break
        else:
            why = f" ({'; '.join(unreadable)})" if unreadable else ""
            raise CheckpointError(f"no checkpoint in {output_dir / 'checkpoints'} can be read{why}. Delete that "
                                  f"folder to start again from step 0, or pass a new --output-dir.")
    if main:
        remove_stale_staging(output_dir / "checkpoints")

    def evaluate(step: int) -> Optional[dict]:
        if eval_windows is None:
            return None
        if structure is not None:
            structure.pause(unwrapped)  # validation text does not vote on the allocation
        try:
            return measure(step)
        finally:
            if structure is not None:
                structure.resume(unwrapped)

    def measure(step: int) -> dict:
        # Sharded, every rank runs every window: each forward pass is collective (all-gathers of the base).
        mine = eval_windows if sharded else eval_windows[rank::world]
        result = evaluate_perplexity(unwrapped, mine, autocast_dtype=autocast, progress=args.progress and main) \
            if len(mine) else \
            {"nll": 0.0, "tokens": 0}
        totals = torch.tensor([result["nll"] * result["tokens"], float(result["tokens"])], device=device,
                              dtype=torch.float64)
        if not sharded:
            totals = accelerator.reduce(totals, reduction="sum")
        nll = (totals[0] / totals[1]).item()
        return {"step": step, "perplexity": math.exp(nll), "nll": nll, "tokens": int(totals[1].item())}

    def save_checkpoint(folder: Path, step: int, elapsed: float) -> None:
        """Write ``folder`` after checking the weights: a NaN adapter is never called a good checkpoint."""
        if not _finite(params):
            raise TrainingDiverged(f"the weights became NaN/inf at step {step}; training stopped without saving "
                                   f"them. {good_checkpoint()} Lower --learning-rate.")
        rngs = gather_object([rng_state()])  # every rank's RNG, so each resumes its own stream

        def fill(tmp: Path) -> None:
            save_model(unwrapped, tmp)
            save_training_state(tmp, {
                "step": step, "tokens": tokens_seen, "elapsed": elapsed, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": rngs, "world_size": world, "run_config": run_config,
                "history": history, "best": best, "initial_eval": initial_eval,
                **({"structure": structure.state(unwrapped)} if structure is not None else {})})
        failure = None
        if main:
            try:
                write_checkpoint(folder, fill)
            except OSError as exc:
                failure = f"{exc.strerror or exc} ({exc.filename or folder})"
        if world > 1:  # every rank stops together, or none: the next step is a collective operation
            failed = accelerator.reduce(torch.tensor([float(failure is not None)], device=device), reduction="sum")
            failure = failure or ("on the main process" if failed.item() > 0 else None)
        if failure:
            raise LlamaExpertError(f"cannot write the checkpoint {folder}: {failure}. Free disk space or fix the "
                                   f"folder's permissions, then rerun with --resume.")

    def all_finite(loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every rank: all ranks must stop together (backward is collective)."""
        finite = torch.isfinite(loss.detach()).float().reshape(1)
        return bool(accelerator.reduce(finite, reduction="sum").item() == world) if world > 1 else bool(finite.item())

    def good_checkpoint() -> str:
        for folder in (last_dir, best_dir):
            if folder.is_dir():
                return f"The last good checkpoint is in {folder}."
        return "No checkpoint was written before that."

    def is_better(result: Optional[dict]) -> bool:
        return bool(result) and math.isfinite(result["perplexity"]) and \
            (best is None or result["perplexity"] < best["perplexity"])

    loggers = TrainingLoggers(args, main, run_config)
    loggers.log({"event": "resume", "step": start_step, "checkpoint": str(resumed_from)} if resumed_from
                else {"event": "start", "step": start_step, "resume": bool(args.resume)})
    if initial_eval is None:
        initial_eval = evaluate(0)
        if initial_eval:
            loggers.log({"event": "eval", **{f"eval_{k}": v for k, v in initial_eval.items() if k != "step"},
                         "step": 0})
        if is_better(initial_eval):  # the untrained adapter is a candidate too: training can make things worse
            best = initial_eval
            save_checkpoint(best_dir, 0, 0.0)

    bar = progress_bar(total=total_steps, initial=start_step, desc="training", unit="step",
                       enabled=main and args.progress, leave=True)
    save_every = args.save_every or args.eval_every or total_steps
    end_step = total_steps if args.stop_after_steps is None else min(total_steps, start_step + args.stop_after_steps)
    tokens_per_step = args.batch_size * args.seq_len * args.gradient_accumulation_steps * world
    started = time.perf_counter()
    final_eval = None
    model.train()
    if structure is not None:
        structure.start(unwrapped)
        if resumed_structure is not None:  # the routing statistics since the checkpoint's last change
            structure.load_state(unwrapped, resumed_structure)
        elif start_step == 0 and main:  # where the allocation starts: the first column of allocation.png
            loggers.log(structure.allocation_event(unwrapped, 0))
    step = start_step
    stop = StopRequests(world_size=world, reduce=accelerator.reduce, device=device, announce=main)
    try:
        with stop:
            while step < end_step:
                step_started = time.perf_counter()
                terms: Dict[str, float] = {}
                for micro in range(args.gradient_accumulation_steps):
                    rows = block_rows(step, micro, args.gradient_accumulation_steps, args.batch_size, rank, world,
                                      num_blocks, args.seed)
                    batch = train_blocks[rows].to(device)
                    last_micro = micro == args.gradient_accumulation_steps - 1
                    with (nullcontext() if last_micro else accelerator.no_sync(model)):
                        with accelerator.autocast():
                            lm_loss = model(input_ids=batch, labels=batch).loss
                            added, extra = extra_loss(unwrapped) if extra_loss else (0.0, {})
                            loss = lm_loss + added
                        if not all_finite(loss):
                            raise TrainingDiverged(
                                f"the loss became {loss.item() if world == 1 else 'NaN/inf'} at step {step + 1}; training stopped. "
                                f"{good_checkpoint()} Lower --learning-rate, or use --mixed-precision no.")
                        accelerator.backward(loss / args.gradient_accumulation_steps)
                    for name, value in {"lm_loss": lm_loss, "loss": loss, **extra}.items():
                        terms[name] = terms.get(name, 0.0) + value.item() / args.gradient_accumulation_steps
                if sharded:
                    average_gradients(params)
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                else:
                    grad_norm = accelerator.clip_grad_norm_(params, args.max_grad_norm)
                if grad_norm is None:  # DeepSpeed clips inside its own step and returns no norm
                    grad_norm = torch.tensor(float("nan"))
                elif accelerator.mixed_precision != "fp16" and not torch.isfinite(grad_norm):
                    raise TrainingDiverged(f"the gradients became {grad_norm.item()} at step {step + 1}; training "
                                           f"stopped. {good_checkpoint()} Lower --learning-rate.")
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens_seen += tokens_per_step
                event = structure.after_step(unwrapped, step) if structure is not None else None
                if event is not None:
                    rebuild_optimizer(event.pop("transfers"))
                    loggers.log(event)
                seconds = time.perf_counter() - step_started
                record = {"step": step, **terms, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                          "tokens": tokens_seen, "tokens_per_s": tokens_per_step / seconds}
                if step % args.log_every == 0 or step == end_step:
                    loggers.log(record)
                bar.set_postfix(loss=f"{terms['loss']:.3f}", aux=f"{terms.get('aux_loss', 0):.3f}",
                                z=f"{terms.get('z_loss', 0):.2f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                refresh=False)
                bar.update(1)
                elapsed = elapsed_before + time.perf_counter() - started
                if args.eval_every and (step % args.eval_every == 0 or step == total_steps):
                    final_eval = evaluate(step)
                    if final_eval:
                        history.append(final_eval)
                        loggers.log({"event": "eval", "step": step,
                                     **{f"eval_{k}": v for k, v in final_eval.items() if k != "step"}})
                        if main:
                            bar.write(f"step {step}: validation perplexity {final_eval['perplexity']:.3f}")
                        if is_better(final_eval):
                            best = final_eval
                            save_checkpoint(best_dir, step, elapsed)
                saved = step % save_every == 0 or step == end_step
                if saved:
                    save_checkpoint(last_dir, step, elapsed)
                if step < end_step and stop.requested():  # a stop in the last step just ends the run
                    if not saved:
                        save_checkpoint(last_dir, step, elapsed)
                    loggers.log({"event": "interrupted", "step": step, "signal": stop.signal_name})
                    raise TrainingInterrupted(f"{stop.signal_name} stopped training after step {step} of "
                                              f"{total_steps}; a checkpoint of that step is in {last_dir}. Add --resume "
                                              f"to the same command to continue exactly where it stopped.")
    finally:
        bar.close()
        loggers.close()
        if structure is not None:
            structure.pause(unwrapped)
    if final_eval is None or final_eval["step"] != step:
        final_eval = evaluate(step) if step == total_steps else final_eval
        if final_eval is not None and final_eval["step"] == step and is_better(final_eval):
            best = final_eval
            save_checkpoint(best_dir, step, elapsed_before + time.perf_counter() - started)
    accelerator.wait_for_everyone()
    if not _finite(params):
        raise TrainingDiverged(f"the weights became NaN/inf; the adapter was not saved. {good_checkpoint()} "
                               f"Lower --learning-rate.")
    if main:
        save_model(unwrapped, output_dir)
    return TrainResult(output_dir=str(output_dir), steps=step, tokens=tokens_seen, peak_memory=peak_memory(device),
                       seconds=elapsed_before + time.perf_counter() - started, initial_eval=initial_eval,
                       final_eval=final_eval, best_eval=best, history=history, stopped_early=step < total_steps)
