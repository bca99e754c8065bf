"""Training methods: ``train --init-adapter DIR [--train-only router]`` (``methods.AdapterStart``), a run that starts
from an adapter already trained. Two real branches are trained, mixed, and the mix's routing calibrated: only the
router moves, the experts stay bit for bit; the expert flags may not contradict the adapter, and the run may not
write over the adapter it reads."""

import json

import pytest
import torch
from safetensors.torch import load_file

from llama_expert.cli import main
from llama_expert.integration.adapter_files import expert_names

BRANCH = ["--expert-type", "lora_experts", "--num-experts", "1", "--top-k", "1", "--expert-allocation", "uniform",
          "--expert-rank", "2"]


def _train(base, dataset, out, *extra):
    model = ["--model", str(base)] if base is not None else []
    argv = ["train", *model, "--dataset", str(dataset), "--output-dir", str(out), "--max-steps", "3",
            "--batch-size", "2", "--seq-len", "32", "--eval-every", "0", "--eval-max-tokens", "64",
            "--learning-rate", "1e-2", "--no-progress", *extra]
    assert main(argv) == 0


@pytest.fixture
def mixed(trained_base, tmp_path):
    base, _ = trained_base
    (tmp_path / "digits.txt").write_text("".join(f"{i % 10}" * 7 + "\n" for i in range(400)))
    (tmp_path / "letters.txt").write_text("".join("abcdefg"[i % 7] * 7 + "\n" for i in range(400)))
    for name in ("digits", "letters"):
        _train(base, tmp_path / f"{name}.txt", tmp_path / name, *BRANCH)
    assert main(["mix", str(tmp_path / "digits"), str(tmp_path / "letters"), "--output-dir", str(tmp_path / "mix"),
                 "--model", str(base)]) == 0
    return base, tmp_path


def test_calibrating_a_mix_trains_its_router_alone(mixed):
    base, root = mixed
    data = f"{root / 'digits.txt'},{root / 'letters.txt'}"
    _train(None, data, root / "calibrated", "--init-adapter", str(root / "mix"), "--train-only", "router",
           "--router-lr-multiplier", "2")  # no --model: the base the mix records; a training flag may be set
    before = load_file(str(root / "mix" / "adapter_model.safetensors"))
    after = load_file(str(root / "calibrated" / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    moved = {key for key in before if not torch.equal(before[key], after[key])}
    assert moved and all(".router.weight" in key or ".router.null_distance" in key for key in moved), moved
    summary = json.loads((root / "calibrated" / "training_summary.json").read_text())
    routers = sum(t.numel() for key, t in before.items() if key.endswith(".router.weight"))
    assert summary["trainable_parameters"] == routers
    assert summary["settings"]["init_adapter"] == str(root / "mix") and summary["settings"]["train_only"] == "router"
    assert summary["settings"]["model"] == str(base)
    assert summary["settings"]["expert_config"]["router_lr_multiplier"] == 2
    assert expert_names(root / "calibrated", 2) == ["digits", "letters"]  # the experts keep their branches' names


def test_a_run_from_an_adapter_refuses_what_contradicts_or_endangers_it(mixed, cli_error):
    base, root = mixed
    common = ["train", "--model", str(base), "--dataset", str(root / "digits.txt"), "--max-steps", "1"]
    assert "--router-type" in cli_error(common + ["--init-adapter", str(root / "mix"), "--router-type", "soft",
                                                  "--output-dir", str(root / "x")])
    assert "--init-adapter DIR" in cli_error(common + ["--train-only", "router", "--output-dir", str(root / "x")])
    line = cli_error(common + ["--init-adapter", str(root / "mix"), "--output-dir", str(root / "mix"), "--overwrite"])
    assert "the adapter the run starts from" in line
    assert (root / "mix" / "adapter_model.safetensors").is_file()
    assert "`llama-expert mix`" in cli_error(common + ["--router-type", "prototype", "--output-dir", str(root / "x")])
    assert "--method moe" in cli_error(common + ["--init-adapter", str(root / "mix"), "--method", "lora",
                                                 "--output-dir", str(root / "x")])


def test_a_lora_trains_on_from_where_it_stopped(mixed, cli_error):
    """--method lora --init-adapter: the forgetting baseline (a LoRA trained domain after domain) starts from the
    saved LoRA, not from a fresh one (whose B is zero): one step at a tiny learning rate leaves it where it was."""
    base, root = mixed
    _train(base, root / "digits.txt", root / "lora-digits", "--method", "lora", "--lora-r", "2")
    _train(None, root / "letters.txt", root / "lora-then", "--method", "lora", "--init-adapter",
           str(root / "lora-digits"), "--learning-rate", "1e-7", "--lora-dropout", "0")
    before = load_file(str(root / "lora-digits" / "adapter_model.safetensors"))
    after = load_file(str(root / "lora-then" / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    assert all(torch.allclose(before[k], after[k], atol=1e-5) for k in before)
    assert max(before[k].abs().max() for k in before if "lora_B" in k) > 1e-3  # trained: not the fresh zeros
    summary = json.loads((root / "lora-then" / "training_summary.json").read_text())
    assert summary["settings"]["init_adapter"] == str(root / "lora-digits") and summary["settings"]["lora"]["r"] == 2
    common = ["train", "--model", str(base), "--dataset", str(root / "digits.txt"), "--max-steps", "1",
              "--output-dir", str(root / "x")]
    assert "continue it with --method lora" in cli_error(common + ["--init-adapter", str(root / "lora-digits")])
    assert "--method moe" in cli_error(common + ["--method", "lora", "--init-adapter", str(root / "mix")])
    assert "drop --lora-r" in cli_error(common + ["--method", "lora", "--init-adapter", str(root / "lora-digits"),
                                                  "--lora-r", "8"])
    assert "drop --train-only" in cli_error(common + ["--method", "lora", "--init-adapter", str(root / "lora-digits"),
                                                      "--train-only", "router"])
    assert "--router-lr-multiplier" in cli_error(common + ["--method", "lora", "--init-adapter",
                                                           str(root / "lora-digits"), "--router-lr-multiplier", "2"])
