"""HyperDreamBoothPipeline and the personalize/generate commands, on the tiny base with a small trained hypernet."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hyperdiff import Adapter, HyperdiffError
from hyperdiff import synthfaces as sf
from hyperdiff.models import TINY_BASE
from hyperdiff.personalize.pipeline import HyperDreamBoothPipeline

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def hypernet_dir(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "scripts"))
    import train_hypernet

    out = tmp_path_factory.mktemp("hp")
    assert train_hypernet.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--output_dir", str(out), "--max_train_steps", "3"]) == 0
    return out


@pytest.fixture(scope="module")
def hdb(hypernet_dir):
    return HyperDreamBoothPipeline.from_pretrained(TINY_BASE, hypernet_dir, device="cpu")


@pytest.fixture(scope="module")
def ref():
    return sf.render(sf.Identity.from_seed(1_000_007), sf.Scene(), 32)


def _arr(images):
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def test_personalize_then_generate_through_the_api(hdb, ref):
    ad = hdb.personalize([ref])
    assert ad.kind == "lidb" and ad.rank == 1 and ad.info.token == "sks"
    images = hdb.generate("a sks face, smiling, on a red background", ad, num_images=2, steps=3, seed=5)
    assert [im.size for im in images] == [(32, 32)] * 2
    again = hdb.generate("a sks face, smiling, on a red background", ad, num_images=1, steps=3, seed=6)
    assert np.array_equal(_arr(images[1:]), _arr(again))  # image i uses seed S+i
    relaxed = hdb.personalize([ref], finetune_steps=2)
    assert relaxed.rank == 1 + 4 and relaxed.kind == "lora"
    assert "finetune_steps=2" in relaxed.info.source


def test_a_batch_of_adapters_equals_each_alone(hdb, ref):
    other = sf.render(sf.Identity.from_seed(1_000_008), sf.Scene("blue"), 32)
    a, b = hdb.personalize([ref], finetune_steps=2), hdb.personalize([other], finetune_steps=2, seed=1)
    batch = hdb.generate("a sks face", [a, b], steps=3, seed=0)
    alone = hdb.generate("a sks face", a, steps=3, seed=0) + hdb.generate("a sks face", b, steps=3, seed=1)
    assert np.abs(_arr(batch) - _arr(alone)).max() <= 2  # uint8 pixels: processors vs fused, float rounding


def test_mix_with_weights_one_zero_is_the_first_adapter(hdb, ref):
    a = hdb.personalize([ref], finetune_steps=2)
    b = hdb.personalize([sf.render(sf.Identity.from_seed(1_000_009), sf.Scene(), 32)], finetune_steps=2)
    mixed = hdb.mix([a, b], [1.0, 0.0])
    name = hdb.table.names[0]
    assert torch.equal(mixed.delta_weight(name), a.delta_weight(name))
    assert np.array_equal(_arr(hdb.generate("a sks face", mixed, steps=3)), _arr(hdb.generate("a sks face", a, steps=3)))


def test_sample_adapters_gives_n_images_and_a_spread_map(hdb, ref):
    images, spread = hdb.sample_adapters(ref, n=3, steps=3)
    assert len(images) == 3 and spread.size == images[0].size and spread.mode == "L"
    assert np.asarray(spread).max() > 0  # the sampled adapters differ
    with pytest.raises(HyperdiffError, match="`n` must be an integer in"):
        hdb.sample_adapters(ref, n=1)


def test_bad_arguments_are_one_line_errors(hdb, ref, tmp_path):
    for kwargs, needle in [({"num_images": 0}, "`num_images`"), ({"steps": 10_000}, "`steps`"), ({"guidance": -1.0}, "`guidance`"),
                           ({"strength": float("nan")}, r"`strength` must be a number in \[-10, 10\], got nan")]:
        with pytest.raises(HyperdiffError, match=needle):
            hdb.generate("a sks face", None, **kwargs)
    with pytest.raises(HyperdiffError, match="does not exist"):
        hdb.personalize([tmp_path / "absent.png"])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(HyperdiffError, match="cannot be read as an image"):
        hdb.personalize([bad])


def test_a_caption_replaces_the_fine_tunes_instance_prompt(hdb, ref):
    from dataclasses import replace

    from hyperdiff.personalize.finetune import finetune
    from hyperdiff.personalize.pipeline import FAST_FINETUNE

    caption = "a {token} face, neutral, on a gray background"
    got = hdb.personalize([ref], finetune_steps=2, seed=3, caption=caption)
    cfg = replace(FAST_FINETUNE, steps=2, token="sks", seed=3, instance_prompt=caption)
    expected = finetune(hdb.pipe, [[ref]], cfg, start=[hdb.hypernet.predict([ref])], progress=False)[0]
    plain = hdb.personalize([ref], finetune_steps=2, seed=3)
    literal = hdb.personalize([ref], finetune_steps=2, seed=3, caption="a sks face, neutral, on a gray background")
    for name in hdb.table.names:
        torch.testing.assert_close(got.delta_weight(name), expected.delta_weight(name), rtol=0, atol=0)
        torch.testing.assert_close(literal.delta_weight(name), got.delta_weight(name), rtol=0, atol=0)
    assert any(not torch.equal(got.delta_weight(n), plain.delta_weight(n)) for n in hdb.table.names)
    assert got.info.source.endswith("caption='a sks face, neutral, on a gray background'")  # the record says what it trained on
    assert "caption" not in plain.info.source
    for bad, needle in [("", "non-empty"), ("a face on gray", "must name the subject by the token 'sks'"),
                        ("a {name} face", "no braces but {token}"), ("a {token} face {", "no braces but {token}")]:
        with pytest.raises(HyperdiffError, match=needle):
            hdb.personalize([ref], finetune_steps=2, caption=bad)


def test_without_a_caption_the_pipelines_captioner_reads_each_reference(hdb, ref):
    """With a captioner (the embedded base's: `detectors.reference_caption`) and no caption, the fine-tune trains on
    what each reference shows, read from it: the engine's `finetune` told those captions, bit for bit, and the record
    says they were read. One caption per image works too; a count that fits neither is a one-line error. Without a
    captioner the instance prompt stays."""
    from dataclasses import replace

    from hyperdiff.personalize.finetune import finetune
    from hyperdiff.synthfaces.detectors import reference_caption
    from hyperdiff.personalize.pipeline import FAST_FINETUNE

    other = sf.render(sf.Identity.from_seed(1_000_007), sf.Scene("yellow", True, "smiling"), 32)
    reading = HyperDreamBoothPipeline(hdb.pipe, hdb.hypernet, captioner=reference_caption)
    read = [reference_caption(im).format(token="sks") for im in (ref, other)]
    assert read == ["a sks face, neutral, on a gray background", "a sks face, smiling, wearing a hat, on a yellow background"]
    got = reading.personalize([ref, other], finetune_steps=2, seed=3)
    cfg = replace(FAST_FINETUNE, steps=2, token="sks", seed=3)
    start = [hdb.hypernet.predict([ref, other])]
    want = finetune(hdb.pipe, [[ref, other]], cfg, start=start, prompts=[read], progress=False)[0]
    assert all(torch.equal(got.delta_weight(n), want.delta_weight(n)) for n in hdb.table.names)
    assert got.info.source.endswith(f"caption (read from the references)={read!r}"), got.info.source
    given = reading.personalize([ref, other], finetune_steps=2, seed=3, caption=read)  # typed, one per image
    assert all(torch.equal(given.delta_weight(n), want.delta_weight(n)) for n in hdb.table.names)
    assert given.info.source.endswith(f"caption={read!r}")
    plain = reading.personalize([ref, other], finetune_steps=2, seed=3, caption="a {token} face")  # no caption asked
    assert plain.info.source.endswith("caption='a sks face'")
    assert any(not torch.equal(plain.delta_weight(n), want.delta_weight(n)) for n in hdb.table.names)
    assert "caption" not in hdb.personalize([ref], finetune_steps=2, seed=3).info.source  # no captioner: no caption
    assert "caption" not in reading.personalize([ref]).info.source  # zero-shot: nothing is fine-tuned, nothing read
    with pytest.raises(HyperdiffError, match=r"`caption` must be one string or one per reference image \(2\), got 3"):
        reading.personalize([ref, other], finetune_steps=2, caption=read + read[:1])


def run(*args):
    # one thread, like this test process (tests/conftest.py): CPU reductions round differently with another count
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "hyperdiff.cli", *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


def test_cli_personalize_generate_and_reload_reproduce_the_api(hdb, hypernet_dir, ref, tmp_path):
    ref_path = tmp_path / "ref.png"
    ref.save(ref_path)
    adapter = tmp_path / "me.safetensors"
    res = run("personalize", "--image", ref_path, "--out", adapter, "--base", TINY_BASE, "--hypernet", hypernet_dir)
    assert res.returncode == 0, res.stderr
    res = run("generate", "--adapter", adapter, "--prompt", "a sks face, sad, on a green background", "--out", tmp_path / "imgs",
              "--base", TINY_BASE, "--num-images", "2", "--steps", "3", "--seed", "4")
    assert res.returncode == 0, res.stderr
    files = sorted((tmp_path / "imgs").glob("*.png"))
    assert [f.name for f in files] == ["me_seed4.png", "me_seed5.png"]
    loaded = Adapter.load(adapter)  # the file reloads and reproduces the same images for the same seed
    expected = hdb.generate("a sks face, sad, on a green background", loaded, num_images=2, steps=3, seed=4)
    assert np.array_equal(_arr([Image.open(f) for f in files]), _arr(expected))
    direct = hdb.personalize([ref])
    assert all(torch.equal(direct.factors[n][0], loaded.factors[n][0]) for n in hdb.table.names)
    caption = "a {token} face, neutral, on a gray background"
    res = run("personalize", "--image", ref_path, "--out", adapter, "--base", TINY_BASE, "--hypernet", hypernet_dir,
              "--finetune-steps", "2", "--caption", caption)
    assert res.returncode == 0, res.stderr
    captioned = hdb.personalize([ref], finetune_steps=2, caption=caption)
    from_file = Adapter.load(adapter)
    assert all(torch.equal(captioned.delta_weight(n), from_file.delta_weight(n)) for n in hdb.table.names)
    assert from_file.info.source == captioned.info.source and "caption='a sks face, neutral" in from_file.info.source


def test_cli_bad_inputs_exit_2_and_leave_no_file(hypernet_dir, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("hello")
    good = tmp_path / "ref.png"
    sf.render(sf.Identity.from_seed(1_000_010), sf.Scene(), 32).save(good)
    cases = [
        (["personalize", "--image", tmp_path / "absent.png", "--out", tmp_path / "a.safetensors"], "does not exist"),
        (["personalize", "--image", text, "--out", tmp_path / "a.safetensors"], "cannot be read as an image"),
        (["personalize", "--image", good, "--out", tmp_path / "a.ckpt"], "must end with .safetensors"),
        (["personalize", "--image", good, "--out", "/proc/x/a.safetensors", "--base", TINY_BASE, "--hypernet", hypernet_dir], "/proc/x"),
        (["personalize", "--image", good, "--out", tmp_path / "a.safetensors", "--base", TINY_BASE, "--hypernet", hypernet_dir,
          "--finetune-steps", "-3"], "`finetune_steps`"),
        (["personalize", "--image", good, "--out", tmp_path / "a.safetensors", "--base", TINY_BASE, "--hypernet", hypernet_dir,
          "--finetune-steps", "2", "--caption", "a face"], "`caption` must name the subject"),
        (["personalize", "--image", good, "--image", good, "--out", tmp_path / "a.safetensors", "--finetune-steps", "2",
          *["--caption", "a {token} face"] * 3], "`--caption` must be given once (for every image) or once per --image (2), got 3"),
        (["generate", "--adapter", text, "--prompt", "a sks face", "--out", tmp_path / "o"], "is not a safetensors file"),
        (["personalize", "--image", good, "--out", tmp_path / "a.safetensors", "--device", "cuda:7"], "`device` 'cuda:7' is not available"),
        (["personalize", "--image", good, "--out", tmp_path / "a.safetensors", "--device", "tpu"], "`device` must be cpu, cuda"),
        (["personalize", "--image", good, "--out", tmp_path / "a.safetensors", "--dtype", "half"], "`dtype` must be one of"),
    ]
    for args, needle in cases:
        res = run(*args)
        assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)
    assert not any(p.suffix == ".safetensors" or p.name.startswith(".") for p in tmp_path.iterdir())


def test_without_a_hypernet_personalize_fine_tunes_from_scratch(ref, tmp_path):
    from dataclasses import replace

    from hyperdiff.personalize.finetune import finetune
    from hyperdiff.personalize.pipeline import DREAMBOOTH_LIDB

    bare = HyperDreamBoothPipeline.from_pretrained(TINY_BASE, device="cpu")  # another base: no hypernet for it
    assert bare.hypernet is None and bare.describe()["hypernet"] == "-"
    with pytest.raises(HyperdiffError, match="finetune_steps > 0 to fine-tune from scratch"):
        bare.personalize([ref])
    ad = bare.personalize([ref], finetune_steps=3)
    assert (ad.kind, ad.rank) == ("lidb", 1) and ad.info.source.startswith("DreamBooth-LiDB")
    want = finetune(bare.pipe, [[ref]], replace(DREAMBOOTH_LIDB, steps=3), progress=False)[0]  # the engine, directly
    assert all(torch.equal(ad.factors[n][1], want.factors[n][1]) for n in bare.table.names)
    ref_path, out = tmp_path / "ref.png", tmp_path / "scratch.safetensors"
    ref.save(ref_path)
    res = run("personalize", "--image", ref_path, "--out", out, "--base", TINY_BASE, "--finetune-steps", "3")
    assert res.returncode == 0, res.stderr
    assert all(torch.equal(Adapter.load(out).factors[n][1], want.factors[n][1]) for n in bare.table.names)
    res = run("personalize", "--image", ref_path, "--out", tmp_path / "none.safetensors", "--base", TINY_BASE)
    assert res.returncode == 2 and "fine-tune from scratch" in res.stderr and not (tmp_path / "none.safetensors").exists()
