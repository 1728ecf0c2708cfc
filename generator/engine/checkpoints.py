"""Wan DiT weight files: open, classify, map TurboDiffusion names to diffusers names, load tensor by tensor.

Layouts (docs/engine.md section 3):
  * "turbodiffusion": a flat ``torch.save`` state dict with TurboDiffusion / original Wan names (``blocks.i.
    self_attn.q.weight``...), optionally SLA ``proj_l`` keys and ``-quant`` int8 tile weights. The original Wan
    release uses the same names without proj_l and with a 5-D patch embedding; it is read the same way.
  * "diffusers": diffusers ``WanTransformer3DModel`` names, from a model folder (config.json + safetensors,
    possibly sharded with an index) or a single safetensors / torch file.

Every failure a user can cause (missing, truncated or foreign file, other model size, SLA vs plain, quant vs
plain, a folder missing shards) is raised as ``CheckpointError`` whose message says what the file is and what
was expected.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from generator.engine.api import CheckpointError
from generator.engine.quant import dequantize_tiles, scale_grid_shape
from generator.engine.wan_configs import model_name

WRAPPER_INFIX = "_checkpoint_wrapped_module."
PROJ_L = "proj_l"  # name of the per-block SLA projection under ``blocks.i.attn1``
QUANT_WEIGHT, QUANT_SCALE = "int8_weight", "scale"

_P = r"(weight|bias)"
_Q = r"(weight|bias|int8_weight|scale)"  # linears that -quant files store as int8 tiles
# Non-block names, TurboDiffusion -> diffusers. ``head.modulation`` is matched here, before any block rule.
_TOP_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), r)
    for p, r in [
        (rf"patch_embedding\.{_P}", r"patch_embedding.\1"),
        (rf"text_embedding\.0\.{_P}", r"condition_embedder.text_embedder.linear_1.\1"),
        (rf"text_embedding\.2\.{_P}", r"condition_embedder.text_embedder.linear_2.\1"),
        (rf"time_embedding\.0\.{_P}", r"condition_embedder.time_embedder.linear_1.\1"),
        (rf"time_embedding\.2\.{_P}", r"condition_embedder.time_embedder.linear_2.\1"),
        (rf"time_projection\.1\.{_P}", r"condition_embedder.time_proj.\1"),
        (r"head\.modulation", "scale_shift_table"),
        (rf"head\.head\.{_P}", r"proj_out.\1"),
    ]
]
# Names inside ``blocks.i.``.
_BLOCK_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), r)
    for p, r in [
        (r"modulation", "scale_shift_table"),
        (rf"self_attn\.([qkv])\.{_Q}", r"attn1.to_\1.\2"),
        (rf"self_attn\.o\.{_Q}", r"attn1.to_out.0.\1"),
        (r"self_attn\.norm_([qk])\.weight", r"attn1.norm_\1.weight"),
        (rf"self_attn\.attn_op\.local_attn\.proj_l\.{_P}", rf"attn1.{PROJ_L}.\1"),
        (rf"cross_attn\.([qkv])\.{_Q}", r"attn2.to_\1.\2"),
        (rf"cross_attn\.o\.{_Q}", r"attn2.to_out.0.\1"),
        (r"cross_attn\.norm_([qk])\.weight", r"attn2.norm_\1.weight"),
        (
            rf"norm3\.{_P}",
            r"norm2.\1",
        ),  # TurboDiffusion's norm3 (affine, before cross-attn) is diffusers' norm2
        (rf"ffn\.0\.{_Q}", r"ffn.net.0.proj.\1"),
        (rf"ffn\.2\.{_Q}", r"ffn.net.2.\1"),
    ]
]
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")
_IMAGE_HINTS = (
    "img_emb.",
    "k_img.",
    "v_img.",
    "norm_k_img.",
    "image_embedder.",
    "add_k_proj.",
    "add_v_proj.",
)


def normalize_key(key: str) -> str:
    """Drop activation-checkpoint wrapper infixes (``_checkpoint_wrapped_module.``)."""
    return key.replace(WRAPPER_INFIX, "")


def turbo_to_diffusers_key(key: str) -> str | None:
    """The diffusers name of a TurboDiffusion key, or None if it has none. ``-quant`` suffixes
    (``int8_weight``, ``scale``) are kept on the mapped linear's name."""
    key = normalize_key(key)
    m = _BLOCK_KEY.fullmatch(key)
    rules, rest, prefix = (_BLOCK_RULES, m.group(2), f"blocks.{m.group(1)}.") if m else (_TOP_RULES, key, "")
    for pattern, repl in rules:
        hit = pattern.fullmatch(rest)
        if hit:
            return prefix + hit.expand(repl)
    return None


