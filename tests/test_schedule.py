"""Low-noise gain (hyperdiff.core.schedule): sampling with ΔW × gain below a timestep, in both of the pipeline's paths, in
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
from hyperdiff.core.layers import LayerTable
from hyperdiff.core.schedule import LowNoiseGain, diffusers_schedule
from hyperdiff.models import TINY_BASE
from hyperdiff.personalize.pipeline import HyperDreamBoothPipeline

PROMPT = "a sks face, smiling, on a red background"
STEPS = 6


@pytest.fixture(scope="module")
def hdb():
    return HyperDreamBoothPipeline.from_pretrained(TINY_BASE, load_hypernet=False, device="cpu")


@pytest.fixture(scope="module")
def plain(hdb):
    return random_lora(LayerTable.from_unet(hdb.pipe.unet), seed=3, std=0.4, token="sks")


@pytest.fixture(scope="module")
def other(hdb):
    return random_lora(hdb.table, seed=4, std=0.4, token="sks")


def parts(first: Adapter, second: Adapter, schedule: LowNoiseGain, rest: LowNoiseGain = LowNoiseGain()) -> Adapter:
    """`first + second` (their rank concatenation), `first`'s rank components sampled with `schedule`, the rest with
    `rest`: how a fine-tune's start and learned part sample."""
    ad = Adapter.concat([first, second])
    ad.info = replace(ad.info, low_noise=rest, rank_schedules=((first.rank, schedule),))
    return ad


def scheduled(adapter: Adapter, gain: float, below: int, off_from: int = 1000) -> Adapter:
    out = 1.0 * adapter  # a copy: `info` is the adapter's own
    out.info = replace(out.info, low_noise=LowNoiseGain(gain, below, off_from))
    return out


