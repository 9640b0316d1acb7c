"""HyperNetwork: exact no-op at init, gradients through the processors, per-sample batches, files, sampling, the MLP
ablation, real SD1.5/SD2.1 layer tables and the CLIP image encoder (a tiny random-init CLIP saved to a folder)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors import safe_open
import torch
from diffusers import DDPMScheduler

from hyperdiff import Adapter, HyperdiffError, LayerTable
from hyperdiff import synthfaces as sf
from hyperdiff.config import load_config
from hyperdiff.core.processors import hyper_lora_processors
from hyperdiff.hypernet import (
    EncoderConfig,
    HyperNetConfig,
    HyperNetwork,
    pool_references,
)
from hyperdiff.hypernet.encoders import ClipImageEncoder, SmallImageEncoder
from hyperdiff.personalize.losses import diffusion_loss, encode_images, encode_prompts

from conftest import unet_inputs

ROOT = Path(__file__).resolve().parent.parent
SMALL = EncoderConfig(kind="small", image_size=32, channels=(16, 32), dim=32)


def hyper_config(**kw) -> HyperNetConfig:
    base = {"dim": 32, "layers": 1, "heads": 4, "refine_steps": 2, "encoder": SMALL}
    if kw.get("decoder") == "mlp":
        base["refine_steps"] = 1
    return HyperNetConfig(**{**base, **kw})


def make_hypernet(table: LayerTable, seed: int = 0, **kw) -> HyperNetwork:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return HyperNetwork(hyper_config(**kw), table)


def randomise_b_head(hp: HyperNetwork, seed: int = 1, std: float = 1e-3) -> HyperNetwork:
    """A stand-in for a trained hypernet: the zero-initialised B head gets seeded random weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        hp.head_b.weight.copy_(torch.randn(hp.head_b.weight.shape, generator=gen) * std)
        hp.head_b.bias.copy_(torch.randn(hp.head_b.bias.shape, generator=gen) * std)
    return hp


def face(seed: int, background: str = "red", hat: bool = False, expression: str = "smiling", size: int = 32):
    return sf.render(sf.Identity.from_seed(seed), sf.Scene(background, hat, expression), size)


@pytest.fixture(scope="module")
def tiny():
    """One frozen tiny pipeline for the module (tests restore its processors with context managers)."""
    from hyperdiff.models import tiny_pipeline

    pipe = tiny_pipeline(seed=0)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    return pipe


@pytest.fixture(scope="module")
def table(tiny):
    return LayerTable.from_unet(tiny.unet)


@pytest.fixture(scope="module")
def identity_batch(tiny):
    """One identity, fixed noise and timesteps: (reference pixels (4, 3, 32, 32), latents, text, noise, timesteps)."""
    target = face(3, "blue", True, "neutral")
    latents = encode_images(tiny, [target]).repeat(4, 1, 1, 1)
    text = encode_prompts(tiny, ["a sks face, neutral, wearing a hat, on a blue background"] * 4)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([100, 300, 500, 700])
    return face(3), latents, text, noise, timesteps


def _loss(pipe, hp, batch) -> torch.Tensor:
    ref, latents, text, noise, timesteps = batch
    a, b = hp(hp.encoder.preprocess([ref] * latents.shape[0]))
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    return diffusion_loss(pipe, sched, latents, text, [hp.hyper_lora(a, b)], noise=noise, timesteps=timesteps)


def _trainable(hp):
    return [(n, p) for n, p in hp.named_parameters() if p.requires_grad]


# -- 1. no-op at init, and it learns ------------------------------------------------------------------------------
@pytest.mark.parametrize("decoder", ["attention", "mlp"])
def test_untrained_hypernet_predicts_an_exact_no_op(tiny, table, decoder):
    hp = make_hypernet(table, decoder=decoder)
    pixels = hp.encoder.preprocess([face(1), face(2, "green")])
    a, b = hp(pixels)
    assert a.shape == (2, len(table), 100, 1) and b.shape == (2, len(table), 1, 50)
    assert torch.count_nonzero(b) == 0 and a.abs().max() > 0.01
    unet = tiny.unet
    x, t, e = unet_inputs(unet, batch=2)
    with torch.no_grad():
        base = unet(x, t, e).sample
        with hyper_lora_processors(unet, table):
            per_call = unet(x, t, e, cross_attention_kwargs={"hyper_lora": hp.hyper_lora(a, b)}).sample
        with hp.predict([face(1)]).applied(unet):
            applied = unet(x, t, e).sample
    assert torch.equal(per_call, base)
    assert torch.equal(applied, base)