@dataclass(frozen=True)
class Recipe:
    """How to make one diffusers tensor: ``copy`` a source key, reshape a 2-D ``patch`` embedding, or
    ``dequant`` an (int8_weight, scale) pair."""

    op: str
    sources: tuple[str, ...]


@dataclass
class Conversion:
    layout: str  # "turbodiffusion" or "diffusers"
    recipes: dict[str, Recipe]  # diffusers name -> recipe
    unmapped: list[str]  # source keys with no diffusers name


def detect_layout(keys: Iterable[str]) -> str:
    keys = list(keys)
    if any(".attn1." in k or k.startswith("condition_embedder.") for k in keys):
        return "diffusers"
    if any(".self_attn." in k or k.startswith(("text_embedding.", "head.")) for k in keys):
        return "turbodiffusion"
    sample = ", ".join(sorted(keys)[:4])
    if any(k.startswith(("decoder.", "encoder.conv")) for k in keys):
        what = "it looks like a VAE"
    elif any("token_embedding" in k or k.startswith(("shared.", "encoder.block.")) for k in keys):
        what = "it looks like a text encoder"
    else:
        what = "its keys are not a Wan DiT's"
    raise _NotADit(f"{what} (first keys: {sample})")


class _NotADit(Exception):
    pass


def convert_keys(keys: Iterable[str]) -> Conversion:
    """Plan the mapping of (normalized) source keys onto diffusers names."""
    keys = list(keys)
    layout = detect_layout(keys)
    recipes: dict[str, Recipe] = {}
    unmapped: list[str] = []
    if layout == "diffusers":
        for k in keys:
            recipes[k] = Recipe("copy", (k,))
        return Conversion(layout, recipes, unmapped)
    quant_parts: dict[str, dict[str, str]] = {}
    for k in keys:
        target = turbo_to_diffusers_key(k)
        if target is None:
            unmapped.append(k)
            continue
        base, _, suffix = target.rpartition(".")
        if suffix in (QUANT_WEIGHT, QUANT_SCALE):
            quant_parts.setdefault(base, {})[suffix] = k
            continue
        op = "patch" if target == "patch_embedding.weight" else "copy"
        if target in recipes:
            raise CheckpointError(f"two keys map to {target}: {recipes[target].sources[0]} and {k}")
        recipes[target] = Recipe(op, (k,))
    for base, parts in quant_parts.items():
        if set(parts) != {QUANT_WEIGHT, QUANT_SCALE}:
            unmapped.extend(parts.values())  # half a quantized linear: reported as a stray key
            continue
        recipes[f"{base}.weight"] = Recipe("dequant", (parts[QUANT_WEIGHT], parts[QUANT_SCALE]))
    return Conversion(layout, recipes, unmapped)


# --------------------------------------------------------------------------------------------------
# Opening files and folders
# --------------------------------------------------------------------------------------------------


