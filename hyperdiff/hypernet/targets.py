"""Stage-1 LiDB targets for hypernet training, for any number of accelerate processes.

Contract: `precompute_targets(cfg)` (stage 1): DreamBooth-LiDB per identity, many identities per batch, sharded across
processes (identity i goes to process i mod N), restartable (identities with a file are skipped), one native adapter
file per identity in `targets_dir/<key>.safetensors` (what `HypernetTrainConfig.targets_dir` then trains on).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from hyperdiff.core.lidb import stable_seed
from hyperdiff.errors import HyperdiffError
from hyperdiff.hypernet.training import HypernetTrainConfig, _load_base, _use_cpu
from hyperdiff.personalize.finetune import finetune, make_prior


def precompute_targets(cfg: HypernetTrainConfig) -> Path:
    """Stage 1: one DreamBooth-LiDB adapter per identity, `precompute_batch` identities per fine-tune call."""
    from accelerate import PartialState

    state = PartialState(cpu=_use_cpu(cfg))
    if cfg.finetune.kind != "lidb" or cfg.finetune.lidb != cfg.hypernet.lidb:
        raise HyperdiffError("`finetune` must train LiDB factors with the hypernet's `lidb` config for stage-1 targets")
    folder = Path(cfg.targets_dir or Path(cfg.output_dir) / "targets")
    folder.mkdir(parents=True, exist_ok=True)
    pipe = _load_base(cfg.base).to(state.device)
    source = cfg.data.build()
    keys = source.keys[: cfg.precompute_identities][state.process_index :: state.num_processes]
    todo = [k for k in keys if not (folder / f"{k}.safetensors").exists()]
    prior = make_prior(pipe, cfg.finetune) if cfg.finetune.prior_weight > 0 else None
    for i in tqdm(range(0, len(todo), cfg.precompute_batch), desc=f"stage-1 targets (rank {state.process_index})"):
        chunk = todo[i : i + cfg.precompute_batch]
        refs, prompts = [], []
        for key in chunk:
            gen = torch.Generator().manual_seed(stable_seed("stage1", cfg.seed, key))
            pairs = [source.pair(key, gen) for _ in range(3)]  # three images of the identity, with their captions
            refs.append([target for _, target, _ in pairs])
            prompts.append([text for _, _, text in pairs])
        adapters = finetune(pipe, refs, cfg.finetune, prompts=prompts, prior=prior, progress=False)
        for key, ad in zip(chunk, adapters):
            ad.save(folder / f"{key}.safetensors")
    state.wait_for_everyone()
    return folder
