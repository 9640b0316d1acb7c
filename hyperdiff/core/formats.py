"""Adapter files: hyperdiff's native format and the LoRA formats other tools load.

Contract (DESIGN.md, "Files"; REFERENCES.md, "File formats"):
- Native `.safetensors`: tensors `"<layer>.down"`/`".up"` (kind `lora`) or `"<layer>.A_train"`/`".B_train"`
  (kind `lidb`); string metadata `hyperdiff.format_version`, `.kind`, `.rank`, `.alpha`, `.aux_seed`,
  `.base_fingerprint`, `.base_model`, `.token`, `.source`, `.targets` (JSON), `.layers` (JSON
  `{attention module: {projection: [in, out]}}`, the dims a LiDB file needs to regenerate its aux bases),
  `.low_noise` (JSON `{"gain", "below"}` and `"off_from"` when set, `hyperdiff.core.schedule`; absent in older files: no
  low-noise gain), `.rank_schedules` (JSON `[[rank count, schedule], ...]`, only when the adapter has them) and
  `modelspec.*`. The same adapter gives the same tensors and metadata (safetensors orders the header itself).
- `diffusers`: exactly what `StableDiffusionPipeline.save_lora_weights` writes (diffusers itself writes it):
  `unet.<layer>.lora.down.weight`/`.lora.up.weight` and `lora_adapter_metadata` (the PEFT `LoraConfig`, so
  `lora_alpha` survives `load_lora_weights`), plus `modelspec.*` and `hyperdiff.*` provenance metadata.
- `kohya`: `lora_unet_<layer with . → _>.lora_down.weight`/`.lora_up.weight`/`.alpha` (scalar), `ss_*` and
  `modelspec.*` metadata (and `hyperdiff.*` provenance); loaded by A1111, ComfyUI and diffusers' non-diffusers
  LoRA conversion.
- A LoRA file applies ΔW at one strength: exporting an adapter with an active low-noise gain warns that the
  export samples as the adapter without it unless diffusers is given the schedule (`hyperdiff.low_noise` in its
  provenance says what it is: `file_schedule(path)`). An adapter whose rank parts have their own schedules exports
  one file per part (`export_parts`: `<name>-part1`, `-part2`, …), each with its own.
- All writes are atomic (temp file + rename); all reads are safetensors; a bad file is a one-line
  `HyperdiffError` that names the file and the problem.
- `digest(adapter)`: a short hex hash of what the adapter computes (kind, alpha, LiDB config, every factor's values),
  equal for equal adapters on every machine; `file_name(adapter, format)` =
  `hyperdiff-<token>-<digest>-<format>.safetensors`; `write(adapter, folder, format)` writes that file in `folder`
  in any of `FILE_FORMATS` (native, diffusers, kohya).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
import shutil
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from hyperdiff.core.files import check_writable, make_parent, read_header, read_safetensors, write_safetensors
from hyperdiff.core.info import AdapterInfo
from hyperdiff.core.layers import TargetConfig
from hyperdiff.core.lidb import LiDBConfig
from hyperdiff.core.schedule import LowNoiseGain
from hyperdiff.errors import HyperdiffError

FORMAT_VERSION = "1"
EXPORT_FORMATS = ("diffusers", "kohya")
FILE_FORMATS = ("native", *EXPORT_FORMATS)
_SUFFIXES = {"lora": ("down", "up"), "lidb": ("A_train", "B_train")}
_KOHYA_VERSION = {"stable-diffusion-v1": "sd_v1", "stable-diffusion-v2": "sd_v2"}


def _modelspec(adapter, title: str) -> dict[str, str]:
    info = adapter.info
    spec = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{info.architecture}/lora",
        "modelspec.implementation": "hyperdiff",
        "modelspec.title": title,
        "modelspec.prediction_type": info.prediction_type,
    }
    if info.resolution:
        spec["modelspec.resolution"] = info.resolution
    if info.token:
        spec["modelspec.trigger_phrase"] = info.token
    return spec


def _provenance(adapter, exported_as: str) -> dict[str, str]:
    """What an export says of where it came from (no format version: it is not a native adapter)."""
    keys = ("kind", "rank", "alpha", "base_fingerprint", "base_model", "token", "source", "low_noise")
    native = _hyperdiff_metadata(adapter)
    return {f"hyperdiff.{k}": native[f"hyperdiff.{k}"] for k in keys} | {"hyperdiff.exported_as": exported_as}


def _hyperdiff_metadata(adapter) -> dict[str, str]:
    return {
        "hyperdiff.format_version": FORMAT_VERSION,
        "hyperdiff.kind": adapter.kind,
        "hyperdiff.rank": str(adapter.rank),
        "hyperdiff.alpha": repr(adapter.alpha),
        "hyperdiff.aux_seed": str(adapter.lidb.aux_seed) if adapter.lidb else "",
        "hyperdiff.base_fingerprint": adapter.fingerprint,
        "hyperdiff.base_model": adapter.info.base_model,
        "hyperdiff.token": adapter.info.token,
        "hyperdiff.source": adapter.info.source,
        "hyperdiff.architecture": adapter.info.architecture,
        "hyperdiff.targets": json.dumps(adapter.targets.to_dict(), separators=(",", ":")),
        "hyperdiff.layers": json.dumps(_nest_dims(adapter.dims), separators=(",", ":")),
        "hyperdiff.low_noise": json.dumps(adapter.info.low_noise.to_dict(), separators=(",", ":")),
    } | ({"hyperdiff.rank_schedules": _rank_schedules_json(adapter.info)} if adapter.info.rank_schedules else {})


def _rank_schedules_json(info) -> str:
    return json.dumps([[k, s.to_dict()] for k, s in info.rank_schedules], separators=(",", ":"))


def _nest_dims(dims) -> dict:
    """`{"<attn>.to_q": (i, o)}` → `{"<attn>": {"to_q": [i, o]}}`: the same names, a third of the header bytes."""
    nested: dict[str, dict[str, list[int]]] = {}
    for name, (n_in, n_out) in dims.items():
        attention, projection = name.split(".to_", 1)
        nested.setdefault(attention, {})["to_" + projection] = [n_in, n_out]
    return nested


def _flat_dims(nested: dict) -> dict[str, tuple[int, int]]:
    return {f"{attn}.{proj}": (int(i), int(o)) for attn, projs in nested.items() for proj, (i, o) in projs.items()}


# -- native ------------------------------------------------------------------------------------------------
def save_native(adapter, path: str | Path) -> Path:
    first, second = _SUFFIXES[adapter.kind]
    tensors = {}
    for name, (a, b) in adapter.factors.items():
        tensors[f"{name}.{first}"] = a
        tensors[f"{name}.{second}"] = b
    title = f"hyperdiff adapter ({adapter.info.token})" if adapter.info.token else "hyperdiff adapter"
    return write_safetensors(path, tensors, _hyperdiff_metadata(adapter) | _modelspec(adapter, title))


def _meta(meta: dict, key: str, path: Path, parse=str, expected: str = "a value"):
    value = meta.get(f"hyperdiff.{key}")
    if value is None:
        raise HyperdiffError(f"adapter file '{path}' has no 'hyperdiff.{key}' metadata")
    try:
        return parse(value)
    except (ValueError, TypeError, HyperdiffError):
        raise HyperdiffError(f"adapter file '{path}' has 'hyperdiff.{key}' = {value!r}, expected {expected}") from None


def _low_noise(meta: dict, path: Path) -> LowNoiseGain:
    if "hyperdiff.low_noise" not in meta:  # written before the field existed
        return LowNoiseGain()

    def parse(text: str) -> LowNoiseGain:
        return _schedule(json.loads(text))

    return _meta(meta, "low_noise", path, parse, 'JSON {"gain": number > 0, "below": timestep in [0, 1000]} and '
                 'optionally "off_from": timestep in [below, 1000]')


def file_schedule(path: str | Path) -> LowNoiseGain:
    """The schedule a hyperdiff file says its ΔW samples with (`hyperdiff.low_noise`, native or exported; one
    strength for files without it), for `schedule.diffusers_schedule`. A native adapter whose parts have their own
    schedules has no single one: export it part by part (`Adapter.export_parts`, `hyperdiff export --split`)
    and read each part's file."""
    path = Path(path)
    meta = dict(read_header(path, "LoRA file").get("__metadata__") or {})
    if "hyperdiff.rank_schedules" in meta:
        raise HyperdiffError(f"adapter file '{path}' gives its rank parts their own schedules, so it has no single one; "
                             "expected one file per part (`hyperdiff export --split`)")
    return _low_noise(meta, path)


