"""The trainer: exact resume, the NaN guard, crash safety, two-rank DDP and FSDP (the math of one process), W&B
logging, and the routers' learning-rate multiplier."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llama_expert import load_adapter_weights
from llama_expert.training.checkpoints import latest_checkpoint, load_training_state
from llama_expert.integration.surgery import adapter_state_dict
from llama_expert.training.arguments import TrainingArguments
from llama_expert.training.methods import MoEMethod
from llama_expert.training.trainer import TrainingDiverged, train_model

sys.path.insert(0, str(Path(__file__).parent))
from train_worker import tiny_training_setup  # noqa: E402

WORKER = str(Path(__file__).parent / "train_worker.py")


def _args(out, **kw):
    base = dict(output_dir=str(out), batch_size=4, seq_len=16, eval_every=0, save_every=1, learning_rate=1e-2,
                progress=False, mixed_precision="no")
    base.update(kw)
    return TrainingArguments(**base)


def _noisy_setup(**config):
    """Tiny model with dropout and router noise on: resume must restore the RNG to match."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama_expert import ExpertConfig, augment_model

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    augment_model(model, ExpertConfig(lora_dropout=0.1, **config))
    blocks = torch.randint(0, 128, (40, 16), generator=torch.Generator().manual_seed(1))
    return model, blocks


def _train(model, blocks, args, eval_windows=None, method=None):
    """Train an augmented model as the ``moe`` method would (its own ExpertConfig)."""
    return train_model(model, method or MoEMethod(model.expert_config), blocks, eval_windows, args)


# the balancing window (a buffer outside the adapter file) travels in the checkpoint's hook state: with aux_free
# it steers the bias, with noisy top-k the loss's f_i (beside a null expert and the mutual-information loss)
RESUME_CASES = {"default": {}, "aux_free-window": {"balance_window": 6},
                "noisy-window-null-mi": {"router_type": "noisy_top_k", "balance_window": 6, "null_expert": True,
                                         "router_mi_loss_coef": 0.1, "expert_type": "lora_experts"}}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_resume_gives_the_same_weights_as_one_run(tmp_path, case):
    model, blocks = _noisy_setup(**RESUME_CASES[case])
    whole = _train(model, blocks, _args(tmp_path / "whole", max_steps=8, eval_every=4),
                   eval_windows=blocks[:4])
    one_go = {k: v.clone() for k, v in adapter_state_dict(model).items()}

    model, blocks = _noisy_setup(**RESUME_CASES[case])
    first = _train(model, blocks, _args(tmp_path / "split", max_steps=8, eval_every=4, stop_after_steps=4),
                   eval_windows=blocks[:4])
    assert first.steps == 4 and first.stopped_early
    model, blocks = _noisy_setup(**RESUME_CASES[case])  # a fresh process would start from a fresh model
    second = _train(model, blocks, _args(tmp_path / "split", max_steps=8, eval_every=4, resume=True),
                    eval_windows=blocks[:4])
    assert second.steps == 8 and not second.stopped_early
    resumed = adapter_state_dict(model)
    assert one_go.keys() == resumed.keys()
    for key in one_go:
        assert torch.equal(one_go[key], resumed[key]), key
    assert second.final_eval["perplexity"] == whole.final_eval["perplexity"]
    assert json.loads((tmp_path / "split" / "adapter_config.json").read_text())["expert_config"]


def test_resume_refuses_other_settings(tmp_path):
    import re

    from llama_expert import ConfigError

    model, blocks = _noisy_setup()
    _train(model, blocks, _args(tmp_path, max_steps=2))
    found = latest_checkpoint(tmp_path / "checkpoints" / "last")
    before = {p: p.read_bytes() for p in sorted(found.rglob("*")) if p.is_file()}
    model, blocks = _noisy_setup()
    with pytest.raises(ConfigError) as info:
        _train(model, blocks, _args(tmp_path, max_steps=4, batch_size=2, resume=True))
    message = str(info.value)
    assert message.startswith("cannot resume from") and str(found) in message, message
    assert re.search(r"batch_size\D+4\D+2\b", message), message  # names the setting, the old and the new value
    assert latest_checkpoint(tmp_path / "checkpoints" / "last") == found  # the checkpoint is left as it was
    assert {p: p.read_bytes() for p in sorted(found.rglob("*")) if p.is_file()} == before


