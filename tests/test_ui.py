"""The web UI through its HTTP API (gradio_client against a server on 127.0.0.1): personalize → generate → download
in every format, the diffusers file in vanilla diffusers, sessions that never share an identity, bad uploads,
cancelling a fine-tune, uncertainty and mixing, and the `hyperdiff ui` command itself.

Every image the UI returns is compared with what a second, independent `HyperDreamBoothPipeline` (same base, same
hypernet) gives for the same reference and seed: the UI must add nothing and lose nothing (PNG, bit for bit)."""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import re
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from safetensors import safe_open

from hyperdiff import Adapter
from hyperdiff import synthfaces as sf
from hyperdiff.core.schedule import diffusers_schedule
from hyperdiff.personalize.pipeline import EMBEDDED_HYPERNET, HyperDreamBoothPipeline

from ui_support import PROMPT, STEPS, face, free_port, hypernet_dir, pixels, server  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def expected(hypernet_dir):
    """An independent pipeline: what the UI's answers must equal."""
    return HyperDreamBoothPipeline.from_pretrained(hypernet=hypernet_dir, device="cpu")


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """Two evaluation identities as PNG files (lossless, so the UI reads the same pixels)."""
    folder = tmp_path_factory.mktemp("refs")
    paths = []
    for seed, background in [(1_000_003, "gray"), (1_000_004, "green")]:
        paths.append(folder / f"id{seed}.png")
        face(seed, background).save(paths[-1])
    return paths


def client(url) -> Client:
    return Client(url, verbose=False)  # a new session (its own session hash, its own gr.State)


def personalize(c: Client, ref, finetune_steps: int = 0) -> str:
    preview, note = c.predict([handle_file(str(ref))], None, api_name="/references")
    assert len(preview) == 1 and "ready" in note
    status, _ = c.predict("sks", finetune_steps, 0, api_name="/personalize")
    return status


def generate(c: Client, seed: int, n: int = 1, randomize: bool = False):
    gallery, info = c.predict(PROMPT, "", STEPS, 4.0, seed, randomize, n, api_name="/generate")
    return [g["image"] for g in gallery], [g["caption"] for g in gallery], info


# -- the main path ----------------------------------------------------------------------------------------------
def test_personalize_generate_download_every_format_and_load_in_vanilla_diffusers(server, expected, refs):
    from hyperdiff.models import load_base

    c = client(server)
    status = personalize(c, refs[0])
    assert re.search(r"Personalized from 1 reference\(s\) in \*\*\d+\.\d\d s\*\* \(zero-shot", status), status
    images, captions, info = generate(c, seed=5, n=2)
    assert captions == ["seed 5", "seed 6"] and "first seed **5**" in info
    assert all(str(p).endswith(".png") for p in images)

    ours = expected.personalize([refs[0]])
    want = expected.generate(PROMPT, ours, num_images=2, steps=STEPS, seed=5)
    assert np.array_equal(pixels(images), pixels(want))  # bit for bit: PNG, same seeds (image i uses seed + i)
    base_only = expected.generate(PROMPT, None, num_images=1, steps=STEPS, seed=5)
    assert np.abs(pixels(images[:1]) - pixels(base_only)).max() > 20  # the adapter mattered

    files = {}
    for fmt in ("native", "diffusers", "kohya"):
        path, parts, note = c.predict(fmt, api_name="/download")
        files[fmt] = path
        assert not parts  # one schedule for the whole adapter: no part files
        assert re.fullmatch(rf"hyperdiff-sks-{ours.digest}-{fmt}\.safetensors", os.path.basename(path)), path
        assert f"{os.path.getsize(path):,} bytes" in note
        said = "applies ΔW at one strength, where hyperdiff applies it ×1.5 below timestep 500" in note
        assert said == (fmt != "native"), note  # the test hypernet's low-noise gain, which a LoRA file cannot carry
    back = Adapter.load(files["native"], expected.table)
    assert back.digest == ours.digest and back.info.token == "sks"
    with safe_open(files["kohya"], "pt") as f:
        assert all(k.startswith("lora_unet_") for k in f.keys()) and f.metadata()["ss_network_dim"] == str(ours.rank)

    vanilla = load_base()  # a fresh copy of the same base: only diffusers' own loader runs
    vanilla.set_progress_bar_config(disable=True)
    vanilla.load_lora_weights(files["diffusers"], adapter_name="id")
    theirs = vanilla(PROMPT, num_inference_steps=STEPS, guidance_scale=4.0, generator=torch.Generator().manual_seed(5),
                     callback_on_step_end=diffusers_schedule(vanilla, {"id": ours.info.low_noise}, STEPS)).images  # the adapter's schedule
    assert np.abs(pixels(theirs) - pixels(images[:1])).max() <= 1  # fused (hyperdiff) vs PEFT branch: float rounding