def _schedule(value) -> LowNoiseGain:
    """A schedule's JSON object: "gain" and "below", and "off_from" when set."""
    if not isinstance(value, dict) or set(value) - {"off_from"} != {"gain", "below"}:
        raise ValueError(value)
    return LowNoiseGain(**value)


def _rank_schedules(meta: dict, path: Path) -> tuple:
    if "hyperdiff.rank_schedules" not in meta:  # one schedule for the whole adapter
        return ()

    def parse(text: str) -> tuple:
        value = json.loads(text)
        if not isinstance(value, list) or not value:
            raise ValueError(text)
        out = []
        for item in value:
            if not (isinstance(item, list) and len(item) == 2):
                raise ValueError(text)
            out.append((item[0], _schedule(item[1])))
        return tuple(out)

    return _meta(meta, "rank_schedules", path, parse,
                 'a JSON list of [rank count, {"gain", "below"[, "off_from"]}] pairs')


def read_native(path: str | Path) -> tuple[dict, int]:
    """A native file, read and checked: (the `Adapter` constructor's keyword arguments, the rank it says it has);
    `Adapter.load` builds the adapter and checks that its tensors have that rank."""
    path = Path(path)
    tensors, meta = read_safetensors(path)
    if "hyperdiff.format_version" not in meta:
        exported = meta.get("hyperdiff.exported_as")
        hint = f" (it is a {exported} LoRA export; load the native adapter it was exported from)" if exported else ""
        raise HyperdiffError(f"adapter file '{path}' is not a hyperdiff adapter: no 'hyperdiff.format_version' metadata{hint}")
    version = meta["hyperdiff.format_version"]
    if version != FORMAT_VERSION:
        raise HyperdiffError(f"adapter file '{path}' has format version {version!r}, this hyperdiff reads {FORMAT_VERSION!r}")
    kind = _meta(meta, "kind", path)
    if kind not in _SUFFIXES:
        raise HyperdiffError(f"adapter file '{path}' has kind {kind!r}, expected one of {list(_SUFFIXES)}")
    rank = _meta(meta, "rank", path, int, "an integer")
    alpha = _meta(meta, "alpha", path, float, "a number")
    dims = _meta(meta, "layers", path, lambda v: _flat_dims(json.loads(v)), "a JSON object of layer dims")
    targets = _meta(meta, "targets", path, lambda v: TargetConfig(**json.loads(v)), "a JSON target config")
    first, second = _SUFFIXES[kind]
    expected = {f"{n}.{s}" for n in dims for s in (first, second)}
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing:
        raise HyperdiffError(f"adapter file '{path}' is missing {len(missing)} tensors, e.g. '{missing[0]}'")
    if extra:
        raise HyperdiffError(f"adapter file '{path}' has {len(extra)} unexpected tensors, e.g. '{extra[0]}'")
    factors = {n: (tensors[f"{n}.{first}"], tensors[f"{n}.{second}"]) for n in dims}
    lidb = None
    if kind == "lidb":
        a_train, b_train = next(iter(factors.values()))
        aux_seed = _meta(meta, "aux_seed", path, int, "an integer")
        try:
            lidb = LiDBConfig(rank=rank, a=a_train.shape[0], b=b_train.shape[-1], aux_seed=aux_seed)
        except (HyperdiffError, IndexError) as e:
            raise HyperdiffError(f"adapter file '{path}': {e}") from None
    info = AdapterInfo(
        base_model=meta.get("hyperdiff.base_model", ""),
        token=meta.get("hyperdiff.token", ""),
        source=meta.get("hyperdiff.source", ""),
        architecture=meta.get("hyperdiff.architecture", "hyperdiff-custom"),
        resolution=meta.get("modelspec.resolution", ""),
        prediction_type=meta.get("modelspec.prediction_type", "epsilon"),
        low_noise=_low_noise(meta, path),
    )
    try:
        info = replace(info, rank_schedules=_rank_schedules(meta, path))
    except HyperdiffError as e:
        raise HyperdiffError(f"adapter file '{path}': {e}") from None
    fields = dict(kind=kind, factors=factors, dims=dims, alpha=alpha, fingerprint=_meta(meta, "base_fingerprint", path),
                  targets=targets, lidb=lidb, info=info)
    return fields, rank


