"""The decode fast path (modeling/fused_inference.py) gives what the general path gives, for every router and
bank that has an inference form, falls back for those that do not, and never serves a stale plan; on a CPU its
compiled kernel (modeling/decode_kernel.py) gives the same, and without a compiler the PyTorch form runs."""

import copy
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama_expert import ExpertConfig
from llama_expert.integration.prototypes import fit_by_length
from llama_expert.modeling.decode_kernel import LayerKernel, build_kernel
from llama_expert.modeling.adapter import MoEAdapter
from llama_expert.modeling.experts import MixLoRAExperts
from llama_expert.modeling.fused_inference import FusedInference
from llama_expert.modeling.routing import ROUTERS, PrefixState
from llama_expert.modeling.routing.prefix_state import sequence_prefix_means

HIDDEN = 16


class TinyMLP(torch.nn.Module):
    """A Llama-style MLP (mixlora reads its parts)."""

    def __init__(self):
        super().__init__()
        self.gate_proj = torch.nn.Linear(HIDDEN, 32, bias=False)
        self.up_proj = torch.nn.Linear(HIDDEN, 32, bias=False)
        self.down_proj = torch.nn.Linear(32, HIDDEN, bias=False)
        self.act_fn = torch.nn.SiLU()

    def forward(self, h):
        return self.down_proj(self.act_fn(self.gate_proj(h)) * self.up_proj(h))


def trained_adapter(router_type="aux_free", expert_type="shared_core", num_experts=6, seed=0, spread=0.5, **extra):
    """An adapter whose every parameter is random and non-zero (as after training; ``spread``: the experts' scale), in
    eval mode."""
    torch.manual_seed(seed)
    config = ExpertConfig(num_experts=num_experts, top_k=2, lora_r=4, router_type=router_type,
                          expert_type=expert_type, router_noise=True, **extra)
    adapter = MoEAdapter(TinyMLP(), HIDDEN, num_experts, config)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if not name.startswith("base_mlp"):
                p.copy_(torch.randn_like(p) * (spread if name.startswith("experts.") else 0.5))
    return adapter.eval()


def general_and_fused(adapter, hidden):
    with torch.no_grad():
        adapter.fused_inference = False
        general = adapter(hidden)
        adapter.fused_inference = True
        fused = adapter(hidden)
    return general, fused


FAST_ROUTERS = ["aux_free", "noisy_top_k", "switch", "soft"]  # the routers with an inference form
FAST_BANKS = {"shared_core": {}, "shared_down": {}, "lora_experts": {},
              "lora_experts+shared": {"shared_expert_rank": 3}}
NULL = {"experts only": {}, "null expert": {"null_expert": True}}
KERNEL_BANKS = {**FAST_BANKS, "mixlora": {"spread": 0.2, "seed": 3}}  # mixlora: the compiled kernel only


def fast_adapter(router_type, bank, null, **kw):
    return trained_adapter(router_type, bank.split("+")[0], **KERNEL_BANKS[bank], **NULL[null], **kw)


def assert_some_token_chose_the_null(adapter, hidden):
    """With a null expert: some token did choose it (else the case tests nothing new)."""
    if adapter.router.null_choices:
        with torch.no_grad():
            routing = adapter.router(hidden.reshape(-1, HIDDEN))
        assert bool((routing.indices == adapter.num_experts).any()), "no token chose the null expert"


@pytest.mark.parametrize("null", NULL)
@pytest.mark.parametrize("router_type", FAST_ROUTERS)
@pytest.mark.parametrize("bank", FAST_BANKS)
def test_the_fused_path_equals_the_general_path(router_type, bank, null):
    adapter = fast_adapter(router_type, bank, null)
    for shape in ((1, 1, HIDDEN), (8, 1, HIDDEN), (2, 24, HIDDEN)):  # decode at batch 1 and 8, a prefill
        hidden = torch.randn(*shape)
        general, fused = general_and_fused(adapter, hidden)
        assert adapter.inference_plan is not None and adapter.inference_plan.ready()
        torch.testing.assert_close(fused, general, rtol=1e-5, atol=1e-5)
        assert not torch.equal(general, adapter.base_mlp(hidden))  # the adapters do change the output
    assert_some_token_chose_the_null(adapter, hidden)


