"""`prune`: experts scored on calibration text (checked against a per-token loop), each layer keeps its best,
and the smaller adapter loads like any other; bad input gets one clear line."""

import json

import pytest
import torch

from llama_expert import ExpertConfig, augment_model, load_augmented_model, save_adapter
from llama_expert.cli import main
from llama_expert.errors import ConfigError
from llama_expert.integration.base_models import load_base_model
from llama_expert.integration.surgery import adapters
from llama_expert.lifecycle.prune import expert_scores, parse_keep, prune_model


def _randomised(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, adapter in adapters(model):
            for p in list(adapter.router.parameters()) + list(adapter.experts.parameters()):
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return model.eval()


@pytest.fixture
def moe_folder(trained_base, tmp_path):
    base_folder, text = trained_base
    model = augment_model(load_base_model(str(base_folder)), ExpertConfig(num_experts=6, top_k=2,
                                                                          expert_allocation="uniform"))
    folder = tmp_path / "moe"
    save_adapter(_randomised(model), folder, base_model_name_or_path=str(base_folder))
    return base_folder, text, folder


def test_parse_keep():
    assert parse_keep("0.5", [4, 6, 8], [2, 2, 2]) == [2, 3, 4]
    assert parse_keep("0.1", [4, 6, 8], [2, 2, 1]) == [2, 2, 1]  # never below what the router needs
    assert parse_keep("1", [4, 6], [2, 2]) == [4, 6]
    assert parse_keep("3,5", [4, 6], [2, 2]) == [3, 5]
    for bad, match in (("0", "fraction"), ("1.5", "one integer count per layer"), ("nan", "fraction"),
                       ("x", "fraction"), ("3", "one integer count per layer"), ("3,2.5", "integer"),
                       ("1,5", "at least 2"), ("5,5", "has 4")):
        with pytest.raises(ConfigError, match=match):
            parse_keep(bad, [4, 6], [2, 2])


@torch.no_grad()
def test_expert_score_is_the_gated_output_norm_summed_over_tokens(moe_folder):
    base_folder, _, folder = moe_folder
    model, _ = load_augmented_model(adapter_path=folder)
    windows = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(1))
    scores = expert_scores(model, windows, progress=False)
    captured = {}
    name, adapter = adapters(model)[1]
    handle = adapter.register_forward_pre_hook(lambda m, args: captured.setdefault("h", []).append(args[0]))
    for window in windows:
        model(input_ids=window.unsqueeze(0))
    handle.remove()
    hidden = torch.cat([h.reshape(-1, h.shape[-1]) for h in captured["h"]])
    want = torch.zeros(adapter.num_experts, dtype=torch.float64)
    tokens = torch.zeros(adapter.num_experts)
    for h in hidden:  # one token at a time
        routing = adapter.router(h.unsqueeze(0))
        for e, g in zip(routing.indices[0].tolist(), routing.gates[0].tolist()):
            one = lambda gate: adapter.experts(h.unsqueeze(0), torch.tensor([[e]]), torch.tensor([[gate]]))  # noqa
            want[e] += g * float((one(1.0) - one(0.0)).norm()) * float(adapter.residual_scale.abs())
            tokens[e] += 1
    assert scores[1]["tokens"] == tokens.tolist()
    torch.testing.assert_close(torch.tensor(scores[1]["score"], dtype=torch.float64), want, rtol=1e-4, atol=1e-6)


def test_prune_keeps_the_best_experts_and_writes_an_adapter_that_loads(moe_folder, tmp_path):
    base_folder, text, folder = moe_folder
    out = tmp_path / "pruned"
    assert main(["prune", "--adapter", str(folder), "--keep", "0.5", "--calibration", str(text),
                 "--output-dir", str(out), "--seq-len", "32", "--max-tokens", "256", "--no-progress"]) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["experts_before"] == [6, 6] and report["experts_after"] == [3, 3]
    for layer in report["layers"]:
        best = sorted(range(6), key=lambda e: -layer["score"][e])[:3]
        assert layer["kept"] == sorted(best)
    pruned, config = load_augmented_model(adapter_path=out)
    assert config.expert_allocation == [3, 3]
    original, _ = load_augmented_model(adapter_path=folder)
    for (_, small), (_, big), layer in zip(adapters(pruned), adapters(original), report["layers"]):
        keep = torch.tensor(layer["kept"])
        assert small.num_experts == 3
        assert torch.equal(small.router.weight, big.router.weight[keep])
        assert torch.equal(small.experts.core_in, big.experts.core_in[keep])
        assert torch.equal(small.experts.up, big.experts.up)  # shared tensors stay
    ids = torch.randint(0, 200, (1, 20))
    assert torch.isfinite(pruned(input_ids=ids).logits).all()




def test_bad_prune_input_gets_one_line(moe_folder, tmp_path, cli_error):
    base_folder, text, folder = moe_folder
    out = tmp_path / "out"
    common = ["--calibration", str(text), "--seq-len", "32", "--max-tokens", "64", "--no-progress"]
    assert "--keep" in cli_error(["prune", "--adapter", str(folder), "--output-dir", str(out), *common])
    assert "(0, 1]" in cli_error(["prune", "--adapter", str(folder), "--keep", "0", "--output-dir", str(out),
                                       *common])
    assert "not found" in cli_error(["prune", "--adapter", str(tmp_path / "none"), "--keep", "0.5",
                                          "--output-dir", str(out), *common])
    assert not out.exists()
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert "--overwrite" in cli_error(["prune", "--adapter", str(folder), "--keep", "0.5", "--output-dir",
                                            str(out), *common])
    assert (out / "mine.txt").read_text() == "keep me"


@torch.no_grad()
def test_an_adapter_with_a_null_expert_scores_and_prunes_its_experts_only(trained_base, tmp_path):
    """The null's slots go to no expert's score; the pruned adapter keeps its null expert, last, and loads."""
    base_folder, _ = trained_base
    config = ExpertConfig(num_experts=5, top_k=2, expert_allocation="uniform", null_expert=True,
                          expert_type="lora_experts", router_type="noisy_top_k")
    model = _randomised(augment_model(load_base_model(str(base_folder)), config))
    windows = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(1))
    scores = expert_scores(model, windows, progress=False)
    for _, adapter in adapters(model):
        adapter.router.record_statistics = True  # the same windows, counted by the routers (E + 1 choices)
    for window in windows:
        model(input_ids=window.unsqueeze(0))
    nulls = 0
    for (_, adapter), layer in zip(adapters(model), scores):
        counts = adapter.router.expert_counts
        nulls += int(counts[5])
        assert len(layer["score"]) == 5 and layer["tokens"] == counts[:5].tolist()  # the null's slots: nobody's
        adapter.router.record_statistics = False
    assert nulls > 0
    prune_model(model, [3] * len(scores), scores)
    for _, adapter in adapters(model):
        assert adapter.num_experts == 3 and adapter.router.num_experts == 4
    save_adapter(model, tmp_path / "pruned", base_model_name_or_path=str(base_folder))
    loaded, _ = load_augmented_model(adapter_path=tmp_path / "pruned")
    ids = windows[:1]
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
