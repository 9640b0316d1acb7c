"""Low-noise gain (hyperdiff.schedule): sampling with ΔW × gain below a timestep, in both of the pipeline's paths, in
the native file, and in vanilla diffusers through an exported LoRA file and the step callback."""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import random_lora
from test_pipeline import run
from hyperdiff import Adapter, HyperdiffError
from hyperdiff.layers import LayerTable
from hyperdiff.models import TINY_BASE
from hyperdiff.pipeline import HyperDreamBoothPipeline
from hyperdiff.schedule import LowNoiseGain, diffusers_callback

PROMPT = "a sks face, smiling, on a red background"
STEPS = 6


@pytest.fixture(scope="module")
def hdb():
    return HyperDreamBoothPipeline.from_pretrained(TINY_BASE, load_hypernet=False, device="cpu")


@pytest.fixture(scope="module")
def plain(hdb):
    return random_lora(LayerTable.from_unet(hdb.pipe.unet), seed=3, std=0.4, token="sks")


def scheduled(adapter: Adapter, gain: float, below: int) -> Adapter:
    out = 1.0 * adapter  # a copy: `info` is the adapter's own
    out.info = replace(out.info, low_noise=LowNoiseGain(gain, below))
    return out


def _arr(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def test_low_noise_gain_checks_its_fields():
    for kwargs, needle in [({"gain": 0}, "`low_noise.gain` must be a positive number, got 0"),
                           ({"gain": float("nan")}, "`low_noise.gain`"), ({"gain": True}, "`low_noise.gain`"),
                           ({"below": -1}, r"`low_noise.below` must be an integer timestep in \[0, 1000\], got -1"),
                           ({"below": 1001}, "`low_noise.below`"), ({"below": 2.5}, "`low_noise.below`")]:
        with pytest.raises(HyperdiffError, match=needle):
            LowNoiseGain(**{"gain": 1.5, "below": 300, **kwargs})
    low = LowNoiseGain(1.5, 300)
    assert low.active and (low.factor(299), low.factor(300), low.factor(999)) == (1.5, 1.0, 1.0)
    assert not LowNoiseGain().active and not LowNoiseGain(2.0, 0).active and not LowNoiseGain(1.0, 500).active


def test_a_gain_over_every_timestep_is_that_strength_and_none_is_the_adapter(hdb, plain):
    """Analytic ends: below 1000 covers every timestep (ΔW × gain throughout, bit for bit as strength = gain);
    below 0 covers none. In between the image is neither."""
    before = hdb.generate(PROMPT, None, steps=STEPS, seed=1)
    one = hdb.generate(PROMPT, plain, steps=STEPS, seed=1)
    two = hdb.generate(PROMPT, plain, steps=STEPS, seed=1, strength=2.0)
    assert np.array_equal(_arr(hdb.generate(PROMPT, scheduled(plain, 2.0, 1000), steps=STEPS, seed=1)), _arr(two))
    assert np.array_equal(_arr(hdb.generate(PROMPT, scheduled(plain, 2.0, 0), steps=STEPS, seed=1)), _arr(one))
    mid = _arr(hdb.generate(PROMPT, scheduled(plain, 2.0, 500), steps=STEPS, seed=1))
    assert np.abs(mid - _arr(one)).max() > 5 and np.abs(mid - _arr(two)).max() > 5
    # the call's own `low_noise` overrides the adapter's
    assert np.array_equal(_arr(hdb.generate(PROMPT, scheduled(plain, 2.0, 500), steps=STEPS, seed=1,
                                            low_noise=LowNoiseGain())), _arr(one))
    # the UNet's weights are the base's again afterwards, the schedule's re-fuse included
    assert np.array_equal(_arr(hdb.generate(PROMPT, None, steps=STEPS, seed=1)), _arr(before))


def test_per_sample_schedules_in_one_batch_equal_each_adapter_alone(hdb, plain):
    """The processors' path (one delta set per image, swapped when a schedule's factor changes) against the fused
    path, image by image, with two different schedules and one without."""
    other = random_lora(hdb.table, seed=4, std=0.4, token="sks")
    ads = [scheduled(plain, 2.0, 500), scheduled(other, 0.5, 600), other]
    batch = hdb.generate(PROMPT, ads, steps=STEPS, seed=2)
    alone = [hdb.generate(PROMPT, ad, steps=STEPS, seed=2 + i)[0] for i, ad in enumerate(ads)]
    assert np.abs(_arr(batch) - _arr(alone)).max() <= 2  # uint8 pixels: processors vs fused, float rounding
    unscheduled = hdb.generate(PROMPT, [plain, other, other], steps=STEPS, seed=2)
    assert np.abs(_arr(batch[:2]) - _arr(unscheduled[:2])).max(axis=(1, 2, 3)).min() > 5  # both schedules acted


def test_the_native_file_keeps_the_schedule_and_exports_say_they_cannot(plain, tmp_path):
    ad = scheduled(plain, 1.5, 300)
    back = Adapter.load(ad.save(tmp_path / "a.safetensors"))
    assert back.info.low_noise == LowNoiseGain(1.5, 300)
    assert back.digest == ad.digest != plain.digest  # it changes what sampling computes, hence the file name
    assert Adapter.load(plain.save(tmp_path / "p.safetensors")).info.low_noise == LowNoiseGain()
    derived = [0.5 * ad, Adapter.concat([ad, plain]), Adapter.mix([ad, plain], [1, 1])]
    assert all(d.info.low_noise == ad.info.low_noise for d in derived)  # like the rest of `info`: the first one's

    tensors, meta = {}, {}
    with safe_open(tmp_path / "a.safetensors", "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    for bad in ('{"gain": 0, "below": 300}', '{"gain": 1.5}', "[1.5, 300]", "fast"):
        save_file(tensors, tmp_path / "bad.safetensors", {**meta, "hyperdiff.low_noise": bad})
        with pytest.raises(HyperdiffError, match=r"bad.safetensors' has 'hyperdiff.low_noise' = .*expected JSON"):
            Adapter.load(tmp_path / "bad.safetensors")
    del meta["hyperdiff.low_noise"]  # a file written before the field existed
    save_file(tensors, tmp_path / "old.safetensors", meta)
    assert Adapter.load(tmp_path / "old.safetensors").info.low_noise == LowNoiseGain()

    for fmt in ("diffusers", "kohya"):
        with pytest.warns(UserWarning, match=r"samples without this adapter's low-noise gain \(×1.5 below timestep 300\)"):
            path = ad.export(tmp_path / f"{fmt}.safetensors", fmt)
        with safe_open(path, "pt") as f:
            assert json.loads(f.metadata()["hyperdiff.low_noise"]) == {"gain": 1.5, "below": 300}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            plain.export(tmp_path / f"plain-{fmt}.safetensors", fmt)  # nothing to warn about


def test_vanilla_diffusers_with_the_step_callback_samples_as_hyperdiff(hdb, plain, tmp_path):
    """The independent path: diffusers' own LoRA loader (PEFT layers, weight set per step by the callback) on the
    exported file, against hyperdiff's re-fused weights, from the same noise."""
    ad = scheduled(plain, 2.0, 500)
    with pytest.warns(UserWarning):
        path = ad.export(tmp_path / "id.safetensors", "diffusers")
    ours = hdb.generate(PROMPT, ad, steps=STEPS, seed=0)
    vanilla = copy.deepcopy(hdb.pipe)
    vanilla.load_lora_weights(str(path), adapter_name="id")

    def sample(**kwargs):
        side, channels = vanilla.unet.config.sample_size, vanilla.unet.config.in_channels
        noise = torch.randn((1, channels, side, side), generator=torch.Generator().manual_seed(0))
        return vanilla(PROMPT, num_inference_steps=STEPS, guidance_scale=4.0, latents=noise, **kwargs).images

    theirs = sample(callback_on_step_end=diffusers_callback(ad.info.low_noise, "id"))
    assert np.abs(_arr(theirs) - _arr(ours)).max() <= 2  # PEFT branch vs fused weights: float rounding
    vanilla.set_adapters(["id"], [1.0])
    assert np.abs(_arr(sample()) - _arr(ours)).max() > 5  # without the callback the export samples at one strength


def test_cli_generate_samples_with_the_files_schedule_and_the_flags_override_it(hdb, plain, tmp_path):
    path = scheduled(plain, 2.0, 500).save(tmp_path / "me.safetensors")
    common = ["generate", "--adapter", path, "--prompt", PROMPT, "--base", TINY_BASE, "--steps", STEPS, "--seed", 3]
    for flags, low in [([], None), (["--low-noise-gain", "1"], LowNoiseGain()),
                       (["--low-noise-below", "300"], LowNoiseGain(2.0, 300))]:
        out = tmp_path / f"imgs{len(flags)}{flags[-1] if flags else ''}"
        res = run(*common, "--out", out, *flags)
        assert res.returncode == 0, res.stderr
        want = hdb.generate(PROMPT, Adapter.load(path), steps=STEPS, seed=3, low_noise=low)
        assert np.array_equal(_arr([Image.open(f) for f in out.glob("*.png")]), _arr(want)), flags
    res = run("inspect", path)
    assert res.returncode == 0 and "low-noise gain: x2 below timestep 500" in res.stdout, res.stderr
    res = run("export", path, "--format", "kohya", "--out", tmp_path / "k.safetensors")
    assert res.returncode == 0 and "samples without this adapter's low-noise gain (×2 below timestep 500)" in res.stderr
    for flags, needle in [(["--low-noise-gain", "0"], "`low_noise.gain` must be a positive number, got 0.0"),
                          (["--low-noise-below", "2000"], "`low_noise.below` must be an integer timestep in [0, 1000]")]:
        res = run(*common, "--out", tmp_path / "bad", *flags)
        assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


def test_a_calibrated_hypernets_prediction_carries_its_gain_and_a_fine_tune_samples_at_one_strength(hdb, tmp_path):
    from test_hypernet import make_hypernet, randomise_b_head

    from hyperdiff.data import synthfaces as sf
    from hyperdiff.hypernet import HyperNetwork

    hp = randomise_b_head(make_hypernet(hdb.table, seed=0), std=1e-2)
    hp.set_gain(1.0, low_noise=LowNoiseGain(1.5, 200))
    hp.save_pretrained(tmp_path / "hp")  # the gain is part of the hypernet's config.json
    personal = HyperDreamBoothPipeline(hdb.pipe, HyperNetwork.from_pretrained(tmp_path / "hp", hdb.table))
    ref = sf.render(sf.Identity.from_seed(1_000_007), sf.Scene(), 32)
    assert personal.personalize([ref]).info.low_noise == LowNoiseGain(1.5, 200)
    assert personal.personalize([ref], finetune_steps=1).info.low_noise == LowNoiseGain()
