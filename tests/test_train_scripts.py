"""Training scripts on the tiny config: 2 gloo CPU processes vs 1 process, kill + resume, restartable stage-1 targets and
their use in training, identity datasets and the YAML configs.

The 2-process run uses `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU: `train_hypernet` asks accelerate
for cpu=True when WORLD_SIZE > 1 and there is no CUDA; `--cpu --num_processes 2` would silently run one process).
A driver wraps the script's training loop so each rank writes its own final weights as `rank<r>-of-<n>.safetensors`:
that proves both ranks ran in one process group and lets the test compare them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from hyperdiff import Adapter, HyperdiffError, LayerTable
from hyperdiff import synthfaces as sf
from hyperdiff.config import load_config
from hyperdiff.core.processors import hyper_lora_processors
from hyperdiff.data.identities import FolderIdentities, SynthFacesIdentities
from hyperdiff.hypernet import HyperNetwork
from hyperdiff.hypernet import training as trainer
from hyperdiff.hypernet.training import HypernetTrainConfig
from hyperdiff.personalize.losses import (encode_images, encode_prompts, frozen_identity_encoder, identity_embeddings,
                                          identity_loss, noise_prediction)
from hyperdiff.train import checkpoints

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
TINY = str(ROOT / "configs" / "tiny.yaml")
PYTHON = sys.executable
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


def _script(name: str):
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))  # the scripts import their sibling `_flags`
    spec = importlib.util.spec_from_file_location(f"script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_script():
    return _script("train_hypernet")


@pytest.fixture(scope="module")
def precompute_script():
    return _script("precompute_lidb")


@pytest.fixture(autouse=True)
def fresh_accelerate():
    """In-process runs share accelerate's singletons: start and leave every test with fresh ones."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


DRIVER = """
import sys
sys.path.insert(0, {scripts!r})
from accelerate import PartialState
from safetensors.torch import save_file
import hyperdiff.hypernet.targets as targets
import hyperdiff.hypernet.training as trainer
import precompute_lidb
import train_hypernet as script

inner_finetune = targets.finetune

def finetune(pipe, refs, *args, **kwargs):
    state = PartialState()
    print(f"[rank {{state.process_index}} of {{state.num_processes}}] stage-1 fine-tune of {{len(refs)}}", flush=True)
    return inner_finetune(pipe, refs, *args, **kwargs)

targets.finetune = finetune
inner = trainer._train_loop

def loop(cfg, accelerator, pipe, model, hp, *rest):
    inner(cfg, accelerator, pipe, model, hp, *rest)
    rank, world = accelerator.process_index, accelerator.num_processes
    print(f"[rank {{rank}} of {{world}}] trained", flush=True)
    save_file({{k: v.detach().contiguous() for k, v in hp.state_dict().items()}},
              f"{{cfg.output_dir}}/rank{{rank}}-of-{{world}}.safetensors")

trainer._train_loop = loop
stage1 = sys.argv.index("--stage1")
if precompute_lidb.main(sys.argv[stage1 + 1 :]) != 0:
    sys.exit(1)
sys.exit(script.main(sys.argv[1:stage1]))
"""


