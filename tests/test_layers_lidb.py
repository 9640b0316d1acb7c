"""LayerTable on real SD shapes, and the LiDB factorisation against independent computations."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections import Counter

import pytest
import torch

from hyperdiff import Adapter, HyperdiffError, LayerTable, LiDBConfig, TargetConfig
from hyperdiff.core.lidb import (_aux_basis_cached, _aux_bases_cached, aux_bases, aux_basis, compose, lidb_parameter_count,
                            lora_parameter_count)
from hyperdiff.models.configs import build_unet, unet_config

from conftest import random_lidb


def test_sd15_table_has_128_layers_with_module_dims(sd15_unet):
    table = LayerTable.from_unet(sd15_unet)
    assert len(table) == 128
    # Independent expectation: every attention module has a width C (its to_q.out_features); self-attention maps
    # C → C everywhere, cross-attention keys/values read 768-d text.
    for row in table:
        width = sd15_unet.get_submodule(row.attention).to_q.out_features
        cross_kv = row.attention.endswith("attn2") and row.projection in ("to_k", "to_v")
        assert (row.in_features, row.out_features) == ((768 if cross_kv else width), width), row.name
    widths = Counter(sd15_unet.get_submodule(r.attention).to_q.out_features for r in table)
    assert widths == {320: 40, 640: 40, 1280: 48}  # 5 + 5 + 6 transformer blocks × 8 Linears
    assert table["mid_block.attentions.0.transformer_blocks.0.attn2.to_k"].in_features == 768
    assert lora_parameter_count([(r.in_features, r.out_features) for r in table], 1) == 199_296


def test_fingerprint_identifies_architecture_not_build(sd15_unet, sd21_unet):
    t15 = LayerTable.from_unet(sd15_unet)
    t21 = LayerTable.from_unet(sd21_unet)
    assert len(t21) == 128 and t15.fingerprint != t21.fingerprint
    assert t15.architecture == "stable-diffusion-v1" and t21.architecture == "stable-diffusion-v2"
    # Equal across builds and devices: a second meta build, and a real (random-init) tiny build vs its meta twin.
    assert LayerTable.from_unet(build_unet("sd15", device="meta")).fingerprint == t15.fingerprint
    tiny_cfg = dict(unet_config("sd15"), block_out_channels=(32, 64, 64, 64), cross_attention_dim=32, sample_size=8)
    assert LayerTable.from_unet(build_unet(tiny_cfg, "cpu")).fingerprint == LayerTable.from_unet(build_unet(tiny_cfg)).fingerprint
    # Stable across versions of hyperdiff: adapters in the wild carry this value.
    assert t15.fingerprint == "58958b2a683d313a"


def test_fingerprint_stable_across_processes():
    code = (
        "from hyperdiff import LayerTable; from hyperdiff.models.configs import build_unet;"
        "print(LayerTable.from_unet(build_unet('sd21')).fingerprint)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == LayerTable.from_unet(build_unet("sd21")).fingerprint


def test_target_config_selects_and_validates(sd15_unet):
    t = LayerTable.from_unet(sd15_unet, TargetConfig(attention=("attn2",), projections=("to_k", "to_v")))
    assert len(t) == 32 and all(r.in_features == 768 for r in t)
    assert t.fingerprint != LayerTable.from_unet(sd15_unet).fingerprint
    with pytest.raises(HyperdiffError, match="`projections` must be a non-empty subset"):
        TargetConfig(projections=("to_z",))
    with pytest.raises(HyperdiffError, match="layer 'nope' is not in this LayerTable"):
        t["nope"]


@pytest.mark.parametrize("rows, cols", [(100, 320), (50, 1280), (100, 32), (7, 7)])
def test_aux_basis_rows_unit_norm_and_orthogonal_or_full_rank(rows, cols):
    basis = aux_basis(rows, cols, seed=123).double()
    assert basis.shape == (rows, cols)
    torch.testing.assert_close(basis.norm(dim=1), torch.ones(rows, dtype=torch.float64), atol=1e-6, rtol=0)
    if rows <= cols:
        torch.testing.assert_close(basis @ basis.T, torch.eye(rows, dtype=torch.float64), atol=1e-6, rtol=0)
    else:  # stacked orthonormal blocks: every direction of the input space stays reachable
        assert torch.linalg.matrix_rank(basis) == cols
        torch.testing.assert_close(basis[:cols] @ basis[:cols].T, torch.eye(cols, dtype=torch.float64), atol=1e-6, rtol=0)


def test_aux_bases_regenerate_bit_identically_in_another_process():
    cfg = LiDBConfig(aux_seed=7)
    a, b = aux_bases("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 320, 320, cfg)
    _aux_basis_cached.cache_clear()
    _aux_bases_cached.cache_clear()  # both caches: the basis is computed again
    a2, _ = aux_bases("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 320, 320, cfg)
    assert torch.equal(a, a2) and a is not a2
    digest = hashlib.sha256(a.numpy().tobytes() + b.numpy().tobytes()).hexdigest()
    code = (
        "import hashlib; from hyperdiff.core.lidb import aux_bases, LiDBConfig;"
        "a, b = aux_bases('down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q', 320, 320, LiDBConfig(aux_seed=7));"
        "print(hashlib.sha256(a.numpy().tobytes() + b.numpy().tobytes()).hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == digest
    other, _ = aux_bases("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k", 320, 320, cfg)
    assert not torch.allclose(a, other)
    reseeded, _ = aux_bases("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 320, 320, LiDBConfig(aux_seed=8))
    assert not torch.allclose(a, reseeded)


def test_aux_bases_on_another_device_are_one_cached_copy_of_the_cpu_basis():
    name, cfg = "mid_block.attentions.0.transformer_blocks.0.attn2.to_v", LiDBConfig(a=6, b=5)
    cpu = aux_bases(name, 16, 12, cfg)
    assert aux_bases(name, 16, 12, cfg, "cpu")[0] is cpu[0]
    meta = aux_bases(name, 16, 12, cfg, "meta")  # stands in for a GPU: copied once, then served from the cache
    assert all(t.device.type == "meta" for t in meta) and [t.shape for t in meta] == [t.shape for t in cpu]
    assert aux_bases(name, 16, 12, cfg, torch.device("meta"))[1] is meta[1]


def test_compose_matches_reference_einsum():
    g = torch.Generator().manual_seed(0)
    a_aux, b_aux = aux_basis(10, 24, 1), aux_basis(6, 16, 2)
    a_train, b_train = torch.randn(3, 10, 2, generator=g), torch.randn(3, 2, 6, generator=g)  # batch of 3, rank 2
    down, up = compose(a_train, b_train, a_aux, b_aux)
    assert down.shape == (3, 2, 24) and up.shape == (3, 16, 2)
    torch.testing.assert_close(down, torch.einsum("nar,ai->nri", a_train, a_aux))
    torch.testing.assert_close(up, torch.einsum("bo,nrb->nor", b_aux, b_train))
    # ΔW = A_aux^T A_train B_train B_aux, transposed into (out, in): the paper's product
    delta = up[0] @ down[0]
    torch.testing.assert_close(delta, (a_aux.T @ a_train[0] @ b_train[0] @ b_aux).T)


def test_lidb_config_validation():
    with pytest.raises(HyperdiffError, match="`rank` must be a positive integer, got 0"):
        LiDBConfig(rank=0)
    with pytest.raises(HyperdiffError, match="`a` must be a positive integer"):
        LiDBConfig(a=-1)
    with pytest.raises(HyperdiffError, match="`aux_seed` must be an integer"):
        LiDBConfig(aux_seed=-3)


def test_sd15_lidb_is_19200_values_and_file_under_120kb(sd15_unet, tmp_path):
    table = LayerTable.from_unet(sd15_unet)
    assert lidb_parameter_count(len(table), LiDBConfig()) == 19_200
    adapter = random_lidb(table, seed=0)
    assert adapter.num_values == 19_200
    path = adapter.save(tmp_path / "id.safetensors")
    assert path.stat().st_size <= 120_000, path.stat().st_size
    loaded = Adapter.load(path, table)
    assert loaded.kind == "lidb" and loaded.lidb == adapter.lidb
    name = table.names[0]
    torch.testing.assert_close(loaded.delta_weight(name), adapter.delta_weight(name), rtol=0, atol=0)
