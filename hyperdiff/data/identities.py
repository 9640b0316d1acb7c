"""Identity datasets for hypernet training and stage-1 targets.

Contract: an identity source gives, for an identity key and a seeded generator, a reference image and a training
example `(image, caption)` of the same identity.
- `SynthFacesIdentities(seeds, image_size, token, same_image)`: renders any identity of `seeds` (a range of
  SynthFaces seeds) in random scenes; the reference and the target are independent scenes of one identity, so
  predicted weights must carry the identity, not the reference's scene — except that with probability `same_image`
  the target *is* the reference (HyperDreamBooth's reconstruction of the input image: a stronger identity signal).
  Keys are the seeds.
- `FolderIdentities(root, token, image_size, same_image)`: a folder with one sub-folder per identity (images + optional `caption.txt`, whose
  `{token}` is filled in; default "a {token} face"), or a Hugging Face imagefolder `metadata.jsonl` with `file_name`,
  `identity` and optional `text` columns. Unreadable or bad images are skipped with one counted warning, never a crash.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image, UnidentifiedImageError

from hyperdiff import synthfaces
from hyperdiff.errors import HyperdiffError, check_number_in

logger = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class IdentitySource(Protocol):
    keys: list[int | str]

    def pair(self, key, gen: torch.Generator) -> tuple[Image.Image, Image.Image, str]:
        """(reference image, target image, target caption) of identity `key`."""


def _pick(options, gen: torch.Generator):
    return options[int(torch.randint(len(options), (), generator=gen))]


class SynthFacesIdentities:
    def __init__(self, seeds: range, image_size: int = 64, token: str = "sks", same_image: float = 0.0):
        if seeds.start < 0 or (len(seeds) and seeds[-1] >= synthfaces.EVAL_SEED_START):
            raise HyperdiffError(f"`seeds` must lie below {synthfaces.EVAL_SEED_START} (evaluation seeds), got {seeds}")
        self.keys, self.image_size, self.token = list(seeds), image_size, token
        self.same_image = check_number_in("same_image", same_image, 0, 1)

    def _scene(self, gen: torch.Generator) -> synthfaces.Scene:
        w = synthfaces.SCENE_WORDS
        return synthfaces.Scene(_pick(w["background"], gen), _pick(w["hat"], gen), _pick(w["expression"], gen))

    def pair(self, key, gen):
        identity = synthfaces.Identity.from_seed(int(key))
        ref_scene, target_scene = self._scene(gen), self._scene(gen)
        if torch.rand((), generator=gen) < self.same_image:
            target_scene = ref_scene
        reference = synthfaces.render(identity, ref_scene, self.image_size)
        target = reference if target_scene == ref_scene else synthfaces.render(identity, target_scene, self.image_size)
        return reference, target, synthfaces.caption(target_scene, self.token)


class FolderIdentities:
    def __init__(self, root: str | Path, token: str = "sks", image_size: int = 64, same_image: float = 0.0):
        self.root, self.token, self.image_size = Path(root), token, image_size
        self.same_image = check_number_in("same_image", same_image, 0, 1)
        if not self.root.is_dir():
            raise HyperdiffError(f"dataset folder '{self.root}' does not exist")
        self.images: dict[str, list[tuple[Path, str]]] = {}
        bad = 0
        entries = self._metadata() if (self.root / "metadata.jsonl").exists() else self._subfolders()
        for ident, path, caption in entries:
            try:
                with Image.open(path) as im:
                    im.verify()
            except (OSError, UnidentifiedImageError, SyntaxError):
                bad += 1
                continue
            self.images.setdefault(ident, []).append((path, caption))
        if bad:
            warnings.warn(f"dataset '{self.root}': skipped {bad} unreadable image(s)", stacklevel=2)
        self.keys = sorted(self.images)
        if not self.keys:
            raise HyperdiffError(f"dataset folder '{self.root}' holds no readable images")

    def _subfolders(self):
        for sub in sorted(p for p in self.root.iterdir() if p.is_dir()):
            caption_file = sub / "caption.txt"
            caption = caption_file.read_text().strip() if caption_file.exists() else "a {token} face"
            for path in sorted(sub.iterdir()):
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    yield sub.name, path, caption.format(token=self.token)

    def _metadata(self):
        for n, line in enumerate((self.root / "metadata.jsonl").read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                yield str(row["identity"]), self.root / row["file_name"], row.get("text", "a {token} face").format(token=self.token)
            except (json.JSONDecodeError, KeyError) as e:
                raise HyperdiffError(f"'{self.root / 'metadata.jsonl'}' line {n} must be JSON with 'file_name' and 'identity' ({e})") from None

    def _load(self, path: Path) -> Image.Image:
        with Image.open(path) as im:
            return im.convert("RGB").resize((self.image_size, self.image_size), Image.BICUBIC)

    def pair(self, key, gen):
        items = self.images[key]
        i = int(torch.randint(len(items), (), generator=gen))
        others = [j for j in range(len(items)) if j != i] or [i]  # a different image when there is one
        j = _pick(others, gen)
        if torch.rand((), generator=gen) < self.same_image:
            j = i
        ref, target = items[i], items[j]
        return self._load(ref[0]), self._load(target[0]), target[1]