# -- exports -----------------------------------------------------------------------------------------------
def export(adapter, path: str | Path, format: str) -> Path:
    if format not in EXPORT_FORMATS:
        raise HyperdiffError(f"`format` must be one of {list(EXPORT_FORMATS)}, got {format!r}")
    path = Path(path)
    check_writable(path, "export file")
    if path.suffix != ".safetensors":
        raise HyperdiffError(f"export path '{path}' must end with .safetensors")
    if adapter.info.scheduled:
        told = ("unless diffusers is given it (`hyperdiff.schedule.diffusers_schedule`)" if not adapter.info.rank_schedules
                else "(one LoRA weight per step cannot give its parts their own schedules: export one file per part with "
                "`hyperdiff export --split` or `Adapter.split_by_schedule`, and sample them with "
                "`hyperdiff.schedule.diffusers_schedule`)")
        warnings.warn(f"a {format} LoRA file applies ΔW at one strength: '{path.name}' samples without this adapter's "
                      f"low-noise schedule ({adapter.info.describe_schedule()}) {told}", stacklevel=2)
    return (export_diffusers if format == "diffusers" else export_kohya)(adapter, path)


def export_parts(adapter, path: str | Path, format: str) -> list[Path]:
    """One LoRA file per schedule part (`Adapter.split_by_schedule`): `path`'s name + `-part1`, `-part2`, … before
    its suffix; returns their paths."""
    path = Path(path)
    return [export(part, path.with_name(f"{path.stem}-part{i}{path.suffix}"), format)
            for i, part in enumerate(adapter.split_by_schedule(), 1)]