def test_a_bfloat16_base_takes_the_same_float32_adapter_path():
    adapter = trained_adapter()
    adapter.base_mlp.to(torch.bfloat16)
    general, fused = general_and_fused(adapter, torch.randn(3, 5, HIDDEN, dtype=torch.bfloat16))
    assert fused.dtype == torch.bfloat16
    torch.testing.assert_close(fused, general)


@pytest.mark.parametrize("router_type,expert_type,kernel", [("expert_choice", "shared_core", True),
                                                             ("aux_free", "mixlora", False)])
def test_routers_and_banks_without_an_inference_form_keep_the_general_path(router_type, expert_type, kernel):
    """Expert choice has no inference form; mixlora's is its compiled kernel alone (here turned off)."""
    adapter = trained_adapter(router_type, expert_type)
    adapter.decode_kernel = kernel
    general, fused = general_and_fused(adapter, torch.randn(2, 7, HIDDEN))
    assert adapter.inference_plan is not None and not adapter.inference_plan.ready()
    assert torch.equal(fused, general)


def test_training_gradients_and_statistics_take_the_general_path():
    adapter = trained_adapter()
    hidden = torch.randn(2, 5, HIDDEN)
    adapter.train()
    assert not adapter.use_fused_inference(hidden)
    adapter.eval()
    assert not adapter.use_fused_inference(hidden)  # gradients on
    with torch.no_grad():
        assert adapter.use_fused_inference(hidden)
        adapter.router.record_statistics = True  # routing_health counts choices: the router must see the tokens
        assert not adapter.use_fused_inference(hidden)
        adapter(hidden)
        assert adapter.router.tokens_seen == 10


def test_a_changed_parameter_rebuilds_the_plan():
    """In-place updates (an optimiser step, loading weights) and pruning reach the next fused call."""
    adapter = trained_adapter()
    hidden = torch.randn(4, 3, HIDDEN)
    general_and_fused(adapter, hidden)
    with torch.no_grad():
        adapter.experts.up.mul_(2.0)  # in place
        adapter.residual_scale.fill_(0.3)
        adapter.router.bias.add_(torch.linspace(-1, 1, adapter.num_experts))  # aux_free's balancing bias
    general, fused = general_and_fused(adapter, hidden)
    torch.testing.assert_close(fused, general, rtol=1e-5, atol=1e-5)
    adapter.keep_experts([0, 2, 5])  # new parameter tensors
    general, fused = general_and_fused(adapter, hidden)
    torch.testing.assert_close(fused, general, rtol=1e-5, atol=1e-5)
    adapter.experts.up = torch.nn.Parameter(adapter.experts.up.detach() * 0.5)  # a replaced parameter
    general, fused = general_and_fused(adapter, hidden)
    torch.testing.assert_close(fused, general, rtol=1e-5, atol=1e-5)
    adapter.load_state_dict({k: torch.zeros_like(v) if k.endswith("experts.up") else v
                             for k, v in adapter.state_dict().items()})
    with torch.no_grad():
        torch.testing.assert_close(adapter(hidden), adapter.base_mlp(hidden))  # B = 0: the base MLP again


def test_every_registered_router_says_whether_it_has_an_inference_form():
    """A new router gets the general path until it implements ``inference_gates`` (no silent wrong gates)."""
    for name in ROUTERS.names():
        router = ROUTERS.get(name)
        assert isinstance(router.has_inference_gates, bool)
        if not router.has_inference_gates:
            with pytest.raises(NotImplementedError):
                router.inference_gates(router.from_config(HIDDEN, 4, ExpertConfig(num_experts=4, top_k=2)),
                                       torch.zeros(1, 4))



@pytest.mark.parametrize("router_type", ["noisy_top_k", "switch", "soft"])
def test_a_fused_optimiser_step_between_two_inference_passes_reaches_the_plan(router_type):
    """A fused AdamW step (what Hugging Face's Trainer uses) leaves parameter versions unchanged."""
    adapter = trained_adapter(router_type)
    hidden = torch.randn(2, 5, HIDDEN)
    general_and_fused(adapter, hidden)  # a plan exists
    optimizer = torch.optim.AdamW([p for n, p in adapter.named_parameters() if not n.startswith("base_mlp")],
                                  lr=0.5, fused=True)
    adapter(hidden).pow(2).mean().backward()  # eval mode, gradients on: the general path
    optimizer.step()
    general, fused = general_and_fused(adapter, hidden)
    torch.testing.assert_close(fused, general, rtol=1e-5, atol=1e-5)


