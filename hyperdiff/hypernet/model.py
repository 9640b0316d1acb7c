"""HyperNetwork: reference image features → LiDB factors for every layer of a LayerTable.

Contract (DESIGN.md, "HyperNetwork"):
- Attention decoder (default): one query token per LayerTable row (learned, initialised to zero as in the paper) plus
  embeddings of the row's kind (projection × self/cross attention) and depth (its attention module's index in UNet
  order). A transformer decoder lets the tokens attend to the projected image features; K refinement steps:
      θ₀ = 0,   θₖ = θₖ₋₁ + Head(Decoder(Q + Embed(θₖ₋₁), f)),   θ = (A_train (a×r), B_train (r×b)) per layer.
  One head serves all layers (every layer has the same trainable shapes).
- MLP decoder (ablation): mean-pooled features → MLP → all layers' factors at once (K = 1).
- The head part that emits B_train starts at zero (as LoRA zero-initialises B): an untrained hypernet predicts ΔW = 0
  exactly, yet gradients reach B_train's head at once because A_train ≠ 0 (zeroing both would block them).
- `forward(pixels, groups=None)` → (A (B, L, a, r), B (B, L, r, b)); several references of one identity are pooled
  (`pool_references`). `hyper_lora(...)` turns a batch into per-sample processor deltas (differentiable), `predict`
  into Adapters, `sample(images, n, seed)` draws n different adapters: the decoder input (query tokens, or the MLP's
  pooled features) gets seeded Gaussian noise of std `sample_noise` (and dropout stays active when `dropout > 0`), a
  spread that reflects how sensitive the prediction is around the reference.
- `set_gain(g, low_noise=None)` scales every predicted ΔW by g through `alpha` (an output gain calibrated after
  training) and sets `config.low_noise`, the extra gain at low-noise timesteps (`hyperdiff.core.schedule`) that every
  predicted adapter carries into sampling.
- `save_pretrained(dir)`: `config.json` (config, base fingerprint, layer table, training info) + `model.safetensors`
  + `README.md` model card; `from_pretrained(dir, table=None)` checks the fingerprint against `table` when given and
  builds the model on its saved table (the layer order its weights were trained in, whatever order `table` lists);
  `read_config(dir)` reads and checks only the config (no model is built, no weights read).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from hyperdiff.config import from_dict, to_dict
from hyperdiff.core.adapter import Adapter
from hyperdiff.core.files import atomic_path, read_safetensors, write_safetensors
from hyperdiff.core.info import AdapterInfo
from hyperdiff.core.layers import KNOWN_PROJECTIONS, LayerRow, LayerTable
from hyperdiff.core.lidb import LiDBConfig, aux_bases, compose
from hyperdiff.core.processors import HyperLoRA, LowRankDelta
from hyperdiff.core.schedule import LowNoiseGain
from hyperdiff.errors import HyperdiffError, check_positive_int, check_positive_number
from hyperdiff.hypernet.encoders import EncoderConfig, build_image_encoder, pool_references

DECODERS = ("attention", "mlp")
CONFIG_NAME, WEIGHTS_NAME, CARD_NAME = "config.json", "model.safetensors", "README.md"


@dataclass
class HyperNetConfig:
    decoder: str = "attention"
    dim: int = 128
    layers: int = 2
    heads: int = 4
    refine_steps: int = 2
    dropout: float = 0.0
    sample_noise: float = 0.5
    alpha: float = 1.0  # adapter alpha; scale = alpha / rank
    lidb: LiDBConfig = field(default_factory=LiDBConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    low_noise: LowNoiseGain = field(default_factory=LowNoiseGain)  # sampling: ΔW × gain below a timestep

    def __post_init__(self) -> None:
        if self.decoder not in DECODERS:
            raise HyperdiffError(f"`decoder` must be one of {list(DECODERS)}, got {self.decoder!r}")
        for name in ("dim", "layers", "heads", "refine_steps"):
            check_positive_int(name, getattr(self, name))
        if self.dim % self.heads:
            raise HyperdiffError(f"`dim` must be a multiple of `heads` ({self.heads}), got {self.dim}")
        if not 0 <= self.dropout < 1:
            raise HyperdiffError(f"`dropout` must be in [0, 1), got {self.dropout}")
        if self.sample_noise < 0 or self.alpha <= 0:
            raise HyperdiffError(f"`sample_noise` must be ≥ 0 and `alpha` > 0, got {self.sample_noise}, {self.alpha}")
        if self.decoder == "mlp" and self.refine_steps != 1:
            raise HyperdiffError(f"`refine_steps` must be 1 for the mlp decoder, got {self.refine_steps}")

    def to_dict(self) -> dict:
        return to_dict(self)


def _kind_index(row: LayerRow) -> int:
    return KNOWN_PROJECTIONS.index(row.projection) * 2 + (row.attention.endswith("attn2"))


class HyperNetwork(nn.Module):
    def __init__(self, config: HyperNetConfig, table: LayerTable, info: dict | None = None):
        super().__init__()
        self.config, self.table, self.info = config, table, dict(info or {})
        lidb, d = config.lidb, config.dim
        self.n_a, self.n_b = lidb.a * lidb.rank, lidb.rank * lidb.b  # values of A_train, B_train per layer
        n_layers = len(table)
        self.encoder = build_image_encoder(config.encoder)
        self.feature_proj = nn.Linear(self.encoder.dim, d)
        depth = {name: i for i, name in enumerate(table.attention_modules)}
        self.register_buffer("kinds", torch.tensor([_kind_index(r) for r in table]), persistent=False)
        self.register_buffer("depths", torch.tensor([depth[r.attention] for r in table]), persistent=False)
        if config.decoder == "attention":
            self.queries = nn.Parameter(torch.zeros(n_layers, d))  # (L, d), zero-initialised as in the paper
            self.kind_embed = nn.Embedding(2 * len(KNOWN_PROJECTIONS), d)
            self.depth_embed = nn.Embedding(len(depth), d)
            layer = nn.TransformerDecoderLayer(d, config.heads, 4 * d, config.dropout, batch_first=True, norm_first=True)
            self.decoder = nn.TransformerDecoder(layer, config.layers)
            self.embed_theta = nn.Linear(self.n_a + self.n_b, d)
            self.head_a = nn.Linear(d, self.n_a)
            self.head_b = nn.Linear(d, self.n_b)
        else:
            self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Dropout(config.dropout), nn.Linear(4 * d, 4 * d), nn.GELU())
            self.head_a = nn.Linear(4 * d, n_layers * self.n_a)
            self.head_b = nn.Linear(4 * d, n_layers * self.n_b)
        nn.init.zeros_(self.head_b.weight)  # B_train starts at 0: a no-op that still learns
        nn.init.zeros_(self.head_b.bias)

    @property
    def fingerprint(self) -> str:
        return self.table.fingerprint

    # -- prediction ------------------------------------------------------------------------------------------------
    def features(self, pixels: torch.Tensor, groups: Sequence[int] | None = None) -> torch.Tensor:
        f = self.encoder(pixels)  # (Σn, T, d_f)
        if groups is not None:
            f = pool_references(f, groups)  # (B, T, d_f)
        return self.feature_proj(f)  # (B, T, d)

    def forward(
        self, pixels: torch.Tensor, groups: Sequence[int] | None = None, query_noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels (Σn, 3, H, W) (already `preprocess`ed) → A_train (B, L, a, r), B_train (B, L, r, b).
        `query_noise` perturbs the decoder's input: the query tokens (B, L, d) of the attention decoder, the pooled
        features (B, d) of the MLP decoder."""
        lidb = self.config.lidb
        f = self.features(pixels, groups)
        batch, n_layers = f.shape[0], len(self.table)
        if self.config.decoder == "mlp":
            pooled = f.mean(1) if query_noise is None else f.mean(1) + query_noise  # (B, d)
            h = self.mlp(pooled)  # (B, 4d)
            theta_a = self.head_a(h).view(batch, n_layers, self.n_a)
            theta_b = self.head_b(h).view(batch, n_layers, self.n_b)
        else:
            q = self.queries + self.kind_embed(self.kinds) + self.depth_embed(self.depths)  # (L, d)
            q = q.expand(batch, -1, -1)
            if query_noise is not None:
                q = q + query_noise  # (B, L, d)
            theta_a = f.new_zeros(batch, n_layers, self.n_a)
            theta_b = f.new_zeros(batch, n_layers, self.n_b)
            for _ in range(self.config.refine_steps):
                h = self.decoder(q + self.embed_theta(torch.cat([theta_a, theta_b], -1)), f)  # (B, L, d)
                theta_a = theta_a + self.head_a(h)
                theta_b = theta_b + self.head_b(h)
        return theta_a.view(batch, n_layers, lidb.a, lidb.rank), theta_b.view(batch, n_layers, lidb.rank, lidb.b)

    def hyper_lora(self, a_train: torch.Tensor, b_train: torch.Tensor, strength: float = 1.0) -> HyperLoRA:
        """Per-sample processor deltas from batched factors (differentiable): down (B, r, in), up (B, out, r)."""
        lidb = self.config.lidb
        layers = {}
        for i, row in enumerate(self.table):
            a_aux, b_aux = aux_bases(row.name, row.in_features, row.out_features, lidb, a_train.device)
            down, up = compose(a_train[:, i], b_train[:, i], a_aux, b_aux)
            layers[row.name] = LowRankDelta(down, up, self.config.alpha / lidb.rank)
        return HyperLoRA(layers, strength)

    def to_adapters(self, a_train: torch.Tensor, b_train: torch.Tensor, token: str = "sks") -> list[Adapter]:
        info = AdapterInfo(
            base_model=self.info.get("base_model", ""), token=token,
            source=f"hypernet {self.info.get('name', '')} {self.fingerprint}".strip(), architecture=self.table.architecture,
            low_noise=self.config.low_noise,
        )
        return [
            Adapter.from_lidb(
                {row.name: (a_train[b, i].detach().float().cpu(), b_train[b, i].detach().float().cpu()) for i, row in enumerate(self.table)},
                self.table, self.config.lidb, alpha=self.config.alpha, info=info,
            )
            for b in range(a_train.shape[0])
        ]

    @torch.no_grad()
    def predict(self, images, token: str = "sks") -> Adapter:
        """One identity from one or more reference images (PIL list or (n, 3, H, W) tensor in [0, 1])."""
        was = self.training
        self.eval()
        try:
            pixels = self.encoder.preprocess(images).to(self.head_a.weight.device)
            a, b = self(pixels, groups=[pixels.shape[0]])
        finally:
            self.train(was)
        return self.to_adapters(a, b, token)[0]

    @torch.no_grad()
    def sample(self, images, n: int, seed: int = 0, token: str = "sks") -> list[Adapter]:
        """n different adapters for one identity (see the module docstring for where the spread comes from)."""
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise HyperdiffError(f"`n` must be a positive integer, got {n!r}")
        was = self.training
        self.train(self.config.dropout > 0)  # keep dropout active when the model has any
        try:
            device = self.head_a.weight.device
            pixels = self.encoder.preprocess(images).to(device)
            gen = torch.Generator().manual_seed(seed)
            out = []
            for _ in range(n):
                shape = (1, len(self.table), self.config.dim) if self.config.decoder == "attention" else (1, self.config.dim)
                noise = (torch.randn(shape, generator=gen) * self.config.sample_noise).to(device)
                a, b = self(pixels, groups=[pixels.shape[0]], query_noise=noise)
                out += self.to_adapters(a, b, token)
        finally:
            self.train(was)
        return out

    def set_gain(self, gain: float, calibration: dict | None = None, low_noise: LowNoiseGain | None = None) -> None:
        """Scale every predicted ΔW by `gain`, through `alpha` (adapters and their files carry it), and sample them
        with `low_noise` when given; `calibration` (how both were chosen) goes into `info`, hence into config.json."""
        check_positive_number("gain", gain)
        self.config = replace(self.config, alpha=self.config.alpha * gain,
                              low_noise=self.config.low_noise if low_noise is None else low_noise)
        if calibration is not None:
            self.info["calibration"] = calibration

    # -- files -----------------------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"fingerprint": self.fingerprint, "format": "hyperdiff.hypernet/1"}
        write_safetensors(path / WEIGHTS_NAME, {k: v.to(dtype) for k, v in self.state_dict().items()}, meta, "hypernet weights")
        payload = {
            "format": "hyperdiff.hypernet/1",
            "config": self.config.to_dict(),
            "base_fingerprint": self.fingerprint,
            "layer_table": self.table.to_dict(),
            "info": self.info,
        }
        with atomic_path(path / CONFIG_NAME, "hypernet config") as tmp:
            tmp.write_text(json.dumps(payload, indent=2))
        with atomic_path(path / CARD_NAME, "model card") as tmp:
            tmp.write_text(self._model_card())
        return path

    def _model_card(self) -> str:
        c = self.config
        n_params = sum(p.numel() for p in self.parameters())
        training = json.dumps(self.info.get("training", {}), indent=2)
        return (
            f"# hyperdiff hypernetwork\n\nPredicts LiDB adapters (a={c.lidb.a}, b={c.lidb.b}, rank {c.lidb.rank}, "
            f"aux_seed {c.lidb.aux_seed}) for {len(self.table)} attention Linears of the base model "
            f"`{self.info.get('base_model', 'unknown')}` (layer fingerprint `{self.fingerprint}`).\n\n"
            f"- decoder: {c.decoder}, {c.layers} layers, width {c.dim}, {c.heads} heads, K = {c.refine_steps}\n"
            f"- image encoder: {c.encoder.kind} {c.encoder.pretrained}\n- parameters: {n_params:,}\n\n"
            "```python\nfrom hyperdiff import HyperNetwork\nhp = HyperNetwork.from_pretrained(path)\n"
            "adapter = hp.predict([reference_image])\n```\n\n## Training\n\n```json\n" + training + "\n```\n"
        )

    @staticmethod
    def read_config(path: str | Path) -> HyperNetConfig:
        """A saved hypernet's config (architecture, `alpha`, `low_noise`), checked as `from_pretrained` checks it,
        without building the model or reading its weights."""
        return HyperNetwork._read_config_file(Path(path))[0]

    @staticmethod
    def _read_config_file(path: Path) -> tuple[HyperNetConfig, LayerTable, str, dict | None]:
        """(config, saved layer table, base fingerprint, info) from `path`/config.json, every problem one line."""
        if not (path / CONFIG_NAME).is_file():
            raise HyperdiffError(f"hypernet '{path}' has no {CONFIG_NAME}: expected a folder written by save_pretrained")
        try:
            payload = json.loads((path / CONFIG_NAME).read_text())
        except json.JSONDecodeError as e:
            raise HyperdiffError(f"hypernet '{path}/{CONFIG_NAME}' is not valid JSON ({e.msg})") from None
        if not isinstance(payload, dict) or payload.get("format") != "hyperdiff.hypernet/1":
            found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
            raise HyperdiffError(f"hypernet '{path}' has format {found!r}, expected 'hyperdiff.hypernet/1'")
        try:
            config = from_dict(HyperNetConfig, payload["config"], "hypernet config")
            saved = LayerTable.from_dict(payload["layer_table"])
            fingerprint = str(payload["base_fingerprint"])
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            if isinstance(e, HyperdiffError):
                raise HyperdiffError(f"hypernet '{path}/{CONFIG_NAME}': {e}") from None
            raise HyperdiffError(f"hypernet '{path}/{CONFIG_NAME}' is incomplete or malformed ({type(e).__name__}: {e})") from None
        saved.check_fingerprint(fingerprint, f"hypernet '{path}'")
        return config, saved, fingerprint, payload.get("info")

    @classmethod
    def from_pretrained(cls, path: str | Path, table: LayerTable | None = None) -> "HyperNetwork":
        path = Path(path)
        config, saved, fingerprint, info = cls._read_config_file(path)
        if table is not None:
            table.check_fingerprint(fingerprint, f"hypernet '{path}'")
        model = cls(config, saved, info)  # its layer tokens in the order it was trained with; `table` may list them in another
        tensors, _ = read_safetensors(path / WEIGHTS_NAME, "hypernet weights")
        state = model.state_dict()
        missing, extra = sorted(set(state) - set(tensors)), sorted(set(tensors) - set(state))
        wrong = sorted(k for k in set(state) & set(tensors) if tensors[k].shape != state[k].shape)
        if missing or extra or wrong:
            raise HyperdiffError(
                f"hypernet '{path}' weights do not match its config (missing {missing[:1]}, unexpected {extra[:1]}, "
                f"wrong shape {wrong[:1]})"
            )
        model.load_state_dict({k: v.to(state[k].dtype) for k, v in tensors.items()})
        return model.eval()
