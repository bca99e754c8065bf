"""`serve`'s routing view: ``POST /v1/routing`` gives each token's expert per layer as the router computes it (checked
against the router's own logits), names a mix's experts, refuses what it cannot route in one line; and the page at
``/``, opened in a real headless Chromium, colours the tokens as the JSON says and chats."""

import json
import os
import shutil

import httpx
import pytest
import torch
import torch.nn.functional as F

from llama_expert import ExpertConfig, augment_model, load_augmented_model, save_adapter
from llama_expert.inference.openai_app import Service, build_app
from llama_expert.inference.routing_view import NULL_LABEL, expert_labels, routing_answer, token_pieces
from llama_expert.inference.server import ServeArguments
from llama_expert.integration.base_models import load_base_model, load_tokenizer
from llama_expert.integration.surgery import adapters
from llama_expert.metrics.routing import token_routing

KEY = "page-key-1"
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
NAMES = ["code", "prose", "maths"]
TEXT = "The quick brown fox jumps over the lazy dog.\nThe lazy dog sleeps; été, naïve"


def _random_routers(model, seed=0):
    """Router rows far apart, so that the tokens of a short text go to different experts."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, adapter in adapters(model):
            adapter.router.weight.copy_(torch.randn(adapter.router.weight.shape, generator=generator) * 3)
    return model


@pytest.fixture(scope="module")
def routed(trained_base, tmp_path_factory):
    """(base folder with a chat template, a top-1 adapter of 3 experts and a null expert, named as a mix names them)."""
    root = tmp_path_factory.mktemp("routed")
    base = root / "base"
    shutil.copytree(trained_base[0], base)
    tokenizer = load_tokenizer(str(base))
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(base)
    model = augment_model(load_base_model(str(base)), ExpertConfig(num_experts=3, top_k=1, null_expert=True,
                                                                   expert_allocation="uniform"))
    save_adapter(_random_routers(model), root / "adapter", base_model_name_or_path=str(base))
    (root / "adapter" / "mix_report.json").write_text(json.dumps({"experts": NAMES}))  # as `mix` writes it
    return base, root / "adapter"


@pytest.fixture(scope="module")
def server(routed, serve_process):
    """A `llama-expert serve` process on the routed adapter, with an API key: yields its URL."""
    base, adapter = routed
    yield from serve_process(base, "--adapter", str(adapter), "--served-model-name", "tiny", key=KEY)


def _route(url, body, key=KEY):
    return httpx.post(f"{url}/v1/routing", json=body, timeout=60, headers={"Authorization": f"Bearer {key}"})


@torch.no_grad()
def _router_choices(base, adapter, ids):
    """[L][T] each layer's top-1 choice for ``ids`` from the router's own logits ``h W_g`` over the adapter's inputs
    (captured in an ordinary forward pass, the fast path's)."""
    model, _ = load_augmented_model(str(base), adapter_path=adapter)
    model.eval()
    inputs = []
    handles = [a.register_forward_pre_hook(lambda _, args: inputs.append(args[0])) for _, a in adapters(model)]
    model(input_ids=torch.tensor([ids]), use_cache=False)
    for handle in handles:
        handle.remove()
    return [F.linear(h[0].float(), a.router.weight).argmax(-1).tolist() for h, (_, a) in zip(inputs, adapters(model))]


def test_the_routing_of_a_text_is_what_its_routers_choose(server, routed):
    base, adapter = routed
    reply = _route(server, {"text": TEXT, "model": "tiny"})
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    ids = load_tokenizer(str(base))(TEXT)["input_ids"]
    assert answer["token_ids"] == ids and "".join(answer["tokens"]) == TEXT and len(answer["tokens"]) == len(ids)
    assert answer["num_experts"] == 4 and answer["null_expert"] is True and answer["top_k"] == 1
    assert answer["experts"] == NAMES + [NULL_LABEL]
    assert [layer["layer"] for layer in answer["layers"]] == [0, 1]
    assert [layer["experts"] for layer in answer["layers"]] == _router_choices(base, adapter, ids)
    assert all("gates" not in layer for layer in answer["layers"])  # top-1: the choice says it all
    chosen = {e for layer in answer["layers"] for e in layer["experts"]}
    assert len(chosen) > 1, chosen  # a test of colours needs more than one


def test_top_k_routing_gives_every_gate(trained_base):
    """Top-2: each token's two gates are the softmax of its two largest logits; the choice is the larger."""
    model = _random_routers(augment_model(load_base_model(str(trained_base[0])), ExpertConfig(
        num_experts=4, top_k=2, expert_allocation="uniform"))).eval()
    tokenizer = load_tokenizer(str(trained_base[0]))
    ids = tokenizer(TEXT)["input_ids"]
    inputs = []
    handles = [a.register_forward_pre_hook(lambda _, args: inputs.append(args[0])) for _, a in adapters(model)]
    answer = routing_answer(token_routing(model, torch.tensor(ids)), expert_labels(model, None))
    for handle in handles:
        handle.remove()
    assert answer["experts"] == [f"expert {i}" for i in range(4)] and answer["null_expert"] is False
    for layer, h, (_, adapter) in zip(answer["layers"], inputs, adapters(model)):
        logits = F.linear(h[0].float(), adapter.router.weight)
        top, index = logits.topk(2, dim=-1)
        want = torch.zeros_like(logits).scatter(1, index, torch.softmax(top, dim=-1))
        torch.testing.assert_close(torch.tensor(layer["gates"]), want, atol=1e-4, rtol=0)
        assert layer["experts"] == index[:, 0].tolist() and layer["top_k"] == 2


def test_the_pieces_of_a_text_join_to_it(trained_base):
    tokenizer = load_tokenizer(str(trained_base[0]))
    for text in (TEXT, "  leading spaces", "ü\n\n€ tail ", "x"):
        ids = tokenizer(text)["input_ids"]
        pieces = token_pieces(tokenizer, text, ids)
        assert "".join(pieces) == text and len(pieces) == len(ids)
    assert token_pieces(tokenizer, "é", tokenizer("é")["input_ids"]) == ["é", ""]  # two bytes, one character


def test_what_cannot_be_routed_is_refused_in_one_line(server, trained_base):
    assert _route(server, {"text": "The"}, key="wrong").status_code == 401
    for body, param in (({}, "text"), ({"text": ""}, "text"), ({"text": 3}, "text"),
                        ({"text": "word " * 40}, "text"), ({"text": "The", "model": "gpt-4"}, "model")):
        reply = _route(server, body)
        error = reply.json()["error"]
        assert reply.status_code in (400, 404) and error["param"] == param and "\n" not in error["message"], body
    assert _route(server, {"text": "word " * 40}).json()["error"]["code"] == "context_length_exceeded"
    assert _route(server, {"text": "The"}).status_code == 200  # still serving
    from fastapi.testclient import TestClient

    folder = str(trained_base[0])  # a base model without adapter, served in this process
    service = Service(load_base_model(folder).eval(), load_tokenizer(folder), "base", ServeArguments(), None)
    reply = TestClient(build_app(service)).post("/v1/routing", json={"text": "The"})
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "no_adapter"
    assert "--adapter" in reply.json()["error"]["message"] and "\n" not in reply.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------- in a browser
def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def page(server):
    """A headless Chromium tab on the page at ``/`` (the system's Chromium, driven by Playwright)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is part of the [test] extra")
    executable = os.environ.get("CHROMIUM_PATH") or _chromium()
    if not executable:
        pytest.skip("no Chromium on this machine: apt-get install chromium (or set CHROMIUM_PATH)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        tab = browser.new_page()
        failures = []
        tab.on("pageerror", lambda exc: failures.append(str(exc)))
        tab.goto(server)
        yield tab
        browser.close()
    assert failures == [], failures  # no JavaScript error on the page


def _spans(page):
    return page.eval_on_selector_all("#tokens .tok", "spans => spans.map(s => [s.textContent, s.dataset.expert, "
                                                     "getComputedStyle(s).backgroundColor])")


def test_the_page_colours_each_token_by_the_expert_the_json_gives(page, server):
    assert page.is_visible("#api-key")  # this server needs a key: the page asks for it
    page.fill("#api-key", KEY)
    page.fill("#text", TEXT)
    page.click("#show")
    answer = _route(server, {"text": TEXT}).json()
    count = len(answer["tokens"])
    page.wait_for_function(f"document.querySelectorAll('#tokens .tok').length === {count}")
    for layer in answer["layers"]:
        page.select_option("#layer", str(layer["layer"]))
        spans = _spans(page)
        assert [s[0] for s in spans] == answer["tokens"]
        assert [s[1] for s in spans] == [str(e) for e in layer["experts"]]
        colours = {}
        for _, expert, colour in spans:
            colours.setdefault(expert, set()).add(colour)
        assert all(len(c) == 1 for c in colours.values()), colours  # one colour per expert
        assert len({c.pop() for c in colours.values()}) == len(colours)  # and a different one for each
    page.select_option("#layer", "most")
    votes = [[layer["experts"][t] for layer in answer["layers"]] for t in range(count)]
    most = [max(range(4), key=lambda e: (v.count(e), -e)) for v in votes]  # the most chosen, the lowest on a tie
    assert [s[1] for s in _spans(page)] == [str(e) for e in most]
    legend = page.eval_on_selector_all("#legend .legend-item", "items => items.map(i => i.textContent)")
    assert legend == [f"{name}: {most.count(e)}" for e, name in enumerate(NAMES + [NULL_LABEL])]
    page.select_option("#layer", "blend")
    assert len(_spans(page)) == count and "4 experts" in page.inner_text("#routing-status")


def test_the_page_chats_and_says_what_went_wrong(page):
    page.fill("#api-key", KEY)
    page.fill("#max-tokens", "6")
    page.fill("#chat-input", "The quick")
    page.click("#send")
    page.wait_for_selector("#messages .msg.assistant")
    assert page.inner_text("#messages .msg.user").startswith("The quick")
    assert page.locator("#messages .msg.assistant.error").count() == 0
    page.fill("#api-key", "wrong")
    page.fill("#chat-input", "again")
    page.click("#send")
    page.wait_for_selector("#messages .msg.assistant.error")
    assert "API key" in page.inner_text("#messages .msg.assistant.error")