def test_replaced_modules_and_scales_and_mode_switches_reach_the_plan():
    adapter = trained_adapter("noisy_top_k")
    hidden = torch.randn(2, 5, HIDDEN)
    general_and_fused(adapter, hidden)
    adapter.residual_scale = torch.nn.Parameter(torch.tensor([3.0]))
    general, fused = general_and_fused(adapter, hidden)
    torch.testing.assert_close(fused, general, rtol=1e-5, atol=1e-5)
    adapter.router = trained_adapter("noisy_top_k", seed=1).router
    general, fused = general_and_fused(adapter, hidden)
    torch.testing.assert_close(fused, general, rtol=1e-5, atol=1e-5)
    adapter.experts.up.data.mul_(3.0)  # bypasses version counters: a mode switch rebuilds the plan
    adapter.train().eval()
    general, fused = general_and_fused(adapter, hidden)
    torch.testing.assert_close(fused, general, rtol=1e-5, atol=1e-5)


def test_an_inference_pass_clears_the_last_training_pass_losses():
    adapter = trained_adapter("noisy_top_k").train()
    adapter(torch.randn(2, 5, HIDDEN))
    assert adapter.aux_loss is not None
    adapter.eval()
    with torch.no_grad():
        adapter(torch.randn(2, 5, HIDDEN))
    assert adapter.aux_loss is None and adapter.z_loss is None  # as the general path leaves them


# --- the compiled decode kernel (modeling/decode_kernel.py): the fused path as one C call on a CPU ---

needs_compiler = pytest.mark.skipif(not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")),
                                    reason="the decode kernel is built with the system C compiler")


def kernel_and_pytorch(adapter, hidden):
    """(general path, compiled kernel, PyTorch fused path) outputs."""
    general, kernel = general_and_fused(adapter, hidden)
    assert adapter.inference_plan.kernel is not None, "the kernel should run here"
    adapter.decode_kernel, adapter.inference_plan = False, None
    with torch.no_grad():
        pytorch = adapter(hidden)
    assert adapter.inference_plan.kernel is None
    adapter.decode_kernel, adapter.inference_plan = True, None
    return general, kernel, pytorch


@needs_compiler
@pytest.mark.parametrize("null", NULL)
@pytest.mark.parametrize("router_type", FAST_ROUTERS)
@pytest.mark.parametrize("bank", FAST_BANKS)
def test_the_compiled_kernel_equals_the_general_path(router_type, bank, null):
    adapter = fast_adapter(router_type, bank, null, num_experts=7)
    with torch.no_grad():
        adapter.router.weight.mul_(4.0)  # decisive routing: a near-tie could flip between the two sums' orders
    for shape in ((1, 1, HIDDEN), (8, 1, HIDDEN), (3, 40, HIDDEN)):
        hidden = torch.randn(*shape)
        general, kernel, pytorch = kernel_and_pytorch(adapter, hidden)
        torch.testing.assert_close(kernel, general, rtol=1e-5, atol=1e-5)
        # float32 sums in other orders (the PyTorch plan multiplies W1^T A once): a few 1e-5 at values near 1; a
        # wrong expert or gate is off by 0.1 or more
        torch.testing.assert_close(pytorch, general, rtol=5e-5, atol=5e-5)
    assert_some_token_chose_the_null(adapter, hidden)


@needs_compiler
def test_the_compiled_kernel_rounds_a_bfloat16_base_once():
    adapter = trained_adapter()
    adapter.base_mlp.to(torch.bfloat16)
    hidden = torch.randn(4, 9, HIDDEN, dtype=torch.bfloat16)
    general, kernel, pytorch = kernel_and_pytorch(adapter, hidden)
    assert kernel.dtype == torch.bfloat16
    with torch.no_grad():  # the exact sum in float32, rounded once: the kernel is within half a bfloat16 step
        flat = hidden.reshape(-1, HIDDEN).float()
        routing = adapter.router(flat)
        moe = adapter.experts(flat, routing.indices, routing.gates).view(hidden.shape)
        exact = adapter.base_mlp(hidden).float() + adapter.residual_scale * moe
    torch.testing.assert_close(kernel.float(), exact, rtol=2 ** -7, atol=1e-6)
    torch.testing.assert_close(kernel, general)


