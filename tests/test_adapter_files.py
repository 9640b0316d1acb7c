"""Adapter files read back, checked against vanilla diffusers' loaders, and every invalid file's error."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hyperdiff import Adapter, AdapterInfo, HyperdiffError, LayerTable, LiDBConfig
from hyperdiff.models import tiny_pipeline

from conftest import random_lidb, random_lora, unet_inputs


def _image(pipe, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return pipe("a sks face on a green background", num_inference_steps=3, guidance_scale=4.0, generator=gen, output_type="pt").images


@pytest.fixture
def table(pipe):
    return LayerTable.from_unet(pipe.unet)


def _meta(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


# -- native -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lora", "lidb"])
def test_native_round_trip_keeps_tensors_and_metadata(table, tmp_path, kind):
    info = AdapterInfo(base_model="tiny", token="sks", source="test", architecture=table.architecture)
    ad = random_lora(table, seed=1, alpha=3.5) if kind == "lora" else random_lidb(table, seed=1, config=LiDBConfig(aux_seed=9))
    ad = Adapter(kind=ad.kind, factors=ad.factors, dims=ad.dims, alpha=ad.alpha, fingerprint=ad.fingerprint, lidb=ad.lidb, info=info)
    path = ad.save(tmp_path / "a.safetensors")
    back = Adapter.load(path, table)
    assert (back.kind, back.rank, back.alpha, back.lidb, back.info, back.fingerprint) == (
        ad.kind, ad.rank, ad.alpha, ad.lidb, ad.info, ad.fingerprint,
    )
    for name, (a, b) in ad.factors.items():
        assert torch.equal(back.factors[name][0], a) and torch.equal(back.factors[name][1], b)
    meta = _meta(path)
    assert meta["hyperdiff.kind"] == kind and meta["hyperdiff.base_fingerprint"] == table.fingerprint
    assert meta["hyperdiff.alpha"] == repr(ad.alpha) and meta["hyperdiff.token"] == "sks"
    assert meta["hyperdiff.aux_seed"] == ("9" if kind == "lidb" else "")
    assert meta["modelspec.sai_model_spec"] == "1.0.1" and meta["modelspec.trigger_phrase"] == "sks"
    suffixes = {"lora": {"down", "up"}, "lidb": {"A_train", "B_train"}}[kind]
    assert {k.rsplit(".", 1)[1] for k in load_file(path)} == suffixes
    again = ad.save(tmp_path / "b.safetensors")  # same adapter → same tensors bit for bit, same metadata
    first, second = load_file(path), load_file(again)
    assert all(first[k].numpy().tobytes() == second[k].numpy().tobytes() for k in first) and _meta(again) == meta


def _corrupt(src: Path, dst: Path, edit) -> Path:
    tensors = load_file(src)
    meta = _meta(src)
    edit(tensors, meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _first(tensors, suffix):
    return next(k for k in sorted(tensors) if k.endswith(suffix))


INVALID = {
    "missing": (lambda t, m: t.pop(_first(t, ".up")), r"is missing 1 tensors, e\.g\. '.*\.up'"),
    "extra": (lambda t, m: t.__setitem__("stray.weight", torch.zeros(2)), r"has 1 unexpected tensors, e\.g\. 'stray\.weight'"),
    "misshaped": (lambda t, m: t.__setitem__(_first(t, ".down"), torch.zeros(2, 5)), r"\.down` must be a floating tensor of shape \(2, \d+\), got torch.float32 \(2, 5\)"),
    "nan": (lambda t, m: t[_first(t, ".down")].__setitem__((0, 0), float("nan")), r"tensor '.*\.down' contains NaN or Inf"),
    "inf": (lambda t, m: t[_first(t, ".up")].__setitem__((0, 0), float("inf")), r"tensor '.*\.up' contains NaN or Inf"),
    "int_dtype": (lambda t, m: t.__setitem__(_first(t, ".up"), t[_first(t, ".up")].to(torch.int32)), r"has dtype torch.int32, expected a floating dtype"),
    "no_version": (lambda t, m: m.pop("hyperdiff.format_version"), r"is not a hyperdiff adapter: no 'hyperdiff.format_version'"),
    "future_version": (lambda t, m: m.__setitem__("hyperdiff.format_version", "99"), r"has format version '99', this hyperdiff reads '1'"),
    "bad_kind": (lambda t, m: m.__setitem__("hyperdiff.kind", "dora"), r"has kind 'dora', expected one of"),
    "bad_alpha": (lambda t, m: m.__setitem__("hyperdiff.alpha", "lots"), r"'hyperdiff.alpha' = 'lots', expected a number"),
    "wrong_rank": (lambda t, m: m.__setitem__("hyperdiff.rank", "3"), r"says rank 3 but its tensors have rank 2"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_each_invalid_file_gets_its_specific_error(table, tmp_path, case):
    good = random_lora(table, seed=2).save(tmp_path / "good.safetensors")
    edit, message = INVALID[case]
    bad = _corrupt(good, tmp_path / f"{case}.safetensors", edit)
    with pytest.raises(HyperdiffError, match=message) as err:
        Adapter.load(bad)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_not_safetensors_pickle_missing_and_foreign_base(table, tmp_path, sd15_unet):
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, not a tensor file")
    pickled = tmp_path / "model.safetensors"
    pickled.write_bytes(pickle.dumps({"weight": [1.0, 2.0]}))  # what a .ckpt/.bin would hold
    for path in (text, pickled):
        with pytest.raises(HyperdiffError, match="is not a safetensors file"):
            Adapter.load(path)
    with pytest.raises(HyperdiffError, match="does not exist"):
        Adapter.load(tmp_path / "absent.safetensors")
    good = random_lora(table, seed=3).save(tmp_path / "good.safetensors")
    sd15 = LayerTable.from_unet(sd15_unet)
    with pytest.raises(HyperdiffError, match=f"fingerprint {table.fingerprint}, but this UNet has {sd15.fingerprint}"):
        Adapter.load(good, sd15)
    ad = Adapter.load(good)
    with pytest.raises(HyperdiffError, match="load it onto the base it was trained for"):
        ad.fuse(sd15_unet)
    with pytest.raises(HyperdiffError, match="load it onto the base it was trained for"):
        with ad.applied(sd15_unet):
            pass


def test_no_pickle_loading_anywhere_in_the_code():
    root = Path(__file__).resolve().parents[1]
    pattern = re.compile(r"torch\.load\(|pickle\.loads?\(|weights_only\s*=\s*False")
    offenders = [
        str(p) for d in ("hyperdiff", "scripts", "ui") if (root / d).exists() for p in (root / d).rglob("*.py") if pattern.search(p.read_text())
    ]
    assert offenders == []


def test_failed_write_leaves_no_file(table, tmp_path, monkeypatch):
    import hyperdiff.core.files as files

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(files, "save_file", broken_save)
    with pytest.raises(HyperdiffError, match="could not be written: disk full"):
        random_lora(table, seed=4).save(tmp_path / "a.safetensors")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(HyperdiffError, match="is a folder, expected a file path"):
        random_lora(table, seed=4).save(tmp_path)


# -- exports against vanilla diffusers ------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
@pytest.mark.parametrize("kind", ["lora", "lidb"])
def test_export_loads_in_vanilla_diffusers_with_same_image(pipe, table, tmp_path, fmt, kind):
    ad = random_lora(table, seed=5, rank=2, alpha=5.0) if kind == "lora" else 0.5 * random_lidb(table, seed=5)
    if kind == "lidb":
        ad = Adapter(kind="lidb", factors=ad.factors, dims=ad.dims, alpha=3.0, fingerprint=ad.fingerprint, lidb=ad.lidb, info=ad.info)
    assert ad.alpha != ad.rank
    with ad.applied(pipe.unet):
        ours = _image(pipe)
    base = _image(pipe)
    path = ad.export(tmp_path / f"{fmt}.safetensors", format=fmt)

    vanilla = tiny_pipeline(seed=0)  # a fresh, untouched pipeline: only diffusers' own loader runs
    vanilla.load_lora_weights(str(path))
    theirs = _image(vanilla)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    # alpha mattered: the same factors at scale 1 give another image
    assert (ours - base).abs().max() > 1e-3
    vanilla.fuse_lora()
    torch.testing.assert_close(_image(vanilla), ours, rtol=0, atol=1e-4)


def test_export_keys_and_metadata(table, tmp_path):
    ad = random_lora(table, seed=6, rank=2, alpha=3.0)
    d = ad.export(tmp_path / "d.safetensors", "diffusers")
    keys = set(load_file(d))
    name = table.names[0]
    assert f"unet.{name}.lora.down.weight" in keys and f"unet.{name}.lora.up.weight" in keys and len(keys) == 2 * len(table)
    peft = json.loads(_meta(d)["lora_adapter_metadata"])
    assert peft["unet.r"] == 2 and peft["unet.lora_alpha"] == 3.0 and sorted(peft["unet.target_modules"]) == sorted(table.names)
    k = ad.export(tmp_path / "k.safetensors", "kohya")
    tensors = load_file(k)
    kname = "lora_unet_" + name.replace(".", "_")
    assert tensors[f"{kname}.alpha"].shape == () and tensors[f"{kname}.alpha"].item() == 3.0
    assert tensors[f"{kname}.lora_down.weight"].shape == (2, table[name].in_features)
    assert all(not key.split(".")[0].count(".") and "to_out_0" in key for key in tensors if "to_out" in key)
    meta = _meta(k)
    assert meta["ss_network_dim"] == "2" and float(meta["ss_network_alpha"]) == 3.0
    assert meta["modelspec.architecture"] == f"{table.architecture}/lora" and meta["modelspec.sai_model_spec"] == "1.0.1"
    with pytest.raises(HyperdiffError, match="`format` must be one of"):
        ad.export(tmp_path / "x.safetensors", "ckpt")


def test_sd15_kohya_and_diffusers_exports_name_real_modules(sd15_unet, tmp_path):
    table = LayerTable.from_unet(sd15_unet)
    g = torch.Generator().manual_seed(0)
    factors = {r.name: (torch.randn(1, r.in_features, generator=g), torch.randn(r.out_features, 1, generator=g)) for r in table}
    ad = Adapter.from_factors(factors, table, alpha=1.0)
    k = load_file(ad.export(tmp_path / "k.safetensors", "kohya"))
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight" in k
    assert _meta(tmp_path / "k.safetensors")["ss_base_model_version"] == "sd_v1"
    from diffusers.utils import convert_unet_state_dict_to_peft

    # diffusers' own kohya conversion path (what load_lora_weights runs) maps every key back to its module
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(tmp_path / "k.safetensors"))
    peft = convert_unet_state_dict_to_peft({key.removeprefix("unet."): v for key, v in state.items()})
    assert {key.removesuffix(".lora_A.weight") for key in peft if key.endswith("lora_A.weight")} == set(table.names)
    assert len(peft) == 2 * len(table)


# -- fuse / unfuse and algebra -------------------------------------------------------------------------------
def test_thousand_fuse_unfuse_cycles_leave_base_bit_identical(pipe, table):
    unet = pipe.unet
    original = {k: v.clone() for k, v in unet.state_dict().items()}
    adapters = [random_lora(table, seed=s, rank=1 + s % 3) for s in range(6)] + [random_lidb(table, seed=7)]
    for i in range(1000):
        a, b = adapters[i % len(adapters)], adapters[(i * 3 + 1) % len(adapters)]
        a.fuse(unet)
        if b is not a:
            b.fuse(unet)
            (a if i % 2 else b).unfuse(unet)  # out of order too
            (b if i % 2 else a).unfuse(unet)
        else:
            a.unfuse(unet)
    for k, v in unet.state_dict().items():
        assert torch.equal(v, original[k]), k
    with pytest.raises(HyperdiffError, match="not fused"):
        adapters[0].unfuse(unet)
    adapters[0].fuse(unet)
    with pytest.raises(HyperdiffError, match="already fused"):
        adapters[0].fuse(unet)


def test_unfuse_after_base_weights_change_uses_the_new_base(pipe, table):
    unet = pipe.unet
    ad = random_lora(table, seed=1)
    ad.fuse(unet)
    ad.unfuse(unet)
    weight = unet.get_submodule(table.names[0]).weight
    with torch.no_grad():
        weight.mul_(0.5)  # e.g. a training step on the base between two swaps
    changed = weight.clone()
    ad.fuse(unet)
    ad.unfuse(unet)
    assert torch.equal(unet.get_submodule(table.names[0]).weight, changed)


def test_a_swap_writes_the_weights_once_and_never_the_base(pipe, table):
    """Fusing points each Parameter at a kept buffer holding W + ΔW; unfusing points it back at the untouched base
    storage: the Parameter objects stay, the base is never written, and swaps after the first allocate nothing."""
    unet = pipe.unet
    name = table.names[5]
    weight = unet.get_submodule(name).weight
    base_ptr, base_values = weight.data_ptr(), weight.detach().clone()
    params = {id(p) for p in unet.parameters()}
    a, b = random_lora(table, seed=1, rank=1), random_lidb(table, seed=2)
    a.fuse(unet)
    buffer_ptr = weight.data_ptr()
    assert buffer_ptr != base_ptr and weight.requires_grad
    torch.testing.assert_close(weight.detach(), base_values + a.delta_weight(name), rtol=0, atol=1e-6)
    a.unfuse(unet)
    assert weight.data_ptr() == base_ptr and torch.equal(weight.detach(), base_values)
    for ad in (b, a, b):  # later swaps reuse the buffer
        ad.fuse(unet)
        assert weight.data_ptr() == buffer_ptr
        ad.unfuse(unet)
    assert {id(p) for p in unet.parameters()} == params and weight.data_ptr() == base_ptr


def test_weights_replaced_while_fused_get_the_base_values_back(pipe, table):
    unet = pipe.unet
    name = table.names[2]
    weight = unet.get_submodule(name).weight
    before = weight.detach().clone()
    ad = random_lora(table, seed=4)
    ad.fuse(unet)
    with torch.no_grad():
        weight.data = weight.data.clone()  # e.g. a .to() by other code while fused
    replaced = weight.data_ptr()
    ad.unfuse(unet)
    assert weight.data_ptr() == replaced and torch.equal(weight.detach(), before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_fuse_rounds_once_and_unfuses_exactly(table, dtype):
    from hyperdiff.models import tiny_pipeline

    unet = tiny_pipeline(seed=0).unet.to(dtype)
    name = table.names[0]
    weight = unet.get_submodule(name).weight
    before = weight.detach().clone()
    a, b = random_lora(table, seed=1, rank=2), random_lidb(table, seed=3)
    a.fuse(unet)
    b.fuse(unet)
    once = (before.float() + a.delta_weight(name)).to(dtype)
    want = (once.float() + b.delta_weight(name)).to(dtype)  # each entry accumulated in float32, rounded once
    assert torch.equal(weight.detach(), want)
    a.unfuse(unet)  # out of order: b alone, re-fused from the base
    assert torch.equal(weight.detach(), (before.float() + b.delta_weight(name)).to(dtype))
    b.unfuse(unet)
    assert torch.equal(weight.detach(), before)


def test_mixing_and_concatenation_are_sums_of_delta_w(pipe, table):
    a, b = random_lora(table, seed=1, alpha=4.0), random_lidb(table, seed=2)
    name = table.names[3]
    first = Adapter.mix([a, b], [1.0, 0.0])
    assert torch.equal(first.delta_weight(name), a.delta_weight(name))
    half = Adapter.mix([a, b], [0.5, 0.5])
    torch.testing.assert_close(half.delta_weight(name), 0.5 * a.delta_weight(name) + 0.5 * b.delta_weight(name))
    both = a + b
    assert both.rank == a.rank + b.rank and both.kind == "lora"
    torch.testing.assert_close(both.delta_weight(name), a.delta_weight(name) + b.delta_weight(name))
    assert (0.5 * b).kind == "lidb"
    x, t, e = unet_inputs(pipe.unet)
    with torch.no_grad():
        a.fuse(pipe.unet)
        b.fuse(pipe.unet)
        fused_both = pipe.unet(x, t, e).sample
        b.unfuse(pipe.unet)
        a.unfuse(pipe.unet)
        with both.applied(pipe.unet):
            concat = pipe.unet(x, t, e).sample
    torch.testing.assert_close(concat, fused_both, rtol=0, atol=1e-4)
    with pytest.raises(HyperdiffError, match="one number per adapter"):
        Adapter.mix([a, b], [1.0])
