"""``mix``: branches trained apart become one adapter. A sequence routed to branch i computes exactly what branch i
computes (its rank padded, its scales folded in); measured prototypes send each domain's text to its own branch;
the null expert gives back the base; the command writes an ordinary adapter; bad inputs get a one-line reason."""

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from llama_expert import ExpertConfig, augment_model, load_augmented_model, save_adapter
from llama_expert.cli import main
from llama_expert.errors import ConfigError
from llama_expert.integration.adapter_files import expert_names, load_adapter_weights
from llama_expert.integration.prototypes import (PROTOTYPES_NAME, Prototypes, load_prototypes, measure_prototypes,
                                                 save_prototypes)
from llama_expert.integration.surgery import adapters
from llama_expert.lifecycle.mix import MixArguments, mix_branches, read_experts, run_mix

# two domains of the tiny model's 128-token vocabulary: low ids and high ids
DOMAINS = ((1, 60), (64, 127))


def _text(domain, rows=4, length=48, seed=0):
    low, high = DOMAINS[domain]
    return torch.randint(low, high, (rows, length), generator=torch.Generator().manual_seed(seed + 10 * domain))


def _branch(tiny_model, folder, domain, rank=3, shared=0, seed=0, prototypes=True, size=0.1):
    """A branch as `train` leaves it: one random LoRA expert per layer (+ a shared one), a residual scale and lora
    scaling away from 1, and the prototypes of its domain's text."""
    torch.manual_seed(seed)
    model = augment_model(copy.deepcopy(tiny_model), ExpertConfig(
        expert_type="lora_experts", num_experts=1, top_k=1, expert_allocation="uniform", expert_rank=rank,
        shared_expert_rank=shared, lora_r=4, lora_alpha=6.0 + 4 * seed, router_type="aux_free"))  # scales differ
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, adapter in adapters(model):
            for p in adapter.experts.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * size)
            adapter.residual_scale.fill_(0.8 + 0.1 * seed)
    model.eval()
    save_adapter(model, folder, "tiny")
    if prototypes:
        save_prototypes(measure_prototypes(model, _text(domain, rows=16, length=64, seed=seed)), folder)
    return model


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


def _mixed(tiny_model, folders, **kw):
    base = copy.deepcopy(tiny_model)
    args = MixArguments(adapters=[str(f) for f in folders], output_dir="unused", **kw)
    return mix_branches(base, [e for f in folders for e in read_experts(base, f)], args).eval()


def _routed_to(mixed, expert: int):
    """A copy of a two-expert mix whose other prototype is far away: every token goes to ``expert``."""
    far = copy.deepcopy(mixed)
    with torch.no_grad():
        for _, adapter in adapters(far):
            adapter.router.weight[1 - expert] += 1e3
    return far


def test_a_sequence_routed_to_a_branch_computes_that_branch_exactly(tiny_model, tmp_path):
    branches = [_branch(tiny_model, tmp_path / "a", 0, rank=3, shared=2, seed=0),
                _branch(tiny_model, tmp_path / "b", 1, rank=2, seed=1)]
    mixed = _mixed(tiny_model, [tmp_path / "a", tmp_path / "b"])
    for i, branch in enumerate(branches):
        ids = _text(i, rows=2, seed=5)
        torch.testing.assert_close(_logits(_routed_to(mixed, i), ids), _logits(branch, ids), rtol=1e-4, atol=1e-4)
    assert mixed.expert_config.expert_rank == 5 and mixed.expert_config.router_type == "prototype"


def _routes(model, ids):
    """[L, B, T] the expert each token of ``ids`` is routed to in each layer (as the full pass routes it)."""
    routes = []

    def hook(adapter, args):
        routes.append(adapter.router.route_sequences(args[0], adapter.token_mask).indices[:, 0].view(ids.shape))

    handles = [adapter.register_forward_pre_hook(hook) for _, adapter in adapters(model)]
    _logits(model, ids)
    for handle in handles:
        handle.remove()
    return torch.stack(routes)