def mixlora_adapter(router_type="aux_free", null="experts only", **extra):
    """A trained mixlora adapter (LoRAs inside the MLP's projections: a mix of PEFT LoRAs) at the scale of one."""
    adapter = trained_adapter(router_type, "mixlora", num_experts=5, spread=0.2, **NULL[null], **extra)
    with torch.no_grad():
        if router_type != "prototype":
            adapter.router.weight.mul_(4.0)  # decisive routing, as above
    return adapter


def general_and_kernel(adapter, hidden, monkeypatch):
    """(general path, kernel) outputs of a mixlora adapter; the general layer is made to fail for the second, so the
    kernel is what ran."""
    with torch.no_grad():
        adapter.fused_inference = False
        general = adapter(hidden)
        adapter.fused_inference = True
        with monkeypatch.context() as patch:
            patch.setattr(MixLoRAExperts, "layer_output", None)
            kernel = adapter(hidden)
    return general, kernel


def assert_close_at_scale(got, want, tolerance=1e-5):
    """Close relative to the output's scale: float32 sums in two orders (the kernel's and PyTorch's)."""
    torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance * float(want.abs().max()))


@needs_compiler
@pytest.mark.parametrize("null", NULL)
@pytest.mark.parametrize("router_type", FAST_ROUTERS)
def test_the_compiled_kernel_computes_the_mixlora_layer_as_the_general_path(router_type, null, monkeypatch):
    """The frozen projections by PyTorch, the routing and the chosen experts' LoRAs in C: the general path's layer."""
    adapter = mixlora_adapter(router_type, null)
    for shape in ((1, 1, HIDDEN), (8, 1, HIDDEN), (3, 40, HIDDEN)):
        hidden = torch.randn(*shape)
        general, kernel = general_and_kernel(adapter, hidden, monkeypatch)
        assert isinstance(adapter.inference_plan.kernel, LayerKernel)
        assert_close_at_scale(kernel, general)
        assert not torch.allclose(general, adapter.base_mlp(hidden), rtol=0.01, atol=0.01)
    assert_some_token_chose_the_null(adapter, hidden)


@needs_compiler
def test_the_mixlora_kernel_keeps_the_base_bit_for_bit_where_the_null_expert_is_chosen(monkeypatch):
    """A token routed to the null expert alone (top-1) gets the frozen MLP's own output, as the general path."""
    adapter = mixlora_adapter(null="null expert")
    adapter.router.top_k = 1
    hidden = torch.randn(2, 30, HIDDEN)
    general, kernel = general_and_kernel(adapter, hidden, monkeypatch)
    with torch.no_grad():
        null = (adapter.router(hidden.reshape(-1, HIDDEN)).indices[:, 0] == adapter.num_experts).view(2, 30)
        base = adapter.base_mlp(hidden)
    assert bool(null.any()) and not bool(null.all())
    assert torch.equal(kernel[null], base[null]) and torch.equal(general[null], base[null])
    assert_close_at_scale(kernel, general)


@needs_compiler
def test_the_mixlora_kernel_takes_a_bfloat16_base_and_leaves_others_to_the_general_path(monkeypatch):
    adapter = mixlora_adapter()
    adapter.base_mlp.to(torch.bfloat16)
    hidden = torch.randn(3, 7, HIDDEN, dtype=torch.bfloat16)
    general, kernel = general_and_kernel(adapter, hidden, monkeypatch)
    assert kernel.dtype == torch.bfloat16 and adapter.inference_plan.kernel is not None
    torch.testing.assert_close(kernel.float(), general.float(), rtol=2 ** -6, atol=2 ** -6 * float(general.abs().max()))
    adapter.base_mlp.act_fn = torch.nn.GELU()  # the kernel computes silu: another activation, the general path
    adapter.inference_plan = None
    general, fused = general_and_fused(adapter, hidden)
    assert adapter.inference_plan.kernel is None and torch.equal(fused, general)