def _arr(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def test_low_noise_gain_checks_its_fields():
    for kwargs, needle in [({"gain": 0}, "`low_noise.gain` must be a positive number, got 0"),
                           ({"gain": float("nan")}, "`low_noise.gain`"), ({"gain": True}, "`low_noise.gain`"),
                           ({"below": -1}, r"`low_noise.below` must be an integer timestep in \[0, 1000\], got -1"),
                           ({"below": 1001}, "`low_noise.below`"), ({"below": 2.5}, "`low_noise.below`"),
                           ({"off_from": 299}, r"`low_noise.off_from` must be an integer timestep in \[max\(`below`, 1\), "
                                               r"1000\], got 299 \(`below` is 300\)"),
                           ({"off_from": 1001}, "`low_noise.off_from`"), ({"off_from": 800.0}, "`low_noise.off_from`"),
                           ({"below": 0, "off_from": 0}, "`low_noise.off_from`")]:
        with pytest.raises(HyperdiffError, match=needle):
            LowNoiseGain(**{"gain": 1.5, "below": 300, **kwargs})
    low = LowNoiseGain(1.5, 300)
    assert low.active and (low.factor(299), low.factor(300), low.factor(999)) == (1.5, 1.0, 1.0)
    assert not LowNoiseGain().active and not LowNoiseGain(2.0, 0).active and not LowNoiseGain(1.0, 500).active
    window = LowNoiseGain(1.25, 200, 800)
    assert [window.factor(t) for t in (199, 200, 799, 800, 999)] == [1.25, 1.0, 1.0, 0.0, 0.0]
    assert LowNoiseGain(1.0, 0, 600).active and LowNoiseGain(1.0, 0, 600).factor(599) == 1.0
    assert window.describe() == "×1.25 below timestep 200, off from timestep 800"
    assert (LowNoiseGain(1.5, 300).describe(), LowNoiseGain().describe()) == ("×1.5 below timestep 300", "one strength")
    assert window.to_dict() == {"gain": 1.25, "below": 200, "off_from": 800}
    assert low.to_dict() == {"gain": 1.5, "below": 300}  # as written before `off_from` existed


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


def test_an_adapter_off_from_a_timestep_is_the_base_model_above_it(hdb, plain):
    """Analytic end: off from timestep 1, ΔW acts at no sampled timestep (the tiny base's 6 steps end above 0), so
    both paths give the base model's image bit for bit. Off from 500 it acts in the low-noise steps only: neither."""
    before = hdb.generate(PROMPT, None, steps=STEPS, seed=1)
    one = hdb.generate(PROMPT, plain, steps=STEPS, seed=1)
    assert np.array_equal(_arr(hdb.generate(PROMPT, scheduled(plain, 1.0, 0, 1), steps=STEPS, seed=1)), _arr(before))
    assert np.array_equal(_arr(hdb.generate(PROMPT, [scheduled(plain, 1.0, 0, 1)], steps=STEPS, seed=1)), _arr(before))
    late = _arr(hdb.generate(PROMPT, scheduled(plain, 1.0, 0, 500), steps=STEPS, seed=1))
    assert np.abs(late - _arr(one)).max() > 5 and np.abs(late - _arr(before)).max() > 5
    per_sample = hdb.generate(PROMPT, [scheduled(plain, 1.0, 0, 500)], steps=STEPS, seed=1)
    assert np.abs(_arr(per_sample) - late).max() <= 2  # processors vs fused: float rounding


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
    window = scheduled(plain, 1.25, 200, 800)
    back = Adapter.load(window.save(tmp_path / "w.safetensors"))
    assert back.info.low_noise == LowNoiseGain(1.25, 200, 800) and back.digest == window.digest
    assert window.digest != scheduled(plain, 1.25, 200).digest
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
    for bad in ('{"gain": 0, "below": 300}', '{"gain": 1.5}', "[1.5, 300]", "fast",
                '{"gain": 1.5, "below": 300, "off_from": 100}', '{"gain": 1.5, "below": 300, "until": 800}'):
        save_file(tensors, tmp_path / "bad.safetensors", {**meta, "hyperdiff.low_noise": bad})
        with pytest.raises(HyperdiffError, match=r"bad.safetensors' has 'hyperdiff.low_noise' = .*expected JSON"):
            Adapter.load(tmp_path / "bad.safetensors")
    del meta["hyperdiff.low_noise"]  # a file written before the field existed
    save_file(tensors, tmp_path / "old.safetensors", meta)
    assert Adapter.load(tmp_path / "old.safetensors").info.low_noise == LowNoiseGain()

    for fmt in ("diffusers", "kohya"):
        with pytest.warns(UserWarning, match=r"samples without this adapter's low-noise schedule \(×1.5 below timestep 300\)"):
            path = ad.export(tmp_path / f"{fmt}.safetensors", fmt)
        with safe_open(path, "pt") as f:
            assert json.loads(f.metadata()["hyperdiff.low_noise"]) == {"gain": 1.5, "below": 300}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            plain.export(tmp_path / f"plain-{fmt}.safetensors", fmt)  # nothing to warn about


@pytest.mark.parametrize("low", [LowNoiseGain(2.0, 500), LowNoiseGain(2.0, 300, 700)])
def test_vanilla_diffusers_with_the_step_callback_samples_as_hyperdiff(hdb, plain, tmp_path, low):
    """The independent path: diffusers' own LoRA loader (PEFT layers, weight set for the first step and then per
    step by the callback) on the exported file, against hyperdiff's re-fused weights, from the same noise; off from
    700 the first steps sample without the LoRA."""
    ad = scheduled(plain, low.gain, low.below, low.off_from)
    with pytest.warns(UserWarning):
        path = ad.export(tmp_path / "id.safetensors", "diffusers")
    ours = hdb.generate(PROMPT, ad, steps=STEPS, seed=0)
    vanilla = copy.deepcopy(hdb.pipe)
    vanilla.load_lora_weights(str(path), adapter_name="id")

    def sample(**kwargs):
        side, channels = vanilla.unet.config.sample_size, vanilla.unet.config.in_channels
        noise = torch.randn((1, channels, side, side), generator=torch.Generator().manual_seed(0))
        return vanilla(PROMPT, num_inference_steps=STEPS, guidance_scale=4.0, latents=noise, **kwargs).images

    theirs = sample(callback_on_step_end=diffusers_schedule(vanilla, {"id": ad.info.low_noise}, STEPS))
    assert np.abs(_arr(theirs) - _arr(ours)).max() <= 2  # PEFT branch vs fused weights: float rounding
    vanilla.set_adapters(["id"], [1.0])
    assert np.abs(_arr(sample()) - _arr(ours)).max() > 5  # without the callback the export samples at one strength


def test_cli_generate_samples_with_the_files_schedule_and_the_flags_override_it(hdb, plain, tmp_path):
    path = scheduled(plain, 2.0, 500).save(tmp_path / "me.safetensors")
    common = ["generate", "--adapter", path, "--prompt", PROMPT, "--base", TINY_BASE, "--steps", STEPS, "--seed", 3]
    for flags, low in [([], None), (["--low-noise-gain", "1"], LowNoiseGain()),
                       (["--low-noise-below", "300"], LowNoiseGain(2.0, 300)),
                       (["--low-noise-off-from", "700"], LowNoiseGain(2.0, 500, 700))]:
        out = tmp_path / f"imgs{len(flags)}{flags[-1] if flags else ''}"
        res = run(*common, "--out", out, *flags)
        assert res.returncode == 0, res.stderr
        want = hdb.generate(PROMPT, Adapter.load(path), steps=STEPS, seed=3, low_noise=low)
        assert np.array_equal(_arr([Image.open(f) for f in out.glob("*.png")]), _arr(want)), flags
    res = run("inspect", path)
    assert res.returncode == 0 and "low-noise schedule: ×2 below timestep 500" in res.stdout, res.stderr
    res = run("export", path, "--format", "kohya", "--out", tmp_path / "k.safetensors")
    assert res.returncode == 0 and "samples without this adapter's low-noise schedule (×2 below timestep 500)" in res.stderr
    for flags, needle in [(["--low-noise-gain", "0"], "`low_noise.gain` must be a positive number, got 0.0"),
                          (["--low-noise-below", "2000"], "`low_noise.below` must be an integer timestep in [0, 1000]"),
                          (["--low-noise-off-from", "400"], "`low_noise.off_from` must be an integer timestep in "
                                                            "[max(`below`, 1), 1000], got 400 (`below` is 500)")]:
        res = run(*common, "--out", tmp_path / "bad", *flags)
        assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


def test_an_adapters_rank_parts_sample_with_their_own_schedules(hdb, plain, other, tmp_path):
    """`info.rank_schedules` against known cases, in both paths: the first part off at every sampled timestep is the
    second part alone; the first part × 2 at every timestep is the concatenation of 2·first and second at one
    strength. A part × 2 below 500 only is neither. The native file keeps the parts; a LoRA export warns."""
    def both_paths(ad: Adapter) -> tuple[np.ndarray, np.ndarray]:
        return (_arr(hdb.generate(PROMPT, ad, steps=STEPS, seed=1)), _arr(hdb.generate(PROMPT, [ad], steps=STEPS, seed=1)))

    alone = _arr(hdb.generate(PROMPT, other, steps=STEPS, seed=1))
    doubled = _arr(hdb.generate(PROMPT, Adapter.concat([2 * plain, other]), steps=STEPS, seed=1))
    for ad, want in [(parts(plain, other, LowNoiseGain(1.0, 0, 1)), alone),
                     (parts(plain, other, LowNoiseGain(2.0, 1000)), doubled)]:
        for got in both_paths(ad):
            assert np.abs(got - want).max() <= 2  # the same ΔW summed in another order: float rounding
    mid = both_paths(parts(plain, other, LowNoiseGain(2.0, 500)))
    assert np.abs(mid[0] - mid[1]).max() <= 2
    assert min(np.abs(mid[0] - want).max() for want in (alone, doubled)) > 5
    # the call's own `low_noise` replaces every part's schedule
    one = _arr(hdb.generate(PROMPT, Adapter.concat([plain, other]), steps=STEPS, seed=1))
    assert np.array_equal(_arr(hdb.generate(PROMPT, parts(plain, other, LowNoiseGain(2.0, 500)), steps=STEPS, seed=1,
                                            low_noise=LowNoiseGain())), one)

    ad = parts(plain, other, LowNoiseGain(1.5, 300), LowNoiseGain(1.25, 200, 800))
    assert ad.schedule_parts == ((plain.rank, LowNoiseGain(1.5, 300)), (other.rank, LowNoiseGain(1.25, 200, 800)))
    back = Adapter.load(ad.save(tmp_path / "parts.safetensors"))
    assert back.info.rank_schedules == ad.info.rank_schedules and back.digest == ad.digest
    assert ad.digest != parts(plain, other, LowNoiseGain(1.25, 200, 800), LowNoiseGain(1.25, 200, 800)).digest
    assert ad.info.describe_schedule() == (f"rank {plain.rank}: ×1.5 below timestep 300; the rest: ×1.25 below "
                                           "timestep 200, off from timestep 800")
    with pytest.warns(UserWarning, match="cannot give its parts their own schedules"):
        ad.export(tmp_path / "parts.diffusers.safetensors", "diffusers")
    with safe_open(tmp_path / "parts.safetensors", "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    for bad in ("[]", '[[0, {"gain": 1.5, "below": 300}]]', f'[[{ad.rank + 1}, {{"gain": 1.5, "below": 300}}]]',
                '[[1, {"gain": 1.5}]]', '{"rank": 1}'):
        save_file(tensors, tmp_path / "bad.safetensors", {**meta, "hyperdiff.rank_schedules": bad})
        with pytest.raises(HyperdiffError, match=r"bad.safetensors'"):
            Adapter.load(tmp_path / "bad.safetensors")
    with pytest.raises(HyperdiffError, match=r"`rank_schedules` cover 99 rank components, the adapter has"):
        Adapter.concat([plain, other]).with_schedule(LowNoiseGain())._derive(
            Adapter.concat([plain, other]).factors, rank_schedules=((99, LowNoiseGain()),))


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # two adapters, loaded on purpose
def test_a_split_export_samples_in_vanilla_diffusers_as_hyperdiff_samples_its_parts(hdb, plain, other, tmp_path):
    """`hyperdiff export --split` writes one LoRA file per schedule part: each holds its part's ΔW (known: the
    concatenation's first part is `plain`, the second `other`) and says its schedule (`file_schedule`); loaded in
    vanilla diffusers under two adapter names and sampled with `diffusers_schedule`, they give hyperdiff's images of
    the whole adapter, from the same noise. One LoRA weight per step for both files does not."""
    from hyperdiff.core.formats import file_schedule

    start, rest = LowNoiseGain(2.0, 500), LowNoiseGain(1.5, 300, 700)
    ad = parts(plain, other, start, rest)
    split = ad.split_by_schedule()
    want = [(plain.rank, start, ()), (other.rank, rest, ())]
    assert [(p.rank, p.info.low_noise, p.info.rank_schedules) for p in split] == want
    for name in hdb.table.names:
        for part, made_from in zip(split, (plain, other)):
            torch.testing.assert_close(part.delta_weight(name), made_from.delta_weight(name))
    assert plain.split_by_schedule() == (plain,)  # one schedule: its own only part

    native = ad.save(tmp_path / "parts.safetensors")
    res = run("export", native, "--format", "diffusers", "--out", tmp_path / "me.safetensors", "--split")
    assert res.returncode == 0, res.stderr
    files = [tmp_path / "me-part1.safetensors", tmp_path / "me-part2.safetensors"]
    assert sorted(tmp_path.glob("me*")) == files and "part 2 of 2" in res.stdout, res.stdout
    said = res.stderr.strip().splitlines()  # each part's schedule is one a LoRA loader does not apply by itself
    assert len(said) == 2 and all(s.startswith("hyperdiff: warning: a diffusers LoRA file applies") for s in said), said
    assert [file_schedule(f) for f in files] == [start, rest]
    with pytest.raises(HyperdiffError, match=r"'.*parts.safetensors' gives its rank parts their own schedules"):
        file_schedule(native)

    ours = _arr(hdb.generate(PROMPT, ad, steps=STEPS, seed=0))
    vanilla = copy.deepcopy(hdb.pipe)
    for name, f in zip(("start", "learned"), files):
        vanilla.load_lora_weights(str(f), adapter_name=name)

    def sample(**kwargs):
        side, channels = vanilla.unet.config.sample_size, vanilla.unet.config.in_channels
        noise = torch.randn((1, channels, side, side), generator=torch.Generator().manual_seed(0))
        return _arr(vanilla(PROMPT, num_inference_steps=STEPS, guidance_scale=4.0, latents=noise, **kwargs).images)

    schedules = {"start": file_schedule(files[0]), "learned": file_schedule(files[1])}
    assert np.abs(sample(callback_on_step_end=diffusers_schedule(vanilla, schedules, STEPS)) - ours).max() <= 2
    one = diffusers_schedule(vanilla, {"start": rest, "learned": rest}, STEPS)  # one schedule for the whole adapter
    assert np.abs(sample(callback_on_step_end=one) - ours).max() > 5
    for bad, needle in [({}, "`schedules` must map adapter names"), ({"start": 1.5}, r"`schedules\['start'\]` must be")]:
        with pytest.raises(HyperdiffError, match=needle):
            diffusers_schedule(vanilla, bad, STEPS)
    with pytest.raises(HyperdiffError, match=r"`weights` names adapters without a schedule: \['x'\]"):
        diffusers_schedule(vanilla, schedules, STEPS, weights={"x": 1.0})
    with pytest.raises(HyperdiffError, match=r"`weights\['start'\]` must be a number in \[-10, 10\], got 'a'"):
        diffusers_schedule(vanilla, schedules, STEPS, weights={"start": "a"})


def test_a_calibrated_hypernets_prediction_carries_its_gain_and_a_fine_tunes_start_keeps_it(hdb, tmp_path):
    from test_hypernet import make_hypernet, randomise_b_head

    from hyperdiff import synthfaces as sf
    from hyperdiff.hypernet import HyperNetwork

    hp = randomise_b_head(make_hypernet(hdb.table, seed=0), std=1e-2)
    hp.set_gain(1.0, low_noise=LowNoiseGain(1.5, 200))
    hp.save_pretrained(tmp_path / "hp")  # the gain is part of the hypernet's config.json
    personal = HyperDreamBoothPipeline(hdb.pipe, HyperNetwork.from_pretrained(tmp_path / "hp", hdb.table))
    ref = sf.render(sf.Identity.from_seed(1_000_007), sf.Scene(), 32)
    start = personal.personalize([ref])
    assert start.info.low_noise == LowNoiseGain(1.5, 200)
    tuned = personal.personalize([ref], finetune_steps=1)  # on top of the start: its rank keeps the start's schedule
    assert tuned.info.low_noise == LowNoiseGain() and tuned.info.rank_schedules == ((start.rank, LowNoiseGain(1.5, 200)),)
    assert tuned.info.scheduled and Adapter.load(tuned.save(tmp_path / "t.safetensors")).schedule_parts == tuned.schedule_parts
    recipe = replace(personal.fast_finetune, start_keeps_schedule=False)
    assert personal.personalize([ref], finetune_steps=1, finetune_config=recipe).info.rank_schedules == ()
    with pytest.raises(HyperdiffError, match="`start_keeps_schedule` must be True or False, got 1"):
        replace(recipe, start_keeps_schedule=1)
