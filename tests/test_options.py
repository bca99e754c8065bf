"""A settings field's flag is derived in one place (``flag_of``): the CLI generates that flag and every message
names it, the ``--no-...`` switch of a boolean that is on by default included."""

import argparse
import dataclasses
import re
from dataclasses import dataclass

import pytest

from llama_expert import ExpertConfig, TrainingArguments
from llama_expert.cli.arguments import add_dataclass_arguments
from llama_expert.evaluation.benchmark import BenchmarkArguments
from llama_expert.options import flag_for, flag_of, option


@dataclass
class _Switches:
    verbose: bool = option(True, "be quiet")
    dry_run: bool = option(False, "change nothing")
    colour: bool = option(True, "no colours", flag="--plain")
    num_train_epochs: float = option(1.0, "epochs", flag="--epochs")


@pytest.mark.parametrize("name, flag", [("verbose", "--no-verbose"), ("dry_run", "--dry-run"), ("colour", "--plain"),
                                        ("num_train_epochs", "--epochs")])
def test_the_flag_of_a_field(name, flag):
    assert flag_for(_Switches, name) == flag


@pytest.mark.parametrize("cls", [ExpertConfig, TrainingArguments, BenchmarkArguments])
def test_the_cli_generates_exactly_the_flag_messages_name(cls):
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, cls)
    flags = set(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", parser.format_usage())) - {"--help"}
    assert flags == {flag_of(f) for f in dataclasses.fields(cls) if f.init} | {
        alias for f in dataclasses.fields(cls) for alias in f.metadata.get("aliases", ())}
    assert cls is not ExpertConfig or ("--no-router-noise" in flags and "--router-noise" not in flags)
