"""User inputs checked before any model loads: numbers, words, prompts, output paths and reference images.

Contract: every function raises a one-line `HyperdiffError` naming the input, what was wrong and what was expected,
and imports neither torch nor diffusers, so the CLI answers bad input at once, before it loads anything. The library
calls the same checks (`HyperDreamBoothPipeline.personalize`/`generate`), so a limit is written once:
- `check_personalize(finetune_steps, token, seed)`, `check_captions(caption, n, token)` → one caption per image or
  None, `check_prompt(name, prompt, token)` (a template that formats with `token` and names the subject by it);
- `check_generate(prompt, num_images, steps, guidance, strength, seed)`;
- `check_device_name(device)`, `check_dtype_name(dtype)`: the spelling only (whether this machine has the device is
  `pipeline.resolve_device`'s);
- `check_writable(path, what)`: the nearest existing folder above `path` is a writable folder (tried with a
  temporary file, removed at once) and `path` is not a folder; no folder is created;
- `read_header(path, what)`: the raw safetensors JSON header of a file, read without loading a tensor (a missing
  file, a folder or a file that is not safetensors is refused);
- `check_outside_assets(path, flag, named)`: nothing writes into the shipped models (`ASSETS_DIR`,
  hyperdiff/assets/) unless the user named that folder on the command line (`named`); a config file or a default
  that points there is refused, so a quick try never replaces what every user gets;
- `load_images(images, max_side, max_bytes)` → RGB PIL images, refusing absent, unreadable and oversized files (the
  pixel size is read from the header before any pixel is decoded).
"""

from __future__ import annotations

import json
import os
import re
import struct
import tempfile
from pathlib import Path
from typing import Sequence

from PIL import Image

from hyperdiff.errors import HyperdiffError, check_int_in, check_number_in

MAX_IMAGES, MAX_STEPS, MAX_FINETUNE_STEPS = 64, 500, 10_000
MAX_STRENGTH = 10  # an adapter's strength (ΔW × strength) lies in [-MAX_STRENGTH, MAX_STRENGTH]; negative subtracts it
MAX_SEED = 2**32 - 1  # image i of a call is drawn with seed + i
MAX_GUIDANCE = 50
MAX_PROMPT_CHARS = 2_000  # far beyond what the text encoder reads (77 tokens); longer text is a mistake
DTYPE_NAMES = ("float32", "float16", "bfloat16")
ASSETS_DIR = Path(__file__).resolve().parent / "assets"  # the shipped models


def check_token(token: object) -> str:
    if not isinstance(token, str) or not token or not token.isalnum():
        raise HyperdiffError(f"`token` must be one word of letters or digits, like 'sks', got {token!r}")
    return token


def check_seed(seed: object) -> int:
    return check_int_in("seed", seed, 0, MAX_SEED)


def check_text(name: str, text: object) -> str:
    """A non-empty prompt of at most `MAX_PROMPT_CHARS` characters."""
    if not isinstance(text, str) or not text.strip():
        raise HyperdiffError(f"`{name}` must be a non-empty string, got {text!r}")
    if len(text) > MAX_PROMPT_CHARS:
        raise HyperdiffError(f"`{name}` is {len(text):,} characters long, expected at most {MAX_PROMPT_CHARS:,}")
    return text


def check_prompt(name: str, prompt: object, token: str) -> None:
    """A prompt template (a reference caption, an anchor prompt) must format with `token` alone and then name the
    subject by the token."""
    check_text(name, prompt)
    try:
        text = prompt.format(token=token)
    except (KeyError, IndexError, ValueError):
        raise HyperdiffError(f"`{name}` may hold no braces but {{token}}, got {prompt!r}") from None
    if token not in re.findall(r"\w+", text):
        raise HyperdiffError(f"`{name}` must name the subject by the token {token!r} (or {{token}}), got {prompt!r}")


def check_personalize(finetune_steps: object, token: object, seed: object) -> None:
    check_int_in("finetune_steps", finetune_steps, 0, MAX_FINETUNE_STEPS)
    check_token(token)
    check_seed(seed)


def check_captions(caption: str | Sequence[str] | None, n: int, token: str) -> list[str] | None:
    """`personalize`'s caption(s) checked, one per reference image (a single string serves them all)."""
    if caption is None:
        return None
    captions = [caption] * n if isinstance(caption, str) else list(caption) if isinstance(caption, Sequence) else None
    if captions is None or len(captions) != n:
        raise HyperdiffError(f"`caption` must be one string or one per reference image ({n}), got "
                             + (f"{len(captions)}" if captions is not None else type(caption).__name__))
    for c in captions:
        check_prompt("caption", c, token)
    return captions


