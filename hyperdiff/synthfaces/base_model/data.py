"""Training the SynthFaces base model: the data its stages read.

Contract:
- Data: `render_cache` renders `data.images` (identity, scene) pairs from `TRAIN_SEEDS` once (a safetensors cache of
  uint8 images and scene indices under `data.cache_dir`); evaluation seeds (≥ 1,000,000) are never used. Captions are
  `synthfaces.caption(scene)` with each clause dropped with probability `data.clause_dropout` (so partial prompts
  work) and the whole caption emptied with probability `data.caption_dropout` (classifier-free guidance).
- `encode_latents(vae, images, cache)`: every image encoded once (posterior means, cached) after stage 1, and the
  VAE's `scaling_factor` set to 1 / std of the latents.
- `expression_map` / `expression_weight_map`: where the expression words act (eyes, brows, mouth), on the latent grid
  or on the pixels; the stages' `expression_weight` up-weights their losses there.
- `_batch_generator(seed, stage, step)`: the generator every batch of a stage is drawn from.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from hyperdiff import synthfaces
from hyperdiff.config import to_dict
from hyperdiff.core.files import write_safetensors
from hyperdiff.synthfaces.base_model.config import DataConfig
from hyperdiff.synthfaces.images import to_batch



# -- data --------------------------------------------------------------------------------------------------------
SCENE_AXES = ("background", "hat", "expression")


def _scene_index(scene: synthfaces.Scene) -> list[int]:
    return [
        synthfaces.BACKGROUNDS.index(scene.background),
        int(scene.hat),
        synthfaces.EXPRESSIONS.index(scene.expression),
    ]


def _scene_of(index: list[int]) -> synthfaces.Scene:
    return synthfaces.Scene(synthfaces.BACKGROUNDS[index[0]], bool(index[1]), synthfaces.EXPRESSIONS[index[2]])


def render_cache(data: DataConfig, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 3, size, size), scenes int64 (N, 3)), rendered once and cached as safetensors."""
    path = Path(data.cache_dir) / f"renders-n{data.images}-s{data.seed}-{size}px.safetensors"
    if path.exists():
        tensors = load_file(str(path))
        return tensors["images"], tensors["scenes"]
    pairs = synthfaces.sample(synthfaces.TRAIN_SEEDS, data.images, rng_seed=data.seed)
    images = torch.empty(len(pairs), 3, size, size, dtype=torch.uint8)
    scenes = torch.empty(len(pairs), 3, dtype=torch.int64)
    for i, (identity, scene) in enumerate(tqdm(pairs, desc="render SynthFaces", mininterval=2)):
        pixels = torch.frombuffer(bytearray(synthfaces.render(identity, scene, size).tobytes()), dtype=torch.uint8)
        images[i] = pixels.view(size, size, 3).permute(2, 0, 1)
        scenes[i] = torch.tensor(_scene_index(scene))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(path, {"images": images, "scenes": scenes}, {"data": str(to_dict(data))}, "render cache")
    return images, scenes


def training_caption(scene: synthfaces.Scene, gen: torch.Generator, data: DataConfig) -> tuple[str, frozenset[str]]:
    """The canonical caption with clauses dropped at random, or "" (unconditional) for CFG; and the scene axes
    (`SCENE_AXES`) whose words it says (a scene without a hat names no hat)."""
    if torch.rand((), generator=gen) < data.caption_dropout:
        return "", frozenset()
    keep = (torch.rand(3, generator=gen) >= data.clause_dropout).tolist()
    parts, named = ["a face"], set()
    if keep[0]:
        parts.append(scene.expression)
        named.add("expression")
    if scene.hat and keep[1]:
        parts.append("wearing a hat")
        named.add("hat")
    if keep[2]:
        parts.append(f"on a {scene.background} background")
        named.add("background")
    return ", ".join(parts), frozenset(named)


def _batch_generator(seed: int, stage: str, step: int) -> torch.Generator:
    from hyperdiff.core.lidb import stable_seed

    return torch.Generator().manual_seed(stable_seed("train_base", seed, stage, step))


def _pixels(images: torch.Tensor) -> torch.Tensor:
    return images.float().div(127.5).sub(1)  # uint8 → [-1, 1]


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, cache: Path, batch: int = 256) -> torch.Tensor:
    """Posterior means (N, C, h, w) of every image, cached; sets `vae.config.scaling_factor` = 1 / std."""
    if cache.exists():
        latents = load_file(str(cache))["latents"]
    else:
        vae.eval()
        chunks = [
            vae.encode(_pixels(images[i : i + batch])).latent_dist.mean
            for i in tqdm(range(0, len(images), batch), desc="encode latents", mininterval=5)
        ]
        latents = torch.cat(chunks)
        write_safetensors(cache, {"latents": latents}, {}, "latent cache")
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return latents


@torch.no_grad()
def expression_map(vae, size: int, identities: int = 128, seed: int = 0) -> torch.Tensor:
    """Where the expression words act, max 1: for training identities in random scenes, the std over the expressions
    (everything else fixed) of the VAE's latents — an (h, w) latent map — or, with `vae` None, of the pixels — a
    (size, size) map — averaged over channels and identities."""
    spreads = []
    for identity, scene in synthfaces.sample(synthfaces.TRAIN_SEEDS, identities, rng_seed=seed):
        renders = [synthfaces.render(identity, synthfaces.Scene(scene.background, scene.hat, e), size)
                   for e in synthfaces.EXPRESSIONS]
        x = to_batch(renders, size=None) * 2 - 1  # (E, 3, size, size) in [-1, 1]
        z = x if vae is None else vae.encode(x).latent_dist.mean  # (E, C, h, w)
        spreads.append(z.std(0).mean(0))  # (h, w)
    spread = torch.stack(spreads).mean(0)
    return spread / spread.max()


def expression_weight_map(expression_weight: float, size: int, seed: int, vae=None) -> torch.Tensor:
    """(1, 1, h, w): 1 + expression_weight · `expression_map`, normalised to mean 1 (the loss keeps its scale); on the
    latent grid of `vae` for renders of `size` px, or on the pixels without one."""
    if expression_weight <= 0 and vae is None:  # uniform: no renders needed
        return torch.ones(1, 1, size, size)
    weight = 1 + expression_weight * expression_map(vae, size, seed=seed)[None, None]
    return weight / weight.mean()
