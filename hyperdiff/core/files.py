"""Safe file I/O: safetensors only, atomic writes, one-line errors.

Contract:
- `write_safetensors(path, tensors, metadata)` writes to a temporary file in the destination folder, then
  renames it over `path` (`os.replace`), so a reader never sees a half-written file and a failure leaves none.
- `read_safetensors(path, what)` returns `(tensors, metadata)` or raises `HyperdiffError` naming the file when it
  is missing, is not a safetensors file, or holds non-finite or non-floating tensors. Nothing is unpickled.
- `atomic_path(path)` is the same temp-then-rename discipline for writers that take a path (PIL, diffusers);
  `make_parent(path)` makes the missing folders above a path when it is written (checks never create them).
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hyperdiff.errors import HyperdiffError
from hyperdiff.inputs import check_writable, read_header  # noqa: F401 (re-exported: formats and scripts take them from here)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_parent(path: str | os.PathLike, what: str) -> Path:
    """`path` checked writable (`check_writable`), its missing folders made, at the moment it is written."""
    path = Path(path)
    check_writable(path, what)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HyperdiffError(f"{what} folder '{path.parent}' cannot be created: {e.strerror}") from None
    return path


@contextmanager
def atomic_path(path: str | os.PathLike, what: str = "output") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path`, on failure remove it.

    An `OSError` (no permission, disk full, read-only file system) becomes a one-line `HyperdiffError`.
    """
    path = make_parent(path, what)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise HyperdiffError(f"{what} '{path}' is not writable: {e.strerror}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
        os.replace(tmp_path, path)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        raise HyperdiffError(f"{what} '{path}' could not be written: {e.strerror or e}") from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], what: str = "adapter file"
) -> Path:
    """Atomically write `tensors` (made contiguous, on CPU) with string `metadata` to `path`."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path, what) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
    return Path(path)


def read_safetensors(path: str | os.PathLike, what: str = "adapter file") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load every tensor of a safetensors file (CPU) and its string metadata, validating each tensor."""
    header = read_header(path, what)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise HyperdiffError(f"{what} '{path}' is not a valid safetensors file ({str(e).splitlines()[0]})") from None
    for key, t in tensors.items():
        if t.dtype not in FLOAT_DTYPES:
            raise HyperdiffError(f"{what} '{path}': tensor '{key}' has dtype {t.dtype}, expected a floating dtype")
        if not torch.isfinite(t).all():
            raise HyperdiffError(f"{what} '{path}': tensor '{key}' contains NaN or Inf values")
    return tensors, dict(header.get("__metadata__") or {})