def test_two_sessions_at_once_each_get_their_own_identity(server, expected, refs):
    clients = [client(server), client(server)]
    for c, ref in zip(clients, refs):
        personalize(c, ref)
    results: dict[int, list] = {}
    barrier = threading.Barrier(2)

    def run(i: int) -> None:
        barrier.wait()  # both generate requests reach the server together
        results[i] = generate(clients[i], seed=7)[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == [0, 1]
    for i, ref in enumerate(refs):
        want = expected.generate(PROMPT, expected.personalize([ref]), steps=STEPS, seed=7)
        assert np.array_equal(pixels(results[i]), pixels(want)), f"session {i} did not get its own identity"
    assert np.abs(pixels(results[0]) - pixels(results[1])).max() > 20  # the identities differ: a mix-up would show


# -- errors -----------------------------------------------------------------------------------------------------
def test_bad_uploads_and_bad_values_are_one_line_errors_and_the_app_keeps_serving(server, refs, tmp_path):
    c = client(server)
    with pytest.raises(Exception, match="no adapter yet"):
        generate(c, seed=0)
    with pytest.raises(Exception, match="no reference image yet"):
        c.predict("sks", 0, 0, api_name="/personalize")
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(refs[0].read_bytes()[:200])  # a truncated PNG
    wide = tmp_path / "wide.png"
    from PIL import Image

    Image.new("RGB", (4100, 8)).save(wide)
    for path, needle in [(text, "cannot be read as an image"), (corrupt, "cannot be read as an image"),
                         (wide, "4100x8 px, expected at most 4096 px")]:
        with pytest.raises(Exception, match=re.escape(needle)):
            c.predict([handle_file(str(path))], None, api_name="/references")
    with pytest.raises(Exception, match="no reference image yet"):  # the bad upload left no reference behind
        c.predict("sks", 0, 0, api_name="/personalize")
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (21 * 2**20))
    with pytest.raises(Exception, match="exceeds the maximum file size of 20971520 bytes"):  # Gradio's upload limit
        c.predict([handle_file(str(big))], None, api_name="/references")
    assert "Personalized" in personalize(c, refs[0])  # and the app keeps serving
    with pytest.raises(Exception, match="Value 0 is less than minimum value 1"):  # the sliders' own bounds
        c.predict(PROMPT, "", 0, 4.0, 0, False, 1, api_name="/generate")
    with pytest.raises(Exception, match="`prompt` must be a non-empty string"):
        c.predict("  ", "", STEPS, 4.0, 0, False, 1, api_name="/generate")
    with pytest.raises(Exception, match="no image generated yet"):
        c.predict(api_name="/reuse_seed")


# -- seeds, fine-tune and cancel, uncertainty, mixing -----------------------------------------------------------
def test_random_seed_then_reuse_the_last_one(server, refs):
    c = client(server)
    personalize(c, refs[1])
    images, captions, _ = generate(c, seed=0, n=2, randomize=True)
    first = int(captions[0].split()[1])
    assert captions == [f"seed {first}", f"seed {first + 1}"]
    seed, randomize = c.predict(api_name="/reuse_seed")
    assert (seed, randomize) == (first, False)
    again, _, _ = generate(c, seed=seed, n=2)  # the same batch (a batch of 1 may round differently in the UNet)
    assert np.array_equal(pixels(again), pixels(images))


