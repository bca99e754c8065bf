"""``llama-expert benchmark``: perplexity, throughput, memory and routing health of one model."""

from __future__ import annotations

import argparse

from ..evaluation.benchmark import BenchmarkArguments, run_benchmark
from ..evaluation.throughput import ThroughputArguments
from ..integration.loading import ModelArguments
from .arguments import add_dataclass_arguments, dataclass_from_args




def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, ModelArguments, title="model")
    add_dataclass_arguments(parser, BenchmarkArguments, title="measurement")
    add_dataclass_arguments(parser, ThroughputArguments, title="throughput")


def run(args: argparse.Namespace) -> int:
    run_benchmark(dataclass_from_args(ModelArguments, args), dataclass_from_args(BenchmarkArguments, args),
                  dataclass_from_args(ThroughputArguments, args))
    return 0
