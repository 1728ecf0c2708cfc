"""The Wan DiT as a diffusers ``WanTransformer3DModel`` with our self-attention (SLA / SageSLA / dense).

``build_transformer`` makes a random-init model, ``load_transformer`` one from a TurboDiffusion ``.pth``
(plain or ``-quant``) or a diffusers folder, ``set_attention`` switches the attention at run time. Either
way every block's ``attn1`` runs ``TurboSelfAttnProcessor`` (diffusers' projections, q/k RMSNorm, RoPE and
output projection, with only the attention op swapped) and, for SLA checkpoints, owns the block's SLA
output projection as ``blocks.i.attn1.proj_l`` (Linear(head_dim, head_dim), shared across heads).
Cross-attention (``attn2``) keeps diffusers' own dense processor.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from generator.engine.offline import ensure_offline

ensure_offline()  # never reach a hub: set before diffusers is imported

import torch  # noqa: E402
from diffusers.models.transformers.transformer_wan import (  # noqa: E402
    WanAttention,
    WanRotaryPosEmbed,
    WanTransformer3DModel,
)
from torch import nn  # noqa: E402

from generator import attention as attn_ops  # noqa: E402
from generator.engine import checkpoints as ckpt  # noqa: E402
from generator.engine import fp8  # noqa: E402
from generator.engine.api import EngineError  # noqa: E402

ATTENTIONS = ("auto", "sla", "sagesla", "dense")
_MODES = ("sla", "sagesla", "dense")  # what "auto" resolves to
_LOW_PRECISION = (torch.float16, torch.bfloat16)


class TurboSelfAttnProcessor:
    """Self-attention of a Wan block, as diffusers' ``WanAttnProcessor`` computes it up to the attention op.

    mode "sla": ``sla_attention(..., backend="auto")`` (Triton on CUDA, reference elsewhere) with the block's
    proj_l; "sagesla": the int8 SLA kernel (falls back to "auto" where it cannot run, e.g. on CPU);
    "dense": SDPA, proj_l unused.

    ``exchange`` is set only during a context-parallel forward (``generator.engine.context_parallel``): it
    turns this rank's token shard with all heads into the whole sequence with the rank's heads before the
    attention op, and back after it; projections, norms and RoPE stay per token.
    """

    # Read by diffusers' ``set_attention_backend``; unused here because we dispatch ourselves.
    _attention_backend = None
    _parallel_config = None

    def __init__(self, mode: str, topk: float = 0.1) -> None:
        if mode not in _MODES:
            raise ValueError(f"unknown attention mode {mode!r}; expected one of {_MODES}")
        self.mode = mode
        self.topk = float(topk)
        self.exchange: Any = None

    def __repr__(self) -> str:
        return f"TurboSelfAttnProcessor(mode={self.mode!r}, topk={self.topk})"

    def __call__(
        self,
        attn: WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("TurboSelfAttnProcessor is for unmasked self-attention (attn1) only")
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = apply_rope(query, *rotary_emb)
            key = apply_rope(key, *rotary_emb)
        ex = self.exchange
        if ex is not None:  # one all-to-all for q, k and v together
            query, key, value = ex.to_heads(torch.stack([query, key, value])).unbind(0)

        if self.mode == "dense":
            out = attn_ops.dense_attention(query, key, value)
        else:
            proj_l = getattr(attn, ckpt.PROJ_L, None)
            if proj_l is None:
                raise EngineError(
                    "This model has no SLA weights (proj_l); use attention 'dense'.",
                    code="attention_unavailable",
                )
            backend = "auto"
            if self.mode == "sagesla" and attn_ops.triton_supported(query):
                backend = "sagesla"
            out = attn_ops.sla_attention(query, key, value, proj_l, topk=self.topk, backend=backend)
        if ex is not None:
            out = ex.to_tokens(out)
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def apply_rope(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan RoPE on interleaved (even, odd) feature pairs of x [B, L, H, D], as diffusers applies it."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------

_INIT_ARGS = frozenset(inspect.signature(WanTransformer3DModel.__init__).parameters) - {"self"}


def model_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """``WanTransformer3DModel`` kwargs from a config dict (a config.json's ``_``-keys are ignored)."""
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    unknown = sorted(set(kwargs) - _INIT_ARGS)
    if unknown:
        raise ValueError(f"not WanTransformer3DModel settings: {', '.join(unknown)}")
    if "patch_size" in kwargs:
        kwargs["patch_size"] = tuple(kwargs["patch_size"])
    return kwargs


def param_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """dtype of one parameter: diffusers keeps its fp32 modules (time embedder, modulation tables, affine
    norms) in float32 when the model runs in fp16/bf16, as ``from_pretrained(torch_dtype=...)`` does."""
    if dtype in _LOW_PRECISION and any(
        part in WanTransformer3DModel._keep_in_fp32_modules for part in name.split(".")
    ):
        return torch.float32
    return dtype


def _skeleton(config: Mapping[str, Any], *, sla: bool) -> WanTransformer3DModel:
    """The model on the meta device (no memory), with a proj_l per block when ``sla``."""
    kwargs = model_kwargs(config)
    with torch.device("meta"):
        model = WanTransformer3DModel(**kwargs)
        if sla:
            head_dim = model.config.attention_head_dim
            for block in model.blocks:
                block.attn1.add_module(ckpt.PROJ_L, nn.Linear(head_dim, head_dim))
    return model


def _finish(model: WanTransformer3DModel, device: torch.device) -> None:
    """Rebuild the RoPE tables (non-persistent buffers, left on meta by ``_skeleton``) and go to inference."""
    cfg = model.config
    model.rope = WanRotaryPosEmbed(cfg.attention_head_dim, tuple(cfg.patch_size), cfg.rope_max_seq_len).to(
        device
    )
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"tensors left unmaterialized: {leftover[:5]}")
    model.requires_grad_(False)
    model.eval()


