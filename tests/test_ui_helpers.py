"""Library helpers the web UI relies on (so the UI holds no logic of its own): upload limits in `load_images`, the
encoder's view of a reference (`encoder.view`, `HyperDreamBoothPipeline.encoder_view`), and adapter file names
(`Adapter.digest`, `file_name`, `save_as`)."""

from __future__ import annotations

import re
import zlib

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

from hyperdiff import Adapter, HyperdiffError, LayerTable
from hyperdiff.hypernet import EncoderConfig
from hyperdiff.hypernet.encoders import ClipImageEncoder, SmallImageEncoder
from hyperdiff.personalize.pipeline import HyperDreamBoothPipeline, load_images

from conftest import random_lidb, random_lora
from test_hypernet import face, make_hypernet, tiny_clip  # noqa: F401 (tiny_clip is a fixture)


# -- load_images limits ---------------------------------------------------------------------------------------------
def test_load_images_refuses_oversized_files_and_pixels_before_decoding(tmp_path):
    ok = tmp_path / "ok.png"
    face(1_000_000, size=64).save(ok)
    assert load_images(ok, max_side=64, max_bytes=ok.stat().st_size)[0].size == (64, 64)  # limits are inclusive
    with pytest.raises(HyperdiffError, match=r"image '.*/ok.png' is 64x64 px, expected at most 63 px on each side"):
        load_images(ok, max_side=63)
    size = ok.stat().st_size
    with pytest.raises(HyperdiffError, match=rf"image '.*/ok.png' is {size:,} bytes, expected at most 100 bytes \("):
        load_images(ok, max_bytes=100)
    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.truncate(21 * 2**20)  # sparse: 21 MB on paper, refused before a byte is read
    with pytest.raises(HyperdiffError, match=r"is 22,020,096 bytes, expected at most 20,971,520 bytes \(20 MB\)"):
        load_images(big, max_bytes=20 * 2**20)
    with pytest.raises(HyperdiffError, match=r"image 2 is 64x64 px"):  # PIL images are checked too
        load_images([Image.new("RGB", (8, 8)), Image.new("RGB", (64, 64))], max_side=32)
    # a PNG whose header declares 5000 x 5000 px over 1 pixel of data: refused from the header, nothing decoded
    liar = tmp_path / "liar.png"
    Image.new("1", (1, 1)).save(liar)
    data = bytearray(liar.read_bytes())
    data[16:24] = (5000).to_bytes(4, "big") * 2  # IHDR width, height
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # IHDR CRC
    liar.write_bytes(bytes(data))
    with pytest.raises(HyperdiffError, match="image '.*/liar.png' is 5000x5000 px, expected at most 4096 px"):
        load_images(liar, max_side=4096)
    with pytest.raises(HyperdiffError, match="cannot be read as an image"):  # decoding it is what would fail
        load_images(liar)
    assert len(load_images([ok, ok])) == 2  # no limits: as before


# -- what the encoder sees ------------------------------------------------------------------------------------------
def test_small_encoder_view_is_its_own_resize():
    enc = SmallImageEncoder(EncoderConfig(kind="small", image_size=32, channels=(16,), dim=16))
    image = face(1_000_001, size=64)
    (view,) = enc.view([image])
    assert view.size == (32, 32) and view.mode == "RGB"
    x = torch.tensor(list(image.getdata()), dtype=torch.float32).view(1, 64, 64, 3).permute(0, 3, 1, 2) / 255
    want = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    got = torch.tensor(list(view.getdata()), dtype=torch.float32).view(1, 32, 32, 3).permute(0, 3, 1, 2) / 255
    assert (got - want).abs().max() <= 0.5 / 255 + 1e-6  # only the uint8 rounding
    # fed back, the view is (up to that rounding) what the encoder computes on
    assert (enc.preprocess([view]) - enc.preprocess([image])).abs().max() <= 1 / 255 + 1e-6


def test_clip_encoder_view_is_the_centre_crop_of_its_processor(tiny_clip):  # noqa: F811
    enc = ClipImageEncoder(EncoderConfig(kind="clip", pretrained=str(tiny_clip)))
    wide = Image.new("RGB", (96, 48), (0, 0, 255))
    wide.paste((255, 0, 0), (0, 0, 24, 48))  # red left quarter: cut off by the centre crop
    (view,) = enc.view([wide])
    assert view.size == (32, 32)  # short side → 32, centre crop 32 x 32 of a 64 x 32 resize
    colours = {view.getpixel((x, 16)) for x in range(4, 28)}
    assert colours == {(0, 0, 255)}, colours  # what survives the crop is the blue middle, not the red edge


def test_pipeline_encoder_view_goes_through_load_images(tmp_path, pipe):
    table = LayerTable.from_unet(pipe.unet)
    hdb = HyperDreamBoothPipeline(pipe, make_hypernet(table))
    path = tmp_path / "ref.png"
    face(1_000_002, size=64).save(path)
    views = hdb.encoder_view([path, face(1_000_003, size=48)])
    assert [v.size for v in views] == [(32, 32), (32, 32)]
    with pytest.raises(HyperdiffError, match="cannot be read as an image"):
        path.write_text("text")
        hdb.encoder_view([path])
    with pytest.raises(HyperdiffError, match="loaded without a hypernet"):
        HyperDreamBoothPipeline(pipe, None).encoder_view([face(1_000_002)])


# -- adapter file names -----------------------------------------------------------------------------------------------
def test_digest_names_what_the_adapter_computes(pipe):
    table = LayerTable.from_unet(pipe.unet)
    a = random_lidb(table, seed=1)
    assert re.fullmatch(r"[0-9a-f]{8}", a.digest)
    assert random_lidb(table, seed=1).digest == a.digest  # equal adapters, equal digest
    assert random_lidb(table, seed=2).digest != a.digest
    assert (2.0 * a).digest != a.digest and random_lora(table, seed=1).digest != a.digest
    name = table.names[0]
    changed = {k: (v[0].clone(), v[1].clone()) for k, v in a.factors.items()}
    changed[name][1].view(-1)[0] += 1e-6  # one value of one layer
    b = Adapter(kind=a.kind, factors=changed, dims=a.dims, alpha=a.alpha, fingerprint=a.fingerprint, lidb=a.lidb, info=a.info)
    assert b.digest != a.digest


def test_save_as_writes_each_format_under_its_name(pipe, tmp_path):
    from dataclasses import replace

    table = LayerTable.from_unet(pipe.unet)
    ad = random_lidb(table, seed=3)
    ad.info = replace(ad.info, token="Sks-1")
    paths = {fmt: ad.save_as(tmp_path, fmt) for fmt in ("native", "diffusers", "kohya")}
    for fmt, path in paths.items():
        assert path == tmp_path / f"hyperdiff-sks1-{ad.digest}-{fmt}.safetensors" == tmp_path / ad.file_name(fmt)
    assert Adapter.load(paths["native"], table).digest == ad.digest
    with safe_open(str(paths["diffusers"]), "pt") as f:
        assert all(k.startswith("unet.") for k in f.keys())
    with safe_open(str(paths["kohya"]), "pt") as f:
        assert all(k.startswith("lora_unet_") for k in f.keys())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())  # no temp files left
    with pytest.raises(HyperdiffError, match=r"`format` must be one of \['native', 'diffusers', 'kohya'\], got 'ckpt'"):
        ad.save_as(tmp_path, "ckpt")
    assert random_lora(table, seed=0).file_name().startswith("hyperdiff-adapter-")  # no token
