"""Dynamic expert allocation: idle experts retire, busy ones split up to the budget, the optimiser follows the
rows, the allocation is logged and drawn, the adapter saves its real counts, and resume stays exact."""

import gc
import json
import weakref

import pytest
import torch
from safetensors.torch import load_file

from llama_expert import ExpertConfig, TrainingArguments, augment_model, load_augmented_model
from llama_expert.integration.base_models import load_base_model
from llama_expert.integration.surgery import adapters
from llama_expert.training.arguments import DataArguments
from llama_expert.training.dynamic import DynamicAllocation
from llama_expert.training.methods import MoEMethod
from llama_expert.training.recipe import fine_tune
from llama_expert.training.loggers import TrainingLoggers
from llama_expert.training.trainer import Trainer, train_model

CONFIG = dict(num_experts=4, top_k=2, expert_allocation="dynamic", dynamic_interval=2, dynamic_budget=7)


def test_idle_experts_retire_and_busy_ones_split_to_the_budget(trained_base):
    folder, _ = trained_base
    model = augment_model(load_base_model(str(folder)), ExpertConfig(**CONFIG))
    layers = [a for _, a in adapters(model)]
    assert [a.num_experts for a in layers] == [2, 2]  # half of progressive (4, 4), at least top_k
    policy = DynamicAllocation(model.expert_config, seed=0)
    assert policy.start(model, 0, None) == [policy.allocation_event(model, 0)]  # a fresh run logs where it starts
    layers[0].router.expert_counts.copy_(torch.tensor([90.0, 10.0]))
    layers[1].router.expert_counts.copy_(torch.tensor([50.0, 50.0]))
    assert policy.after_step(model, 1) is None  # not an interval step
    event = policy.after_step(model, 2)
    assert event["experts"] == [4, 3] and sum(event["experts"]) == 7
    # layer 0's expert 0 (load 0.9 of 2) splits first, then again (0.45 of 3), then layer 1 (ties: lowest index)
    assert event["grown"] == [(0, 0), (0, 0), (1, 0)]
    assert all(float(a.router.expert_counts.sum()) == 0 for a in layers)  # statistics restart
    layers[0].router.expert_counts.copy_(torch.tensor([40.0, 30.0, 30.0, 0.0]))  # expert 3 idle: retired
    layers[1].router.expert_counts.copy_(torch.tensor([10.0, 10.0, 10.0]))
    event = policy.after_step(model, 4)
    assert event["retired"] == [(0, 3)]
    assert sum(event["experts"]) == 7  # and the budget is filled again
    model(input_ids=torch.randint(0, 100, (1, 8)))


def test_with_a_null_expert_the_allocation_reads_the_experts_counts_only(trained_base):
    """The null's count (the last) is neither an expert's load nor a candidate to split; it stays last."""
    folder, _ = trained_base
    model = augment_model(load_base_model(str(folder)), ExpertConfig(**CONFIG, null_expert=True))
    layers = [a for _, a in adapters(model)]
    policy = DynamicAllocation(model.expert_config, seed=0)
    policy.start(model, 0, None)
    layers[0].router.expert_counts.copy_(torch.tensor([90.0, 10.0, 500.0]))  # most tokens chose the null
    layers[1].router.expert_counts.copy_(torch.tensor([50.0, 50.0, 0.0]))
    event = policy.after_step(model, 2)
    assert event["grown"] == [(0, 0), (0, 0), (1, 0)]  # as without the null: 0.9 of layer 0 splits first
    assert [a.router.num_experts for a in layers] == [5, 4]  # the experts and the null
    model(input_ids=torch.randint(0, 100, (1, 8)))


def _fine_tune(base, out, config=None, **kw):
    folder, text = base
    settings = dict(output_dir=str(out), max_steps=6, batch_size=2, seq_len=32, eval_every=0, eval_max_tokens=128,
                    save_every=1, progress=False, mixed_precision="no", learning_rate=1e-2, seed=3)
    settings.update(kw)
    return fine_tune(MoEMethod(ExpertConfig(**(config or CONFIG))), TrainingArguments(**settings),
                     DataArguments(dataset=str(text)), model_id=str(folder))


def test_dynamic_training_logs_draws_and_saves_its_allocation(trained_base, tmp_path):
    out = tmp_path / "run"
    _fine_tune(trained_base, out)
    events = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    changes = [e for e in events if e.get("event") == "allocation"]
    assert [e["step"] for e in changes] == [0, 2, 4, 6]  # the start (half of progressive), then every 2 steps
    assert sum(changes[0]["experts"]) < 7 and not changes[0]["grown"]
    assert all(sum(e["experts"]) == 7 for e in changes[1:])
    assert (out / "allocation.png").is_file()
    saved = json.loads((out / "adapter_config.json").read_text())["expert_config"]
    assert saved["expert_allocation"] == changes[-1]["experts"]  # the real counts, not "dynamic"
    model, config = load_augmented_model(adapter_path=out)
    assert [a.num_experts for _, a in adapters(model)] == changes[-1]["experts"]