def test_measured_prototypes_send_each_domain_to_its_branch(tiny_model, tmp_path):
    """Zero-shot: after the first 16 tokens of a sequence, (almost) every token of domain d goes to branch d. (The
    branches are small, as trained ones are; the random base's two token ranges are given embeddings of different
    means, as two domains' texts differ: random ones alone differ less, in the deeper layers, than one sequence does
    from another.)"""
    base = copy.deepcopy(tiny_model)
    with torch.no_grad():
        embeddings = base.get_input_embeddings().weight
        shift = torch.randn(embeddings.shape[1], generator=torch.Generator().manual_seed(3))
        embeddings[DOMAINS[1][0]:] += 0.02 * shift
    for domain in (0, 1):
        _branch(base, tmp_path / str(domain), domain, seed=domain, size=0.02)
    mixed = _mixed(base, [tmp_path / "0", tmp_path / "1"])
    for domain in (0, 1):
        routes = _routes(mixed, _text(domain, length=64, seed=7))[:, :, 16:]
        assert (routes == domain).double().mean() > 0.9, (domain, (routes == domain).double().mean(dim=(1, 2)))


def test_the_null_expert_keeps_the_base_for_text_unlike_every_branch(tiny_model, tmp_path):
    for domain in (0, 1):
        _branch(tiny_model, tmp_path / str(domain), domain, seed=domain)
    mixed = _mixed(tiny_model, [tmp_path / "0", tmp_path / "1"], null_expert=True)
    with torch.no_grad():
        for _, adapter in adapters(mixed):
            adapter.router.weight += 1e3  # every prototype far from any text: the null wins
    ids = _text(0, seed=3)
    torch.testing.assert_close(_logits(mixed, ids), _logits(tiny_model, ids), rtol=0, atol=0)


def test_one_skill_and_the_null_expert_make_a_mix_the_skill_for_its_text_and_the_base_for_the_rest(tiny_model,
                                                                                                  tmp_path):
    """`mix A --null-expert`: a skill trained alone, beside the base's own behaviour for text unlike its own (how a
    skill keeps what the base knew). Routed to the skill it computes the branch; routed to the null, the base."""
    branch = _branch(tiny_model, tmp_path / "a", 0)
    mixed = _mixed(tiny_model, [tmp_path / "a"], null_expert=True)
    assert [(a.num_experts, a.router.num_experts) for _, a in adapters(mixed)] == [(1, 2)] * 4  # skill, + the null
    ids = _text(0, rows=2, seed=5)
    near, far = copy.deepcopy(mixed), copy.deepcopy(mixed)
    with torch.no_grad():
        for (_, close), (_, away) in zip(adapters(near), adapters(far)):
            close.router.null_distance.fill_(1e9)  # the null never wins
            away.router.weight += 1e3  # the skill's prototype far from any text: the null wins
    torch.testing.assert_close(_logits(near, ids), _logits(branch, ids), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_logits(far, ids), _logits(tiny_model, ids), rtol=0, atol=0)


def test_the_mix_command_writes_an_adapter_that_loads(tiny_model, tiny_folder, tmp_path, capsys):
    for domain in (0, 1):
        _branch(tiny_model, tmp_path / str(domain), domain, seed=domain)
    out = tmp_path / "mixed"
    assert main(["mix", str(tmp_path / "0"), str(tmp_path / "1"), "--output-dir", str(out),
                 "--model", str(tiny_folder)]) == 0
    assert "mixed 2 adapter(s)" in capsys.readouterr().out
    model, config = load_augmented_model(str(tiny_folder), adapter_path=out)
    assert config.router_type == "prototype" and [a.num_experts for _, a in adapters(model)] == [2] * 4
    assert (out / "mix_report.json").is_file()
    with pytest.raises(ConfigError, match="--overwrite"):
        run_mix(MixArguments(adapters=[str(tmp_path / "0"), str(tmp_path / "1")], output_dir=str(out),
                             model=str(tiny_folder)))