@needs_compiler
def test_the_mixlora_kernel_leaves_a_hooked_or_replaced_projection_to_its_module(monkeypatch):
    """The kernel path calls ``F.linear`` on the MLP's weights: a projection with a forward hook, or one that is not a
    plain ``nn.Linear`` (a wrapper, a 4-bit layer), is called as a module on the general path instead."""
    adapter = mixlora_adapter()
    hidden = torch.randn(2, 5, HIDDEN)
    general, kernel = general_and_kernel(adapter, hidden, monkeypatch)
    calls = []
    hook = adapter.base_mlp.up_proj.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    with torch.no_grad():
        hooked = adapter(hidden)
        object.__setattr__(adapter, "pass_kernel", adapter.kernel_for_pass((2, 5)))  # as a model pass sets it
        in_pass = adapter(hidden)
        object.__setattr__(adapter, "pass_kernel", None)
    hook.remove()
    assert len(calls) == 2 and torch.equal(hooked, general) and torch.equal(in_pass, general)
    for register in (torch.nn.modules.module.register_module_forward_hook,
                     torch.nn.modules.module.register_module_forward_pre_hook):
        handle = register(lambda module, *args: calls.append("global") if isinstance(module, torch.nn.Linear) else None)
        with torch.no_grad():
            globally_hooked = adapter(hidden)
        handle.remove()
        assert calls[-1] == "global" and torch.equal(globally_hooked, general)
    up_proj = adapter.base_mlp.up_proj
    up_proj.forward = lambda x: torch.nn.functional.linear(x, up_proj.weight) * 2  # as Accelerate's hooks set it
    with torch.no_grad():
        assert torch.equal(adapter(hidden), general_and_fused(adapter, hidden)[0])
        assert not torch.allclose(adapter(hidden), general)
    del up_proj.forward

    class Doubled(torch.nn.Linear):  # a wrapped projection: its own forward must run
        def forward(self, x):
            return 2 * super().forward(x)

    doubled = Doubled(HIDDEN, adapter.base_mlp.up_proj.out_features, bias=False)
    doubled.weight = adapter.base_mlp.up_proj.weight
    adapter.base_mlp.up_proj = doubled
    general, _ = general_and_fused(adapter, hidden)
    with torch.no_grad():
        assert torch.equal(adapter(hidden), general) and not torch.allclose(general, kernel)


@needs_compiler
def test_the_kernel_leaves_other_layouts_to_pytorch():
    """A non-contiguous or float64 input takes the PyTorch fused path, with the same result."""
    adapter = trained_adapter()
    hidden = torch.randn(9, 4, HIDDEN).transpose(0, 1)
    general, fused = general_and_fused(adapter, hidden)
    assert adapter.inference_plan.kernel is not None and not adapter.inference_plan.kernel.accepts(
        hidden, adapter.base_mlp(hidden))
    torch.testing.assert_close(fused, general, rtol=1e-5, atol=1e-5)


@needs_compiler
def test_an_adapter_that_ran_the_kernel_can_be_copied_and_pickled():
    """The copy derives its own plan (the kernel's ctypes structures point at the original's tensors)."""
    adapter = trained_adapter()
    hidden = torch.randn(2, 3, HIDDEN)
    general, kernel, _ = kernel_and_pytorch(adapter, hidden)
    with torch.no_grad():
        adapter(hidden)
    assert adapter.inference_plan.kernel is not None
    for copied in (copy.deepcopy(adapter), pickle.loads(pickle.dumps(adapter))):
        assert copied.inference_plan is None
        with torch.no_grad():
            torch.testing.assert_close(copied(hidden), kernel, rtol=0, atol=0)
        assert copied.inference_plan.kernel is not None and copied.inference_plan is not adapter.inference_plan


@needs_compiler
def test_the_kernel_is_built_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_EXPERT_CACHE", str(tmp_path))
    built = build_kernel()
    assert built.parent == tmp_path / "kernels" and built.exists()
    stamp = built.stat().st_mtime_ns
    assert build_kernel() == built and built.stat().st_mtime_ns == stamp
    assert [p.name for p in built.parent.iterdir()] == [built.name]  # no temporary file left