def _materialize_random(model: WanTransformer3DModel, device: torch.device, dtype: torch.dtype) -> None:
    """Allocate every parameter on ``device`` and initialise it as diffusers' constructor would."""
    for mod_name, mod in model.named_modules():
        for pname, p in list(mod._parameters.items()):
            if p is None:
                continue
            full = f"{mod_name}.{pname}" if mod_name else pname
            t = torch.empty(p.shape, dtype=param_dtype(full, dtype), device=device)
            mod._parameters[pname] = nn.Parameter(t, requires_grad=False)
    done: set[int] = set()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.Linear, nn.Conv3d, nn.LayerNorm, nn.RMSNorm)):
                mod.reset_parameters()
                done.update(id(p) for p in mod.parameters(recurse=False))
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "scale_shift_table":
                p.normal_().div_(p.shape[-1] ** 0.5)  # randn / sqrt(dim), like diffusers
                done.add(id(p))
    left = [n for n, p in model.named_parameters() if id(p) not in done]
    if left:
        raise RuntimeError(f"no initialiser for {left[:5]}")


def build_transformer(
    config: Mapping[str, Any],
    *,
    attention: str = "sla",
    sla_topk: float = 0.1,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    precision: str = "bf16",
) -> WanTransformer3DModel:
    """A random-init ``WanTransformer3DModel(**config)`` with our self-attention and a proj_l per block.

    Parameters are allocated directly on ``device`` in ``dtype`` (fp32 modules kept fp32 under fp16/bf16),
    so real sizes can be built on a GPU without a CPU copy. ``device="meta"`` returns the shape-only skeleton.
    Seed with ``torch.manual_seed`` (and the CUDA seed) for reproducible weights. ``precision="fp8"`` then
    quantizes the block linears (``generator.engine.fp8``), one layer at a time.
    """
    model = _skeleton(config, sla=True)
    device = torch.device(device)
    if device.type != "meta":
        _materialize_random(model, device, dtype)
        _finish(model, device)
        if precision == "fp8":
            fp8.convert_to_fp8(model, out_dtype=dtype)
    set_attention(model, attention, sla_topk)
    model.turbo_precision = precision
    return model


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_transformer(
    path: str | Path,
    *,
    config: Mapping[str, Any],
    attention: str = "sla",
    sla_topk: float = 0.1,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    quantized: bool | None = None,
    precision: str = "bf16",
) -> WanTransformer3DModel:
    """Load a Wan DiT from a TurboDiffusion ``.pth`` (plain or ``-quant``, int8 tiles dequantized to
    ``dtype``), an original Wan file, or a diffusers folder / safetensors file; strictly, tensor by tensor.

    ``config`` holds the ``WanTransformer3DModel`` kwargs the file must match. ``attention`` "sla"/"sagesla"
    need a file with SLA proj_l weights; "dense" accepts any (proj_l kept but unused); "auto" picks "sla"
    when the file has proj_l, else "dense". ``quantized`` True/False requires a -quant / plain file (None:
    either). Any mismatch raises ``CheckpointError`` naming what the file is and what was configured.

    ``precision="fp8"``: the block linears are quantized per output channel as each tensor arrives (a -quant
    file's int8 tiles are dequantized to float32 one tensor at a time, then requantized), so the model is
    never held in bf16: peak memory is the fp8 model plus one float32 weight.
    """
    if precision not in ("bf16", "fp8"):
        raise ValueError(f"precision must be 'bf16' or 'fp8' here, got {precision!r}")
    _check_attention(attention, sla_topk)
    device = torch.device(device)
    src = ckpt.open_weights(path)
    conv = ckpt.convert_source(src)
    kwargs = model_kwargs(config)
    probe = _skeleton(kwargs, sla=False)  # fills in diffusers' defaults for the comparison
    full_config = dict(probe.config)
    patch = tuple(full_config["patch_size"])
    info = ckpt.classify(src.shapes, conv, path=str(src.path), source_kind=src.kind, patch_size=patch)
    ckpt.check_compatible(
        info,
        full_config,
        need_sla=attention in ("sla", "sagesla"),
        quantized=quantized,
        folder_config=src.folder_config,
    )

    model = _skeleton(kwargs, sla=info.sla) if info.sla else probe
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    ckpt.check_keys(info, ckpt.target_shapes(src.shapes, conv, patch), expected)
    targets = {name: (shape, param_dtype(name, dtype)) for name, shape in expected.items()}
    fp8_weights: set[str] = set()
    if precision == "fp8":
        names = fp8.block_linear_names(model)
        fp8_weights = {f"{n}.weight" for n in names}
        for w in fp8_weights:  # quantized from float32, whatever the file stores
            targets[w] = (targets[w][0], torch.float32)
        fp8.swap_to_empty_fp8(model, names, out_dtype=dtype)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in ckpt.iter_tensors(src, conv, targets, device):
        if name in fp8_weights:
            q, scale = fp8.quantize_rows(t)
            del t
            tensors[name], tensors[name[: -len("weight")] + "weight_scale"] = q, scale
        else:
            tensors[name] = t
    model.load_state_dict(tensors, strict=True, assign=True)
    del tensors
    _finish(model, device)
    set_attention(model, attention, sla_topk)
    model.turbo_checkpoint = info  # what was loaded, for the engine's /readyz info
    model.turbo_precision = precision
    return model