def check_generate(prompt: object, num_images: object, steps: object, guidance: object, strength: object,
                   seed: object, negative_prompt: object = None) -> None:
    check_text("prompt", prompt)
    if negative_prompt:  # "" or None: none
        check_text("negative_prompt", negative_prompt)
    check_int_in("num_images", num_images, 1, MAX_IMAGES)
    check_int_in("steps", steps, 1, MAX_STEPS)
    check_number_in("guidance", guidance, 0, MAX_GUIDANCE)  # NaN fails every comparison: refused too
    check_number_in("strength", strength, -MAX_STRENGTH, MAX_STRENGTH)
    check_int_in("seed", seed, 0, MAX_SEED - num_images + 1)


def check_device_name(device: str | None) -> None:
    if device is not None and not re.fullmatch(r"cpu|mps|cuda(:\d+)?", device):
        raise HyperdiffError(f"`device` must be cpu, cuda, cuda:N or mps, got {device!r}")


def check_dtype_name(dtype: str | None) -> None:
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise HyperdiffError(f"`dtype` must be one of {list(DTYPE_NAMES)}, got {dtype!r}")


def check_writable(path: Path, what: str) -> None:
    """`path` can be written: it is not a folder, and the nearest existing folder above it is a writable folder
    (the missing ones between are made when it is written)."""
    path = Path(path)
    if path.is_dir():
        raise HyperdiffError(f"{what} '{path}' is a folder, expected a file path")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise HyperdiffError(f"{what} '{path}' cannot be written: '{parent}' is a file, expected a folder")
    try:  # a real try, not os.access: root passes that on read-only mounts and /proc
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise HyperdiffError(f"{what} '{path}' is not writable: {e.strerror or e} in '{parent}'") from None


def check_outside_assets(path: str | os.PathLike | None, flag: str, named: bool) -> None:
    """Refuse a write into the shipped models unless `named` (the path came from `flag` on the command line)."""
    if not path or named:
        return
    target = Path(path).resolve()
    if target == ASSETS_DIR or ASSETS_DIR in target.parents:
        raise HyperdiffError(f"`{flag}` '{path}' is inside the shipped models ({ASSETS_DIR}), set by a config file or a "
                             f"default: name it with {flag} on the command line to replace a shipped model")


def read_header(path: str | os.PathLike, what: str = "adapter file") -> dict:
    """The raw safetensors JSON header (tensor entries and `__metadata__`), without loading any tensor."""
    path = Path(path)
    if not path.exists():
        raise HyperdiffError(f"{what} '{path}' does not exist")
    if not path.is_file():
        raise HyperdiffError(f"{what} '{path}' is not a file")
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(100_000_000, path.stat().st_size - 8):
                raise ValueError
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError
    except (ValueError, struct.error, UnicodeDecodeError):
        raise HyperdiffError(f"{what} '{path}' is not a safetensors file (its header cannot be read)") from None
    return header


def load_images(
    images: Sequence[Image.Image | str | Path] | Image.Image | str | Path, max_side: int | None = None,
    max_bytes: int | None = None,
) -> list[Image.Image]:
    """PIL images or paths → RGB PIL images; an absent or unreadable file is a one-line error naming it.

    `max_side` (pixels, either side) and `max_bytes` (file size) refuse oversized inputs, e.g. web uploads; the pixel
    size is read from the file's header, before any pixel is decoded."""
    if isinstance(images, (Image.Image, str, Path)):
        images = [images]
    out = []
    for item in images:
        if isinstance(item, Image.Image):
            _check_side(f"image {len(out) + 1}", item.size, max_side)
            out.append(item.convert("RGB"))
            continue
        path = Path(item)
        if not path.is_file():
            raise HyperdiffError(f"image '{path}' does not exist")
        size = path.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise HyperdiffError(f"image '{path}' is {size:,} bytes, expected at most {max_bytes:,} bytes "
                                 f"({max_bytes / 2**20:.3g} MB)")
        try:
            with Image.open(path) as im:
                _check_side(f"image '{path}'", im.size, max_side)
                im.load()
                out.append(im.convert("RGB"))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            if isinstance(e, HyperdiffError):
                raise
            raise HyperdiffError(f"image '{path}' cannot be read as an image ({str(e).splitlines()[0]})") from None
    if not out:
        raise HyperdiffError("`images` must hold at least one reference image")
    return out


def _check_side(what: str, size: tuple[int, int], max_side: int | None) -> None:
    if max_side is not None and max(size) > max_side:
        raise HyperdiffError(f"{what} is {size[0]}x{size[1]} px, expected at most {max_side} px on each side")