@pytest.mark.parametrize("environment,warning", [({"CC": "/nonexistent/cc"}, "the compiled decode kernel is unavailable"),
                                                 ({"LLAMA_EXPERT_DECODE_KERNEL": "0"}, None)])
def test_without_the_kernel_adapters_take_the_pytorch_fused_path(tmp_path, environment, warning):
    """No compiler: one warning that names the fix, and the same outputs; turned off: no warning."""
    script = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]);"
        "from test_fused_inference import trained_adapter, general_and_fused;"
        "adapter = trained_adapter(); general, fused = general_and_fused(adapter, torch.randn(2, 5, 16));"
        "assert adapter.inference_plan.kernel is None; torch.testing.assert_close(fused, general);"
        "general_and_fused(trained_adapter('noisy_top_k'), torch.randn(1, 1, 16)); print('ok')")
    env = {**os.environ, "LLAMA_EXPERT_CACHE": str(tmp_path), **environment}
    done = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
    if warning:
        assert done.stderr.count(warning) == 1 and "install a C compiler" in done.stderr, done.stderr
    else:
        assert "decode kernel" not in done.stderr
    assert not (tmp_path / "kernels").exists() or not any((tmp_path / "kernels").iterdir())


@needs_compiler
def test_the_kernel_gives_the_null_logit_of_the_general_path_bit_for_bit():
    """The null's logit ``-(D + S / n) / T`` in the same float32 operations on both paths, so that they choose alike
    where it nearly ties a real expert's: random thresholds, slopes, temperatures (T != 1 above all) and lengths."""
    import ctypes
    import random

    from llama_expert.modeling.decode_kernel import PlanStruct, kernel_function, kernel_library

    library = kernel_library()
    assert library is not None, "the kernel should build here"
    logits = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p)(
        kernel_function(library, "prototype_logits"))
    draw, zero, out = random.Random(0), torch.zeros(1), torch.zeros(2)
    for _ in range(2000):
        temperature = draw.choice([0.1, 0.3, 1 / 3, 0.7, 2.5, draw.uniform(0.01, 5.0)])
        router = ROUTERS.get("prototype")(1, 1, 1, temperature=temperature, null=True)
        count = float(draw.randint(1, 4000))
        with torch.no_grad():
            router.null_distance.fill_(draw.uniform(0.01, 50.0))
            router.null_slope.fill_(draw.uniform(-20.0, 50.0))
            general = router.logits(torch.zeros(1, 1), torch.tensor([count]))[0, -1]
        plan_of = router.kernel_routing()
        plan = PlanStruct(hidden=1, experts=2, real=1, top_k=1, prefix_mean=1, divisor=plan_of.divisor,
                          null_logit=plan_of.null_logit, null_slope=plan_of.null_slope, alpha=1.0,
                          router_rows=zero.data_ptr(), centre=zero.data_ptr(), row_norms=zero.data_ptr())
        logits(ctypes.addressof(plan), zero.data_ptr(), count, out.data_ptr())
        assert general.item() == out[1].item(), (temperature, count)


# --- routers that route by the sequence's prefix mean (sequence_aux_free, prototype: a mix's router) ---

PREFIX_CASES = [("prototype", "lora_experts", 1), ("prototype", "lora_experts+shared", 2),
                ("prototype", "shared_core", 2), ("sequence_aux_free", "shared_core", 2),
                ("sequence_aux_free", "lora_experts", 1), ("prototype", "mixlora", 1), ("prototype", "mixlora", 2)]


def prefix_adapter(router_type, bank, top_k, null):
    """A trained adapter routed by the prefix mean; a prototype router gets prototypes at the scale of the hidden
    states, and a null threshold that shrinks with the prefix's length as its nearest distances do: the
    least-squares ``null_distance + null_slope / n`` through them on ``padded_pass``, so that the null wins for some
    tokens and loses for others."""
    adapter = fast_adapter(router_type, bank, null, num_experts=4, prototype_temperature=0.1)
    adapter.router.top_k = top_k
    with torch.no_grad():
        adapter.router.weight.mul_(4.0 if router_type == "sequence_aux_free" else 1.0)
        if adapter.router.null_choices and router_type == "prototype":
            hidden, mask = padded_pass()
            adapter.token_mask.set(mask)
            prefix = sequence_prefix_means(adapter.router, hidden, adapter.token_mask)
            nearest = -adapter.router.logits(prefix.means, prefix.counts)[:, :-1].amax(-1) * adapter.router.temperature
            keep = prefix.mask.bool()
            floor, slope = fit_by_length(prefix.counts[keep].double(), nearest[keep].double())
            adapter.router.null_distance.fill_(floor)
            adapter.router.null_slope.fill_(slope)
    return adapter