def peft_config(adapter) -> dict:
    """The PEFT `LoraConfig` (as a dict) under which diffusers rebuilds this adapter's scale alpha / rank."""
    from peft import LoraConfig

    config = LoraConfig(r=adapter.rank, lora_alpha=adapter.alpha, target_modules=sorted(adapter.factors))
    return json.loads(json.dumps(config.to_dict(), default=lambda o: sorted(o) if isinstance(o, set) else str(o)))


def export_diffusers(adapter, path: Path) -> Path:
    from diffusers import StableDiffusionPipeline

    layers = {}
    for name, (down, up) in adapter.lora_factors().items():
        layers[f"{name}.lora.down.weight"] = down.contiguous()  # (r, in)
        layers[f"{name}.lora.up.weight"] = up.contiguous()  # (out, r)
    workdir = Path(tempfile.mkdtemp(prefix=".hyperdiff-export-", dir=make_parent(path, "export file").parent))
    try:  # diffusers writes its own format; hyperdiff adds metadata and moves it into place atomically
        StableDiffusionPipeline.save_lora_weights(
            workdir, unet_lora_layers=layers, unet_lora_adapter_metadata=peft_config(adapter), weight_name=path.name
        )
        tensors, meta = read_safetensors(workdir / path.name, "diffusers LoRA file")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return write_safetensors(path, tensors, meta | _provenance(adapter, "diffusers") | _modelspec(adapter, path.stem), "export file")


def export_kohya(adapter, path: Path) -> Path:
    tensors = {}
    for name, (down, up) in adapter.lora_factors().items():
        key = "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = down  # (r, in)
        tensors[f"{key}.lora_up.weight"] = up  # (out, r)
        tensors[f"{key}.alpha"] = torch.tensor(adapter.alpha, dtype=torch.float32)  # scale = alpha / rank
    info = adapter.info
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(adapter.rank),
        "ss_network_alpha": repr(adapter.alpha),
        "ss_base_model_version": _KOHYA_VERSION.get(info.architecture, info.architecture),
        "ss_v2": str(info.architecture == "stable-diffusion-v2"),
        "ss_output_name": path.stem,
        "ss_sd_model_name": info.base_model,
        "ss_training_comment": f"exported by hyperdiff from a {adapter.kind} adapter; {info.source}".rstrip("; "),
        "modelspec.date": _dt.date.today().isoformat(),
    } | _provenance(adapter, "kohya") | _modelspec(adapter, path.stem)
    return write_safetensors(path, tensors, meta, "export file")


# -- file names ----------------------------------------------------------------------------------------------
def digest(adapter, length: int = 8) -> str:
    """Hex digest of the adapter's kind, alpha, LiDB config, low-noise gain (when active) and factor values (float32,
    layers in name order)."""
    h = hashlib.sha256()
    lidb = json.dumps(adapter.lidb.__dict__, sort_keys=True) if adapter.lidb is not None else ""
    h.update(f"{adapter.kind}|{adapter.alpha!r}|{lidb}|{adapter.fingerprint}".encode())
    if adapter.info.low_noise.active:  # it changes what sampling computes (the names of older files stay)
        h.update(json.dumps(adapter.info.low_noise.to_dict(), sort_keys=True).encode())
    if adapter.info.rank_schedules:
        h.update(_rank_schedules_json(adapter.info).encode())
    for name in sorted(adapter.factors):
        h.update(name.encode())
        for t in adapter.factors[name]:
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:length]


def file_name(adapter, format: str) -> str:
    """`hyperdiff-<token>-<digest>-<format>.safetensors` (token reduced to [a-z0-9], "adapter" when it has none)."""
    if format not in FILE_FORMATS:
        raise HyperdiffError(f"`format` must be one of {list(FILE_FORMATS)}, got {format!r}")
    token = re.sub(r"[^a-z0-9]", "", (adapter.info.token or "").lower()) or "adapter"
    return f"hyperdiff-{token}-{digest(adapter)}-{format}.safetensors"


def write(adapter, folder: str | Path, format: str) -> Path:
    """Write the adapter as `folder / file_name(adapter, format)` (atomically) and return that path."""
    path = Path(folder) / file_name(adapter, format)
    return save_native(adapter, path) if format == "native" else export(adapter, path, format)