def test_fast_finetune_reports_progress_and_cancel_keeps_the_previous_adapter(server, expected, refs):
    c = client(server)
    status = personalize(c, refs[0], finetune_steps=2)
    assert "2-step fast fine-tune" in status
    tuned = expected.personalize([refs[0]], finetune_steps=2, seed=0)
    assert Adapter.load(c.predict("native", api_name="/download")[0]).digest == tuned.digest

    job = c.submit("sks", 500, 0, api_name="/personalize")
    deadline, progress = time.monotonic() + 60, []

    def stepping(progress) -> bool:
        return bool(progress) and "fast fine-tune: step" in (progress[0].desc or "")

    while not stepping(progress) and time.monotonic() < deadline:  # the progress bar moves with the fine-tune
        time.sleep(0.1)
        progress = job.status().progress_data
    assert stepping(progress) and 0 < progress[0].progress < 1, progress
    assert "Cancelling" in c.predict(api_name="/cancel")
    status, summary = job.result(timeout=60)
    assert re.match(r"Cancelled after \d+ of 500 fine-tune steps", status), status
    assert tuned.digest in summary
    assert Adapter.load(c.predict("native", api_name="/download")[0]).digest == tuned.digest
    assert c.predict(api_name="/cancel") == "Nothing to cancel."


def test_the_reference_caption_reaches_the_fine_tune(server, expected, refs):
    c = client(server)
    personalize(c, refs[0])
    caption = "a {token} face, smiling, wearing a hat, on a gray background"  # not what the reference shows
    status, summary = c.predict("sks", 2, 0, caption, api_name="/personalize")
    assert "2-step fast fine-tune" in status and "caption='a sks face, smiling, wearing a hat" in status
    captioned = expected.personalize([refs[0]], finetune_steps=2, seed=0, caption=caption)
    read = expected.personalize([refs[0]], finetune_steps=2, seed=0)  # empty field: the caption read from the photo
    assert captioned.digest != read.digest and "caption (read from the references)=" in read.info.source
    downloaded = Adapter.load(c.predict("native", api_name="/download")[0])
    assert downloaded.digest == captioned.digest and downloaded.info.source == captioned.info.source
    with pytest.raises(Exception, match="must name the subject by the token 'sks'"):  # shown, and the adapter kept
        c.predict("sks", 2, 0, "a face on gray", api_name="/personalize")
    assert Adapter.load(c.predict("native", api_name="/download")[0]).digest == captioned.digest


def test_a_fine_tunes_lora_download_comes_part_by_part_too(server, expected, refs, tmp_path):
    """A fine-tuned adapter's start and learned part sample with their own schedules: its LoRA download also comes as
    one file per part, the files `hyperdiff export --split` writes (same tensors, each part's schedule), and the note
    says how to sample them."""
    from hyperdiff.core.formats import file_schedule

    c = client(server)
    personalize(c, refs[0], finetune_steps=2)
    tuned = expected.personalize([refs[0]], finetune_steps=2, seed=0)
    assert len(tuned.schedule_parts) == 2, tuned.info  # the start keeps the test hypernet's gain
    for fmt in ("diffusers", "kohya"):
        path, parts, note = c.predict(fmt, api_name="/download")
        assert len(parts) == 2 and "part files above carry one schedule each" in note, (parts, note)
        assert [file_schedule(p) for p in parts] == [s for _, s in tuned.schedule_parts]
        for i, (got, part) in enumerate(zip(parts, tuned.split_by_schedule()), 1):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a scheduled part's export warns, as the note says
                want = part.export(tmp_path / f"{fmt}-part{i}.safetensors", fmt)
            with safe_open(got, "pt") as g, safe_open(want, "pt") as w:
                assert sorted(g.keys()) == sorted(w.keys())
                assert all(torch.equal(g.get_tensor(k), w.get_tensor(k)) for k in w.keys())