@pytest.fixture
def random_base(trained_base, tmp_path):
    """The tiny base's architecture and tokenizer with untrained weights: its routing is noisy enough that the
    allocation choices below depend on every step's statistics (on the trained base they happen not to)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder, text = trained_base
    torch.manual_seed(0)
    model = LlamaForCausalLM(load_base_model(str(folder)).config)
    model.save_pretrained(tmp_path / "random-base")
    AutoTokenizer.from_pretrained(folder).save_pretrained(tmp_path / "random-base")
    return tmp_path / "random-base", text


def test_dynamic_training_resumes_exactly(random_base, tmp_path):
    trained_base = random_base
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    # retire_share 0.9: experts retire and regrow at every change, so the choices hang on the exact statistics
    config = {**CONFIG, "dynamic_retire_share": 0.9, "dynamic_interval": 3}
    _fine_tune(trained_base, whole, config)
    _fine_tune(trained_base, parts, config, stop_after_steps=4)  # stops between two allocation changes
    _fine_tune(trained_base, parts, config, resume=True)
    log = [json.loads(line) for line in (parts / "train_log.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "allocation" and e["retired"] for e in log)
    want, got = load_file(str(whole / "adapter_model.safetensors")), load_file(str(parts / "adapter_model.safetensors"))
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key


def test_a_model_trained_with_dynamic_allocation_stops_counting_its_routing(trained_base, tmp_path):
    """train_model's last validation runs before the hooks finish (a validation resumes them as it ends): the model
    it returns records no more routing statistics, so it decodes on the fused path."""
    folder, _ = trained_base
    model = augment_model(load_base_model(str(folder)), ExpertConfig(**CONFIG))
    blocks = torch.randint(0, 100, (16, 32), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, batch_size=2, seq_len=32, eval_every=0,
                             progress=False, mixed_precision="no")
    result = train_model(model, MoEMethod(model.expert_config), blocks, blocks[:2], args)
    assert result.final_eval["step"] == 4  # the last validation ran, after the last step
    assert not any(adapter.router.record_statistics for _, adapter in adapters(model))
    model.eval()
    with torch.no_grad():
        assert all(adapter.fused_inference_ready("cpu") for _, adapter in adapters(model))


def test_an_allocation_change_frees_the_replaced_optimiser_state(trained_base, tmp_path):
    """The optimiser moves onto the new parameters in place: the Adam state of the ones replaced is freed, where a
    fresh optimiser prepared by Accelerate at every change kept each earlier one (and its state) alive."""
    folder, _ = trained_base
    model = augment_model(load_base_model(str(folder)), ExpertConfig(**CONFIG))
    blocks = torch.randint(0, 100, (16, 32), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, batch_size=2, seq_len=32, eval_every=0,
                             progress=False, mixed_precision="no")
    trainer = Trainer(model, MoEMethod(model.expert_config), blocks, None, args)
    trainer.setup()
    trainer.loggers = TrainingLoggers(args, True, {})
    for hook in trainer.hooks:
        hook.start(model, 0, None)
    trainer.step()

    def state_tensors():
        return [v for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]

    before = [weakref.ref(t) for t in state_tensors()]
    prepared = trainer.optimizer
    trainer.step()  # step 2: the allocation changes, parameters are replaced
    trainer.loggers.close()
    assert sum(a.num_experts for _, a in adapters(model)) == 7
    gc.collect()
    kept = {id(t) for t in state_tensors()}
    assert [ref for ref in before if ref() is not None and id(ref()) not in kept] == []  # nothing else holds any
    assert any(ref() is None for ref in before)  # the replaced parameters' state is gone
    assert trainer.optimizer is prepared  # Accelerate's wrapper (its fp16 loss scaler) stays the one in use


def test_allocation_events_keep_the_last_record_of_a_step_logged_twice(tmp_path):
    """The log is appended to across resumes: a step redone after a resume is drawn once, as it was redone."""
    from llama_expert.training.methods import allocation_events

    log = tmp_path / "train_log.jsonl"
    records = [{"event": "allocation", "step": 0, "experts": [2, 2]}, {"event": "allocation", "step": 2, "experts": [3, 2]},
               {"event": "start", "step": 2, "resume": True}, {"event": "allocation", "step": 2, "experts": [2, 3]},
               {"event": "allocation", "step": 4, "experts": [2, 3]}]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert [(e["step"], e["experts"]) for e in allocation_events(log)] == [(0, [2, 2]), (2, [2, 3]), (4, [2, 3])]
