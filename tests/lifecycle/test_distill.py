"""`distill`: a dense LoRA trained to reproduce the MoE-augmented model gets closer to it (held-out KL falls,
measured here independently), is written in PEFT's format, and `export --merge` takes it: the whole path. A
distillation that leaves the student worse fails and writes nothing."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from llama_expert import load_augmented_model
from llama_expert.cli import main
from llama_expert.integration.base_models import load_base_model
from llama_expert.integration.surgery import adapters
from llama_expert.lifecycle.distill import distillation_loss
from llama_expert.training.run_folder import LOCK_NAME
from llama_expert.integration.peft_lora import load_lora_model

from ..conftest import moe_adapter_folder


@pytest.fixture
def moe_folder(trained_base, tmp_path):
    return moe_adapter_folder(trained_base, tmp_path / "moe", 0.3)


def test_distillation_loss_is_the_kl_divergence_per_token():
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    p, log_q = torch.softmax(teacher, -1), torch.log_softmax(student, -1)
    want = (p * (p.log() - log_q)).sum(-1).mean()
    torch.testing.assert_close(distillation_loss(student, teacher), want)
    assert float(distillation_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(distillation_loss(student, teacher, 2.0),
                               4 * distillation_loss(student / 2, teacher / 2))


def test_distilled_lora_moves_toward_the_moe_model_and_exports(moe_folder, tmp_path):
    base_folder, text, folder = moe_folder
    out = tmp_path / "dense"
    assert main(["distill", "--adapter", str(folder), "--output-dir", str(out), "--calibration", str(text),
                 "--seq-len", "32", "--max-tokens", "4096", "--steps", "40", "--batch-size", "4",
                 "--learning-rate", "1e-2", "--held-out", "4", "--no-progress"]) == 0
    summary = json.loads((out / "distill_summary.json").read_text())
    teacher, _ = load_augmented_model(adapter_path=folder)
    moe_size = sum(p.numel() for _, a in adapters(teacher) for n, p in a.named_parameters()
                   if p.requires_grad and not n.startswith("base_mlp."))
    assert summary["teacher_parameters"] == moe_size
    assert summary["student_parameters"] <= moe_size  # the default rank keeps the student no larger
    with torch.no_grad():
        ids = torch.randint(0, 200, (3, 32), generator=torch.Generator().manual_seed(5))
        base = load_base_model(str(base_folder))
        student = load_lora_model(load_base_model(str(base_folder)), out)
        target = teacher(input_ids=ids).logits
        before, after = distillation_loss(base(input_ids=ids).logits, target), distillation_loss(
            student(input_ids=ids).logits, target)
        assert after < 0.5 * before, (float(before), float(after))
        assert summary["held_out_kl_after"] < summary["held_out_kl_before"]

        exported = tmp_path / "merged"
        assert main(["export", "--adapter", str(out), "--merge", "--output-dir", str(exported)]) == 0
        assert not (out / LOCK_NAME).exists() and not (exported / LOCK_NAME).exists()  # artifacts: no lock file
        merged = AutoModelForCausalLM.from_pretrained(exported).eval()
        torch.testing.assert_close(merged(input_ids=ids).logits, student(input_ids=ids).logits, rtol=0, atol=1e-4)


def test_bad_distill_input_gets_one_line(moe_folder, tmp_path, cli_error):
    _, _, folder = moe_folder
    out = str(tmp_path / "out")
    assert "--rank must be >= 1" in cli_error(["distill", "--adapter", str(folder), "--output-dir", out, "--rank", "0"])
    assert "not found" in cli_error(["distill", "--adapter", str(tmp_path / "none"), "--output-dir", out])
    assert "--output-dir" in cli_error(["distill", "--adapter", str(folder)])


def test_a_distillation_that_makes_the_student_worse_fails_and_writes_nothing(trained_base, tmp_path, cli_error):
    """A teacher barely off the base (KL ~0.002) and a learning rate far too high: the student ends far off."""
    _, text, folder = moe_adapter_folder(trained_base, tmp_path / "moe", 0.01)
    out = tmp_path / "dense"
    err = cli_error(["distill", "--adapter", str(folder), "--output-dir", str(out), "--calibration", str(text),
                     "--seq-len", "32", "--max-tokens", "1024", "--steps", "4", "--batch-size", "2",
                     "--learning-rate", "1", "--held-out", "2", "--no-progress"])
    assert f"distillation left the student further from {folder} on the 2 held-out windows (KL " in err
    assert f"nothing was written to {out}; lower --learning-rate (now 1) or raise --steps" in err
    assert not out.exists()