def padded_pass(batch=3, length=9, seed=0):
    """Left-padded hidden states [B, T, d] (padding rows NaN: they attend to nothing) and their attention mask."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, HIDDEN, generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        mask[row, :2 * row] = 0
    return hidden.masked_fill(~mask.bool().unsqueeze(-1), float("nan")), mask


def decode_passes(adapter, passes, path):
    """Run ``passes`` ((hidden, attention mask so far), ...) through the adapter as one generation's passes, each
    from the prefix state the last one left, on ``path`` (general, kernel, pytorch); the outputs and the sums."""
    adapter.fused_inference, adapter.decode_kernel, adapter.inference_plan = path != "general", path == "kernel", None
    context, outputs = adapter.token_mask, []
    context.prefix = PrefixState()
    with torch.no_grad():
        for hidden, mask in passes:
            context.set(mask)
            outputs.append(adapter(hidden))
            context.prefix = context.prefix.following()
    kernel = adapter.inference_plan.kernel if adapter.inference_plan is not None else None
    assert (kernel is not None and kernel.sequences is not None) == (path == "kernel"), "not the path under test"
    return outputs, context.prefix.read(adapter.router)


def assert_padded_close(got, want, mask, tolerance):
    keep = mask[:, -got.shape[1]:].bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("null", NULL)
@pytest.mark.parametrize("router_type,bank,top_k", PREFIX_CASES)
def test_prefix_mean_routers_take_the_fast_paths_which_equal_the_general_path(router_type, bank, top_k, null,
                                                                               monkeypatch):
    """A left-padded prefill then decode steps, the prefix state carried from pass to pass: the compiled kernel and
    the PyTorch fused path give the general path's outputs and leave it the same running sums."""
    adapter = prefix_adapter(router_type, bank, top_k, null)
    hidden, mask = padded_pass()
    steps = [(hidden[:, :5].contiguous(), mask[:, :5])] + [(hidden[:, t:t + 1].contiguous(), mask[:, :t + 1])
                                                           for t in range(5, 9)]
    general, sums = decode_passes(adapter, steps, "general")
    paths = ["pytorch"] * (bank != "mixlora") + (["kernel"] if shutil.which("cc") or os.environ.get("CC") else [])
    for path in paths:  # (mixlora has no PyTorch plan: only its kernel)
        if path == "kernel":  # nothing but the kernel can answer
            monkeypatch.setattr(FusedInference, "__call__", None)
            monkeypatch.setattr(MixLoRAExperts, "layer_output", None)
        fast, fast_sums = decode_passes(adapter, steps, path)
        for (_, step_mask), got, want in zip(steps, fast, general):
            assert_padded_close(got, want, step_mask, 1e-5)
        torch.testing.assert_close(fast_sums, sums, rtol=1e-6, atol=1e-6)
    adapter.token_mask.set(mask)
    adapter.token_mask.prefix = None
    with torch.no_grad():  # the case tests something: routing each token by itself would differ, some tokens
        routes = adapter.router.route_sequences(hidden, adapter.token_mask).indices[mask.view(-1).bool()]
        alone = adapter.router(torch.nan_to_num(hidden).reshape(-1, HIDDEN)).indices[mask.view(-1).bool()]
    assert not torch.equal(routes, alone)
    if adapter.router.null_choices:  # choose the null expert and some do not
        assert bool((routes == adapter.num_experts).any()) and bool((routes < adapter.num_experts).any())
    if adapter.router.null_choices and router_type == "prototype":  # the threshold's slope changes some routes
        with torch.no_grad():
            adapter.router.null_slope.zero_()
            flat = adapter.router.route_sequences(hidden, adapter.token_mask).indices[mask.view(-1).bool()]
        assert not torch.equal(routes, flat)