@dataclass
class WeightSource:
    """Tensors of one checkpoint, by normalized key, loaded on demand (mmap / safetensors slices)."""

    path: Path
    kind: str  # "torch file", "safetensors file", "diffusers folder"
    shapes: dict[str, tuple[int, ...]]
    getter: Callable[[str], torch.Tensor]
    folder_config: dict[str, Any] | None = None
    dtypes: dict[str, str] = field(default_factory=dict)

    def get(self, key: str) -> torch.Tensor:
        try:
            return self.getter(key)
        except CheckpointError:
            raise
        except Exception as e:  # a damaged region of a lazily read file
            raise CheckpointError(f"{self.path}: could not read tensor {key}: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _sniff(path: Path) -> str:
    with path.open("rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    if head.startswith(b"GGUF"):
        return "gguf"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":
        return "torch-legacy"
    return "unknown"


def open_weights(path: str | Path) -> WeightSource:
    """Open a .pth/.pt/.safetensors file or a diffusers model folder, without reading tensor data."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{p} does not exist")
    if p.is_dir():
        return _open_folder(p)
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p} is empty (0 bytes): the download or copy did not finish")
    fmt = _sniff(p)
    if fmt == "gguf":
        raise CheckpointError(
            f"{p} is a GGUF file; only .pth, .safetensors and diffusers folders are supported"
        )
    if fmt == "safetensors":
        return _open_safetensors(p, [p], kind="safetensors file")
    if fmt == "unknown":
        raise CheckpointError(f"{p} is not a PyTorch or safetensors checkpoint (unrecognised file header)")
    return _open_torch(p, mmap=fmt == "torch-zip")


def _open_torch(p: Path, *, mmap: bool) -> WeightSource:
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        reason = _first_line(e)
        if "central directory" in reason or "zip archive" in reason or isinstance(e, EOFError):
            reason = f"the file is truncated or corrupt ({reason})"
        elif "Weights only load failed" in reason:
            reason = "it holds Python objects other than tensors, so it is not a plain state dict"
        raise CheckpointError(f"{p} could not be read as a weights file: {reason}") from e
    state = _as_state_dict(p, obj)
    normalized: dict[str, torch.Tensor] = {}
    for k, t in state.items():
        nk = normalize_key(k)
        if nk in normalized:
            raise CheckpointError(
                f"{p}: keys {k!r} and another both become {nk!r} once the wrapper is stripped"
            )
        normalized[nk] = t
    return WeightSource(
        path=p,
        kind="torch file",
        shapes={k: tuple(t.shape) for k, t in normalized.items()},
        getter=normalized.__getitem__,
        dtypes={k: str(t.dtype).removeprefix("torch.") for k, t in normalized.items()},
    )


def _as_state_dict(p: Path, obj: object) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        # Training checkpoints wrap the weights; accept the usual single wrapper, nothing else.
        for wrapper in ("state_dict", "model", "module", "ema"):
            inner = obj.get(wrapper)
            if (
                isinstance(inner, Mapping)
                and inner
                and all(isinstance(v, torch.Tensor) for v in inner.values())
            ):
                return inner
        if not obj:
            raise CheckpointError(f"{p} holds an empty dict, not model weights")
        keys = ", ".join(repr(k) for k in list(obj)[:5])
        raise CheckpointError(f"{p} is not a flat state dict of tensors (top-level keys: {keys})")
    raise CheckpointError(f"{p} is not a state dict: it holds a {type(obj).__name__}")


def _open_safetensors(
    p: Path,
    files: list[Path],
    *,
    kind: str,
    config: dict[str, Any] | None = None,
    index: dict[str, str] | None = None,
) -> WeightSource:
    from safetensors import safe_open

    handles: dict[str, Any] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    for f in files:
        try:
            h = safe_open(str(f), framework="pt", device="cpu")
            for k in h.keys():
                sl = h.get_slice(k)
                nk = normalize_key(k)
                if nk in handles:
                    raise CheckpointError(f"{p}: tensor {k} appears in more than one file")
                handles[nk] = (h, k)
                shapes[nk] = tuple(sl.get_shape())
                dtypes[nk] = str(sl.get_dtype())
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(
                f"{f} is not a readable safetensors file (truncated or corrupt?): {_first_line(e)}"
            ) from e
    if index is not None:
        listed = {normalize_key(k) for k in index}
        missing = sorted(listed - set(shapes))
        if missing:
            raise CheckpointError(
                f"{p}: the index lists {len(missing)} tensors that no shard holds "
                f"(e.g. {missing[0]}); a shard is incomplete"
            )
    if not shapes:
        raise CheckpointError(f"{p} holds no tensors")

    def getter(key: str) -> torch.Tensor:
        h, k = handles[key]
        return h.get_tensor(k)

    return WeightSource(path=p, kind=kind, shapes=shapes, getter=getter, folder_config=config, dtypes=dtypes)


def _open_folder(p: Path) -> WeightSource:
    folder = p
    if not (folder / "config.json").is_file() and (folder / "transformer" / "config.json").is_file():
        folder = folder / "transformer"  # a whole pipeline folder: its DiT lives in transformer/
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        hint = (
            " (a pipeline folder: point at its transformer/ subfolder)"
            if (p / "model_index.json").is_file()
            else ""
        )
        raise CheckpointError(f"{p} is not a diffusers model folder: config.json is missing{hint}")
    try:
        config = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {_first_line(e)}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_file} does not hold a JSON object")
    cls = config.get("_class_name")
    if cls not in (None, "WanTransformer3DModel"):
        raise CheckpointError(f"{folder} holds a {cls}, not a WanTransformer3DModel")
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(f"{folder} has several safetensors index files: {[i.name for i in indexes]}")
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{indexes[0]} is not a valid safetensors index: {_first_line(e)}") from e
        shard_names = sorted(set(weight_map.values()))
        missing = [n for n in shard_names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(
                f"{folder} is missing {len(missing)} of {len(shard_names)} weight shards listed in "
                f"{indexes[0].name}: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
            )
        return _open_safetensors(
            folder,
            [folder / n for n in shard_names],
            kind="diffusers folder",
            config=config,
            index=weight_map,
        )
    singles = sorted(folder.glob("*.safetensors"))
    preferred = folder / "diffusion_pytorch_model.safetensors"
    if preferred in singles:
        singles = [preferred]
    if len(singles) == 1:
        return _open_safetensors(folder, singles, kind="diffusers folder", config=config)
    if singles:
        raise CheckpointError(
            f"{folder} has several safetensors files and no index: {', '.join(s.name for s in singles[:4])}"
        )
    bins = sorted(folder.glob("*.bin"))
    extra = f" (only {bins[0].name}: .bin weights are not supported, convert to safetensors)" if bins else ""
    raise CheckpointError(f"{folder} has config.json but no safetensors weights{extra}")


# --------------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointInfo:
    """What a weights file is, from its key names and shapes alone."""

    path: str
    source_kind: str  # "torch file", "safetensors file", "diffusers folder"
    layout: str  # "turbodiffusion" or "diffusers"
    key_count: int
    sla: bool  # has per-block SLA proj_l weights
    quant: bool  # has -quant int8 tile weights
    image_branch: bool  # Wan2.1-I2V-style CLIP image cross-attention
    dim: int | None
    num_layers: int | None
    in_channels: int | None
    out_channels: int | None
    ffn_dim: int | None
    text_dim: int | None
    freq_dim: int | None
    head_dim: int | None  # known only from proj_l
    unmapped: tuple[str, ...] = ()

    @property
    def model(self) -> str:
        name = model_name(self.dim, self.num_layers, self.in_channels)
        if self.image_branch:
            name = "Wan2.1-I2V (CLIP image branch)" if name != "incomplete Wan DiT" else name
        return name

    def facts(self) -> dict[str, int | None]:
        return {
            "dim": self.dim,
            "num_layers": self.num_layers,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "ffn_dim": self.ffn_dim,
            "text_dim": self.text_dim,
            "freq_dim": self.freq_dim,
            "head_dim": self.head_dim,
        }

    def describe(self) -> str:
        if self.layout == "diffusers":
            fmt = "diffusers-format"
        else:
            fmt = "TurboDiffusion" if (self.sla or self.quant) else "original Wan-format"
        sla = "with SLA proj_l" if self.sla else "without SLA proj_l"
        quant = "int8 -quant" if self.quant else "not quantized"
        return (
            f"a {fmt} {self.model} checkpoint (dim {self.dim}, {self.num_layers} layers, in_channels "
            f"{self.in_channels}, {sla}, {quant}, {self.key_count} keys)"
        )


def target_shapes(
    src_shapes: Mapping[str, tuple[int, ...]], conv: Conversion, patch_size: tuple[int, ...] = (1, 2, 2)
) -> dict[str, tuple[int, ...]]:
    """Shapes the diffusers tensors will have once converted."""
    out: dict[str, tuple[int, ...]] = {}
    n_patch = math.prod(patch_size)
    for name, r in conv.recipes.items():
        shape = src_shapes[r.sources[0]]
        if r.op == "patch" and len(shape) == 2 and shape[1] % n_patch == 0:
            shape = (shape[0], shape[1] // n_patch, *patch_size)
        out[name] = tuple(shape)
    return out


def classify(
    src_shapes: Mapping[str, tuple[int, ...]],
    conv: Conversion,
    *,
    path: str = "",
    source_kind: str = "state dict",
    patch_size: tuple[int, ...] = (1, 2, 2),
) -> CheckpointInfo:
    """Say what a checkpoint is from its (normalized) key shapes."""
    shapes = target_shapes(src_shapes, conv, patch_size)

    def dim_of(name: str, axis: int) -> int | None:
        s = shapes.get(name)
        return int(s[axis]) if s is not None and len(s) > axis else None

    blocks = {int(m.group(1)) for k in shapes if (m := _BLOCK_KEY.fullmatch(k))}
    out_flat = dim_of("proj_out.weight", 0)
    n_patch = math.prod(patch_size)
    names = list(src_shapes)
    return CheckpointInfo(
        path=path,
        source_kind=source_kind,
        layout=conv.layout,
        key_count=len(src_shapes),
        sla=any(f".{PROJ_L}." in k for k in shapes),
        quant=any(r.op == "dequant" for r in conv.recipes.values()),
        image_branch=any(h in k for k in names for h in _IMAGE_HINTS),
        dim=dim_of("patch_embedding.weight", 0),
        num_layers=max(blocks) + 1 if blocks else None,
        in_channels=dim_of("patch_embedding.weight", 1),
        out_channels=out_flat // n_patch if out_flat is not None else None,
        ffn_dim=dim_of("blocks.0.ffn.net.0.proj.weight", 0),
        text_dim=dim_of("condition_embedder.text_embedder.linear_1.weight", 1),
        freq_dim=dim_of("condition_embedder.time_embedder.linear_1.weight", 1),
        head_dim=dim_of(f"blocks.0.attn1.{PROJ_L}.weight", 0),
        unmapped=tuple(conv.unmapped),
    )


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Open a weights file or folder and say what it is (reads shapes only)."""
    src = open_weights(path)
    return classify(src.shapes, convert_source(src), path=str(src.path), source_kind=src.kind)


def convert_source(src: WeightSource) -> Conversion:
    """``convert_keys`` on an opened source, with a CheckpointError for files that are not a Wan DiT."""
    try:
        return convert_keys(src.shapes)
    except _NotADit as e:
        raise CheckpointError(f"{src.path} is not a Wan diffusion-transformer checkpoint: {e}") from None


# --------------------------------------------------------------------------------------------------
# Matching a file against the configured model, then loading
# --------------------------------------------------------------------------------------------------

_FOLDER_CONFIG_KEYS = (
    "num_attention_heads",
    "attention_head_dim",
    "num_layers",
    "in_channels",
    "out_channels",
    "ffn_dim",
    "text_dim",
    "freq_dim",
    "patch_size",
    "qk_norm",
    "cross_attn_norm",
    "image_dim",
    "added_kv_proj_dim",
)


def config_facts(config: Mapping[str, Any]) -> dict[str, int | None]:
    """The shape facts ``CheckpointInfo.facts`` reports, computed from full ``WanTransformer3DModel`` kwargs."""
    return {
        "dim": config["num_attention_heads"] * config["attention_head_dim"],
        "num_layers": config["num_layers"],
        "in_channels": config["in_channels"],
        "out_channels": config["out_channels"] or config["in_channels"],
        "ffn_dim": config["ffn_dim"],
        "text_dim": config["text_dim"],
        "freq_dim": config["freq_dim"],
        "head_dim": config["attention_head_dim"],
    }


def describe_config(config: Mapping[str, Any]) -> str:
    f = config_facts(config)
    name = model_name(f["dim"], f["num_layers"], f["in_channels"])
    return f"{name} (dim {f['dim']}, {f['num_layers']} layers, in_channels {f['in_channels']})"


def check_compatible(
    info: CheckpointInfo,
    config: Mapping[str, Any],
    *,
    need_sla: bool,
    quantized: bool | None = None,
    folder_config: Mapping[str, Any] | None = None,
) -> None:
    """Raise CheckpointError if the file is not the configured model (size, image branch, SLA, quant)."""
    what = f"{info.path} is {info.describe()}"
    expected = describe_config(config)
    diffs = [
        f"{k} {v} (configured {config_facts(config)[k]})"
        for k, v in info.facts().items()
        if v is not None and v != config_facts(config)[k]
    ]
    if diffs:
        raise CheckpointError(f"{what}, but the configured model is {expected}: {', '.join(diffs)}")
    wants_image = config.get("image_dim") is not None or config.get("added_kv_proj_dim") is not None
    if info.image_branch != wants_image:
        has = "has" if info.image_branch else "has no"
        raise CheckpointError(f"{what}; it {has} a CLIP image branch, unlike the configured {expected}")
    if folder_config is not None:
        for k in _FOLDER_CONFIG_KEYS:
            if k in folder_config and k in config and _norm(folder_config[k]) != _norm(config[k]):
                raise CheckpointError(
                    f"{info.path}: its config.json says {k}={folder_config[k]!r}, but the configured model has "
                    f"{k}={config[k]!r}"
                )
    if need_sla and not info.sla:
        raise CheckpointError(
            f"{what}. SLA attention needs the per-block proj_l weights of a TurboDiffusion checkpoint; use "
            "attention 'dense' (or 'auto') with this file, or point the model at a TurboDiffusion .pth"
        )
    if quantized is True and not info.quant:
        raise CheckpointError(f"{what}, but a -quant checkpoint (int8 weights) was configured")
    if quantized is False and info.quant:
        raise CheckpointError(f"{what}, but a plain (not quantized) checkpoint was configured")


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v


def check_keys(
    info: CheckpointInfo, shapes: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]
) -> None:
    """Every expected tensor present with its shape, nothing left over."""
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected)) + list(info.unmapped)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {', '.join(extra[:3])})")
        raise CheckpointError(
            f"{info.path} is {info.describe()}, and its keys do not fit the configured "
            f"model: {'; '.join(parts)}"
        )
    for name, shape in expected.items():
        if tuple(shapes[name]) != tuple(shape):
            raise CheckpointError(
                f"{info.path}: tensor {name} has shape {list(shapes[name])}, the configured "
                f"model needs {list(shape)}"
            )


