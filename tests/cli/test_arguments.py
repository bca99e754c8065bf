"""Flags generated from the settings dataclasses: names kept, defaults from the dataclass, values typed."""

import argparse
from dataclasses import dataclass

import pytest

from llama_expert import ExpertConfig
from llama_expert.cli import build_parser
from llama_expert.cli.arguments import add_dataclass_arguments, dataclass_from_args, redacted_command
from llama_expert.options import option
from llama_expert.training.arguments import TrainingArguments


def _train(argv):
    return build_parser("train").parse_args(["train", *argv])


def test_train_defaults_come_from_the_dataclasses():
    args = _train([])
    assert dataclass_from_args(ExpertConfig, args) == ExpertConfig()
    assert dataclass_from_args(TrainingArguments, args) == TrainingArguments()


def test_seed_flag_names_map_onto_fields():
    args = _train(["--epochs", "2.5", "--gradient-accumulation", "4", "--gradient-checkpointing",
                   "--no-router-noise", "--expert-allocation", "4,6,8,6", "--no-progress", "--log-every", "5",
                   "--wandb-project", "p", "--model", "m", "--num-experts", "8", "--top-k", "1"])
    training = dataclass_from_args(TrainingArguments, args)
    config = dataclass_from_args(ExpertConfig, args)
    assert (training.num_train_epochs, training.gradient_accumulation_steps) == (2.5, 4)
    assert (training.progress, training.log_every, training.wandb_project) == (False, 5, "p")
    assert config.use_gradient_checkpointing and not config.router_noise
    assert config.expert_allocation == [4, 6, 8, 6] and config.top_k == 1
    assert args.model == "m"


@pytest.mark.parametrize("alias", ["--model", "--model-path", "--base-model"])
def test_model_flag_aliases(alias):
    args = build_parser("compare").parse_args(["compare", alias, "x", "--augmented-model", "a"])
    assert (args.model, args.adapter) == ("x", "a")


def test_per_command_default_override_and_only():
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, TrainingArguments, only=("max_steps", "seq_len"), defaults={"max_steps": 100})
    args = parser.parse_args([])
    assert vars(args) == {"max_steps": 100, "seq_len": 512}


def test_list_fields_take_several_values():
    args = build_parser("benchmark").parse_args(["benchmark", "--throughput-batch-sizes", "1", "2", "8"])
    assert args.throughput_batch_sizes == [1, 2, 8]


def test_bad_value_is_a_one_line_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        _train(["--top-k", "two"])
    assert info.value.code == 2
    assert "--top-k: invalid int value: 'two'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, shown", [
    (["compare", "--auth-token", "hf_SECRET", "--lora-baseline"], "llama-expert compare --auth-token *** --lora-baseline"),
    (["train", "--auth-token=hf_SECRET"], "llama-expert train --auth-token=***"),
])
def test_redacted_command_hides_tokens(argv, shown):
    assert redacted_command(argv) == shown


@pytest.mark.parametrize("command", ["train", "benchmark", "compare", "inference"])
def test_abbreviated_flags_are_refused(command, capsys):
    """`--auth` for `--auth-token` would slip past the redaction of recorded commands."""
    with pytest.raises(SystemExit):
        build_parser(command).parse_args([command, "--auth", "hf_SECRET"])
    assert "unrecognized arguments: --auth" in capsys.readouterr().err


def test_a_parse_error_keeps_its_message(capsys):
    with pytest.raises(SystemExit):
        _train(["--expert-allocation", "4,x"])
    assert "--expert-allocation '4,x': use progressive, uniform or counts like 4,6,8,6" in capsys.readouterr().err


def test_a_parsed_field_with_named_choices_says_what_else_it_takes(capsys):
    """The alternative to the names comes from the field (its metavar), not from --expert-allocation's counts."""
    @dataclass
    class Speed:
        rate: object = option("slow", "a named speed or a number", parse=lambda t: float(t) if t[0].isdigit() else t,
                              metavar="RATE")

    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, Speed, choices={"rate": ["fast", "slow"]})
    assert parser.parse_args(["--rate", "2.5"]).rate == 2.5
    with pytest.raises(SystemExit):
        parser.parse_args(["--rate", "steady"])
    assert "invalid choice: 'steady' (choose from fast, slow, or RATE)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _train(["--expert-allocation", "nope"])
    assert "invalid choice: 'nope' (choose from dynamic, progressive, uniform, or COUNTS)" in capsys.readouterr().err


def test_every_registered_method_is_built_from_the_flags():
    from llama_expert.training.methods import METHODS

    for name in METHODS.names():
        method = METHODS.get(name).from_expert_config(dataclass_from_args(ExpertConfig, _train(["--lora-r", "4"])))
        assert method.name == name


@pytest.mark.parametrize("command", ["train", "benchmark", "compare", "inference", "serve", "prune", "distill",
                                     "export"])
def test_every_command_prints_its_help(command, capsys):
    """`--help` formats every option's help text (a bare "%" in one of them used to crash `distill --help`)."""
    from llama_expert.cli import main

    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: llama-expert {command}")


@pytest.mark.parametrize("command", ["inference", "serve", "benchmark", "compare"])
def test_compiled_decoding_is_on_by_default_and_has_an_off_switch(command):
    """On CUDA these commands decode on a static cache in CUDA graphs unless told not to (a CPU ignores it)."""
    extra = ["--augmented-model", "a"] if command == "compare" else []
    assert build_parser(command).parse_args([command, *extra]).compiled_decode is True
    assert build_parser(command).parse_args([command, *extra, "--no-compiled-decode"]).compiled_decode is False


def test_train_compile_flag_names_the_registered_compilations():
    assert dataclass_from_args(TrainingArguments, _train(["--compile", "adapters"])).compile == "adapters"
    assert _train([]).compile == "none"
