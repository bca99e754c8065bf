"""lm-evaluation-harness sees an augmented model as an ordinary Transformers model (its HFLM wrapper).

The harness fetches its stock tasks from the Hub, so the test defines a tiny local task (a rolling
log-likelihood over three WikiText-2 paragraphs read from a JSON-lines file) with the harness's own YAML.
"""

import copy
import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

TASK_YAML = """task: tiny_wikitext
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
metadata:
  version: 1.0
"""


def _evaluate(model, tokenizer, task_dir):
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, max_length=256)
    results = lm_eval.simple_evaluate(model=lm, tasks=["tiny_wikitext"], task_manager=TaskManager(include_path=str(task_dir)),
                                      limit=3, bootstrap_iters=0)
    return results["results"]["tiny_wikitext"]


def test_augmented_model_runs_in_lm_eval_harness(tmp_path, shared_data, chat_folder, embedded_tokenizer):
    """On a tiny random Llama with the embedded model's tokenizer: what matters is how the harness sees an
    augmented model, not SmolLM2's numbers."""
    from llama_expert import ExpertConfig, augment_model, load_base_model

    wikitext_test = shared_data("wikitext-2-raw/wiki.test.raw")  # skips naming the path when missing; fails on CI
    base, tokenizer = load_base_model(str(chat_folder)).eval(), embedded_tokenizer
    paragraphs = [line for line in wikitext_test.read_text().splitlines() if len(line) > 200][:3]
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps({"text": p[:600]}) + "\n" for p in paragraphs))
    (tmp_path / "tiny_wikitext.yaml").write_text(TASK_YAML.format(data=data))

    augmented = augment_model(copy.deepcopy(base), ExpertConfig()).eval()
    got = _evaluate(augmented, tokenizer, tmp_path)
    want = _evaluate(base, tokenizer, tmp_path)
    assert 1.0 < got["word_perplexity,none"] < float("inf")
    # fresh adapters compute exactly the base model, so the harness must see the same numbers
    assert got["word_perplexity,none"] == pytest.approx(want["word_perplexity,none"], rel=1e-5)
