"""The recipe (fine_tune_augmented_model, the public entry point) end to end on the tiny trained base."""

import json


def test_recipe_end_to_end(tmp_path, trained_base):
    """fine_tune_augmented_model, the public entry point, on the tiny trained base (a local folder with its
    tokenizer): every output, no token in any file, the adapter loads back from what it records."""
    from llama_expert import load_augmented_model
    from llama_expert.training.recipe import fine_tune_augmented_model

    base, text = trained_base
    out = tmp_path / "adapter"
    secret = "hf_TESTSECRET123"
    result = fine_tune_augmented_model(model_id=str(base), dataset_name=str(text), output_dir=str(out), max_steps=3,
                                       batch_size=2, seq_len=64, eval_every=3, eval_max_tokens=256,
                                       test_dataset=str(text), test_max_tokens=256, learning_rate=1e-3,
                                       progress=False, use_tensorboard=True, auth_token=secret)
    for path in out.rglob("*"):  # adapter, checkpoints (optimizer/RNG state), logs, TensorBoard events
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), f"token leaked into {path}"
    for name in ("adapter_config.json", "adapter_model.safetensors", "train_log.jsonl", "expert_usage.json",
                 "expert_usage.png", "training_summary.json", "prototypes.safetensors"):
        assert (out / name).is_file(), name
    assert any((out / "tensorboard").iterdir())
    assert result.steps == 3 and result.tokens == 3 * 2 * 64
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["test"]["before"]["tokens"] == summary["test"]["after"]["tokens"] > 0
    usage = json.loads((out / "expert_usage.json").read_text())
    assert len(usage) == 2 and all(abs(sum(row["fractions"]) - 1) < 1e-6 for row in usage)
    model, config = load_augmented_model(adapter_path=out)
    assert model.name_or_path == str(base)
    assert config.top_k == 2


def test_every_block_comes_from_one_domain_and_keeps_its_label(trained_base, tmp_path):
    """A mixture is packed within each domain, then the blocks are mixed: every training block and validation
    window holds one domain's text, labelled with that domain (what oracle routing, the NMI and the heatmaps read)."""
    from llama_expert import load_tokenizer
    from llama_expert.training.arguments import DataArguments
    from llama_expert.training.recipe import RecipeData

    folder, _ = trained_base
    (tmp_path / "digits.txt").write_text("".join(f"{i % 10}" * 7 + "\n" for i in range(600)))
    (tmp_path / "letters.txt").write_text("".join("abcdefg"[i % 7] * 7 + "\n" for i in range(600)))
    tokenizer = load_tokenizer(str(folder))
    data = RecipeData(tokenizer, DataArguments(dataset=f"{tmp_path / 'digits.txt'},{tmp_path / 'letters.txt'}"),
                      seq_len=32, max_samples=None, eval_max_tokens=256, progress=False)
    alphabets = {0: set("0123456789\n"), 1: set("abcdefg\n")}
    for blocks, labels in ((data.train, data.domains), (data.eval, data.eval_domains)):
        assert set(labels.tolist()) == {0, 1}
        for block, label in zip(blocks, labels.tolist()):
            assert set(tokenizer.decode(block.tolist())) <= alphabets[label]


def test_an_oracle_routed_mixture_trains_and_its_experts_follow_the_domains(tmp_path, trained_base):
    """--router-type oracle on two domains and two experts a layer: the recipe hands every block, validation
    window and test window its domain, so training runs and each domain uses its own expert (NMI 1 per layer)."""
    from llama_expert import ExpertConfig
    from llama_expert.training.arguments import DataArguments, TrainingArguments
    from llama_expert.training.methods import MoEMethod
    from llama_expert.training.recipe import fine_tune

    base, text = trained_base
    prose, digits = tmp_path / "prose.txt", tmp_path / "digits.txt"
    prose.write_text(text.read_text())
    digits.write_text("0123456789 9876543210\n" * 200)
    spec, out = f"{prose},{digits}", tmp_path / "run"
    config = ExpertConfig(router_type="oracle", oracle_domains=2, num_experts=2, expert_allocation="uniform")
    result = fine_tune(MoEMethod(config), TrainingArguments(output_dir=str(out), max_steps=3, batch_size=2,
                                                            seq_len=32, eval_every=3, eval_max_tokens=256,
                                                            learning_rate=1e-3, progress=False),
                       DataArguments(dataset=spec, test_dataset=spec, test_max_tokens=128), model_id=str(base))
    assert result.steps == 3 and set(result.test["after"]["domains"]) == {"prose", "digits"}
    usage = json.loads((out / "expert_usage.json").read_text())
    assert len(usage) == 2 and all(row["domain_expert_nmi"] == 1.0 for row in usage)
    assert all(row["domain_fractions"] == [[1.0, 0.0], [0.0, 1.0]] for row in usage)