def test_what_is_not_a_branch_is_refused_with_the_reason(tiny_model, tiny_folder, tmp_path):
    _branch(tiny_model, tmp_path / "a", 0)
    _branch(tiny_model, tmp_path / "bare", 1, prototypes=False)
    _branch(tiny_model, tmp_path / "c", 1, seed=1)
    moe = augment_model(copy.deepcopy(tiny_model), ExpertConfig(num_experts=4, top_k=2, expert_allocation="uniform"))
    save_adapter(moe, tmp_path / "moe", "tiny")
    save_prototypes(Prototypes(torch.zeros(4, 64), torch.ones(4), 1), tmp_path / "moe")

    def mix(*names, **kw):
        run_mix(MixArguments(adapters=[str(tmp_path / n) for n in names], output_dir=str(tmp_path / "out"),
                             model=str(tiny_folder), **kw))

    with pytest.raises(ConfigError, match="at least two branch adapters, or one with --null-expert"):
        mix("a")
    with pytest.raises(ConfigError, match="same adapter twice"):
        mix("a", "a")
    with pytest.raises(ConfigError, match=r"not a branch.*shared_core.*--num-experts 1"):
        mix("a", "moe")
    with pytest.raises(Exception, match="records no prototypes"):
        mix("a", "bare")
    with pytest.raises(ConfigError, match="--top-k 3 is more than the 2 experts"):
        mix("a", "c", top_k=3)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_branch_loads_as_it_was_saved(tiny_model, tmp_path):
    """read_experts loads through load_adapter_weights: the model is the bare base again afterwards."""
    _branch(tiny_model, tmp_path / "a", 0)
    base = copy.deepcopy(tiny_model)
    assert len(read_experts(base, tmp_path / "a")) == 1
    assert not adapters(base)
    ids = _text(0, seed=1)
    torch.testing.assert_close(_logits(base, ids), _logits(tiny_model, ids), rtol=0, atol=0)
    load_adapter_weights(base, tmp_path / "a")  # and can carry an adapter again


def test_the_null_threshold_is_d_times_the_largest_branch_spread_at_each_prefix_length(tiny_model, tmp_path):
    """At prefix length n the null wins beyond ``D * (max_i spread_i + max_i slope_i / n)``, from each branch's
    recorded ``spread + slope / n``; a branch whose prototypes predate the fit brings its mean spread at every
    length."""
    for domain in (0, 1):
        _branch(tiny_model, tmp_path / str(domain), domain, seed=domain)
    old = load_prototypes(tmp_path / "1", 4, 64)
    save_file({"prototype": old.prototype, "spread": old.spread}, str(tmp_path / "1" / PROTOTYPES_NAME))  # pre-fit
    mixed = _mixed(tiny_model, [tmp_path / "0", tmp_path / "1"], null_expert=True, null_distance=2.5)
    floors, slopes = zip(*(load_prototypes(tmp_path / str(d), 4, 64).by_length() for d in (0, 1)))
    assert bool((floors[0] != old.spread).any()) and bool((slopes[0] > 0).any()) and not bool(slopes[1].any())
    for layer, (_, adapter) in enumerate(adapters(mixed)):
        router = adapter.router
        assert router.spread.tolist() == [floors[0][layer].item(), floors[1][layer].item()]
        assert router.spread_slope.tolist() == [slopes[0][layer].item(), 0.0]
        assert router.null_distance.item() == pytest.approx(2.5 * max(f[layer].item() for f in floors))
        assert router.null_slope.item() == pytest.approx(2.5 * slopes[0][layer].item())


def test_a_null_expert_over_prototypes_recorded_before_the_spread_by_length_needs_a_distance_given(
        tiny_model, tiny_folder, tmp_path):
    """Their threshold is the same at every length, for which the default D (chosen for the threshold by length)
    is too tight: refused in one line naming both ways out; a D given is taken, with a warning."""
    for domain in (0, 1):
        _branch(tiny_model, tmp_path / str(domain), domain, seed=domain)
    old = load_prototypes(tmp_path / "1", 4, 64)
    save_file({"prototype": old.prototype, "spread": old.spread}, str(tmp_path / "1" / PROTOTYPES_NAME))

    def mix(output, **kw):
        return run_mix(MixArguments(adapters=[str(tmp_path / "0"), str(tmp_path / "1")],
                                    output_dir=str(tmp_path / output), model=str(tiny_folder), **kw))

    with pytest.raises(ConfigError, match=r"1's prototypes predate .*--prototype-data.*--null-distance"):
        mix("refused", null_expert=True)
    assert not (tmp_path / "refused").exists()
    with pytest.warns(UserWarning, match="predate the spread by prefix length"):
        mix("given", null_expert=True, null_distance=4.0)
    mix("no-null")  # without a null expert the spreads are not used


