"""Processors: exactness against diffusers' default path, per-sample batches, CFG layout, fused equivalence."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from hyperdiff import Adapter, HyperdiffError, HyperLoRA, HyperLoRAAttnProcessor, LayerTable, LowRankDelta
from hyperdiff.core.processors import hyper_lora_processors

from conftest import random_lidb, random_lora, unet_inputs


def _image(pipe, prompt="a sks face on a red background", seed=0, **kw):
    kw.setdefault("num_inference_steps", 3)
    kw.setdefault("guidance_scale", 4.0)
    gen = torch.Generator().manual_seed(seed)
    return pipe(prompt, generator=gen, output_type="pt", **kw).images


def _per_sample(adapters):
    """Stack adapters of equal rank into per-sample deltas, scale folded into `up`."""
    names = adapters[0].layer_names
    return HyperLoRA(
        {
            n: LowRankDelta(
                torch.stack([ad.lora_factors()[n][0] for ad in adapters]),
                torch.stack([ad.lora_factors()[n][1] * ad.scale for ad in adapters]),
            )
            for n in names
        }
    )


def test_zero_deltas_equal_default_processor_exactly_and_random_deltas_differ(pipe):
    assert all(isinstance(p, AttnProcessor2_0) for p in pipe.unet.attn_processors.values())
    base = _image(pipe)
    table = LayerTable.from_unet(pipe.unet)
    zero = Adapter.from_factors({r.name: (torch.zeros(1, r.in_features), torch.zeros(r.out_features, 1)) for r in table}, table)
    with hyper_lora_processors(pipe.unet, table):  # our processor, no deltas at all
        assert all(isinstance(p, HyperLoRAAttnProcessor) for p in pipe.unet.attn_processors.values())
        assert torch.equal(_image(pipe), base)
    with zero.applied(pipe.unet):
        assert torch.equal(_image(pipe), base)
    with random_lora(table, seed=1).applied(pipe.unet):
        assert (_image(pipe) - base).abs().max() > 1e-3
    assert torch.equal(_image(pipe), base)  # processors restored


def test_per_call_deltas_reach_the_processor_through_cross_attention_kwargs(pipe):
    table = LayerTable.from_unet(pipe.unet)
    ad = random_lora(table, seed=2)
    with ad.applied(pipe.unet):
        expected = _image(pipe)
    with hyper_lora_processors(pipe.unet, table):
        got = _image(pipe, cross_attention_kwargs={"hyper_lora": ad.hyper_lora()})  # shared (2-D) deltas
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_per_sample_batched_deltas_equal_each_sample_alone(pipe):
    unet = pipe.unet
    table = LayerTable.from_unet(unet)
    adapters = [random_lora(table, seed=s, rank=r) for s, r in ((3, 1), (4, 1), (5, 1))]
    x, t, e = unet_inputs(unet, batch=3)
    stacked = _per_sample(adapters)  # down (3, r, in), up (3, out, r)
    with torch.no_grad(), hyper_lora_processors(unet, table):
        batched = unet(x, t, e, cross_attention_kwargs={"hyper_lora": stacked}).sample
    for i, ad in enumerate(adapters):
        with torch.no_grad(), ad.applied(unet):
            alone = unet(x[i : i + 1], t[i : i + 1], e[i : i + 1]).sample
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=0, atol=1e-5)
    assert (batched[0] - batched[1]).abs().max() > 1e-3


@pytest.mark.parametrize("images_per_prompt", [1, 2])
def test_cfg_pipeline_batch_with_per_sample_deltas_equals_a_run_alone(pipe, images_per_prompt):
    """A pipeline call doubles the batch as [uncond; cond]; repeat_for lays the deltas out the same way."""
    table = LayerTable.from_unet(pipe.unet)
    adapters = [random_lora(table, seed=6, rank=1), random_lidb(table, seed=7)]
    prompts = ["a sks face on a blue background", "a sks face wearing a hat"]
    n = images_per_prompt
    with hyper_lora_processors(pipe.unet, table):
        batched = _image(pipe, prompts, num_images_per_prompt=n, cross_attention_kwargs={"hyper_lora": _per_sample(adapters).repeat_for(n)})
    with adapters[0].applied(pipe.unet):  # the CPU generator draws the first sample's noise first either way
        alone = _image(pipe, prompts[0], num_images_per_prompt=n)
    torch.testing.assert_close(batched[:n], alone, rtol=0, atol=1e-4)
    assert (batched[n:] - batched[:n]).abs().max() > 1e-3


def test_cfg_layout_matches_manual_uncond_cond_unet_calls(pipe):
    unet = pipe.unet
    table = LayerTable.from_unet(unet)
    adapters = [random_lora(table, seed=6, rank=1), random_lidb(table, seed=7)]
    x, t, _ = unet_inputs(unet, batch=2)
    cond, uncond = pipe.encode_prompt(["a sks face", "a sks face wearing a hat"], "cpu", 1, True)
    text, latents, steps = torch.cat([uncond, cond]), torch.cat([x, x]), torch.cat([t, t])  # [uncond; cond]
    layout = _per_sample(adapters).repeat_for(1, guidance=True)
    wrong = _per_sample(adapters).repeat_for(2, guidance=False)  # [a, a, b, b]: not the pipeline's order
    with torch.no_grad(), hyper_lora_processors(unet, table):
        both = unet(latents, steps, text, cross_attention_kwargs={"hyper_lora": layout}).sample
        misordered = unet(latents, steps, text, cross_attention_kwargs={"hyper_lora": wrong}).sample
    for i, ad in enumerate(adapters):
        rows = [i, 2 + i]  # sample i's uncond and cond rows
        with torch.no_grad(), ad.applied(unet):
            manual = unet(latents[rows], steps[rows], text[rows]).sample
        torch.testing.assert_close(both[rows], manual, rtol=0, atol=1e-5)
    assert (misordered - both).abs().max() > 1e-3


def test_batch_mismatch_is_a_clear_error(pipe):
    table = LayerTable.from_unet(pipe.unet)
    deltas = _per_sample([random_lora(table, seed=8), random_lora(table, seed=9)])
    with hyper_lora_processors(pipe.unet, table), pytest.raises(HyperdiffError, match="use HyperLoRA.repeat_for"):
        _image(pipe, ["a", "b"], cross_attention_kwargs={"hyper_lora": deltas})  # CFG makes the batch 4


def test_processor_path_equals_fused_path_and_strength(pipe):
    unet = pipe.unet
    table = LayerTable.from_unet(unet)
    ad = random_lidb(table, seed=10)
    x, t, e = unet_inputs(unet)
    with torch.no_grad():
        base = unet(x, t, e).sample
        with ad.applied(unet):
            injected = unet(x, t, e).sample
        with ad.applied(unet, strength=0.0):
            torch.testing.assert_close(unet(x, t, e).sample, base, rtol=0, atol=0)
        with ad.applied(unet, strength=2.0):
            doubled = unet(x, t, e).sample
        ad.fuse(unet)
        fused = unet(x, t, e).sample
        ad.unfuse(unet)
        (2.0 * ad).fuse(unet)
        fused_double = unet(x, t, e).sample
    torch.testing.assert_close(fused, injected, rtol=0, atol=1e-4)
    torch.testing.assert_close(fused_double, doubled, rtol=0, atol=1e-4)
    assert (injected - base).abs().max() > 1e-3


def test_applied_restores_processors_on_exception_and_nests(pipe):
    unet = pipe.unet
    table = LayerTable.from_unet(unet)
    before = dict(unet.attn_processors)
    a, b = random_lora(table, seed=11), random_lora(table, seed=12)
    with pytest.raises(RuntimeError, match="boom"):
        with a.applied(unet):
            raise RuntimeError("boom")
    assert all(unet.attn_processors[k] is v for k, v in before.items())
    x, t, e = unet_inputs(unet)
    with torch.no_grad():
        with a.applied(unet), b.applied(unet):  # nested: both apply
            nested = unet(x, t, e).sample
        with (a + b).applied(unet):
            summed = unet(x, t, e).sample
    torch.testing.assert_close(nested, summed, rtol=0, atol=1e-5)
    assert all(unet.attn_processors[k] is v for k, v in before.items())


def test_misshaped_deltas_are_rejected(pipe):
    table = LayerTable.from_unet(pipe.unet)
    name = table.names[0]
    bad = HyperLoRA({name: LowRankDelta(torch.zeros(1, 3), torch.zeros(table[name].out_features, 1))})
    with pytest.raises(HyperdiffError, match="maps 3 → .* features, expected"):
        with hyper_lora_processors(pipe.unet, table, bad):
            pass


def _attention_module(cross: bool):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    return Attention(query_dim=32, cross_attention_dim=48 if cross else None, heads=2, dim_head=16, bias=True).eval()


def _reference(attn, x, ctx, deltas):
    """Attention with deltas by hand: every projection's output plus Σ strength · scale · einsum(x, down, up), then
    softmax(q kᵀ / √d) v — no processor code involved."""
    def proj(name, linear, inp):
        y = inp @ linear.weight.T + linear.bias
        for hl in deltas:
            d = hl.layers.get(f"attn.{name}")
            if d is None:
                continue
            eq = "bni,bri,bor->bno" if d.down.dim() == 3 else "bni,ri,or->bno"
            y = y + hl.strength * d.scale * torch.einsum(eq, inp, d.down, d.up)
        return y

    src = x if ctx is None else ctx
    q, k, v = proj("to_q", attn.to_q, x), proj("to_k", attn.to_k, src), proj("to_v", attn.to_v, src)
    b, heads = x.shape[0], attn.heads
    q, k, v = (t.view(b, -1, heads, 16).transpose(1, 2) for t in (q, k, v))
    w = torch.softmax(q @ k.transpose(-1, -2) / 16 ** 0.5, dim=-1)
    h = (w @ v).transpose(1, 2).reshape(b, -1, heads * 16)
    return proj("to_out.0", attn.to_out[0], h)


def _mixed_deltas(attn, batch, cross):
    """Per-sample deltas on q and v, a shared one on k, rank 4 on out: one HyperLoRA; a rank-1 shared one on q and
    k in a second (strength 0.7)."""
    g = torch.Generator().manual_seed(5)
    dim_kv = 48 if cross else 32

    def delta(n_in, n_out, r, per_sample, scale):
        lead = (batch,) if per_sample else ()
        return LowRankDelta(torch.randn(*lead, r, n_in, generator=g), torch.randn(*lead, n_out, r, generator=g) * 0.1, scale)

    first = HyperLoRA({"attn.to_q": delta(32, 32, 2, True, 0.5), "attn.to_k": delta(dim_kv, 32, 1, False, 1.0),
                       "attn.to_v": delta(dim_kv, 32, 3, True, 2.0), "attn.to_out.0": delta(32, 32, 4, True, 1.0)})
    second = HyperLoRA({"attn.to_q": delta(32, 32, 1, False, 1.0), "attn.to_k": delta(dim_kv, 32, 1, False, 0.25)},
                       strength=0.7)
    return first, second


@pytest.mark.parametrize("cross", [False, True])
def test_packed_deltas_equal_a_reference_einsum(cross):
    """Mixed per-sample and shared deltas, ranks 1-4, one installed HyperLoRA and one per call, self- and
    cross-attention: the processor equals attention computed by hand within float32 rounding (atol 2e-5)."""
    attn = _attention_module(cross)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 10, 32, generator=g)
    ctx = torch.randn(3, 7, 48, generator=g) if cross else None
    first, second = _mixed_deltas(attn, 3, cross)
    attn.set_processor(HyperLoRAAttnProcessor("attn", installed=(first,)))
    with torch.no_grad():
        got = attn(x, encoder_hidden_states=ctx, hyper_lora=second)
        want = _reference(attn, x, ctx, (first, second))
        plain = _reference(attn, x, ctx, ())
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    assert (got - plain).abs().max() > 1e-2  # the deltas are large enough to be seen


@pytest.mark.parametrize("cross", [False, True])
def test_packed_deltas_add_two_matmuls_per_input_and_one_per_projection(cross):
    """Per-sample deltas on all four projections: one packed down-projection per input read (q/k/v together in
    self-attention; q, then k/v, in cross-attention; out) and one accumulating matmul per projection — 6 or 7
    matrix products beyond the base's, where one down, a scale and one up per projection took 12 multiplies."""
    from torch.utils._python_dispatch import TorchDispatchMode

    matmuls = {"mm", "bmm", "addmm", "baddbmm", "matmul", "mul"}

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func.__name__.split(".")[0] in matmuls
            return func(*args, **(kwargs or {}))

    attn = _attention_module(cross)
    x = torch.randn(2, 6, 32)
    ctx = torch.randn(2, 5, 48) if cross else None
    dim_kv = 48 if cross else 32
    full = HyperLoRA({f"attn.{p}": LowRankDelta(torch.randn(2, 1, n_in), torch.randn(2, 32, 1))
                      for p, n_in in (("to_q", 32), ("to_k", dim_kv), ("to_v", dim_kv), ("to_out.0", 32))})
    counts = []
    for deltas in (None, full):
        attn.set_processor(HyperLoRAAttnProcessor("attn"))
        with torch.no_grad(), Count() as c:
            attn(x, encoder_hidden_states=ctx, hyper_lora=deltas)
        counts.append(c.n)
    assert counts[1] - counts[0] == (7 if cross else 6)