class Poisoned(MoEMethod):
    """The router losses, NaN from the fourth forward pass on."""
    calls = 0

    def extra_loss(self, model):
        self.calls += 1
        added, logged = super().extra_loss(model)
        return (added * float("nan") if self.calls > 3 else added), logged


def test_train_model_refuses_resume_without_a_checkpoint(tmp_path):
    """train_model skips fine_tune's early check: resume.load_latest checks again, so --resume never starts at 0."""
    from llama_expert import ConfigError

    model, blocks = _noisy_setup()
    with pytest.raises(ConfigError, match="--resume: there is no checkpoint in"):
        _train(model, blocks, _args(tmp_path / "run", max_steps=2, resume=True))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model, blocks = _noisy_setup()
    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        _train(model, blocks, _args(tmp_path, max_steps=10), method=Poisoned(model.expert_config))
    found = latest_checkpoint(tmp_path / "checkpoints" / "last")
    state = load_training_state(found)
    assert state["step"] == 3
    fresh, _ = _noisy_setup()
    load_adapter_weights(fresh, found)
    assert all(torch.isfinite(v).all() for v in adapter_state_dict(fresh).values())


def test_kill_minus_nine_leaves_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, WORKER, str(out), "100000", "4", "--slow"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while latest_checkpoint(out / "checkpoints" / "last") is None:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "no checkpoint written in time"
            time.sleep(0.2)
        time.sleep(1.5)  # let it run on, so the kill lands at an arbitrary point of the loop
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    found = latest_checkpoint(out / "checkpoints" / "last")
    assert found is not None
    state = load_training_state(found)
    assert state["step"] >= 1
    model, _ = tiny_training_setup()
    load_adapter_weights(model, found)  # complete and loadable
    # ... and training resumes from it (same settings; two more steps).
    done = subprocess.run([sys.executable, WORKER, str(out), "100000", "4", "--resume", "--stop-after", "2"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stdout


WORKER_ENV = {"HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}


def run_two_ranks(out, steps, flags, fsdp=False):
    """The worker on two gloo ranks of batch 2 (with FSDP as `accelerate launch` asks for it, if ``fsdp``)."""
    env = {**os.environ, **WORKER_ENV, **({"ACCELERATE_USE_FSDP": "true"} if fsdp else {})}
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(port)]
    run = subprocess.run(torchrun + [WORKER, str(out), str(steps), "2", *flags], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def train_two_ranks_and_one(tmp_path, flags, fsdp=False):
    """The worker's adapter tensors after 4 steps: (rank 0, rank 1) of a two-rank gloo run of batch 2, and one
    process of batch 4. With ``--cases`` in ``flags``: {case: (rank 0, rank 1, one)}."""
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    run_two_ranks(ddp, 4, flags, fsdp)
    run = subprocess.run([sys.executable, WORKER, str(single), "4", "4", *flags], env={**os.environ, **WORKER_ENV},
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]

    def tensors(folder):
        return (load_file(str(ddp / folder / "rank0.safetensors")), load_file(str(ddp / folder / "rank1.safetensors")),
                load_file(str(single / folder / "rank0.safetensors")))
    if "--cases" not in flags:
        return tensors("")
    return {case: tensors(case) for case in flags[flags.index("--cases") + 1].split(",")}


ROUTING_CASES = ["lm-loss", "router-losses", "router-losses-and-noise", "aux-free", "router-losses-window",
                 "aux-free-window"]  # train_worker.CASES


def assert_same_training(rank0, rank1, one):
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"ranks disagree on {key}"
    moved = False
    for key in one:
        # float32 sums in another order: 1e-5 (local expert fractions instead of global ones miss by 2e-2)
        torch.testing.assert_close(rank0[key], one[key], rtol=1e-3, atol=1e-5)
        moved |= bool(one[key].abs().sum() > 0) and "up" in key
    assert moved, "the adapters did not train"


BROKEN_CASES = ["router-losses-and-noise", "aux-free"]  # run again as "<case>-local": each rank's own statistics


@pytest.fixture(scope="module")
def routing_runs(tmp_path_factory):
    """Every routing case, and the broken ones, trained on two ranks and in one process (one worker start each)."""
    cases = ROUTING_CASES + [f"{case}-local" for case in BROKEN_CASES]
    return train_two_ranks_and_one(tmp_path_factory.mktemp("routing"), ["--cases", ",".join(cases)])


@pytest.mark.parametrize("case", ROUTING_CASES)
def test_two_cpu_ranks_match_single_process_math(routing_runs, case):
    """Two ranks of batch B train exactly as one process of batch 2B: with the router losses on too (their
    expert fractions are summed over the ranks: modeling/routing/losses.global_sums), with noisy top-k's noise
    on (drawn for the global batch: data_parallel_draw), with aux_free (its bias follows the global load), and
    with either balancing over a window of sequences (its counts and sequences are summed over the ranks)."""
    assert_same_training(*routing_runs[case])


@pytest.mark.parametrize("case", BROKEN_CASES)
def test_local_routing_statistics_break_the_equality(routing_runs, case):
    """The same runs with the mechanism broken on purpose (each rank's own counts, load and noise) fail the
    check above: it would catch a regression."""
    with pytest.raises(AssertionError, match="ranks disagree|not close"):
        assert_same_training(*routing_runs[f"{case}-local"])


FSDP_FLAGS = ["--router-losses", "--router-noise"]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """(folder of a 4-step FSDP2 run on two gloo ranks, the tensors of (rank 0, rank 1, one process of batch 4))."""
    folder = tmp_path_factory.mktemp("fsdp")
    return folder / "ddp", train_two_ranks_and_one(folder, FSDP_FLAGS, fsdp=True)


def test_fsdp_two_cpu_ranks_match_single_process_math(fsdp_run):
    """FSDP2 on the frozen base (training/sharding.py), two gloo ranks of batch 2: the adapters train as in one
    process of batch 4, router losses and noise on."""
    assert_same_training(*fsdp_run[1])


def test_fsdp_without_gradient_averaging_breaks_the_equality(tmp_path):
    """The mechanism broken on purpose (no all-reduce of the replicated adapters' gradients) fails the check."""
    trained = train_two_ranks_and_one(tmp_path, ["--router-losses", "--router-noise", "--no-gradient-average"],
                                      fsdp=True)
    with pytest.raises(AssertionError, match="ranks disagree|not close"):
        assert_same_training(*trained)


def test_fsdp_checkpoints_load_and_resume_exactly(fsdp_run, tmp_path):
    """A checkpoint written under FSDP is a plain adapter (it loads into an unsharded model), and an FSDP run
    stopped after 2 of 4 steps and resumed ends exactly where an uninterrupted one (fsdp_run's) does."""
    flags = FSDP_FLAGS
    straight, resumed = fsdp_run[0], tmp_path / "resumed"
    run_two_ranks(resumed, 4, [*flags, "--stop-after", "2"], fsdp=True)
    done = run_two_ranks(resumed, 4, [*flags, "--resume"], fsdp=True)
    assert "resumed from" in done.stdout
    want = load_file(str(straight / "rank0.safetensors"))
    for rank in (0, 1):
        got = load_file(str(resumed / f"rank{rank}.safetensors"))
        for key in want:
            assert torch.equal(got[key], want[key]), f"rank {rank}: {key} differs after resume"
    model, _ = tiny_training_setup(router_losses=True, router_noise=True)
    load_adapter_weights(model, straight / "checkpoints" / "last")
    state = adapter_state_dict(model)
    for key in want:
        assert torch.equal(state[key], want[key]), key


def test_wandb_offline_logging(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    model, blocks = _noisy_setup()
    _train(model, blocks, _args(tmp_path, max_steps=2, use_wandb=True))
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    shutil.rmtree(tmp_path / "wandb", ignore_errors=True)


def _router_setup(multiplier):
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama_expert import ExpertConfig
    from llama_expert.training.methods import MoEMethod

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    method = MoEMethod(ExpertConfig(router_lr_multiplier=multiplier, lora_dropout=0.0, router_noise=False))
    method.add_to(model)
    return model, method


def _is_router(name):
    return ".router." in name


def test_parameter_groups_put_the_routers_at_the_multiplied_learning_rate():
    model, method = _router_setup(1.0)
    assert method.parameter_groups(model, 1e-3) is None  # the default: one group, as before
    model, method = _router_setup(5.0)
    groups = method.parameter_groups(model, 1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(5e-3)]
    assert all(not _is_router(names[id(p)]) for p in groups[0]["params"])
    assert all(_is_router(names[id(p)]) for p in groups[1]["params"])
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("multiplier", [4.0, 0.25])
def test_router_update_scales_with_the_multiplier(tmp_path, multiplier):
    """One AdamW step of the trainer: the routers move `multiplier` times as far, everything else as far."""
    blocks = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1))
    moved = []
    for m in (1.0, multiplier):
        model, method = _router_setup(m)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        train_model(model, method, blocks, None, _args(tmp_path / str(m), max_steps=1, warmup_ratio=0.0))
        moved.append({n: (p.detach() - before[n]).abs().sum().item() for n, p in model.named_parameters()
                      if p.requires_grad})
    routers = [n for n in moved[0] if _is_router(n)]
    assert routers and all(moved[0][n] > 0 for n in routers)
    for name in moved[0]:
        want = moved[0][name] * (multiplier if _is_router(name) else 1.0)
        assert moved[1][name] == pytest.approx(want, rel=1e-4, abs=1e-12), name


def test_parameter_groups_must_cover_every_trainable_parameter(tmp_path):
    from llama_expert import ConfigError

    class RoutersLeftOut(MoEMethod):
        def parameter_groups(self, model, learning_rate):
            return super().parameter_groups(model, learning_rate)[:1]

    model, method = _router_setup(2.0)
    blocks = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ConfigError, match="exactly once"):
        train_model(model, RoutersLeftOut(method.config), blocks, None, _args(tmp_path, max_steps=1))


def test_every_pass_gets_its_rows_domain_labels(tmp_path):
    """Training micro-batches (gradient accumulation, gradient checkpointing's recomputation included) and
    validation windows reach the model with their own rows' labels: block i is filled with token i and labelled
    i % 2, so each pass can check what it was given."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama_expert import ExpertConfig, augment_model
    from llama_expert.integration.surgery import adapters

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=128))
    augment_model(model, ExpertConfig(router_type="oracle", num_experts=2, expert_allocation="uniform",
                                      use_gradient_checkpointing=True))
    blocks = torch.arange(24).unsqueeze(1).expand(24, 16).contiguous()
    token_mask = adapters(model)[0][1].token_mask
    seen = []

    def check(module, args, kwargs):
        rows = kwargs["input_ids"][:, 0]
        seen.append(rows.numel())
        assert torch.equal(torch.as_tensor(token_mask.domain_labels), rows % 2), (rows, token_mask.domain_labels)

    model.register_forward_pre_hook(check, with_kwargs=True)
    train_model(model, MoEMethod(model.expert_config), blocks, blocks[:6],
                _args(tmp_path / "run", max_steps=3, batch_size=2, gradient_accumulation_steps=2, eval_every=3),
                domains=torch.arange(24) % 2, eval_domains=torch.arange(6) % 2)
    assert len(seen) >= 3 * 2 + 2 * 6  # 3 steps x 2 micro-batches, and two validations of 6 windows
