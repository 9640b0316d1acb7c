"""Training checkpoints shared by every training loop.

Contract: `save(accelerator, folder, step, keep, extra)` writes `folder/checkpoint-<step>` with
`accelerator.save_state` (models as safetensors) plus whatever `extra(path)` writes (hyperdiff's own state, e.g. EMA
weights, as safetensors), first into `checkpoint-<step>.tmp` and renamed once complete, so a run killed mid-save
never leaves a half checkpoint; only the newest `keep` checkpoints stay. `latest(folder)` → (path, step) of the
newest complete checkpoint, or (None, 0).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Callable


def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints `checkpoint-N`, oldest first (an unfinished `checkpoint-N.tmp` is not one)."""
    found = [(int(m.group(1)), p) for p in Path(folder).glob("checkpoint-*") if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))]
    return sorted(found)


def latest(folder: Path) -> tuple[Path | None, int]:
    found = checkpoints(folder)
    return (found[-1][1], found[-1][0]) if found else (None, 0)


def save(accelerator, folder: Path, step: int, keep: int, extra: Callable[[Path], None] | None = None) -> Path:
    final = Path(folder) / f"checkpoint-{step}"
    tmp = final.with_name(final.name + ".tmp")
    accelerator.save_state(str(tmp))  # every process writes its part (e.g. its RNG state)
    if extra is not None and accelerator.is_main_process:
        extra(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for _, old in checkpoints(final.parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