def test_adding_a_skill_to_a_mix_leaves_the_experts_already_there_untouched(tiny_model, tiny_folder, tmp_path):
    for name, domain, seed in (("a", 0, 0), ("b", 1, 1), ("c", 0, 2)):
        _branch(tiny_model, tmp_path / name, domain, rank=2 + seed, seed=seed)
    def mix(names, output):
        run_mix(MixArguments(adapters=[str(tmp_path / n) for n in names], output_dir=str(tmp_path / output),
                             model=str(tiny_folder), null_expert=True))
        return load_augmented_model(str(tiny_folder), adapter_path=tmp_path / output)[0]

    ab = mix(["a", "b"], "ab")
    added, abc = mix(["ab", "c"], "ab+c"), mix(["a", "b", "c"], "abc")
    for (_, old), (_, new), (_, direct) in zip(adapters(ab), adapters(added), adapters(abc)):
        rank = old.experts.down.shape[1]
        assert torch.equal(new.experts.down[:2, :rank], old.experts.down)  # the first two skills, as they were
        assert torch.equal(new.experts.up[:2, :rank], old.experts.up)
        assert torch.equal(new.router.weight[:2], old.router.weight)
        assert torch.equal(new.router.spread[:2], old.router.spread)
        assert torch.equal(new.router.spread_slope[:2], old.router.spread_slope)
        torch.testing.assert_close(new.experts.up, direct.experts.up)  # and the same mix as all three at once
        assert torch.equal(new.router.weight, direct.router.weight)
        assert torch.equal(new.router.null_distance, direct.router.null_distance)
        assert torch.equal(new.router.null_slope, direct.router.null_slope)
    ids = _text(1, seed=4)
    torch.testing.assert_close(_logits(added.eval(), ids), _logits(abc.eval(), ids), rtol=1e-5, atol=1e-5)
    for output in ("ab", "ab+c", "abc"):  # each expert named after its branch (what `serve`'s page shows)
        assert expert_names(tmp_path / output, len(output.replace("+", ""))) == list(output.replace("+", ""))
    assert expert_names(tmp_path / "ab", 3) is None  # names for other experts than these are not taken
    run_mix(MixArguments(adapters=[str(tmp_path / "ab"), str(tmp_path / "c")], output_dir=str(tmp_path / "top3"),
                         model=str(tiny_folder), top_k=3))  # --top-k counts the experts, not the adapters


def test_adapters_of_different_bases_are_not_mixed(tiny_model, tiny_folder, tmp_path):
    import json

    for name, domain in (("a", 0), ("b", 1)):
        _branch(tiny_model, tmp_path / name, domain, seed=domain)
    config = tmp_path / "b" / "adapter_config.json"
    meta = json.loads(config.read_text())
    meta["base_model_weights_checksum"] = "0123456789abcdef"  # trained on a sibling of the same shapes
    config.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="different base models"):
        run_mix(MixArguments(adapters=[str(tmp_path / "a"), str(tmp_path / "b")], output_dir=str(tmp_path / "out"),
                             model=str(tiny_folder)))


