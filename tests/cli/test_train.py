"""`llama-expert train`: bad input is one line on stderr, without a traceback."""


def test_cli_train_reports_bad_input_without_traceback(tmp_path, capsys):
    from llama_expert.cli import main

    assert main(["train", "--dataset", str(tmp_path / "missing.txt"), "--output-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "dataset path not found" in err and "Traceback" not in err
    assert main(["train", "--top-k", "9", "--num-experts", "8", "--output-dir", str(tmp_path)]) == 1
    assert "--top-k 9 > --num-experts 8" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(["train", "--dataset", str(empty), "--output-dir", str(tmp_path)]) == 1
    assert "empty" in capsys.readouterr().err


def test_a_flag_the_chosen_method_does_not_use_is_refused(tmp_path, cli_error):
    """`--method lora` reads only the LoRA flags of ExpertConfig; an MoE flag beside it would silently do nothing."""
    err = cli_error(["train", "--method", "lora", "--router-type", "soft", "--no-router-noise", "--num-experts", "4",
                     "--output-dir", str(tmp_path / "run")])
    assert err == ("error: --method lora does not use --num-experts, --no-router-noise, --router-type; drop them, "
                   "or train with --method moe.")
    assert not (tmp_path / "run").exists()


def test_lora_takes_gradient_checkpointing_as_the_moe_adapters_do(tiny_folder):
    from llama_expert import load_base_model
    from llama_expert.training.methods import LoRAMethod

    for wanted in (False, True):
        model = LoRAMethod(rank=2, gradient_checkpointing=wanted).add_to(load_base_model(str(tiny_folder)))
        assert model.base_model.model.is_gradient_checkpointing is wanted