def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path, train_script):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(scripts=str(SCRIPTS)))
    port = _free_port()
    acc_cfg = tmp_path / "accelerate.yaml"
    acc_cfg.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_machines: 1\nnum_processes: 2\n"
        f"machine_rank: 0\nmain_process_ip: 127.0.0.1\nmain_process_port: {port}\nmixed_precision: 'no'\n"
        "use_cpu: false\nrdzv_backend: static\nsame_network: true\n"
    )
    two = tmp_path / "two"
    cmd = [ACCELERATE, "launch", "--config_file", str(acc_cfg), "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(port), str(driver),
           "--config", TINY, "--output_dir", str(two), "--train_batch_size", "1", "--max_train_steps", "4",
           "--stage1", "--config", TINY, "--targets_dir", str(tmp_path / "targets"), "--identities", "4"]
    proc = subprocess.run(cmd, env=_env(), cwd=str(ROOT), capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # stage 1 first: 4 identities sharded over the 2 ranks (precompute_batch 2: one fine-tune call of 2 per rank)
    assert sorted(p.name for p in (tmp_path / "targets").iterdir()) == [f"{i}.safetensors" for i in range(4)]
    for rank in (0, 1):
        assert proc.stdout.count(f"[rank {rank} of 2] stage-1 fine-tune of 2") == 1, proc.stdout
    assert "[rank 0 of 2] trained" in proc.stdout and "[rank 1 of 2] trained" in proc.stdout, proc.stdout
    rank0, rank1 = _weights(two / "rank0-of-2.safetensors"), _weights(two / "rank1-of-2.safetensors")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # DDP kept the ranks bit-identical
    assert json.loads((two / "config.json").read_text())["info"]["num_processes"] == 2
    assert (two / "checkpoint-2").is_dir()

    # 1 process, global batch 2 (in-process: the same code path, also through the script's main)
    one = tmp_path / "one"
    assert train_script.main(["--config", TINY, "--output_dir", str(one), "--train_batch_size", "2",
                              "--max_train_steps", "4"]) == 0
    final_one, final_two = _weights(one / "model.safetensors"), _weights(two / "model.safetensors")
    assert _max_diff(final_two, rank0) == 0
    diff = _max_diff(final_one, final_two)
    # measured 1.8e-5 on this machine (float rounding of batch-2 vs 2 x batch-1 kernels and the gloo average, amplified
    # where Adam divides tiny gradients by their tiny second moment); any error in the data, noise, loss or LR schedule
    # sharding gives ≥ 1e-3 (the head that starts at 0 reaches ~2.5e-3 in these 4 steps)
    assert diff <= 1e-4, diff
    assert final_one["head_b.weight"].abs().max() > 1e-3


def test_a_killed_run_resumes_from_its_last_checkpoint_and_ends_bit_identical(tmp_path, train_script):
    """A real SIGKILL: start the script, wait until checkpoint-2 is complete (checkpoints are written as .tmp and renamed),
    kill -9 it, then `--resume_from_checkpoint latest`."""
    args = ["--config", TINY, "--max_train_steps", "8", "--checkpointing_steps", "2"]
    reference = tmp_path / "reference"
    assert train_script.main(args + ["--output_dir", str(reference)]) == 0

    run = tmp_path / "run"
    proc = subprocess.Popen([PYTHON, str(SCRIPTS / "train_hypernet.py"), *args, "--output_dir", str(run)], env=_env(),
                            cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoint-2").is_dir():
            assert proc.poll() is None, f"training ended before its first checkpoint: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint-2 within 120 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "model.safetensors").exists(), "the run finished before the kill: nothing was resumed"
    path, step = checkpoints.latest(run)
    assert path is not None and step in (2, 4, 6)

    assert train_script.main(args + ["--output_dir", str(run), "--resume_from_checkpoint", "latest"]) == 0
    resumed, uninterrupted = _weights(run / "model.safetensors"), _weights(reference / "model.safetensors")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed), _max_diff(resumed, uninterrupted)
    assert [p.name for _, p in checkpoints.checkpoints(run)] == ["checkpoint-4", "checkpoint-6"]  # newest 2 kept


def test_init_from_starts_a_fresh_run_from_a_trained_hypernets_weights(tmp_path, train_script, capsys, caplog):
    """`--init_from`: a warmed-up first step (lr 0) leaves the copied weights exactly as trained, where a random start
    differs; another architecture is refused in one line (exit 2); a different alpha or low-noise gain (sampling
    settings, not architecture) is only warned about."""
    trained = tmp_path / "trained"
    assert train_script.main(["--config", TINY, "--output_dir", str(trained)]) == 0
    one_step = ["--config", TINY, "--max_train_steps", "1", "--set", "warmup_steps=1"]  # step 0 runs at lr 0
    with caplog.at_level("WARNING", logger=trainer.__name__):
        assert train_script.main(one_step + ["--output_dir", str(tmp_path / "warm"), "--init_from", str(trained),
                                             "--set", "hypernet.alpha=2.0", "--set", "hypernet.low_noise.gain=1.5",
                                             "--set", "hypernet.low_noise.below=200"]) == 0
    assert "alpha 1.0; this run trains under alpha 2.0" in caplog.text
    assert "low-noise gain {'gain': 1.0, 'below': 0}; this run's is {'gain': 1.5, 'below': 200}" in caplog.text
    assert train_script.main(one_step + ["--output_dir", str(tmp_path / "cold")]) == 0
    source = _weights(trained / "model.safetensors")
    warm, cold = _weights(tmp_path / "warm" / "model.safetensors"), _weights(tmp_path / "cold" / "model.safetensors")
    assert all(torch.equal(warm[k], source[k]) for k in source), _max_diff(warm, source)
    assert _max_diff(cold, source) > 1e-4
    assert json.loads((tmp_path / "warm" / "config.json").read_text())["info"]["training"]["init_from"] == str(trained)

    capsys.readouterr()
    assert train_script.main(one_step + ["--output_dir", str(tmp_path / "other"), "--init_from", str(trained),
                                         "--set", "hypernet.dim=64"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train_hypernet: error: `init_from`") and "`hypernet.dim` is 32, this run's 64" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "other" / "model.safetensors").exists()

    # a run with checkpoints continues from them: init_from only starts fresh runs
    run = tmp_path / "resumed"
    assert train_script.main(["--config", TINY, "--output_dir", str(run), "--seed", "1"]) == 0  # ends at checkpoint-4
    first = _weights(run / "model.safetensors")
    assert train_script.main(["--config", TINY, "--output_dir", str(run), "--seed", "1", "--init_from", str(trained)]) == 0
    assert all(torch.equal(first[k], v) for k, v in _weights(run / "model.safetensors").items())
    assert _max_diff(first, source) > 1e-4


def test_checkpoints_are_found_by_number_and_half_written_ones_are_ignored(tmp_path):
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-12.tmp", "checkpoint-x", "logs"):
        (tmp_path / name).mkdir()
    assert checkpoints.latest(tmp_path) == (tmp_path / "checkpoint-10", 10)
    assert checkpoints.latest(tmp_path / "logs") == (None, 0)


def test_cpu_processes_form_a_group_only_when_accelerate_is_told_cpu(monkeypatch):
    cfg = HypernetTrainConfig()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert trainer._use_cpu(cfg) is False  # one plain process: accelerate picks the device itself
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert trainer._use_cpu(cfg) is True  # launched processes without CUDA: gloo
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert trainer._use_cpu(cfg) is False
    assert trainer._use_cpu(HypernetTrainConfig(cpu=True)) is True


def test_precompute_is_restartable_and_training_uses_its_targets(tmp_path, train_script, precompute_script, monkeypatch):
    config = tmp_path / "tiny3.yaml"  # the tiny config with 3 identities, so every training batch has targets
    config.write_text(Path(TINY).read_text().replace("seed_stop: 1000", "seed_stop: 3"))
    assert load_config(HypernetTrainConfig, config).data.seed_stop == 3
    targets = tmp_path / "targets"
    common = ["--config", str(config), "--output_dir", str(tmp_path / "stage1"), "--targets_dir", str(targets)]
    assert precompute_script.main(common + ["--identities", "2"]) == 0
    first = {p.name: p.stat().st_mtime_ns for p in targets.glob("*.safetensors")}
    assert sorted(first) == ["0.safetensors", "1.safetensors"]
    content = (targets / "0.safetensors").read_bytes()
    time.sleep(0.01)
    assert precompute_script.main(common + ["--identities", "3"]) == 0  # restart with one more identity
    second = {p.name: p.stat().st_mtime_ns for p in targets.glob("*.safetensors")}
    assert sorted(second) == ["0.safetensors", "1.safetensors", "2.safetensors"]
    assert all(second[k] == v for k, v in first.items()) and (targets / "0.safetensors").read_bytes() == content

    from hyperdiff.models import tiny_pipeline

    table = LayerTable.from_unet(tiny_pipeline(seed=0).unet)
    loaded = {k: Adapter.load(targets / f"{k}.safetensors", table) for k in range(3)}
    assert all(ad.kind == "lidb" and max(ad.factors[n][1].abs().max() for n in table.names) > 0 for ad in loaded.values())

    # the script passes --targets_dir on: the same run with and without targets ends with different weights
    with_t, without = tmp_path / "with", tmp_path / "without"
    assert train_script.main(["--config", str(config), "--output_dir", str(with_t), "--targets_dir", str(targets)]) == 0
    assert train_script.main(["--config", str(config), "--output_dir", str(without)]) == 0
    assert _max_diff(_weights(with_t / "model.safetensors"), _weights(without / "model.safetensors")) > 1e-5

    # the weight term alone pulls the predictions towards the targets; with the full tiny data (1000 identities)
    # batches must draw the 3 identities that have targets for that to happen
    cfg = load_config(HypernetTrainConfig, TINY, {
        "output_dir": str(tmp_path / "weights_only"), "targets_dir": str(targets), "diffusion_weight": 0.0,
        "weight_weight": 1.0, "max_train_steps": 6, "learning_rate": 0.01,
    })
    with torch.random.fork_rng(devices=[]):  # the trainer's own initialisation
        torch.manual_seed(trainer.stable_seed("hypernet-init", cfg.seed))
        initial = HyperNetwork(cfg.hypernet, table)

    def no_unet(*args, **kwargs):
        raise AssertionError("diffusion_weight 0 must not run the UNet")

    with monkeypatch.context() as m:
        m.setattr(trainer, "noise_prediction", no_unet)
        trained = HyperNetwork.from_pretrained(trainer.train_hypernet(cfg), table=table)

    def distance(hp: HyperNetwork) -> float:
        total = 0.0
        for key, target in loaded.items():
            ad = hp.predict([sf.render(sf.Identity.from_seed(key), sf.Scene(), 32)])
            total += sum(((ad.factors[n][0] - target.factors[n][0]) ** 2).mean() + ((ad.factors[n][1] - target.factors[n][1]) ** 2).mean()
                         for n in table.names).item()
        return total

    before, after = distance(initial), distance(trained)
    assert after < 0.9 * before, (before, after)
    with pytest.raises(HyperdiffError, match="`diffusion_weight` 0 needs another loss term"):
        replace(cfg, targets_dir="")
    with pytest.raises(HyperdiffError, match="no identity of the training data has a stage-1 target"):
        trainer.train_hypernet(replace(cfg, data=replace(cfg.data, seed_start=10, seed_stop=20), output_dir=str(tmp_path / "none")))


def test_distillation_alone_pulls_the_unet_outputs_towards_the_targets(tmp_path):
    """`distill_weight` only (no diffusion or weight term): the UNet's predictions under the predicted weights move
    towards its predictions under each identity's stage-1 weights, measured on noise and timesteps the trainer never
    drew; the weight-space distance is not what it minimises."""
    from hyperdiff.core.lidb import LiDBConfig
    from hyperdiff.core.random_adapters import random_lidb

    pipe = trainer._load_base("hyperdiff:tiny")
    table = LayerTable.from_unet(pipe.unet)
    targets = tmp_path / "targets"
    targets.mkdir()
    teachers = {k: random_lidb(table, seed=k, config=LiDBConfig(), std=1.0) for k in range(3)}  # strong deltas
    for k, ad in teachers.items():
        ad.save(targets / f"{k}.safetensors")
    cfg = load_config(HypernetTrainConfig, TINY, {
        "output_dir": str(tmp_path / "distill"), "targets_dir": str(targets), "diffusion_weight": 0.0,
        # 3e-4, the rate real distillation runs use: at 1e-3 these strong teachers make the run chaotic, and float
        # rounding alone (one thread or two, one CPU or another) moved the end distance between 0.66 and 0.95 of the start
        "weight_weight": 0.0, "distill_weight": 1.0, "max_train_steps": 60, "learning_rate": 3e-4, "report_to": "none",
    })
    with torch.random.fork_rng(devices=[]):  # the trainer's own initialisation
        torch.manual_seed(trainer.stable_seed("hypernet-init", cfg.seed))
        initial = HyperNetwork(cfg.hypernet, table)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)

    def function_distance(hp: HyperNetwork) -> float:
        total = 0.0
        with torch.no_grad(), hyper_lora_processors(pipe.unet, table):
            for key, teacher in teachers.items():
                image = sf.render(sf.Identity.from_seed(key), sf.Scene(), 32)
                latents = encode_images(pipe, [image]).repeat(4, 1, 1, 1)  # (4, C, h, w)
                text = encode_prompts(pipe, [sf.caption(sf.Scene(), "sks")] * 4)
                g = torch.Generator().manual_seed(1000 + key)
                noise, t = torch.randn(latents.shape, generator=g), torch.randint(0, 1000, (4,), generator=g)
                student, _ = noise_prediction(pipe, sched, latents, text, [hp.predict([image]).hyper_lora()], noise, t)
                taught, _ = noise_prediction(pipe, sched, latents, text, [teacher.hyper_lora()], noise, t)
                total += ((student - taught) ** 2).mean().item()
        return total

    distilled = HyperNetwork.from_pretrained(trainer.train_hypernet(cfg), table=table)
    before, after = function_distance(initial), function_distance(distilled)
    assert after < 0.8 * before, (before, after)
    with pytest.raises(HyperdiffError, match="`distill_weight` > 0 needs stage-1 targets"):
        replace(cfg, targets_dir="")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_identity_loss_reads_the_exact_prediction_like_the_encoder_reads_the_decoded_image(prediction_type):
    """Given the exact prediction (the noise, or the velocity), x̂₀ is the clean latent itself, so the loss is 1 − the
    identity encoder's own similarity between the decoded latent (through diffusers' image processor, as PIL) and the
    target; gradients reach the prediction."""
    from hyperdiff.synthfaces.encoder import IdentityEncoder
    from hyperdiff.models import load_base

    pipe = load_base()
    sched = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    encoder = frozen_identity_encoder("", "cpu")
    images = [sf.render(sf.Identity.from_seed(s), sf.Scene(background="red", hat=True), 64) for s in (3, 4)]
    others = [sf.render(sf.Identity.from_seed(s), sf.Scene(), 64) for s in (5, 6)]
    with torch.no_grad():
        latents = encode_images(pipe, images)  # (2, C, h, w)
    g = torch.Generator().manual_seed(0)
    noise, t = torch.randn(latents.shape, generator=g), torch.tensor([100, 700])
    exact = noise if prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
    pred = exact.clone().requires_grad_(True)
    loss = identity_loss(pipe, sched, encoder, latents, noise, t, pred, identity_embeddings(encoder, others))
    with torch.no_grad():
        decoded = pipe.image_processor.postprocess(pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample,
                                                   output_type="pil")
    reader = IdentityEncoder.from_pretrained()  # the same shipped encoder, through its public API
    expected = 1 - reader.similarity(decoded, others).mean().item()
    assert abs(loss.item() - expected) < 0.01, (loss.item(), expected)
    assert 1 - reader.similarity(decoded, images).mean().item() < expected - 0.3  # the decoded faces are the images'
    loss.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


@pytest.mark.parametrize("term", ["identity", "hat"])
def test_encoder_term_alone_moves_the_estimate_towards_each_target(tmp_path, term):
    """`identity_weight` or `hat_weight` only (no diffusion, distillation or stage-1 targets): the trained
    hypernet's weights lower that term on identities, noise and timesteps the trainer never drew."""
    cfg = load_config(HypernetTrainConfig, TINY, {
        "output_dir": str(tmp_path / term), "diffusion_weight": 0.0, "weight_weight": 0.0,
        f"{term}_weight": 1.0, "max_train_steps": 30, "learning_rate": 1e-3, "report_to": "none",
    })
    pipe = trainer._load_base(cfg.base)
    table = LayerTable.from_unet(pipe.unet)
    encoder = frozen_identity_encoder("", "cpu")
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    with torch.random.fork_rng(devices=[]):  # the trainer's own initialisation
        torch.manual_seed(trainer.stable_seed("hypernet-init", cfg.seed))
        initial = HyperNetwork(cfg.hypernet, table)

    def distance(hp: HyperNetwork) -> float:
        keys = range(2000, 2004)  # outside the tiny config's seeds [0, 1000)
        scenes = [sf.Scene(background="blue", hat=h, expression=e) for h, e in zip((True, False) * 2, sf.EXPRESSIONS)]
        refs = [sf.render(sf.Identity.from_seed(k), sf.Scene(), 32) for k in keys]
        targets = [sf.render(sf.Identity.from_seed(k), s, 32) for k, s in zip(keys, scenes)]
        g = torch.Generator().manual_seed(7)
        with torch.no_grad(), hyper_lora_processors(pipe.unet, table):
            latents = encode_images(pipe, targets)
            text = encode_prompts(pipe, [sf.caption(s, "sks") for s in scenes])
            noise, t = torch.randn(latents.shape, generator=g), torch.randint(0, 1000, (len(keys),), generator=g)
            deltas = Adapter.stack([hp.predict([r]) for r in refs], table)  # one adapter per sample
            pred, _ = noise_prediction(pipe, sched, latents, text, [deltas], noise, t)
            return trainer._encoder_terms(cfg, pipe, sched, encoder, latents, noise, t, pred, targets, text)[term].item()

    trained = HyperNetwork.from_pretrained(trainer.train_hypernet(cfg), table=table)
    before, after = distance(initial), distance(trained)
    assert after < before - 0.01, (before, after)


def test_hat_term_is_the_hat_heads_cross_entropy_against_its_reading_of_the_target():
    """Given the exact prediction, x̂₀ is the clean latent at any timestep, so the hat term is the cross-entropy of
    the encoder's hat probability on the decoded latent (read as PIL through its public `classify`) against its
    reading of the target, at a high timestep as at a low one, and the identity term is 1 − its `similarity`. With
    the image itself as the target the hat term is small."""
    from hyperdiff.synthfaces.encoder import IdentityEncoder
    from hyperdiff.models import load_base

    pipe = load_base()
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    encoder = frozen_identity_encoder("", "cpu")
    cfg = HypernetTrainConfig(identity_weight=1.0, hat_weight=2.0)
    images = [sf.render(sf.Identity.from_seed(3), sf.Scene(background="red", hat=True, expression="smiling"), 64),
              sf.render(sf.Identity.from_seed(4), sf.Scene(background="blue", expression="sad"), 64)]
    targets = [sf.render(sf.Identity.from_seed(3), sf.Scene(expression="surprised"), 64),
               sf.render(sf.Identity.from_seed(4), sf.Scene(hat=True, expression="smiling"), 64)]
    with torch.no_grad():
        latents = encode_images(pipe, images)  # (2, C, h, w)
        decoded = pipe.image_processor.postprocess(pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample,
                                                   output_type="pil")
    g = torch.Generator().manual_seed(0)
    noise, t = torch.randn(latents.shape, generator=g), torch.tensor([100, 950])
    pred = noise.clone().requires_grad_(True)
    terms = trainer._encoder_terms(cfg, pipe, sched, encoder, latents, noise, t, pred, targets, None)  # no base term
    reader = IdentityEncoder.from_pretrained()  # the same shipped encoder, through its public API
    made, wanted = reader.classify(decoded)["hat"], reader.classify(targets)["hat"]  # (2,) P(hat) each
    expected = -(wanted * made.log() + (1 - wanted) * (1 - made).log()).mean().item()
    assert expected > 1.0  # each image's hat is the opposite of its target's
    assert abs(terms["hat"].item() - expected) < 0.05 * expected, (terms["hat"].item(), expected)
    assert abs(terms["identity"].item() - (1 - reader.similarity(decoded, targets).mean().item())) < 0.01
    terms["hat"].backward()
    assert pred.grad[0].abs().sum() > 0 and pred.grad[1].abs().sum() > 0  # both timesteps reach the prediction
    itself = trainer._encoder_terms(cfg, pipe, sched, encoder, latents, noise, t, pred, images, None)["hat"].item()
    assert itself < 0.1 * expected, (itself, expected)


def test_expression_prior_is_the_kl_from_the_base_models_reading_of_its_own_estimate():
    """The expression prior is KL(base ‖ made) of the encoder's expression probabilities (its public `classify`, on
    PIL images): "base" read on the base model's own one-step estimate, made here through diffusers' DDPM step from
    the plain UNet (no processors installed), "made" on the estimate of the given prediction (the exact noise: the
    clean latent). Gradients reach the prediction; given the base model's own prediction the term is zero."""
    from hyperdiff.synthfaces.encoder import IdentityEncoder
    from hyperdiff.models import load_base

    pipe = load_base()
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    encoder = frozen_identity_encoder("", "cpu")
    cfg = HypernetTrainConfig(expression_prior_weight=1.0)
    images = [sf.render(sf.Identity.from_seed(3), sf.Scene(background="red", expression="smiling"), 64),
              sf.render(sf.Identity.from_seed(4), sf.Scene(background="blue", expression="surprised"), 64)]
    captions = [sf.caption(sf.Scene(background="red", expression="sad"), "sks"),
                sf.caption(sf.Scene(background="blue", expression="neutral"), "sks")]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        latents = encode_images(pipe, images)  # (2, C, h, w)
        text = encode_prompts(pipe, captions)  # (2, T, d)
        noise, t = torch.randn(latents.shape, generator=g), torch.tensor([100, 950])
        noisy = sched.add_noise(latents, noise, t)
        eps = pipe.unet(noisy, t, text).sample  # the base model, without the hypernet's processors
        base_clean = torch.cat([sched.step(eps[i:i + 1], int(t[i]), noisy[i:i + 1]).pred_original_sample
                                for i in range(2)])

        def pil(lat):
            return pipe.image_processor.postprocess(pipe.vae.decode(lat / pipe.vae.config.scaling_factor).sample,
                                                    output_type="pil")

        reader = IdentityEncoder.from_pretrained()  # the same shipped encoder, through its public API
        made, kept = reader.classify(pil(latents))["expression"], reader.classify(pil(base_clean))["expression"]
    expected = (kept * (kept.clamp_min(1e-12).log() - made.clamp_min(1e-12).log())).sum(dim=1).mean().item()
    assert expected > 0.3  # the base model's estimates do not read as these images' expressions
    pred = noise.clone().requires_grad_(True)
    with hyper_lora_processors(pipe.unet, LayerTable.from_unet(pipe.unet)):
        terms = trainer._encoder_terms(cfg, pipe, sched, encoder, latents, noise, t, pred, images, text)
        assert set(terms) == {"expression_prior"}
        assert abs(terms["expression_prior"].item() - expected) < 0.1 * expected, (terms["expression_prior"].item(), expected)
        terms["expression_prior"].backward()
        assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
        with torch.no_grad():
            own = trainer._encoder_terms(cfg, pipe, sched, encoder, latents, noise, t, eps, images, text)
    assert own["expression_prior"].abs().item() < 1e-5


def test_expression_prior_alone_brings_the_estimates_expression_back_to_the_base_models(tmp_path):
    """The shipped hypernet's weights move the one-step estimates' expression away from the base model's reading at
    high noise; 30 steps from them (`init_from`) on `expression_prior_weight` alone (a loss term of its own: no
    diffusion, distillation or identity term) bring it nearer (below 0.7 of its start), on identities, noise and
    timesteps the trainer never drew."""
    from hyperdiff.personalize.pipeline import EMBEDDED_HYPERNET

    cfg = load_config(HypernetTrainConfig, str(ROOT / "configs" / "synthfaces.yaml"), {
        "output_dir": str(tmp_path / "prior"), "export_dir": "", "init_from": str(EMBEDDED_HYPERNET),
        "diffusion_weight": 0.0, "weight_weight": 0.0, "expression_prior_weight": 1.0, "max_train_steps": 30,
        "train_batch_size": 2, "learning_rate": 1e-3, "warmup_steps": 0, "report_to": "none"})
    kept = trainer.train_hypernet(cfg)
    pipe = trainer._load_base(cfg.base)
    table = LayerTable.from_unet(pipe.unet)
    encoder = frozen_identity_encoder("", "cpu")
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    keys = sf.VAL_SEEDS[:8]  # never drawn in training
    scenes = [sf.Scene(background="blue", hat=k % 2 == 0, expression=sf.EXPRESSIONS[k % 4]) for k in keys]
    refs = [sf.render(sf.Identity.from_seed(k), sf.Scene(), 64) for k in keys]
    targets = [sf.render(sf.Identity.from_seed(k), s, 64) for k, s in zip(keys, scenes)]
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        latents = encode_images(pipe, targets)
        text = encode_prompts(pipe, [sf.caption(s, "sks") for s in scenes])
        noise, t = torch.randn(latents.shape, generator=g), torch.randint(600, 1000, (len(keys),), generator=g)

    def drift(path) -> float:
        hp = HyperNetwork.from_pretrained(path, table=table)
        with torch.no_grad(), hyper_lora_processors(pipe.unet, table):
            deltas = Adapter.stack([hp.predict([r]) for r in refs], table)  # one adapter per sample
            pred, _ = noise_prediction(pipe, sched, latents, text, [deltas], noise, t)
            return trainer._encoder_terms(cfg, pipe, sched, encoder, latents, noise, t, pred, targets,
                                          text)["expression_prior"].item()

    before, after = drift(EMBEDDED_HYPERNET), drift(kept)
    assert before > 0.1 and after < 0.7 * before, (before, after)


def test_expression_weight_reweights_the_noise_space_terms_on_the_latent_grid(tmp_path, monkeypatch):
    """`expression_weight` multiplies the diffusion (and distillation) errors by `expression_weight_map` on the latent
    grid: the trainer hands exactly that map to the per-sample MSE, which weights each squared error before the mean."""
    from hyperdiff.personalize.losses import per_sample_mse
    from hyperdiff.synthfaces.base_model.data import expression_weight_map

    seen = []

    def spy(a, b, weight=None):
        seen.append(weight)
        return per_sample_mse(a, b, weight)

    monkeypatch.setattr(trainer, "per_sample_mse", spy)
    cfg = load_config(HypernetTrainConfig, TINY, {"output_dir": str(tmp_path / "expr"), "expression_weight": 8.0,
                                                  "max_train_steps": 2, "report_to": "none"})
    trainer.train_hypernet(cfg)
    pipe = trainer._load_base(cfg.base)
    side = pipe.unet.config.sample_size
    expected = expression_weight_map(8.0, cfg.data.image_size, cfg.seed, pipe.vae)
    assert expected.shape == (1, 1, side, side) and abs(expected.mean().item() - 1) < 1e-5
    assert expected.max() > 1.5 * expected.min()  # not uniform
    assert len(seen) == 2 and all(w is not None and torch.equal(w, expected) for w in seen)  # one diffusion term a step
    g = torch.Generator().manual_seed(0)
    a, b, w = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g), torch.rand(1, 1, 3, 3, generator=g)
    torch.testing.assert_close(per_sample_mse(a, b, w), ((a - b) ** 2 * w).flatten(1).mean(1))
    with pytest.raises(HyperdiffError, match="`expression_weight` > 0 needs SynthFaces data"):
        replace(cfg, data=replace(cfg.data, kind="folder", path=str(tmp_path)))


def test_weight_loss_is_a_mean_over_the_local_batch():
    """Identities without a target count 0, so equal shards averaged by DDP give the global batch's mean."""
    from hyperdiff.core.lidb import LiDBConfig
    from hyperdiff.core.random_adapters import random_lidb

    table = LayerTable.from_unet(_tiny_unet())
    target = random_lidb(table, seed=0, config=LiDBConfig())
    a = torch.zeros(2, len(table), 100, 1)
    b = torch.zeros(2, len(table), 1, 50)
    assert trainer._weight_loss([7, 8], a, b, {}, table) is None
    only_first = trainer._weight_loss([7, 8], a, b, {"7": target}, table)
    both = trainer._weight_loss([7, 7], a, b, {"7": target}, table)
    torch.testing.assert_close(only_first, both / 2)
    ta = torch.stack([target.factors[r.name][0] for r in table])
    torch.testing.assert_close(trainer._weight_loss([7], ta[None], b[:1], {"7": target}, table),
                               torch.stack([target.factors[r.name][1] for r in table]).pow(2).mean())


def _tiny_unet():
    from hyperdiff.models import tiny_components

    return tiny_components(seed=0)["unet"]


# -- datasets --------------------------------------------------------------------------------------------------------
def _png(path: Path, color, size=(40, 48)) -> Path:
    Image.new("RGB", size, color).save(path)
    return path


def _corrupt(path: Path) -> Path:
    good = path.with_suffix(".tmp.png")
    _png(good, (1, 2, 3))
    path.write_bytes(good.read_bytes()[:60])  # a truncated PNG
    good.unlink()
    return path


def test_folder_identities_from_subfolders_with_captions_and_a_corrupt_image(tmp_path):
    alice, bob = tmp_path / "alice", tmp_path / "bob"
    alice.mkdir(), bob.mkdir()
    _png(alice / "1.png", (255, 0, 0)), _png(alice / "2.jpg", (0, 255, 0))
    (alice / "caption.txt").write_text("a photo of {token} person\n")
    _png(bob / "1.png", (0, 0, 255))
    _corrupt(bob / "2.png")
    (bob / "notes.txt").write_text("not an image")
    (tmp_path / "garbage.png").write_bytes(b"loose files at the root are ignored")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = FolderIdentities(tmp_path, token="zwx", image_size=32)
    skipped = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(skipped) == 1 and "skipped 1 unreadable image" in skipped[0]
    assert data.keys == ["alice", "bob"]
    assert [p.name for p, _ in data.images["alice"]] == ["1.png", "2.jpg"] and len(data.images["bob"]) == 1
    gen = torch.Generator().manual_seed(0)
    ref, target, caption = data.pair("alice", gen)
    assert ref.size == target.size == (32, 32) and ref.mode == "RGB"
    assert caption == "a photo of zwx person"
    dominant = {max(range(3), key=im.getpixel((16, 16)).__getitem__) for im in (ref, target)}
    assert dominant == {0, 1}  # the red PNG and the green JPEG: reference and target are different images
    assert data.pair("bob", gen)[2] == "a zwx face"  # default caption
    ref, target, _ = data.pair("bob", gen)  # one image: reference = target
    assert ref.getpixel((0, 0)) == target.getpixel((0, 0)) == (0, 0, 255)


def test_folder_identities_from_metadata_jsonl(tmp_path):
    (tmp_path / "img").mkdir()
    rows = []
    for i, (ident, color) in enumerate([("p1", (10, 10, 10)), ("p1", (20, 20, 20)), ("p2", (30, 30, 30))]):
        _png(tmp_path / "img" / f"{i}.png", color)
        rows.append({"file_name": f"img/{i}.png", "identity": ident, "text": f"{{token}} number {i}"})
    _corrupt(tmp_path / "img" / "bad.png")
    rows += [{"file_name": "img/bad.png", "identity": "p2"}, {"file_name": "img/missing.png", "identity": "p3"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        data = FolderIdentities(tmp_path, token="sks", image_size=16)
    assert data.keys == ["p1", "p2"]
    _, target, caption = data.pair("p2", torch.Generator().manual_seed(0))
    assert caption == "sks number 2" and target.size == (16, 16)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "img/0.png"}\n')
    with pytest.raises(HyperdiffError, match="line 1"):
        FolderIdentities(tmp_path)
    with pytest.raises(HyperdiffError, match="does not exist"):
        FolderIdentities(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HyperdiffError, match="no readable images"):
        FolderIdentities(empty)


def test_synthfaces_identities_render_one_identity_in_two_scenes(tmp_path):
    data = SynthFacesIdentities(range(10), image_size=32, token="sks")
    ref, target, caption = data.pair(3, torch.Generator().manual_seed(4))
    assert ref.size == target.size == (32, 32) and "sks" in caption
    assert sf.scene_from_caption(caption) is not None
    with pytest.raises(HyperdiffError, match="evaluation"):
        SynthFacesIdentities(range(sf.EVAL_SEED_START - 1, sf.EVAL_SEED_START + 1))


@pytest.mark.parametrize("same_image", [0.0, 0.5, 1.0])
def test_same_image_pairs_reconstruct_the_reference_at_the_given_rate(same_image):
    data = SynthFacesIdentities(range(100), image_size=32, same_image=same_image)
    gen = torch.Generator().manual_seed(0)
    same, n = 0, 200
    for k in range(n):
        ref, target, caption = data.pair(k % 100, gen)
        identical = ref.tobytes() == target.tobytes()
        if identical:  # the target is the reference itself, and the caption describes the reference's scene
            assert sf.render(sf.Identity.from_seed(k % 100), sf.scene_from_caption(caption), 32).tobytes() == ref.tobytes()
        same += identical
    # independent scenes coincide with probability 1/48 (6 backgrounds x 2 hats x 4 expressions)
    expected = same_image + (1 - same_image) / 48
    assert abs(same / n - expected) < 0.08, (same, n)
    with pytest.raises(HyperdiffError, match="`same_image` must be a number in \\[0, 1\\], got 1.5"):
        SynthFacesIdentities(range(10), same_image=1.5)


# -- configs ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, base, encoder, data_kind", [
    ("sd15", "runwayml/stable-diffusion-v1-5", "clip", "folder"),
    ("sd21", "stabilityai/stable-diffusion-2-1-base", "clip", "folder"),
    ("synthfaces", "", "identity", "synthfaces"),
    ("tiny", "hyperdiff:tiny", "small", "synthfaces"),
])
def test_configs_load_into_the_training_dataclass(name, base, encoder, data_kind):
    cfg = load_config(HypernetTrainConfig, ROOT / "configs" / f"{name}.yaml")
    assert cfg.base == base and cfg.hypernet.encoder.kind == encoder and cfg.data.kind == data_kind
    assert isinstance(cfg.learning_rate, float) and cfg.learning_rate > 0
    assert cfg.finetune.kind == "lidb" and cfg.finetune.lidb == cfg.hypernet.lidb  # stage 1 fits the hypernet
    if name != "tiny":
        assert (cfg.hypernet.lidb.a, cfg.hypernet.lidb.b, cfg.hypernet.lidb.rank) == (100, 50, 1)
        assert cfg.hypernet.layers == 2 and cfg.hypernet.refine_steps == 2
    if encoder == "clip":
        assert cfg.hypernet.encoder.pretrained == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K" and cfg.hypernet.dim == 512
    if name == "synthfaces":
        assert cfg.targets_dir == "" and cfg.hypernet.encoder.image_size == 64 and cfg.data.image_size == 64
        assert cfg.data.seed_stop <= sf.EVAL_SEED_START and cfg.data.build().keys[-1] < sf.VAL_SEEDS.start


