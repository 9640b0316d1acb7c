"""The web UI in a real browser: Debian's chromium driven by Playwright (never `playwright install`).

One user's path through the page: a bad upload shows its error and the next good upload works, the encoder preview
appears, Personalize, Generate fills the gallery with the images the pipeline makes (bit for bit), the adapter
downloads as a safetensors file that reads back; a second browser context is a session of its own. A screenshot is
saved to outputs/test-artifacts/ui.png (gitignored). Skipped when /usr/bin/chromium or playwright is missing (the
Makefile's set-up installs both)."""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from hyperdiff import Adapter
from hyperdiff.core.formats import file_schedule
from hyperdiff.personalize.pipeline import HyperDreamBoothPipeline

from ui_support import face, hypernet_dir, pixels, server  # noqa: F401 (fixtures)

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "outputs" / "test-artifacts"
TIMEOUT_MS = 60_000

if not CHROMIUM.exists():
    pytest.skip("Debian chromium is not installed (make test installs it)", allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api")
expect = playwright.expect


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield browser
        browser.close()


def open_page(browser, url):
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url, wait_until="domcontentloaded")
    expect(page.locator("#personalize-btn")).to_be_visible()
    return context, page


def set_number(page, elem_id: str, value: int) -> None:
    """Type into a slider's number box and confirm, as a user does."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def download(page, fmt: str, folder: Path) -> Path:
    """The Download tab as a user works it: pick the format, prepare the file, click its link; the saved file."""
    page.get_by_role("tab", name="Download").click()
    page.get_by_label(fmt).check()
    page.locator("#download-btn").click()
    return save_link(page, "download-file", 1, folder)


def save_link(page, elem_id: str, count: int, folder: Path) -> Path:
    """Component `elem_id` shows `count` file links; click the first and return the saved file."""
    links = page.locator(f"#{elem_id} a")
    expect(links).to_have_count(count)
    with page.expect_download() as info:
        links.first.click()
    saved = folder / info.value.suggested_filename
    info.value.save_as(saved)
    return saved


def test_a_user_uploads_personalizes_generates_and_downloads(browser, server, hypernet_dir, tmp_path):
    bad = tmp_path / "holiday.png"
    bad.write_text("this is not a picture")
    ref = tmp_path / "me.png"
    face(1_000_005, "yellow").save(ref)
    context, page = open_page(browser, server)

    page.set_input_files("#references input[type=file]", str(bad))  # drag-drop goes through this input too
    expect(page.locator(".toast-body").first).to_contain_text("image 'holiday.png' cannot be read as an image")
    page.locator('#references button[aria-label="Clear"]').click()
    page.set_input_files("#references input[type=file]", str(ref))
    expect(page.locator("#status")).to_contain_text("1 reference image(s) ready")
    expect(page.locator("#preview img")).to_have_count(1)  # the crop the encoder sees

    page.locator("#personalize-btn").click()
    expect(page.locator("#status")).to_contain_text("Personalized from 1 reference(s) in")
    set_number(page, "gen-steps", 3)
    page.locator("#generate-btn").click()
    images = page.locator("#gallery img")
    expect(images).to_have_count(2)  # the default: 2 images, seeds 0 and 1
    expect(page.locator("#generate-info")).to_contain_text("2 image(s) in")
    shown = [Image.open(io.BytesIO(page.request.get(images.nth(i).get_attribute("src")).body())) for i in range(2)]
    hdb = HyperDreamBoothPipeline.from_pretrained(hypernet=hypernet_dir, device="cpu")
    prompt = page.locator("#prompt textarea").input_value()
    want = hdb.generate(prompt, hdb.personalize([ref]), num_images=2, steps=3, seed=0)
    assert np.array_equal(pixels(shown), pixels(want))  # the page shows the pipeline's images, losslessly

    saved = download(page, "kohya", tmp_path)
    assert saved.name.startswith("hyperdiff-sks-") and saved.name.endswith("-kohya.safetensors")
    tensors = load_file(saved)
    assert tensors and all(key.startswith("lora_unet_") for key in tensors)
    page.get_by_role("tab", name="2 · Generate").click()
    page.locator('[data-testid="toast-close"]').first.click()  # the earlier error, read: out of the screenshot
    expect(page.locator(".toast-body")).to_have_count(0)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui.png"), full_page=True)

    other_context, other = open_page(browser, server)  # a second session sees none of it
    other.locator("#generate-btn").click()
    expect(other.locator(".toast-body").first).to_contain_text("no adapter yet")
    other_context.close()
    context.close()


def test_a_user_fine_tunes_with_a_caption_of_the_photo(browser, server, hypernet_dir, tmp_path):
    ref = tmp_path / "me.png"
    face(1_000_006, "gray").save(ref)
    context, page = open_page(browser, server)
    page.set_input_files("#references input[type=file]", str(ref))
    expect(page.locator("#status")).to_contain_text("1 reference image(s) ready")
    set_number(page, "ft-steps", 2)
    page.get_by_text("Advanced").click()
    caption = page.locator("#caption input")
    caption.fill("a face on gray")  # no token: refused, visibly
    page.locator("#personalize-btn").click()
    expect(page.locator(".toast-body").first).to_contain_text("must name the subject by the token 'sks'")
    caption.fill("a {token} face, neutral, on a gray background")
    page.locator("#personalize-btn").click()
    expect(page.locator("#status")).to_contain_text("2-step fast fine-tune")
    saved = download(page, "native", tmp_path)
    hdb = HyperDreamBoothPipeline.from_pretrained(hypernet=hypernet_dir, device="cpu")
    want = hdb.personalize([ref], finetune_steps=2, seed=0, caption="a {token} face, neutral, on a gray background")
    assert Adapter.load(saved).digest == want.digest  # the typed caption is what the fine-tune trained on
    download(page, "diffusers", tmp_path)  # a LoRA file of the fine-tune: its parts come apart too
    part = save_link(page, "download-parts", 2, tmp_path)
    start = want.schedule_parts[0][1]  # the hypernet's prediction keeps the test hypernet's low-noise gain
    assert part.name.endswith("-diffusers-part1.safetensors") and start.active and file_schedule(part) == start
    context.close()
