"""LoRA style files for the Wan DiT: read the common layouts, check them against the model, apply per job.

Layouts read (one file may mix prefixes, never layouts of one module):
  * diffusers / PEFT: ``transformer.blocks.0.attn1.to_q.lora_A.weight`` / ``lora_B.weight`` (+ ``.alpha``);
  * original Wan / ComfyUI: ``diffusion_model.blocks.0.self_attn.q.lora_down.weight`` / ``lora_up`` / ``.alpha``;
  * kohya style: ``lora_unet_blocks_0_self_attn_q.lora_down.weight``.
Wan names go through the same table as the checkpoints (``checkpoints.turbo_to_diffusers_key``).

Applying: a plain float ``nn.Linear`` gets ``W += scale * alpha / rank * B @ A`` (computed in float32, cast
back); the original weight tensor is kept and put back after the job, so restoring is bit-exact. An
``Fp8Linear`` (weights quantized, a merge would re-quantize) gets the LoRA as a side branch held in its
``lora_down`` / ``lora_up`` buffers (scale and alpha / rank folded into ``down``, several LoRAs stacked along
the rank), reset after the job. Buffers, not forward hooks: regionally compiled blocks never call a hook
added after they were compiled, so a hook LoRA was silently dropped on fp8 + compile. The rank is padded with
zeros to a power of two (at least ``MIN_BRANCH_RANK``) and every block gets a branch (zero where the LoRA has
none) on the same linears, so all blocks share one compiled variant per rank bucket and the compiler's
recompile limit is not spent on per-LoRA ranks. Fusing costs one matmul per layer per job and nothing per
step; the side branch costs two thin matmuls per layer per step. Measured (H100, 1.3B 480p, 4 steps,
bench/RESULTS.md 2026-12-05): fuse ~0.16 s per job, branch ~40 ms per step at rank 32: about equal per job.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from generator.engine.api import CheckpointError
from generator.engine.checkpoints import turbo_to_diffusers_key
from generator.engine.fp8 import BLOCK_LINEARS, Fp8Linear

SUFFIX = ".safetensors"
MIN_BRANCH_RANK = 16  # smallest fp8 side-branch rank bucket; buckets double from here
_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "model.")
_PARTS = {
    "lora_A.weight": "down", "lora_B.weight": "up", "lora_down.weight": "down", "lora_up.weight": "up",
    "lora_A.default.weight": "down", "lora_B.default.weight": "up", "alpha": "alpha",
}
# kohya ``lora_unet_`` names flatten dots to underscores; the block linears' names, both spellings.
_WAN_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
_FLAT = {n.replace(".", "_"): n for n in (*_WAN_LINEARS, *BLOCK_LINEARS)}
_FLAT_BLOCK = re.compile(r"lora_unet_blocks_(\d+)_(.+)")


class LoraError(CheckpointError):
    """A LoRA file cannot be used; the message names the file and why."""

    code = "bad_lora"


@dataclass(frozen=True)
class LoraLayer:
    module: str  # diffusers module name, e.g. "blocks.0.attn1.to_q"
    down: torch.Tensor  # A: [rank, in]
    up: torch.Tensor  # B: [out, rank]
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def factor(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class LoraFile:
    name: str
    path: Path
    layers: dict[str, LoraLayer]
    description: str = ""

    @property
    def rank(self) -> int:
        return max(layer.rank for layer in self.layers.values())


def module_name(key: str) -> tuple[str, str] | None:
    """A LoRA key -> (diffusers module name, "down" / "up" / "alpha"), or None for a key that is no LoRA part."""
    part = next((p for p in _PARTS if key.endswith("." + p)), None)
    if part is None:
        return None
    base = key[: -len(part) - 1]
    flat = _FLAT_BLOCK.fullmatch(base)
    if flat:
        rest = _FLAT.get(flat.group(2))
        if rest is None:
            return None
        base = f"blocks.{flat.group(1)}.{rest}"
    else:
        for prefix in _PREFIXES:
            if base.startswith(prefix):
                base = base[len(prefix):]
                break
    mapped = turbo_to_diffusers_key(base + ".weight")  # Wan name -> diffusers; diffusers names map to None
    if mapped is not None and mapped.endswith(".weight"):
        base = mapped[: -len(".weight")]
    return base, _PARTS[part]


def read_description(path: Path) -> str:
    """First line of the sidecar ``NAME.txt``, else the safetensors metadata ``description``, else ""."""
    side = path.with_suffix(".txt")
    if side.is_file():
        lines = side.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        return lines[0].strip() if lines else ""
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return str(meta.get("description", "")).strip().splitlines()[0] if meta.get("description") else ""
    except Exception:
        return ""


def read_lora(path: Path, name: str | None = None) -> LoraFile:
    """Read and self-check one LoRA file (pairs complete, ranks agree, alpha positive)."""
    from safetensors.torch import load_file

    path = Path(path)
    label = path.name
    try:
        tensors = load_file(str(path), device="cpu")
    except FileNotFoundError:
        raise LoraError(f"LoRA file {label} was not found.") from None
    except Exception as e:
        raise LoraError(f"LoRA file {label} is not a readable safetensors file ({_first_line(e)}).") from e
    parts: dict[str, dict[str, torch.Tensor]] = {}
    stray: list[str] = []
    for key, t in tensors.items():
        hit = module_name(key)
        if hit is None:
            stray.append(key)
            continue
        module, part = hit
        if part in parts.setdefault(module, {}):
            raise LoraError(f"LoRA file {label}: two keys give {part} of {module} (one is {key}).")
        parts[module][part] = t
    if stray:
        raise LoraError(f"LoRA file {label}: {len(stray)} keys are not LoRA weights of a Wan DiT "
                        f"(e.g. {stray[0]}).")
    if not parts:
        raise LoraError(f"LoRA file {label} holds no LoRA weights.")
    layers: dict[str, LoraLayer] = {}
    for module, p in sorted(parts.items()):
        if "down" not in p or "up" not in p:
            raise LoraError(f"LoRA file {label}: {module} has only half a LoRA pair ({', '.join(sorted(p))}).")
        down, up = p["down"], p["up"]
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise LoraError(f"LoRA file {label}: {module} has mismatched shapes: down {tuple(down.shape)}, "
                            f"up {tuple(up.shape)}.")
        rank = int(down.shape[0])
        alpha = float(p["alpha"].float().reshape(-1)[0]) if "alpha" in p else float(rank)
        if rank < 1 or not math.isfinite(alpha) or alpha <= 0:
            raise LoraError(f"LoRA file {label}: {module} has rank {rank} and alpha {alpha:g}; both must be > 0.")
        if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
            raise LoraError(f"LoRA file {label}: {module} holds NaN or infinite values.")
        layers[module] = LoraLayer(module, down, up, alpha)
    return LoraFile(name or path.stem, path, layers, read_description(path))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _linear_shape(mod: nn.Module) -> tuple[int, int] | None:
    if isinstance(mod, (nn.Linear, Fp8Linear)):
        return int(mod.out_features), int(mod.in_features)
    return None


def check_lora(lora: LoraFile, model: nn.Module, model_label: str = "this model") -> None:
    """Every target is a linear of ``model`` and every shape fits, else ``LoraError`` naming the file."""
    modules = dict(model.named_modules())
    for layer in lora.layers.values():
        mod = modules.get(layer.module)
        shape = _linear_shape(mod) if mod is not None else None
        if shape is None:
            raise LoraError(f"LoRA file {lora.path.name} targets {layer.module}, which {model_label} does not "
                            "have: it is not a LoRA for this model.")
        want = (int(layer.up.shape[0]), int(layer.down.shape[1]))
        if want != shape:
            raise LoraError(f"LoRA file {lora.path.name} is for another model size: {layer.module} is "
                            f"{shape[0]}x{shape[1]} in {model_label} but {want[0]}x{want[1]} in the LoRA.")


# --------------------------------------------------------------------------------------------------
# Applying to a model for one job
# --------------------------------------------------------------------------------------------------


@dataclass
class Applied:
    """What ``apply_loras`` changed; ``restore()`` undoes it (idempotent)."""

    weights: list[tuple[nn.Linear, torch.Tensor]] = field(default_factory=list)  # (layer, original tensor)
    branches: list[tuple[Fp8Linear, torch.Tensor | None, torch.Tensor | None]] = field(default_factory=list)

    def restore(self) -> None:
        with torch.no_grad():
            for lin, original in self.weights:  # .to: an offloaded model may have moved meanwhile
                lin.weight.data = original.to(lin.weight.device)
        for mod, down, up in reversed(self.branches):
            mod.lora_down, mod.lora_up = down, up
        self.weights.clear()
        self.branches.clear()


def lora_delta(layers: Iterable[tuple[LoraLayer, float]], device: torch.device) -> torch.Tensor:
    """sum of scale * alpha / rank * B @ A, in float32."""
    total: torch.Tensor | None = None
    for layer, scale in layers:
        d = (scale * layer.factor) * (layer.up.to(device, torch.float32) @ layer.down.to(device, torch.float32))
        total = d if total is None else total + d
    assert total is not None
    return total


def branch_rank(rank: int) -> int:
    """The padded side-branch rank for a stacked LoRA rank: the next power of two, at least MIN_BRANCH_RANK."""
    return max(MIN_BRANCH_RANK, 1 << max(0, rank - 1).bit_length())


def branch_signature(loras: Sequence[LoraFile]) -> tuple[int, frozenset[str]]:
    """(padded rank, block linears with a branch) of these LoRAs stacked on fp8 experts: equal signatures
    mean equal buffer shapes in every block, so one compiled variant serves both."""
    ranks: dict[str, int] = {}
    for lora in loras:
        for layer in lora.layers.values():
            hit = _block_leaf(layer.module)
            if hit is not None and hit[1] in BLOCK_LINEARS:  # the fp8 ones; the others are fused
                ranks[layer.module] = ranks.get(layer.module, 0) + layer.rank
    leaves = frozenset(hit[1] for hit in map(_block_leaf, ranks) if hit is not None)
    return branch_rank(max(ranks.values(), default=1)), leaves


def _branch_dtype(mod: Fp8Linear) -> torch.dtype:
    # On the GPU the branch runs in the model dtype (bf16 tensor cores, error far below fp8's); the CPU path
    # is float32 throughout, the reference of the GPU one.
    return mod.out_dtype if mod.weight.device.type == "cuda" else torch.float32


def _block_leaf(name: str) -> tuple[int, str] | None:
    head, _, rest = name.partition(".")
    idx, _, leaf = rest.partition(".")
    return (int(idx), leaf) if head == "blocks" and idx.isdigit() and leaf else None


@torch.no_grad()
def _apply_branches(model: nn.Module, targets: dict[str, tuple[Fp8Linear, list[tuple[LoraLayer, float]]]],
                    applied: Applied) -> None:
    rank = branch_rank(max(sum(lay.rank for lay, _ in layers) for _, layers in targets.values()))
    stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, (mod, layers) in targets.items():
        dev, dt = mod.weight.device, _branch_dtype(mod)
        down = torch.zeros(rank, mod.in_features, device=dev, dtype=torch.float32)
        up = torch.zeros(mod.out_features, rank, device=dev, dtype=torch.float32)
        at = 0
        for lay, s in layers:
            down[at:at + lay.rank] = lay.down.to(dev, torch.float32) * (s * lay.factor)
            up[:, at:at + lay.rank] = lay.up.to(dev, torch.float32)
            at += lay.rank
        stacks[name] = (down.to(dt), up.to(dt))
    # Zero branches on the same linears of the other blocks: identical shapes in every block, one variant.
    leaves = {hit[1] for hit in map(_block_leaf, targets) if hit is not None}
    zeros: dict[tuple[int, int, torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, Fp8Linear):
            continue
        if name in stacks:
            down, up = stacks[name]
        else:
            hit = _block_leaf(name)
            if hit is None or hit[1] not in leaves:
                continue
            key = (mod.in_features, mod.out_features, mod.weight.device, _branch_dtype(mod))
            if key not in zeros:  # shared: read-only, one copy per shape
                zeros[key] = (torch.zeros(rank, key[0], device=key[2], dtype=key[3]),
                              torch.zeros(key[1], rank, device=key[2], dtype=key[3]))
            down, up = zeros[key]
        applied.branches.append((mod, mod.lora_down, mod.lora_up))
        mod.lora_down, mod.lora_up = down, up


@torch.no_grad()
def apply_loras(model: nn.Module, loras: Sequence[tuple[LoraFile, float]]) -> Applied:
    """Apply ``(lora, scale)`` pairs to ``model`` (checked with ``check_lora`` beforehand)."""
    applied = Applied()
    by_module: dict[str, list[tuple[LoraLayer, float]]] = {}
    for lora, scale in loras:
        for layer in lora.layers.values():
            by_module.setdefault(layer.module, []).append((layer, float(scale)))
    modules = dict(model.named_modules())
    fp8_targets: dict[str, tuple[Fp8Linear, list[tuple[LoraLayer, float]]]] = {}
    try:
        for name, layers in by_module.items():
            mod = modules[name]
            if isinstance(mod, Fp8Linear):
                fp8_targets[name] = (mod, layers)
            elif isinstance(mod, nn.Linear):
                original = mod.weight.data
                merged = (original.float() + lora_delta(layers, original.device)).to(original.dtype)
                mod.weight.data = merged
                applied.weights.append((mod, original))
            else:
                raise LoraError(f"{name} is not a linear layer; the LoRA cannot be applied.")
        if fp8_targets:
            _apply_branches(model, fp8_targets, applied)
    except BaseException:
        applied.restore()
        raise
    return applied


class LoraCache:
    """Loaded LoRA files by path, the last ``size`` used kept (reloaded when the file changes)."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._items: OrderedDict[Path, tuple[float, LoraFile]] = OrderedDict()

    def get(self, path: Path, name: str | None = None) -> LoraFile:
        path = Path(path)
        try:
            mtime = path.stat().st_mtime
        except OSError:
            raise LoraError(f"LoRA file {path.name} was not found.") from None
        hit = self._items.get(path)
        if hit is not None and hit[0] == mtime:
            self._items.move_to_end(path)
            return hit[1]
        lora = read_lora(path, name)
        self._items[path] = (mtime, lora)
        self._items.move_to_end(path)
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return lora


def discover(folder: Path) -> dict[str, Path]:
    """LoRA files in ``folder`` by name (file stem), sorted; {} when the folder does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    return {p.stem.lower(): p for p in sorted(folder.glob("*" + SUFFIX)) if p.is_file()}