def iter_tensors(
    src: WeightSource,
    conv: Conversion,
    targets: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    device: torch.device,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield each diffusers tensor converted (reshaped / dequantized) and cast to its target dtype on ``device``,
    one at a time so that peak memory stays one tensor above the model's."""
    for name, (shape, dtype) in targets.items():
        r = conv.recipes[name]
        if r.op == "dequant":
            q = src.get(r.sources[0])
            scale = src.get(r.sources[1])
            if q.dtype != torch.int8:
                raise CheckpointError(f"{src.path}: {r.sources[0]} is {q.dtype}, expected int8")
            if tuple(scale.shape) != scale_grid_shape(*q.shape):
                raise CheckpointError(
                    f"{src.path}: {r.sources[1]} has shape {list(scale.shape)}, expected "
                    f"{list(scale_grid_shape(*q.shape))} for a {list(q.shape)} weight"
                )
            t = dequantize_tiles(q.to(device), scale.to(device), dtype)
        else:
            t = src.get(r.sources[0])
            if not t.is_floating_point():
                raise CheckpointError(f"{src.path}: {r.sources[0]} is {t.dtype}, expected a float tensor")
            t = t.to(device=device, dtype=dtype)
            if r.op == "patch":
                t = t.reshape(shape)
        yield name, t