def test_uncertainty_and_mixing(server, expected, refs):
    c = client(server)
    personalize(c, refs[0])
    gallery, spread, note = c.predict(PROMPT, 2, STEPS, 3, api_name="/sample")
    want, want_spread = expected.sample_adapters(refs[0], n=2, prompt=PROMPT, seed=3, steps=STEPS)
    assert np.array_equal(pixels([g["image"] for g in gallery]), pixels(want))
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(spread)), np.asarray(want_spread)) and np.asarray(want_spread).max() > 0

    mixed, note = c.predict(handle_file(str(refs[0])), handle_file(str(refs[1])), 0.0, PROMPT, STEPS, 1, "sks", True,
                            api_name="/mix")
    images = pixels([g["image"] for g in mixed])
    assert [g["caption"] for g in mixed] == ["identity A", "1.00·A + 0.00·B", "identity B"]
    assert np.array_equal(images[0], images[1]) and np.abs(images[0] - images[2]).max() > 20
    assert "now your adapter" in note
    kept = Adapter.load(c.predict("native", api_name="/download")[0])
    a, b = expected.personalize([refs[0]]), expected.personalize([refs[1]])
    assert kept.digest == expected.mix([a, b], [1.0, 0.0]).digest


def test_example_prompts_cover_the_scene_words():
    from ui.app import example_prompts

    scenes = [sf.scene_from_caption(p) for p in example_prompts()]
    assert {s.background for s in scenes} == set(sf.BACKGROUNDS)
    assert {s.hat for s in scenes} == {False, True} and {s.expression for s in scenes} == set(sf.EXPRESSIONS)
    assert all(p == sf.caption(s, "sks") for p, s in zip(example_prompts(), scenes))


# -- the command ------------------------------------------------------------------------------------------------
def _env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", OMP_NUM_THREADS="1")


def _hyperdiff(*args, cwd, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hyperdiff.cli", *map(str, args)], cwd=cwd, env=_env(), text=True,
                            **kwargs)


def test_ui_help_and_bad_flags(tmp_path):
    cases = [(["--help"], None), (["--port", "70000"], "`--port` must be an integer in [1, 65535], got 70000"),
             (["--hypernet", tmp_path / "absent"], "has no config.json")]
    # from another folder (ui is an installed package), all three at once (each imports torch)
    procs = [_hyperdiff("ui", *args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for args, _ in cases]
    results = [(p.communicate(timeout=120), p.returncode) for p in procs]
    (out, _), code = results[0]
    assert code == 0 and all(flag in out for flag in ("--host", "--port", "--base", "--hypernet"))
    for ((_, err), code), (_, needle) in zip(results[1:], cases[1:]):
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("hyperdiff: error: ") and needle in lines[0], err


def test_hyperdiff_ui_with_no_arguments_serves_the_embedded_default(tmp_path, refs):
    from hyperdiff.core.layers import LayerTable
    from hyperdiff.models import load_base

    port = free_port()
    proc = _hyperdiff("ui", "--port", port, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline, c = time.monotonic() + 120, None
        while c is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                c = client(f"http://127.0.0.1:{port}/")
            except Exception:
                time.sleep(0.5)
        assert c is not None, proc.stdout.read() if proc.poll() is not None else "server did not start in 120 s"
        info = c.predict(api_name="/describe")
        shipped = EMBEDDED_HYPERNET.is_dir()
        assert info["base"] == "synthfaces (embedded)" and info["device"] == "cpu" and info["dtype"] == "float32"
        assert info["fingerprint"] == LayerTable.from_unet(load_base().unet).fingerprint
        assert info["hypernet"] == ("synthfaces (embedded)" if shipped else "-")
        c.predict([handle_file(str(refs[0]))], None, api_name="/references")
        if shipped:
            assert "Personalized" in c.predict("sks", 0, 0, api_name="/personalize")[0]
        else:  # no hypernet yet: 0 steps is a clear error, steps > 0 fine-tune from scratch (DreamBooth-LiDB)
            with pytest.raises(Exception, match="loaded without a hypernet"):
                c.predict("sks", 0, 0, api_name="/personalize")
            status, summary, *_ = c.predict("sks", 2, 0, api_name="/personalize")
            assert "2-step DreamBooth-LiDB fine-tune from scratch" in status and "lidb, rank 1" in summary
    finally:
        proc.terminate()
        proc.wait(timeout=30)