def test_script_flags_override_the_config_and_bad_input_is_one_line(tmp_path, train_script, capsys):
    from _flags import overrides, parser

    args = parser("x").parse_args(["--config", TINY, "--learning_rate", "0.5", "--cpu", "--train_batch_size", "3"])
    cfg = load_config(HypernetTrainConfig, args.config, overrides(args))
    assert (cfg.learning_rate, cfg.cpu, cfg.train_batch_size, cfg.max_train_steps) == (0.5, True, 3, 4)
    assert load_config(HypernetTrainConfig, TINY, overrides(parser("x").parse_args([]))).cpu is False
    args = parser("x").parse_args(["--config", TINY, "--set", "hypernet.decoder=mlp", "--set", "hypernet.refine_steps=1",
                                   "--set", "max_grad_norm=0", "--set", "learning_rate=2e-3", "--learning_rate", "0.5"])
    cfg = load_config(HypernetTrainConfig, args.config, overrides(args))
    assert (cfg.hypernet.decoder, cfg.hypernet.refine_steps, cfg.max_grad_norm) == ("mlp", 1, 0)
    assert cfg.learning_rate == 2e-3  # --set comes last and wins
    for bad, words in ((["--set", "hypernet.decoder"], "KEY=VALUE"), (["--set", "hypernet.nope=1"], "nope"),
                       (["--set", "max_grad_norm=-1"], "max_grad_norm")):
        assert train_script.main(["--config", TINY, *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
    assert train_script.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.yaml" in err[0] and "does not exist" in err[0]


def test_validation_images_and_the_fp16_export(tmp_path, train_script):
    out, export = tmp_path / "run", tmp_path / "shipped"
    assert train_script.main(["--config", TINY, "--output_dir", str(out), "--validation_steps", "2", "--max_train_steps", "4",
                              "--export_dir", str(export)]) == 0
    sheets = sorted(p.name for p in (out / "validation").iterdir())
    assert sheets == ["step-2.png", "step-4.png"]
    full, half = load_file(out / "model.safetensors"), load_file(export / "model.safetensors")
    assert full.keys() == half.keys() and {v.dtype for v in half.values()} == {torch.float16}
    assert all(torch.equal(full[k].half(), half[k]) for k in full)  # the same weights, rounded once
    ref = sf.render(sf.Identity.from_seed(1_000_000), sf.Scene(), 32)
    a, b = HyperNetwork.from_pretrained(out).predict([ref]), HyperNetwork.from_pretrained(export).predict([ref])
    for name in a.layer_names:
        da, db = a.delta_weight(name), b.delta_weight(name)
        assert (da - db).norm() <= 1e-2 * da.norm()  # fp16 weights: ~3 significant digits
    with Image.open(out / "validation" / "step-4.png") as im:
        assert im.size[0] > 0 and im.getextrema() != ((255, 255),) * 3  # a real picture, not a blank sheet


# -- the shipped models ----------------------------------------------------------------------------------------------
def _shipped_bytes() -> dict[str, bytes]:
    from hyperdiff.inputs import ASSETS_DIR

    return {str(p.relative_to(ASSETS_DIR)): p.read_bytes() for p in sorted(ASSETS_DIR.rglob("*")) if p.is_file()}


def test_a_default_training_run_leaves_the_shipped_models_untouched(tmp_path, train_script, capsys):
    """The documented command on the shipped config, as a quick try, exports nothing; a config (or a default) that
    points into hyperdiff/assets/ is refused with one line before any training; only a folder named on the command
    line may be there."""
    import yaml

    from hyperdiff.inputs import ASSETS_DIR, check_outside_assets

    before = _shipped_bytes()
    assert before, "nothing shipped to protect"
    run = tmp_path / "run"
    assert train_script.main(["--config", str(ROOT / "configs" / "synthfaces.yaml"), "--max_train_steps", "1",
                              "--train_batch_size", "1", "--output_dir", str(run), "--report_to", "none"]) == 0
    assert (run / "model.safetensors").is_file()
    capsys.readouterr()
    for key in ("export_dir", "output_dir"):
        config = yaml.safe_load(Path(TINY).read_text())
        config[key] = "hyperdiff/assets/synthfaces/hypernet"
        path = tmp_path / f"{key}.yaml"
        path.write_text(yaml.safe_dump(config))
        assert train_script.main(["--config", str(path), "--output_dir" if key == "export_dir" else "--export_dir",
                                  str(tmp_path / "elsewhere")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--{key}" in err[0] and "inside the shipped models" in err[0], err
    sys.path.insert(0, str(SCRIPTS))
    import train_base

    base_config = tmp_path / "base.yaml"
    base_config.write_text("export_dir: hyperdiff/assets/synthfaces/base\n")
    assert train_base.main(["--config", str(base_config), "--output_dir", str(tmp_path / "base")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--export_dir" in err[0] and "inside the shipped models" in err[0], err
    assert not (tmp_path / "base").exists() and not (tmp_path / "elsewhere").exists()
    check_outside_assets(ASSETS_DIR / "synthfaces" / "hypernet", "--export_dir", named=True)  # named: allowed
    assert _shipped_bytes() == before