# --------------------------------------------------------------------------------------------------
# Attention selection
# --------------------------------------------------------------------------------------------------


def _check_attention(attention: str, sla_topk: float) -> None:
    if attention not in ATTENTIONS:
        raise ValueError(f"unknown attention {attention!r}; expected one of {ATTENTIONS}")
    if not 0.0 < float(sla_topk) <= 1.0:
        raise ValueError(f"sla_topk must be in (0, 1], got {sla_topk}")


def has_sla_weights(model: WanTransformer3DModel) -> bool:
    """True when every block's self-attention has its SLA proj_l."""
    blocks = getattr(model, "blocks", [])
    return len(blocks) > 0 and all(getattr(b.attn1, ckpt.PROJ_L, None) is not None for b in blocks)


def set_attention(model: WanTransformer3DModel, attention: str, sla_topk: float = 0.1) -> str:
    """Install our self-attention processor on every block's attn1; returns the mode in use.

    "auto" resolves to "sla" when the model has proj_l weights, else "dense". Asking for "sla"/"sagesla"
    on a model without proj_l raises ``EngineError`` (code "attention_unavailable").
    """
    _check_attention(attention, sla_topk)
    sla_ok = has_sla_weights(model)
    mode = ("sla" if sla_ok else "dense") if attention == "auto" else attention
    if mode != "dense" and not sla_ok:
        raise EngineError(
            f"Attention '{attention}' needs SLA weights (proj_l), which this model was loaded without; "
            "use 'dense' or 'auto'.",
            code="attention_unavailable",
        )
    processor = TurboSelfAttnProcessor(mode, sla_topk)
    for block in model.blocks:
        block.attn1.set_processor(processor)
    model.turbo_attention = mode
    model.turbo_sla_topk = float(sla_topk)
    return mode
