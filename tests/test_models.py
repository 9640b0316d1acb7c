"""Tests for hyperdiff.models: offline tiny pipelines, the offline tokenizer, real-base UNet configs, load_base."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import Attention
from safetensors.torch import save_file
from transformers import CLIPTokenizer

from hyperdiff.errors import HyperdiffError
from hyperdiff.models import (
    DEFAULT_WORDS,
    TinyPipelineConfig,
    build_tokenizer,
    build_unet,
    load_base,
    tiny_pipeline,
    unet_config,
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionPipeline:
    return tiny_pipeline(seed=0)


def _generate(pipe: StableDiffusionPipeline, seed: int = 0) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    return pipe("a sks face", num_inference_steps=2, generator=generator, output_type="np").images


def _state(pipe: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    out = {}
    for name in ("unet", "vae", "text_encoder"):
        out.update({f"{name}.{k}": v for k, v in getattr(pipe, name).state_dict().items()})
    return out


# --- tiny_pipeline ---------------------------------------------------------------------------------------------------


def test_tiny_pipeline_is_deterministic_and_leaves_global_rng(pipe: StableDiffusionPipeline) -> None:
    before = torch.random.get_rng_state()
    same, other = tiny_pipeline(seed=0), tiny_pipeline(seed=1)
    assert torch.equal(before, torch.random.get_rng_state())
    a, b, c = _state(pipe), _state(same), _state(other)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    for module in ("unet.", "vae.", "text_encoder."):
        assert any(not torch.equal(a[k], c[k]) for k in a if k.startswith(module)), module


def test_tiny_pipeline_shape(pipe: StableDiffusionPipeline) -> None:
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    names = [n for n, m in pipe.unet.named_modules() if isinstance(m, Attention)]
    assert any(n.endswith("attn1") for n in names) and any(n.endswith("attn2") for n in names)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.scheduler.config.prediction_type == "epsilon"


def test_tiny_pipeline_generates_deterministically(pipe: StableDiffusionPipeline) -> None:
    image = _generate(pipe)
    assert image.shape == (1, 32, 32, 3)
    assert np.isfinite(image).all()
    np.testing.assert_array_equal(image, _generate(tiny_pipeline(seed=0)))
    assert not np.array_equal(image, _generate(pipe, seed=1))


def test_tiny_pipeline_bigger_config_and_dpm() -> None:
    cfg = TinyPipelineConfig(image_size=64, vae_block_out_channels=(32, 32, 64), scheduler="dpm")
    p = tiny_pipeline(seed=3, config=cfg)
    assert type(p.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert p.unet.config.sample_size == 16
    assert _generate(p).shape == (1, 64, 64, 3)
    assert TinyPipelineConfig(**cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"image_size": 0}, "`image_size` must be a positive integer, got 0"),
        ({"scheduler": "euler"}, "`scheduler` must be one of 'ddim', 'dpm', got 'euler'"),
        ({"text_hidden_size": 64}, "`text_hidden_size` must equal `cross_attention_dim`"),
        ({"unet_block_out_channels": (32, 48)}, "multiples of `norm_num_groups`"),
        ({"image_size": 30}, "`image_size` must be a multiple"),
    ],
)
def test_tiny_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(HyperdiffError, match=match):
        TinyPipelineConfig(**kwargs)


def test_tiny_pipeline_dtype() -> None:
    p = tiny_pipeline(seed=0, dtype=torch.bfloat16)
    assert p.unet.dtype == p.vae.dtype == p.text_encoder.dtype == torch.bfloat16


# --- tokenizer -------------------------------------------------------------------------------------------------------


def test_tokenizer_words_are_single_tokens(pipe: StableDiffusionPipeline) -> None:
    tok = pipe.tokenizer
    assert isinstance(tok, CLIPTokenizer) and tok.model_max_length == 77
    for word in DEFAULT_WORDS + ("sks",):
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    ids = tok("a sks face").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == 5


def test_tokenizer_vocab_covers_all_bytes(pipe: StableDiffusionPipeline) -> None:
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = pipe.tokenizer.get_vocab()
    for char in ByteLevel.alphabet():
        assert char in vocab and char + "</w>" in vocab
    assert "<|startoftext|>" in vocab and "<|endoftext|>" in vocab


def test_tokenizer_unseen_text_round_trips(pipe: StableDiffusionPipeline) -> None:
    tok = pipe.tokenizer
    for text in ("Zebra ünïcode 東京", "zebra-123 ünïcode"):
        ids = tok(text).input_ids
        assert tok.unk_token_id not in ids[1:-1]
        decoded = tok.decode(ids, skip_special_tokens=True)
        # CLIP decoding puts a space after every pre-token ("zebra-123" -> "zebra - 1 2 3"), as real CLIP does
        assert decoded.replace(" ", "") == text.lower().replace(" ", "")
    assert tok.decode(tok("Zebra ünïcode").input_ids, skip_special_tokens=True) == "zebra ünïcode"


def test_tokenizer_is_reproducible_and_saves(tmp_path) -> None:
    tok = build_tokenizer()
    assert tok.get_vocab() == build_tokenizer().get_vocab()
    tok.save_pretrained(tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    text = "a photo of sks person wearing a red hat, zebra-123 ünïcode!"
    assert loaded(text).input_ids == tok(text).input_ids
    assert loaded.model_max_length == 77 and len(loaded) == len(tok)


def test_tokenizer_custom_words_and_errors() -> None:
    tok = build_tokenizer(("hyperdream", "sks", "Zürich"), model_max_length=16)
    assert tok.model_max_length == 16
    for word in ("hyperdream", "zürich"):
        assert len(tok(word, add_special_tokens=False).input_ids) == 1
    with pytest.raises(HyperdiffError, match="one word"):
        build_tokenizer(("two words",))
    with pytest.raises(HyperdiffError, match="not one string"):
        build_tokenizer("face")


# --- real-base configs ---------------------------------------------------------------------------------------------


def test_unet_config_sd15_on_meta() -> None:
    unet = build_unet("sd15")
    assert next(unet.parameters()).device.type == "meta"
    assert abs(sum(p.numel() for p in unet.parameters()) - 859.52e6) < 0.1e6
    assert sum(isinstance(m, Attention) for m in unet.modules()) == 32
    assert unet.config.cross_attention_dim == 768


def test_unet_config_sd21_and_fresh_dicts() -> None:
    cfg = unet_config("sd21")
    assert cfg["cross_attention_dim"] == 1024 and cfg["use_linear_projection"] is True
    assert cfg["sample_size"] == 96
    cfg["cross_attention_dim"] = 1
    assert unet_config("sd21")["cross_attention_dim"] == 1024
    unet = build_unet("sd21")
    assert sum(isinstance(m, Attention) for m in unet.modules()) == 32
    assert unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.in_features == 1024


def test_unet_config_unknown_name() -> None:
    with pytest.raises(HyperdiffError, match=r"^`name` must be one of 'sd15', 'sd21', got 'x'$"):
        unet_config("x")


def test_build_pipeline_and_clip_vision_have_the_published_parameter_counts() -> None:
    """The counts of runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1 and laion/CLIP-ViT-H-14's
    image tower (with its projection), built on the meta device."""
    from hyperdiff.models.configs import build_clip_vision, build_pipeline

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    for name, counts, prediction in [("sd15", (859_520_964, 83_653_863, 123_060_480), "epsilon"),
                                     ("sd21", (865_910_724, 83_653_863, 340_387_840), "v_prediction")]:
        pipe = build_pipeline(name)
        assert (count(pipe.unet), count(pipe.vae), count(pipe.text_encoder)) == counts, name
        assert pipe.scheduler.config.prediction_type == prediction and pipe.vae_scale_factor == 8
    vision, processor = build_clip_vision("clip-vit-h-14")
    assert count(vision) == 632_076_800 and processor.crop_size == {"height": 224, "width": 224}
    with pytest.raises(HyperdiffError, match=r"^`name` must be one of 'clip-vit-h-14', 'clip-vit-l-14', got 'vit'$"):
        build_clip_vision("vit")


def test_build_unet_cpu_seeded() -> None:
    cfg = tiny_pipeline(seed=0).unet.config
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    a, b = build_unet(cfg, device="cpu", seed=5), build_unet(cfg, device="cpu", seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# --- load_base -------------------------------------------------------------------------------------------------------


def _one_line_error(source, **kwargs) -> str:
    with pytest.raises(HyperdiffError) as info:
        load_base(source, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert info.value.__suppress_context__ or info.value.__context__ is None
    return message


def test_load_base_round_trips_a_saved_pipeline(pipe: StableDiffusionPipeline, tmp_path) -> None:
    pipe.save_pretrained(tmp_path / "base")
    assert not list((tmp_path / "base").rglob("*.bin"))
    loaded = load_base(tmp_path / "base")
    assert loaded.safety_checker is None
    np.testing.assert_array_equal(_generate(loaded), _generate(pipe))
    assert loaded.tokenizer("a sks face").input_ids == pipe.tokenizer("a sks face").input_ids
    assert load_base(str(tmp_path / "base"), dtype=torch.bfloat16).unet.dtype == torch.bfloat16


def test_load_base_default_is_the_embedded_base_in_fp32_on_cpu() -> None:
    pipe = load_base()
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64  # the SynthFaces base, not a test model
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32  # shipped fp16, CPU computes fp32


def test_load_base_errors(tmp_path) -> None:
    missing = tmp_path / "nope"
    assert _one_line_error(str(missing)) == f"`base` path {str(missing)!r} does not exist"
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not really a pickle")
    assert "pickle" in _one_line_error(ckpt)
    assert "no model_index.json" in _one_line_error(tmp_path)
    other = tmp_path / "model.onnx"
    other.write_bytes(b"x")
    assert ".safetensors" in _one_line_error(other)


def test_load_base_unreachable_hub_id() -> None:
    message = _one_line_error("hyperdiff-tests/no-such-model-7f3a")
    assert message == (
        "base 'hyperdiff-tests/no-such-model-7f3a' could not be loaded: the Hugging Face hub is unreachable and it is "
        "not in the local cache (pass a local folder or a .safetensors file)"
    )


def test_load_base_single_file_errors(tmp_path) -> None:
    not_sd = tmp_path / "weights.safetensors"
    save_file({"x": torch.zeros(2)}, not_sd)
    assert "not a Stable Diffusion checkpoint" in _one_line_error(not_sd)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"hello")
    assert "not a readable .safetensors file" in _one_line_error(garbage)
    # An SD1-looking checkpoint reaches diffusers' from_single_file, which needs its config from the (offline) hub.
    sd_like = tmp_path / "sd.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}, sd_like)
    assert "its diffusers config is not in the local cache" in _one_line_error(sd_like)


def test_load_base_single_file_uses_from_single_file(pipe, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake(cls, path, **kwargs):
        calls.append((path, kwargs))
        return tiny_pipeline(seed=0)

    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file", classmethod(fake))
    ckpt = tmp_path / "sd.safetensors"
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(1)}, ckpt)
    loaded = load_base(ckpt)
    assert calls and calls[0][0] == str(ckpt) and calls[0][1]["local_files_only"] is True
    assert loaded.safety_checker is None
