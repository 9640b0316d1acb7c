"""The shipped SynthFaces base model: a plain diffusers folder that loads offline and obeys its background words."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, StableDiffusionPipeline

from hyperdiff import LayerTable
from hyperdiff import synthfaces
from hyperdiff.models import EMBEDDED_BASE, load_base

ASSETS = EMBEDDED_BASE.parent


def test_bundle_is_small_and_loads_as_a_plain_diffusers_folder():
    size = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert size <= 20_000_000, size
    pipe = StableDiffusionPipeline.from_pretrained(EMBEDDED_BASE, local_files_only=True)  # no hyperdiff involved
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a face, smiling, on a red background", num_inference_steps=4, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3)
    assert len(LayerTable.from_unet(pipe.unet)) > 0


@pytest.mark.parametrize("swap", [None, DDIMScheduler, EulerAncestralDiscreteScheduler])
def test_generated_background_matches_the_word(swap):
    """Also after the usual scheduler swap, `X.from_config(pipe.scheduler.config)`: the shipped config carries SD's
    `clip_sample=False`, without which DDIM clips the latents and loses most backgrounds."""
    pipe = load_base()  # the embedded default, fp32 on CPU
    if swap is not None:
        pipe.scheduler = swap.from_config(pipe.scheduler.config)
    hits, total = 0, 0
    for k, background in enumerate(synthfaces.BACKGROUNDS):
        scene = synthfaces.Scene(background, k % 2 == 0, synthfaces.EXPRESSIONS[k % 4])
        gens = [torch.Generator().manual_seed(1_000_000 + 10 * k + i) for i in range(4)]
        images = pipe([synthfaces.caption(scene)] * 4, num_inference_steps=20, guidance_scale=4.0, generator=gens).images
        hits += sum(synthfaces.background_of(im) == background for im in images)
        total += len(images)
    assert hits / total >= 0.9, f"{hits}/{total} backgrounds obeyed"