@pytest.mark.parametrize("decoder, lr", [("attention", 3e-4), ("mlp", 1e-3)])
def test_a_few_steps_on_one_identity_lower_its_diffusion_loss(tiny, table, identity_batch, decoder, lr):
    hp = make_hypernet(table, decoder=decoder)
    opt = torch.optim.AdamW(hp.parameters(), lr=lr)
    with hyper_lora_processors(tiny.unet, table):
        with torch.no_grad():
            before = _loss(tiny, hp, identity_batch).item()
        for _ in range(8):
            loss = _loss(tiny, hp, identity_batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            after = _loss(tiny, hp, identity_batch).item()
    # measured on this seed: attention 1.088 -> ~0.92, mlp 1.088 -> ~1.0
    assert after < 0.98 * before, (before, after)


# -- 2. gradients and per-sample weights ---------------------------------------------------------------------------
@pytest.mark.parametrize("decoder", ["attention", "mlp"])
def test_gradients_reach_every_parameter_through_the_processors(tiny, table, identity_batch, decoder):
    hp = make_hypernet(table, decoder=decoder)
    opt = torch.optim.AdamW(hp.parameters(), lr=1e-3)
    with hyper_lora_processors(tiny.unet, table):
        _loss(tiny, hp, identity_batch).backward()
        # B = 0: only the B head gets a gradient (LoRA-style); every parameter is still in the graph
        assert all(p.grad is not None for _, p in _trainable(hp))
        nonzero = sorted(n for n, p in _trainable(hp) if p.grad.abs().max() > 0)
        assert nonzero == ["head_b.bias", "head_b.weight"]
        opt.step()
        opt.zero_grad()
        assert hp.head_b.weight.abs().max() > 0
        _loss(tiny, hp, identity_batch).backward()
    dead = [n for n, p in _trainable(hp) if p.grad is None or p.grad.abs().max() == 0]
    assert dead == []
    assert len(_trainable(hp)) == len(list(hp.parameters()))  # the small encoder trains too


def test_a_batch_of_identities_gets_per_sample_weights(tiny, table):
    hp = randomise_b_head(make_hypernet(table)).eval()
    refs = [face(1), face(2, "green", True, "sad")]
    with torch.no_grad():
        a, b = hp(hp.encoder.preprocess(refs))
    hl = hp.hyper_lora(a, b)
    assert hl.batch == 2 and set(hl.layers) == set(table.names)
    for name, delta in hl.layers.items():
        dw = delta.up @ delta.down  # (2, out, in)
        assert (dw[0] - dw[1]).abs().max() > 1e-4, name
    unet = tiny.unet
    x, t, e = unet_inputs(unet, batch=2)
    with torch.no_grad():
        base = unet(x, t, e).sample
        with hyper_lora_processors(unet, table):
            batched = unet(x, t, e, cross_attention_kwargs={"hyper_lora": hl}).sample
        assert (batched - base).abs().max() > 1e-3  # the predicted weights do something
        for i, (ref, ad) in enumerate(zip(refs, hp.to_adapters(a, b))):
            alone_ad = hp.predict([ref])  # the hypernet itself is per-sample too
            for name in table.names:
                torch.testing.assert_close(alone_ad.factors[name][0], ad.factors[name][0], rtol=0, atol=1e-5)
                torch.testing.assert_close(alone_ad.factors[name][1], ad.factors[name][1], rtol=0, atol=1e-5)
            with ad.applied(unet):
                alone = unet(x[i : i + 1], t[i : i + 1], e[i : i + 1]).sample
            torch.testing.assert_close(batched[i : i + 1], alone, rtol=0, atol=1e-5)


def test_several_references_of_one_identity_are_pooled(table):
    hp = randomise_b_head(make_hypernet(table)).eval()
    refs = [face(4, "red"), face(4, "yellow", True), face(5)]
    pixels = hp.encoder.preprocess(refs)
    with torch.no_grad():
        tokens = hp.encoder(pixels)
        pooled = pool_references(tokens, [2, 1])
        torch.testing.assert_close(pooled[0], (tokens[0] + tokens[1]) / 2)
        torch.testing.assert_close(pooled[1], tokens[2])
        a, b = hp(pixels, groups=[2, 1])
    assert a.shape[0] == 2
    two = hp.predict(refs[:2])
    torch.testing.assert_close(two.factors[table.names[0]][1], b[0, 0], rtol=0, atol=1e-6)
    one = hp.predict(refs[:1])
    assert (one.factors[table.names[0]][1] - two.factors[table.names[0]][1]).abs().max() > 1e-6
    with pytest.raises(HyperdiffError, match="groups"):
        pool_references(tokens, [2, 2])
    with pytest.raises(HyperdiffError, match="groups"):
        pool_references(tokens, [3, 0])


# -- sampling ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decoder", ["attention", "mlp"])
def test_sample_gives_n_different_adapters_deterministic_in_the_seed(table, decoder):
    hp = randomise_b_head(make_hypernet(table, decoder=decoder))
    ref = [face(6)]
    first = hp.sample(ref, 3, seed=0)
    again = hp.sample(ref, 3, seed=0)
    other = hp.sample(ref, 3, seed=1)
    name = table.names[5]
    assert len(first) == 3 and all(isinstance(ad, Adapter) and ad.kind == "lidb" for ad in first)
    for x, y in zip(first, again):
        assert all(torch.equal(x.factors[n][0], y.factors[n][0]) and torch.equal(x.factors[n][1], y.factors[n][1])
                   for n in table.names)
    dws = [ad.delta_weight(name) for ad in first]
    assert min((dws[i] - dws[j]).abs().max() for i in range(3) for j in range(i + 1, 3)) > 1e-5
    assert (other[0].delta_weight(name) - dws[0]).abs().max() > 1e-5
    assert hp.training  # the mode is restored
    with pytest.raises(HyperdiffError, match="`n`"):
        hp.sample(ref, 0)


# -- files ---------------------------------------------------------------------------------------------------------
def test_save_pretrained_round_trip_is_exact_and_checks_the_base(tmp_path, table, sd15_unet):
    hp = randomise_b_head(make_hypernet(table, sample_noise=0.3))
    hp.info = {"base_model": "hyperdiff:tiny", "name": "unit"}
    path = hp.save_pretrained(tmp_path / "hn")
    assert {p.name for p in path.iterdir()} == {"config.json", "model.safetensors", "README.md"}
    assert table.fingerprint in (path / "README.md").read_text()
    refs = [face(7), face(7, "purple")]
    want = hp.predict(refs)
    for loaded in (HyperNetwork.from_pretrained(path), HyperNetwork.from_pretrained(path, table=table)):
        assert loaded.config == hp.config and loaded.fingerprint == table.fingerprint and not loaded.training
        got = loaded.predict(refs)
        assert all(torch.equal(got.factors[n][0], want.factors[n][0]) and torch.equal(got.factors[n][1], want.factors[n][1])
                   for n in table.names)
        sampled, expected = loaded.sample(refs, 2, seed=3), hp.sample(refs, 2, seed=3)
        assert all(torch.equal(s.factors[n][1], e.factors[n][1]) for s, e in zip(sampled, expected) for n in table.names)
    with pytest.raises(HyperdiffError, match="fingerprint"):
        HyperNetwork.from_pretrained(path, table=LayerTable.from_unet(sd15_unet))
    (path / "model.safetensors").unlink()  # the config alone reads without the weights
    assert HyperNetwork.read_config(path) == hp.config


def test_from_pretrained_gives_clear_errors_for_missing_or_corrupt_folders(tmp_path, table):
    path = make_hypernet(table).save_pretrained(tmp_path / "hn")
    config = json.loads((path / "config.json").read_text())

    def broken(name: str, edit) -> Path:
        dst = tmp_path / name
        dst.mkdir()
        for f in path.iterdir():
            (dst / f.name).write_bytes(f.read_bytes())
        edit(dst)
        return dst

    cases = {
        "no config.json": tmp_path / "missing",
        "not valid JSON": broken("badjson", lambda d: (d / "config.json").write_text("{oops")),
        "format": broken("badformat", lambda d: (d / "config.json").write_text("[1, 2]")),
        "malformed": broken("nokeys", lambda d: (d / "config.json").write_text(json.dumps({"format": config["format"]}))),
        "unknown key": broken("badkey", lambda d: (d / "config.json").write_text(
            json.dumps({**config, "config": {**config["config"], "depth": 3}}))),
        "do not match its config": broken("badshape", lambda d: (d / "config.json").write_text(
            json.dumps({**config, "config": {**config["config"], "dim": 64}}))),
        "fingerprint": broken("badprint", lambda d: (d / "config.json").write_text(
            json.dumps({**config, "base_fingerprint": "0123456789abcdef"}))),
        "does not exist": broken("noweights", lambda d: (d / "model.safetensors").unlink()),
        "safetensors": broken("truncated", lambda d: (d / "model.safetensors").write_bytes(
            (path / "model.safetensors").read_bytes()[:1000])),
    }
    for message, folder in cases.items():
        with pytest.raises(HyperdiffError, match=message):
            HyperNetwork.from_pretrained(folder)
        if message not in ("do not match its config", "does not exist", "safetensors"):  # the config's own problems
            with pytest.raises(HyperdiffError, match=message):
                HyperNetwork.read_config(folder)


# -- real base shapes and the CLIP encoder -------------------------------------------------------------------------
@pytest.mark.parametrize("name, config_file, architecture, text_dim", [
    ("sd15", "sd15.yaml", "stable-diffusion-v1", 768),
    ("sd21", "sd21.yaml", "stable-diffusion-v2", 1024),
])
def test_paper_config_covers_all_128_layers_of_the_real_unet(request, name, config_file, architecture, text_dim):
    """The YAML's hypernet (a=100 b=50 r=1, 2-layer decoder, K=2, dim 512) on the real UNet's layer table; the CLIP
    ViT-H tower cannot be downloaded here, so a small encoder stands in for it."""
    from hyperdiff.hypernet.training import HypernetTrainConfig

    cfg = load_config(HypernetTrainConfig, ROOT / "configs" / config_file).hypernet
    assert cfg.encoder.kind == "clip" and cfg.encoder.pretrained == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    assert (cfg.lidb.a, cfg.lidb.b, cfg.lidb.rank, cfg.layers, cfg.refine_steps, cfg.dim) == (100, 50, 1, 2, 2, 512)
    table = LayerTable.from_unet(request.getfixturevalue(f"{name}_unet"))
    assert len(table) == 128 and table.cross_attention_dim == text_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hp = HyperNetwork(replace(cfg, encoder=SMALL), table)
    with torch.no_grad():
        a, b = hp(hp.encoder.preprocess([face(1)]))
    assert a.shape == (1, 128, 100, 1) and b.shape == (1, 128, 1, 50)
    hl = hp.hyper_lora(a, b)
    assert list(hl.layers) == table.names
    for row in table:
        d = hl.layers[row.name]
        assert d.down.shape == (1, 1, row.in_features) and d.up.shape == (1, row.out_features, 1)
    ad = hp.to_adapters(a, b)[0]
    ad.check_table(table)
    assert ad.num_values == 19_200 and ad.fingerprint == table.fingerprint and ad.info.architecture == architecture


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random-init CLIP vision tower + image processor saved like a hub snapshot, loaded offline."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    folder = tmp_path_factory.mktemp("tiny_clip")
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPVisionModelWithProjection(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_clip_encoder_loads_offline_follows_its_processor_and_freezes_all_but_the_last_blocks(tiny_clip):
    from transformers import CLIPImageProcessor

    enc = ClipImageEncoder(EncoderConfig(kind="clip", pretrained=str(tiny_clip), unfreeze_last=1))
    trainable = {n.split(".")[4] for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable == {"2"}  # model.vision_model.encoder.layers.<i>: only the last of 3
    assert not any(p.requires_grad for n, p in enc.named_parameters() if ".layers.2." not in n)
    image = face(8, size=64).crop((0, 0, 64, 50))  # not square: resize the short side, centre crop
    pixels = enc.preprocess([image])
    reference = CLIPImageProcessor.from_pretrained(tiny_clip)(images=[image], return_tensors="pt").pixel_values
    assert pixels.shape == reference.shape == (1, 3, 32, 32)
    assert (pixels - reference).abs().max() < 0.05  # torch bicubic vs PIL bicubic, normalised units
    assert enc(pixels).shape == (1, 1 + 16, 32)
    frozen = ClipImageEncoder(EncoderConfig(kind="clip", pretrained=str(tiny_clip)))
    assert not any(p.requires_grad for p in frozen.parameters())
    for missing in (str(tiny_clip.parent / "nope"), "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"):  # hub is offline here
        with pytest.raises(HyperdiffError, match="could not be loaded"):
            ClipImageEncoder(EncoderConfig(kind="clip", pretrained=missing))
    with pytest.raises(HyperdiffError, match="pretrained"):
        EncoderConfig(kind="clip")


def test_hypernet_with_clip_encoder_trains_its_unfrozen_block_and_round_trips(tmp_path, tiny, table, identity_batch, tiny_clip):
    clip = EncoderConfig(kind="clip", pretrained=str(tiny_clip), unfreeze_last=1)
    hp = randomise_b_head(make_hypernet(table, encoder=clip))
    with hyper_lora_processors(tiny.unet, table):
        _loss(tiny, hp, identity_batch).backward()
    for n, p in hp.encoder.named_parameters():
        if ".layers.2." in n:
            assert p.grad is not None and p.grad.abs().max() > 0, n
        else:
            assert p.grad is None, n
    hp.save_pretrained(tmp_path / "hn")
    loaded = HyperNetwork.from_pretrained(tmp_path / "hn", table=table)
    assert isinstance(loaded.encoder, ClipImageEncoder)
    want, got = hp.predict([face(9)]), loaded.predict([face(9)])
    assert all(torch.equal(got.factors[n][1], want.factors[n][1]) for n in table.names)


def test_identity_encoder_kind_is_frozen_sees_identity_and_travels_in_the_hypernet_file(tmp_path, tiny, table, identity_batch):
    from hyperdiff.hypernet.encoders import IdentityImageEncoder
    from hyperdiff.synthfaces.detectors import default_encoder

    config = EncoderConfig(kind="identity", image_size=64, dim=32)
    hp = randomise_b_head(make_hypernet(table, encoder=config))
    assert isinstance(hp.encoder, IdentityImageEncoder)
    shipped = default_encoder()
    refs = [face(s, size=64) for s in (1_000_020, 1_000_021)]
    same_scene_other_identity = hp.encoder(hp.encoder.preprocess(refs))  # (2, 4·4 + 1, 32)
    assert same_scene_other_identity.shape == (2, 17, 32)
    # the identity token is the shipped encoder's embedding, projected: recompute it independently
    emb = shipped.embed(refs)  # (2, 128), unit norm
    want = emb @ hp.encoder.proj_id.weight.T + hp.encoder.proj_id.bias + hp.encoder.position[-1]
    assert torch.allclose(same_scene_other_identity[:, -1], want, atol=1e-5)
    with hyper_lora_processors(tiny.unet, table):  # (32 px batch: the encoder resizes to its 64 px input)
        _loss(tiny, hp, identity_batch).backward()
    assert all(p.grad is None for n, p in hp.encoder.named_parameters() if n.startswith(("trunk.", "embed_head.")))
    assert hp.encoder.proj_map.weight.grad.abs().max() > 0 and hp.encoder.proj_id.weight.grad.abs().max() > 0
    hp.save_pretrained(tmp_path / "hn")
    with safe_open(str(tmp_path / "hn" / "model.safetensors"), "pt") as f:
        assert any(k.startswith("encoder.trunk.") for k in f.keys())  # self-contained file
    loaded = HyperNetwork.from_pretrained(tmp_path / "hn", table=table)
    want, got = hp.predict([refs[0]]), loaded.predict([refs[0]])
    assert all(torch.equal(got.factors[n][1], want.factors[n][1]) for n in table.names)
    with pytest.raises(HyperdiffError, match="`encoder.image_size` must be the identity encoder's input size 64"):
        IdentityImageEncoder(EncoderConfig(kind="identity", image_size=32, dim=32))


def test_config_validation_is_one_line_errors(table):
    with pytest.raises(HyperdiffError, match="decoder"):
        HyperNetConfig(decoder="rnn")
    with pytest.raises(HyperdiffError, match="multiple of `heads`"):
        HyperNetConfig(dim=30, heads=4)
    with pytest.raises(HyperdiffError, match="refine_steps"):
        HyperNetConfig(decoder="mlp", refine_steps=2)
    with pytest.raises(HyperdiffError, match="encoder.kind"):
        EncoderConfig(kind="resnet")
    assert isinstance(make_hypernet(table).encoder, SmallImageEncoder)
