"""Zero-shot personalization reads the hypernet and the base's layer table from its weights' header, never the base.

The header's table is checked against `LayerTable.from_unet` on real module trees (the tiny and embedded bases, SD1.5
and SD2.1 shapes on the meta device), and the deferred pipeline's adapters against an eagerly loaded one's, bit for
bit, through the API and the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hyperdiff import HyperdiffError
from hyperdiff import synthfaces as sf
from hyperdiff.core.layers import LayerTable
from hyperdiff.hypernet import HyperNetwork
from hyperdiff.models import TINY_BASE, build_unet, load_base
from hyperdiff.models.sources import unet_header
from hyperdiff.personalize.pipeline import DeferredBase, HyperDreamBoothPipeline

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def hypernet_dir(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "scripts"))
    import train_hypernet

    out = tmp_path_factory.mktemp("hp")
    assert train_hypernet.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--output_dir", str(out),
                                "--max_train_steps", "3"]) == 0
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tiny base saved as a diffusers folder (what a user's local base is)."""
    out = tmp_path_factory.mktemp("base")
    load_base(TINY_BASE).save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def ref():
    return sf.render(sf.Identity.from_seed(1_000_007), sf.Scene("green", True, "sad"), 32)


def base_table(source) -> LayerTable | None:
    header = unet_header(source)
    return LayerTable.from_header(header) if header is not None else None


def _rows(table: LayerTable) -> set:
    return set(table.rows)


def _same(a, b) -> bool:
    return list(a.factors) == list(b.factors) and all(
        torch.equal(x, y) for k in a.factors for x, y in zip(a.factors[k], b.factors[k]))


def _header(unet: torch.nn.Module) -> dict:
    return {k: {"dtype": "F32", "shape": list(v.shape)} for k, v in unet.state_dict().items()}


@pytest.mark.parametrize("arch", ["sd15", "sd21"])
def test_a_header_gives_the_rows_of_the_module_tree(arch):
    unet = build_unet(arch)  # meta device: shapes only
    want = LayerTable.from_unet(unet)
    got = LayerTable.from_header(_header(unet))
    assert len(got) == len(want) == 128
    assert _rows(got) == _rows(want) and got.fingerprint == want.fingerprint


def test_the_header_of_the_embedded_base_a_folder_and_a_sharded_folder_gives_their_rows(folder, tmp_path):
    embedded = base_table(None)
    assert _rows(embedded) == _rows(LayerTable.from_unet(load_base(None).unet))
    tiny = LayerTable.from_unet(load_base(TINY_BASE).unet)
    assert _rows(base_table(folder)) == _rows(tiny)
    sharded = tmp_path / "sharded"
    pipe = load_base(TINY_BASE)
    pipe.save_pretrained(sharded, safe_serialization=True)
    shutil.rmtree(sharded / "unet")
    pipe.unet.save_pretrained(sharded / "unet", safe_serialization=True, max_shard_size="50KB")
    assert (sharded / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert not (sharded / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert _rows(base_table(sharded)) == _rows(tiny)
    assert _rows(LayerTable.from_unet(load_base(sharded).unet)) == _rows(tiny)  # diffusers reads it as one UNet


def test_the_header_of_a_cached_hub_id_is_read_and_none_where_it_cannot(folder, tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--someone--tiny-sd" / "snapshots" / ("0" * 40)
    snapshot.parent.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    subprocess.run(["cp", "-r", str(folder), str(snapshot)], check=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert _rows(base_table("someone/tiny-sd")) == _rows(base_table(folder))
    assert base_table("someone/not-cached") is None
    assert base_table(TINY_BASE) is None  # built, not read
    single = tmp_path / "model.safetensors"
    single.write_bytes((folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes())
    assert base_table(single) is None  # a single-file checkpoint: loaded to know
    with pytest.raises(HyperdiffError, match="pickle checkpoint"):
        base_table(tmp_path / "model.ckpt")  # the source's own problems: the same one line as load_base
    with pytest.raises(HyperdiffError, match="does not exist"):
        base_table(tmp_path / "missing")


def test_zero_shot_never_loads_the_base_and_equals_an_eager_pipeline(folder, hypernet_dir, ref):
    eager = HyperDreamBoothPipeline.from_pretrained(str(folder), hypernet_dir, device="cpu", defer_base=False)
    lazy = HyperDreamBoothPipeline.from_pretrained(str(folder), hypernet_dir, device="cpu")
    assert eager.loaded and not lazy.loaded
    assert lazy.describe() == eager.describe()
    want, got = eager.personalize([ref], seed=1), lazy.personalize([ref], seed=1)
    assert not lazy.loaded  # the prediction needed the hypernet only
    assert want.info == got.info
    assert _same(want, got)
    images = lazy.generate("a sks face, smiling", got, steps=2, seed=3)  # first use: the base loads now
    assert lazy.loaded and lazy.table.rows == eager.table.rows  # the module-ordered table from here on
    assert list(images[0].getdata()) == list(eager.generate("a sks face, smiling", want, steps=2, seed=3)[0].getdata())
    tuned = lazy.personalize([ref], finetune_steps=1, seed=1)  # a fine-tune uses the loaded base
    assert tuned.kind == "lora"


def test_a_hypernet_keeps_its_own_layer_order_whatever_order_the_table_lists(hypernet_dir, ref):
    saved = HyperNetwork.from_pretrained(hypernet_dir)
    reordered = LayerTable(tuple(reversed(saved.table.rows)), saved.table.targets)
    other = HyperNetwork.from_pretrained(hypernet_dir, reordered)
    assert other.table.rows == saved.table.rows
    a, b = saved.predict([ref]), other.predict([ref])
    assert _same(a, b)


def test_a_header_that_disagrees_with_the_loaded_unet_is_refused_on_first_use():
    pipe = load_base(TINY_BASE)
    table = LayerTable.from_unet(pipe.unet)
    wrong = LayerTable(table.rows[:-1], table.targets)  # a header that lost a row
    hdb = HyperDreamBoothPipeline(DeferredBase(lambda: pipe, wrong, torch.device("cpu"), torch.float32), None,
                                  base_name="broken")
    with pytest.raises(HyperdiffError, match="layer fingerprint"):
        hdb.pipe


def test_the_cli_zero_shot_imports_no_diffusers_and_writes_the_eager_adapter(folder, hypernet_dir, ref, tmp_path):
    ref_path = tmp_path / "me.png"
    ref.save(ref_path)
    out = tmp_path / "me.safetensors"
    code = (
        "import sys; from hyperdiff.cli import main\n"
        f"rc = main(['personalize', '--image', {str(ref_path)!r}, '--out', {str(out)!r}, '--base', {str(folder)!r}, "
        f"'--hypernet', {str(hypernet_dir)!r}])\n"
        "print(rc, [m for m in ('diffusers', 'transformers') if m in sys.modules])\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == "0 []"
    eager = HyperDreamBoothPipeline.from_pretrained(str(folder), hypernet_dir, device="cpu", defer_base=False)
    want = eager.personalize([ref_path])
    from hyperdiff import Adapter

    got = Adapter.load(out)
    assert _same(want, got)
    header = json.loads(out.read_bytes()[8:8 + int.from_bytes(out.read_bytes()[:8], "little")])
    assert header["__metadata__"]["hyperdiff.base_fingerprint"] == eager.table.fingerprint