def test_dropping_a_skill_from_a_mix_leaves_the_mix_of_the_others(tiny_model, tiny_folder, tmp_path, cli_error):
    """`prune --keep-experts` keeps the same experts in every layer, with no calibration: a mix of a, b, c without b
    computes what the mix of a and c computes."""
    for name, domain, seed in (("a", 0, 0), ("b", 1, 1), ("c", 1, 2)):
        _branch(tiny_model, tmp_path / name, domain, rank=2 + seed, seed=seed)
    for names in ("abc", "ac"):
        run_mix(MixArguments(adapters=[str(tmp_path / n) for n in names], output_dir=str(tmp_path / names),
                             model=str(tiny_folder)))
    assert main(["prune", "--adapter", str(tmp_path / "abc"), "--keep-experts", "0,2", "--output-dir",
                 str(tmp_path / "abc-b"), "--model", str(tiny_folder)]) == 0
    assert expert_names(tmp_path / "abc-b", 2) == ["a", "c"]  # the branch names follow the experts kept
    dropped = load_augmented_model(str(tiny_folder), adapter_path=tmp_path / "abc-b")[0].eval()
    direct = load_augmented_model(str(tiny_folder), adapter_path=tmp_path / "ac")[0].eval()
    for ids in (_text(0, seed=8), _text(1, seed=9)):
        torch.testing.assert_close(_logits(dropped, ids), _logits(direct, ids), rtol=1e-5, atol=1e-5)
    line = cli_error(["prune", "--adapter", str(tmp_path / "abc"), "--keep-experts", "0,3", "--output-dir",
                      str(tmp_path / "bad"), "--model", str(tiny_folder)])
    assert "expert 3 does not exist" in line
    assert "one of --keep" in cli_error(["prune", "--adapter", str(tmp_path / "abc"), "--keep", "0.5",
                                         "--keep-experts", "0", "--output-dir", str(tmp_path / "bad")])


def _peft_lora(tiny_model, folder, domain, rank=2, alpha=5.0, seed=0, targets=("gate_proj", "up_proj", "down_proj"),
               **config):
    """A PEFT LoRA as `train --method lora` leaves it (random A and B, alpha / r away from 1), with the prototypes of
    its domain's text: the model, with the LoRA on, in eval mode."""
    import peft

    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(tiny_model), peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, **config))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    model.eval().save_pretrained(str(folder))
    save_prototypes(measure_prototypes(model, _text(domain, rows=16, length=64, seed=seed)), folder)
    return model


