"""The hypernetwork: image encoders and the attention (or MLP) decoder that predicts LiDB factors."""

from hyperdiff.hypernet.encoders import EncoderConfig, build_image_encoder, pool_references
from hyperdiff.hypernet.model import HyperNetConfig, HyperNetwork

__all__ = ["EncoderConfig", "HyperNetConfig", "HyperNetwork", "build_image_encoder", "pool_references"]
