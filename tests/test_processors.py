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
