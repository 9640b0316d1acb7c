"""scripts/train_base.py end to end on a miniature config: a loadable diffusers folder, and exact resume."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent

MINI = {
    "model": {"image_size": 32, "unet_block_out_channels": [16, 32], "norm_num_groups": 8, "cross_attention_dim": 16,
              "attention_head_dim": 2, "text_hidden_size": 16, "text_layers": 1, "text_heads": 2,
              "vae_block_out_channels": [16, 16], "scheduler": "dpm"},
    "data": {"images": 48, "seed": 0},
    "vae": {"steps": 3, "batch_size": 4, "crop": 16, "warmup_steps": 0},
    "decoder": {"steps": 2, "batch_size": 4, "warmup_steps": 0, "expression_weight": 5.0},
    "unet": {"steps": 6, "batch_size": 4, "warmup_steps": 2, "ema_decay": 0.9, "expression_weight": 10.0,
             "classifier_weight": 0.5, "classifier_max_timestep": 1000},
    "refine": {"steps": 2, "batch_size": 4, "warmup_steps": 0, "pairs": 6, "denoise_steps": 4, "strength": [0.25, 0.5],
               "expression_weight": 5.0},
    "checkpointing_steps": 3,
    "checkpoints_total_limit": 5,
    "report_to": "none",
}


@pytest.fixture(scope="module")
def train_base():
    sys.path.insert(0, str(ROOT / "scripts"))
    import train_base

    return train_base


def _run(train_base, tmp: Path, name: str) -> Path:
    cfg = dict(MINI, output_dir=str(tmp / name), export_dir=str(tmp / name / "export"),
               data=dict(MINI["data"], cache_dir=str(tmp / "cache")))
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert train_base.main(["--config", str(path)]) == 0
    return tmp / name / "export"


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for part in ("unet", "text_encoder", "vae"):
        for k, v in load_file(next((folder / part).glob("*.safetensors"))).items():
            out[f"{part}.{k}"] = v
    return out


EMBEDDING = "text_encoder.embeddings.token_embedding.weight"


def _ids(folder: Path, *words: str) -> list[int]:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    return [tokenizer(w, add_special_tokens=False).input_ids[0] for w in words]


def test_training_exports_a_diffusers_folder_and_resumes_exactly(train_base, tmp_path):
    export = _run(train_base, tmp_path, "full")
    weights = _weights(export)
    assert {v.dtype for k, v in weights.items() if not k.startswith("text_encoder.")} == {torch.float16}  # small
    pipe = StableDiffusionPipeline.from_pretrained(export, local_files_only=True, safety_checker=None)
    image = pipe("a face, smiling, on a red background", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (32, 32, 3)
    assert pipe.vae.config.scaling_factor != 0.18215  # set from the latents' std

    # The last step is checkpointed too (a later run can continue it), its EMA weights being what was exported.
    ema = load_file(tmp_path / "full" / "unet" / "checkpoint-6" / "ema.safetensors")
    assert all(torch.equal(ema[k].half(), v) for k, v in _weights(export).items() if k.startswith("unet."))

    # The decoder stage moved the decoder only: the encoder (hence the cached latents) is stage 1's, and the export
    # carries the fine-tuned decoder.
    from diffusers import AutoencoderKL

    stage1 = AutoencoderKL.from_pretrained(tmp_path / "full" / "vae" / "final").state_dict()
    tuned = AutoencoderKL.from_pretrained(tmp_path / "full" / "decoder" / "final").state_dict()
    assert all(torch.equal(stage1[k], tuned[k]) for k in stage1 if k.startswith(("encoder.", "quant_conv.")))
    assert any(not torch.equal(stage1[k], tuned[k]) for k in stage1 if k.startswith("decoder."))
    # The refine stage (after the UNet) moved the decoder again, from the UNet's own latents, and the export carries
    # that decoder; the encoder is still stage 1's.
    refined = AutoencoderKL.from_pretrained(tmp_path / "full" / "refine" / "final").state_dict()
    assert all(torch.equal(stage1[k], refined[k]) for k in stage1 if k.startswith(("encoder.", "quant_conv.")))
    assert any(not torch.equal(tuned[k], refined[k]) for k in tuned if k.startswith("decoder."))
    exported = {k[len("vae."):]: v for k, v in weights.items() if k.startswith("vae.")}
    assert all(torch.equal(exported[k], refined[k].half()) for k in refined)
    pairs = load_file(tmp_path / "full" / "refine_pairs.safetensors")
    cached = load_file(tmp_path / "full" / "latents.safetensors")["latents"]
    assert pairs["latents"].shape == (6, *cached.shape[1:]) and len(set(pairs["index"].tolist())) == 6

    # The identifier, which no caption names, is exported with its class word's embedding row ("a sks face" starts
    # as "a face face"); `identifier=''` leaves its random row, and nothing else differs.
    sks, face, red = _ids(export, "sks", "face", "red")
    assert torch.equal(weights[EMBEDDING][sks], weights[EMBEDDING][face])
    again = ["--config", str(tmp_path / "full.yaml"), "--export_only"]
    assert train_base.main([*again, "--set", "identifier=''", "--set", f"export_dir={tmp_path / 'keep'}"]) == 0
    kept = _weights(tmp_path / "keep")
    assert all(torch.equal(weights[k], kept[k]) for k in weights if k != EMBEDDING)
    rows = (weights[EMBEDDING] != kept[EMBEDDING]).any(dim=1).nonzero().flatten().tolist()
    assert rows == [sks] and not torch.equal(kept[EMBEDDING][sks], kept[EMBEDDING][face])
    assert train_base.main([*again, "--set", "identifier_class=red", "--set", f"export_dir={tmp_path / 'red'}"]) == 0
    assert torch.equal(_weights(tmp_path / "red")[EMBEDDING][sks], weights[EMBEDDING][red])

    # A run that died after step 3: its VAE, caches and checkpoint-3 are all a new run has; it must finish with the
    # weights of the uninterrupted run (batches are seeded by step; optimizer, schedule and EMA come back). Equal to
    # float rounding, not bit for bit: the first step after a resume already differs by 1 ulp (6e-8) in fp32, which
    # the fp16 export shows as ≤ 1 fp16 ulp; a run that restarted from scratch instead would rewrite checkpoint-3.
    run = tmp_path / "resumed"
    (run / "unet").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "vae", run / "vae")
    shutil.copytree(tmp_path / "full" / "decoder", run / "decoder")  # (the refine stage runs again after the UNet)
    shutil.copy(tmp_path / "full" / "latents.safetensors", run / "latents.safetensors")
    shutil.copytree(tmp_path / "full" / "unet" / "checkpoint-3", run / "unet" / "checkpoint-3")
    assert (run / "unet" / "checkpoint-3" / "ema.safetensors").exists()
    marker = run / "unet" / "checkpoint-3" / "left-by-the-dead-run"
    marker.touch()  # a run that started over would rewrite checkpoint-3 (and drop this file) at its step 3
    resumed = _run(train_base, tmp_path, "resumed")
    assert marker.exists()
    a, b = _weights(export), _weights(resumed)
    assert a.keys() == b.keys()
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) <= 1e-3


def test_init_from_starts_the_unet_stage_from_an_exported_model(train_base, tmp_path, capsys):
    """A run whose UNet stage starts from an export (`unet.init_from`) and exports before any step writes back exactly
    the exported UNet and text encoder; a folder without a UNet is a one-line error."""
    first = _run(train_base, tmp_path, "first")
    cfg = dict(MINI, output_dir=str(tmp_path / "second"), export_dir=str(tmp_path / "second" / "export"),
               data=dict(MINI["data"], cache_dir=str(tmp_path / "cache")), refine=dict(MINI["refine"], steps=0))
    cfg["unet"] = dict(MINI["unet"], init_from=str(first))
    path = tmp_path / "second.yaml"
    path.write_text(yaml.safe_dump(cfg))
    (tmp_path / "second").mkdir()
    shutil.copytree(tmp_path / "first" / "vae", tmp_path / "second" / "vae")  # the same stage-1 VAE, not retrained
    assert train_base.main(["--config", str(path), "--export_only", "--set", "decoder.steps=0"]) == 0
    a, b = _weights(first), _weights(tmp_path / "second" / "export")
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(("unet.", "text_encoder.")))
    capsys.readouterr()
    assert train_base.main(["--config", str(path), "--export_only", "--set", f"unet.init_from={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "`unet.init_from` must be a base-model folder with unet/ and text_encoder/" in err and "\n" not in err
    embedded = ROOT / "hyperdiff" / "assets" / "synthfaces" / "base"  # another architecture than MINI's
    assert train_base.main(["--config", str(path), "--export_only", "--set", "decoder.steps=0",
                            "--set", f"unet.init_from={embedded}"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("train_base: error: `unet.init_from`") and "does not match the configured model" in last, last

    # `unet.init_blend` ends the stage with (1 - blend)·start + blend·trained: here the export of the first run and
    # the EMA weights of the second one's last checkpoint, read back from their files, to within one rounding of the
    # export's dtype (fp16 UNet, fp32 text encoder); a blend weight off by 0.05 fails on the tensors that moved.
    assert train_base.main(["--config", str(path), "--set", "decoder.steps=0"]) == 0
    assert train_base.main(["--config", str(path), "--export_only", "--set", "decoder.steps=0",
                            "--set", "unet.init_blend=0.25", "--set", f"export_dir={tmp_path / 'blend'}"]) == 0
    ema, blended = load_file(tmp_path / "second" / "unet" / "checkpoint-6" / "ema.safetensors"), _weights(tmp_path / "blend")
    sks, face = _ids(first, "sks", "face")

    def close(x, y, k):
        return torch.allclose(x.double(), y.double(), rtol=torch.finfo(a[k].dtype).eps, atol=1e-7)

    def mix(w, k):
        out = a[k].double() * (1 - w) + ema[k].double() * w
        if k == EMBEDDING:
            out[sks] = out[face]  # the identifier's row is its class word's in every export
        return out.to(a[k].dtype)

    assert all(close(blended[k], mix(0.25, k), k) for k in ema)
    for part in ("unet.", "text_encoder."):
        assert all(any(not close(blended[k], mix(w, k), k) for k in ema if k.startswith(part)) for w in (0.2, 0.3))
    assert train_base.main(["--config", str(path), "--export_only", "--set", "unet.init_from=''",
                            "--set", "unet.init_blend=0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("`unet.init_blend` blends with the `unet.init_from` model, which is not set (init_blend 0.5)"), err


def test_classifier_samples_name_their_expression_below_the_timestep_limit():
    """`training_caption` says which scene axes its caption names (read back here from the caption's own clauses),
    and the classifier term takes the samples whose caption names the expression, below the timestep limit."""
    from hyperdiff import synthfaces as sf
    from hyperdiff.synthfaces.base_model.config import DataConfig, UNetStageConfig
    from hyperdiff.synthfaces.base_model.data import training_caption
    from hyperdiff.synthfaces.base_model.unet import _classifier_samples

    gen, data = torch.Generator().manual_seed(0), DataConfig(clause_dropout=0.5, caption_dropout=0.2)
    seen = set()
    for k in range(200):
        scene = sf.Scene(sf.BACKGROUNDS[k % 6], k % 2 == 0, sf.EXPRESSIONS[k % 4])
        caption, named = training_caption(scene, gen, data)
        clauses = caption.split(", ")
        said = {"expression": scene.expression in clauses, "hat": "wearing a hat" in clauses,
                "background": f"on a {scene.background} background" in clauses}
        assert named == {axis for axis, yes in said.items() if yes}, (caption, named)
        seen.add(named)
    assert frozenset() in seen and frozenset({"expression", "hat", "background"}) in seen and len(seen) == 8

    named = [frozenset({"expression", "background"}), frozenset({"hat", "background"}), frozenset(),
             frozenset({"expression"}), frozenset({"expression", "hat"}), frozenset({"expression"})]
    t = torch.tensor([10, 10, 10, 999, 499, 100])
    stage = UNetStageConfig(classifier_weight=1.0, classifier_samples=8, classifier_max_timestep=500)
    assert _classifier_samples(named, t, stage).tolist() == [0, 4, 5]
    stage = UNetStageConfig(classifier_weight=1.0, classifier_samples=2, classifier_max_timestep=1000)
    assert _classifier_samples(named, t, stage).tolist() == [0, 3]


def test_expression_classifier_loss_reads_the_decoded_estimate_like_the_encoder_reads_the_image():
    """Given the exact noise, x̂₀ is the clean latent, so the term is the cross-entropy of the shipped encoder's
    expression probabilities (its public `classify`) on the decoded latent; the named expressions score lower than
    shifted ones, and gradients reach the prediction."""
    from diffusers import DDPMScheduler

    from hyperdiff import synthfaces as sf
    from hyperdiff.personalize.losses import encode_images, frozen_identity_encoder
    from hyperdiff.synthfaces.encoder import IdentityEncoder
    from hyperdiff.models import load_base
    from hyperdiff.synthfaces.base_model.unet import expression_classifier_loss

    pipe = load_base()
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    identity = sf.Identity.from_seed(1_000_003)
    images = [sf.render(identity, sf.Scene("gray", False, e), 64) for e in sf.EXPRESSIONS]
    wanted = torch.arange(len(sf.EXPRESSIONS))
    latents = encode_images(pipe, images)  # (4, C, h, w)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([50, 200, 400, 600])
    pred = noise.clone().requires_grad_(True)
    classifier = frozen_identity_encoder("", "cpu")
    loss = expression_classifier_loss(pipe.vae, sched, classifier, latents, noise, t, pred, wanted)
    with torch.no_grad():
        decoded = pipe.image_processor.postprocess(pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample,
                                                   output_type="pil")
    probs = IdentityEncoder.from_pretrained().classify(decoded)["expression"]  # (4, 4)
    expected = -probs[wanted, wanted].log().mean().item()
    assert abs(loss.item() - expected) < 0.02, (loss.item(), expected)
    shifted = expression_classifier_loss(pipe.vae, sched, classifier, latents, noise, t, pred.detach(), wanted.roll(1))
    assert shifted.item() > loss.item() + 1.0
    loss.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_expression_map_marks_where_expressions_differ():
    """With an 'encoder' that average-pools pixels into 4x4 cells, the map is the pixel spread over expressions, pooled:
    zero where no expression changes a pixel (the corners, which the face never covers), largest on the face."""
    from types import SimpleNamespace

    from hyperdiff.synthfaces.encoder import IdentityEncoderConfig
    from hyperdiff.synthfaces.base_model.data import expression_map

    class PoolingVAE:
        def encode(self, x):  # (E, 3, 64, 64) in [-1, 1] → (E, 3, 16, 16)
            return SimpleNamespace(latent_dist=SimpleNamespace(mean=torch.nn.functional.avg_pool2d(x, 4)))

    m = expression_map(PoolingVAE(), 64, identities=8)
    assert m.shape == (16, 16) and float(m.max()) == 1.0
    assert float(m[0, 0]) == float(m[0, -1]) == float(m[-1, 0]) == float(m[-1, -1]) == 0.0
    row, col = divmod(int(m.argmax()), 16)
    assert 4 <= row <= 12 and 4 <= col <= 11  # on the face: eyes, brows or mouth

    # vae None: the same spread in pixels (the decoder stage's loss weight), zero at the corners, largest inside the
    # identity encoder's expression crop (brows, eyes, mouth)
    p = expression_map(None, 64, identities=8)
    assert p.shape == (64, 64) and float(p.max()) == 1.0
    assert float(p[0, 0]) == float(p[0, -1]) == float(p[-1, 0]) == float(p[-1, -1]) == 0.0
    row, col = divmod(int(p.argmax()), 64)
    top, bottom, left, right = IdentityEncoderConfig().expression_crop
    assert top <= row < bottom and left <= col < right
    assert float(p[:8].max()) < 0.05 and float(p[:, :8].max()) < 0.05  # the background never changes


def test_generated_pairs_are_the_unets_img2img_of_each_render(tmp_path):
    """A pair's latent is its own render's latent re-noised and denoised: at strength 1/denoise_steps (one step from
    barely noised) it stays near that latent, and far nearer than at strength 1 (pure noise, the render forgotten)."""
    from accelerate import Accelerator

    from hyperdiff.config import from_dict
    from hyperdiff import synthfaces as sf
    from hyperdiff.models.tiny import tiny_components
    from hyperdiff.synthfaces.base_model.config import BaseTrainConfig
    from hyperdiff.synthfaces.base_model.data import _scene_index
    from hyperdiff.synthfaces.base_model.vae import generated_pairs

    def config(strength: float) -> BaseTrainConfig:
        return from_dict(BaseTrainConfig, {"model": MINI["model"], "output_dir": str(tmp_path / str(strength)), "refine": {
            "steps": 1, "pairs": 6, "denoise_steps": 20, "strength": [strength, strength]}})

    parts = tiny_components(0, config(1.0).model)
    size = parts["unet"].config.sample_size
    scenes = torch.tensor([_scene_index(sf.Scene(b, False, "smiling")) for b in sf.BACKGROUNDS])  # (6, 3)
    latents = torch.randn(6, 4, size, size, generator=torch.Generator().manual_seed(1))
    parts["vae"].register_to_config(scaling_factor=1.0)
    gaps = {}
    for strength in (0.05, 1.0):
        cfg = config(strength)
        index, made = generated_pairs(cfg, Accelerator(cpu=True), parts["vae"], parts["unet"], parts["text_encoder"],
                                      parts["tokenizer"], latents, scenes)
        assert sorted(index.tolist()) == list(range(6)) and made.shape == latents.shape
        gaps[strength] = float((made - latents[index]).pow(2).mean())
        again = generated_pairs(cfg, Accelerator(cpu=True), None, None, None, None, latents, scenes)  # the cache
        assert torch.equal(again[1], made)
    assert gaps[0.05] < 0.1 * gaps[1.0], gaps


def test_bad_config_is_one_line(train_base, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"vae": {"steps": 0}}))
    assert train_base.main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train_base: error:") and "`steps` must be a positive integer, got 0" in err and "\n" not in err
    assert train_base.main(["--config", str(path), "--set", "vae.steps=3", "--set", "identifier_class=dog"]) == 2
    err = capsys.readouterr().err.strip()
    assert "`identifier_class` must be a word of the model's vocabulary (`model.words`, one token each), got 'dog'" in err
    assert "\n" not in err
    for strength in ([0.6, 0.3], [0.01, 0.5], "high"):  # backwards; under one step of 20; not a range
        assert train_base.main(["--config", str(path), "--set", "vae.steps=3", "--set", f"refine.strength={strength}"]) == 2
        err = capsys.readouterr().err.strip()
        assert "`refine.strength` must be a range [low, high]" in err and "\n" not in err, err