def test_a_sequence_routed_to_a_peft_lora_computes_that_lora_exactly(tiny_model, tmp_path):
    """PEFT LoRAs of different ranks, scalings (rsLoRA too) and targets become the experts inside the MLP (``mixlora``):
    a sequence routed to LoRA i gives PEFT's own logits for LoRA i."""
    loras = [_peft_lora(tiny_model, tmp_path / "a", 0, rank=3, alpha=5.0, seed=0),
             _peft_lora(tiny_model, tmp_path / "b", 1, rank=2, alpha=3.0, seed=1, targets=("up_proj", "down_proj"),
                        use_rslora=True)]
    mixed = _mixed(tiny_model, [tmp_path / "a", tmp_path / "b"])
    assert mixed.expert_config.expert_type == "mixlora" and mixed.expert_config.lora_r == 3
    for i, lora in enumerate(loras):
        ids = _text(i, rows=2, seed=5)
        torch.testing.assert_close(_logits(_routed_to(mixed, i), ids), _logits(lora, ids), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(_logits(lora, ids), _logits(tiny_model, ids), atol=1e-2)  # the LoRA does something


def test_a_peft_lora_mix_routes_each_domain_and_takes_a_skill_later(tiny_model, tiny_folder, tmp_path):
    """The command end to end: a mix of PEFT LoRAs saves, loads and routes like any adapter (its experts named after
    the folders), and mixing it with one more LoRA keeps the experts already there."""
    for name, domain in (("math", 0), ("code", 1), ("docs", 0)):
        _peft_lora(tiny_model, tmp_path / name, domain, seed=domain + len(name))
    assert main(["mix", str(tmp_path / "math"), str(tmp_path / "code"), "--output-dir", str(tmp_path / "m2"),
                 "--model", str(tiny_folder), "--null-expert"]) == 0
    assert main(["mix", str(tmp_path / "m2"), str(tmp_path / "docs"), "--output-dir", str(tmp_path / "m3"),
                 "--model", str(tiny_folder), "--null-expert"]) == 0
    assert expert_names(tmp_path / "m3", 3) == ["math", "code", "docs"]
    two, _ = load_augmented_model(str(tiny_folder), adapter_path=tmp_path / "m2")
    three, config = load_augmented_model(str(tiny_folder), adapter_path=tmp_path / "m3")
    assert config.expert_type == "mixlora" and config.null_expert
    for (_, old), (_, new) in zip(adapters(two), adapters(three)):
        for name in old.experts.per_expert_parameters:
            torch.testing.assert_close(getattr(new.experts, name)[:2], getattr(old.experts, name), rtol=0, atol=0)
        torch.testing.assert_close(new.router.weight[:2], old.router.weight[:2], rtol=0, atol=0)


def test_what_a_peft_lora_mix_cannot_hold_is_refused_with_the_reason(tiny_model, tiny_folder, tmp_path):
    _peft_lora(tiny_model, tmp_path / "mlp", 0)
    _peft_lora(tiny_model, tmp_path / "attention", 1, targets=("q_proj", "down_proj"))
    _peft_lora(tiny_model, tmp_path / "dora", 1, use_dora=True)
    _branch(tiny_model, tmp_path / "branch", 1)

    def mix(*names):
        run_mix(MixArguments(adapters=[str(tmp_path / n) for n in names], output_dir=str(tmp_path / "out"),
                             model=str(tiny_folder)))

    with pytest.raises(ConfigError, match=r"q_proj.*MLP projections gate_proj, up_proj, down_proj"):
        mix("mlp", "attention")
    with pytest.raises(ConfigError, match="use_dora=True"):
        mix("mlp", "dora")
    with pytest.raises(ConfigError, match=r"branch is a LoRA beside the MLP.*mlp a LoRA inside it.*one kind"):
        mix("branch", "mlp")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_prototypes_an_adapter_lacks_are_measured_on_the_text_given(chat_folder, tmp_path):
    """A LoRA trained elsewhere records no prototypes: `mix --prototype-data` measures them on its text, with the
    LoRA on (as `train` would have), and takes the LoRA off the base again; '-' keeps a branch's own."""
    from llama_expert import load_base_model, load_tokenizer
    from llama_expert.lifecycle.calibration import calibration_windows

    base = load_base_model(str(chat_folder))
    lora = _peft_lora(base, tmp_path / "elsewhere", 0)
    (tmp_path / "elsewhere" / "prototypes.safetensors").unlink()
    _peft_lora(base, tmp_path / "ours", 1, seed=1)
    text = tmp_path / "legal.txt"
    text.write_text("The parties agree that the lessee shall pay the rent on the first day of each month.\n" * 40)

    def mix(data=None, out="out"):
        return run_mix(MixArguments(adapters=[str(tmp_path / "elsewhere"), str(tmp_path / "ours")],
                                    output_dir=str(tmp_path / out), prototype_data=data))

    with pytest.raises(Exception, match="records no prototypes.*mix --prototype-data"):
        mix()
    with pytest.raises(ConfigError, match="names 1 sources for 2 adapters"):
        mix(str(text))
    out = mix(f"{text},-")
    windows = calibration_windows(load_tokenizer(str(chat_folder)), str(text), 256, 8192, progress=False)
    want = measure_prototypes(lora, windows).prototype
    model, _ = load_augmented_model(str(chat_folder), adapter_path=out)
    got = torch.stack([adapter.router.weight[0] for _, adapter in adapters(model)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert json.loads((out / "mix_report.json").read_text())["prototype_data"] == [str(text), None]
    bare = copy.deepcopy(base)
    read_experts(bare, tmp_path / "elsewhere", windows)
    assert not [name for name, _ in bare.named_modules() if "lora" in name] and not adapters(bare)
    ids = torch.randint(0, 100, (2, 16))
    torch.testing.assert_close(_logits(bare, ids), _logits(base, ids), rtol=0, atol=0)


def test_loras_naming_different_bases_are_mixed_with_a_warning(tiny_model, tiny_folder, tmp_path):
    """A PEFT LoRA records its base's name, not its weights: two names are a warning (one model may go by two)."""
    for name, domain in (("a", 0), ("b", 1)):
        _peft_lora(tiny_model, tmp_path / name, domain, seed=domain)
    config = tmp_path / "b" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": "another/base"}))
    with pytest.warns(UserWarning, match="name different bases.*another/base"):
        run_mix(MixArguments(adapters=[str(tmp_path / "a"), str(tmp_path / "b")], output_dir=str(tmp_path / "out"),
                             model=str(tiny_folder)))
