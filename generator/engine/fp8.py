"""fp8 (e4m3) linear layers for the Wan DiT on GPUs with fp8 tensor cores (Hopper, Ada, Blackwell).

Weights: one scale per output channel (row of the [out, in] weight). Activations: one scale per token,
computed on the fly from the token's absolute maximum. The GEMM is ``torch._scaled_mm`` with row-wise scales,
bf16 output, bias fused. Where that cannot run (CPU, cards without fp8) ``Fp8Linear`` computes the same
quantized product in float32: the oracle of the GPU path in tests, never the serving path (the engine keeps
bf16 there, see ``resolve_precision``).

Only the ten big linears of each block (self q/k/v/out, cross q/k/v/out, FFN in/out) become fp8: they hold
almost all of a step's arithmetic outside attention. Embeddings, modulation tables, norms, the head and the SLA
proj_l stay in their precision (small, and the first to hurt accuracy).

Error budget: e4m3 keeps 3 mantissa bits, a relative rounding error of at most 2^-4 per element and an RMS
of about 2.5% for values spread over a binade; with both operands quantized, the relative L2 error of one
linear's output on unstructured data is about 3.5% (``LINEAR_REL_L2_BOUND`` leaves margin for that).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
LINEAR_REL_L2_BOUND = 0.06  # one fp8 linear vs float32, random data (see the module docstring)
PRECISIONS = ("auto", "bf16", "fp8")

# Names of the linears inside one diffusers ``WanTransformerBlock`` that run in fp8.
BLOCK_LINEARS = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ffn.net.0.proj", "ffn.net.2",
)
_AMAX_FLOOR = 1e-12  # an all-zero row gets scale ~0 but finite, so 0 / scale stays 0


def fp8_capable(device: torch.device) -> bool:
    """True for CUDA devices whose tensor cores take e4m3 operands (compute capability 8.9 and later)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def device_name(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return "the CPU"


def resolve_precision(setting: str, device: torch.device) -> str:
    """``auto`` -> fp8 where the card has fp8 tensor cores, else bf16. ``fp8`` on a device without them is a
    configuration error, raised here (worker start), never in the middle of a job."""
    if setting not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {setting!r}")
    if setting == "auto":
        return "fp8" if fp8_capable(device) else "bf16"
    if setting == "fp8" and not fp8_capable(device):
        raise ValueError(
            f"precision = \"fp8\" needs a GPU with fp8 tensor cores (compute capability 8.9 or later: Ada, "
            f"Hopper, Blackwell), but this worker runs on {device_name(device)}. Set precision = \"auto\" or "
            f"\"bf16\" for this model."
        )
    return setting


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise e4m3 quantization of a 2-D tensor: (q [M, K] e4m3, scale [M, 1] float32), x ~= q * scale.

    Each row's absolute maximum maps to 448, so no value saturates; computed in float32."""
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(x.shape)}")
    xf = x.float()
    scale = xf.abs().amax(dim=1, keepdim=True).clamp_min(_AMAX_FLOOR) / FP8_MAX
    q = (xf / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


class Fp8Linear(nn.Module):
    """``y = x W^T + b`` with W stored as e4m3 plus a float32 scale per output channel.

    ``weight`` [out, in] e4m3 and ``weight_scale`` [out, 1] float32 are buffers (state-dict keys
    ``weight`` / ``weight_scale``); ``bias`` stays in the model's dtype. Output dtype: ``out_dtype``.

    ``lora_down`` [R, in] / ``lora_up`` [out, R] (None unless a job's LoRA is applied, see ``engine.lora``)
    add ``(x A^T) B^T`` to the output. They are buffers, not a forward hook, because a block compiled
    before a hook is added never calls it; a buffer going from None to a tensor is a guard, so the
    compiled block is re-specialised instead of silently skipping the LoRA. Not in the state dict.
    """

    lora_down: torch.Tensor | None
    lora_up: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 out_dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.out_dtype = out_dtype
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, 1, dtype=torch.float32, device=device))
        self.bias: nn.Parameter | None = (
            nn.Parameter(torch.empty(out_features, dtype=out_dtype, device=device), requires_grad=False)
            if bias else None
        )
        self.register_buffer("lora_down", None, persistent=False)
        self.register_buffer("lora_up", None, persistent=False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 -> {self.out_dtype}"

    @classmethod
    def from_linear(cls, linear: nn.Linear, out_dtype: torch.dtype = torch.bfloat16) -> Fp8Linear:
        """Quantize an ``nn.Linear`` (any float dtype) into a new ``Fp8Linear`` on the same device."""
        w = linear.weight.detach()
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, out_dtype=out_dtype,
                  device=w.device)
        mod.set_weight(w, linear.bias.detach() if linear.bias is not None else None)
        return mod

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Quantize a float [out, in] weight per output channel (in float32) into this layer."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight {tuple(weight.shape)} does not fit {self.out_features}x{self.in_features}")
        q, s = quantize_rows(weight)
        self.weight = q
        self.weight_scale = s
        if bias is not None:
            self.bias = nn.Parameter(bias.to(self.out_dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        xq, xs = quantize_rows(x2)
        if x2.is_cuda:  # the engine puts fp8 only on capable cards (resolve_precision)
            out = torch._scaled_mm(xq, self.weight.t(), scale_a=xs, scale_b=self.weight_scale.t(),
                                   bias=self.bias, out_dtype=self.out_dtype)
        else:
            out = dequantize_rows(xq, xs) @ dequantize_rows(self.weight, self.weight_scale).t()
            if self.bias is not None:
                out = out + self.bias.float()
        down, up = self.lora_down, self.lora_up
        if down is not None and up is not None:  # the branch runs in its buffers' dtype, on the unquantized x
            out = out + ((x2.to(down.dtype) @ down.t()) @ up.t()).to(out.dtype)
        return out.to(self.out_dtype).reshape(*lead, self.out_features)


def block_linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the linears that run in fp8 (the ten per block), in model order."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError("not a Wan transformer: no blocks")
    return [f"blocks.{i}.{leaf}" for i in range(len(blocks)) for leaf in BLOCK_LINEARS]


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return model.get_submodule(path), leaf


def convert_to_fp8(model: nn.Module, names: Iterable[str] | None = None,
                   out_dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace the block linears of a loaded model by ``Fp8Linear`` in place, one at a time (peak memory: the
    model plus one layer); returns how many were converted."""
    n = 0
    for name in block_linear_names(model) if names is None else names:
        parent, leaf = _parent(model, name)
        lin = getattr(parent, leaf)
        if isinstance(lin, Fp8Linear):
            continue
        if not isinstance(lin, nn.Linear):
            raise TypeError(f"{name} is {type(lin).__name__}, not a Linear")
        setattr(parent, leaf, Fp8Linear.from_linear(lin, out_dtype))
        del lin
        n += 1
    return n


def swap_to_empty_fp8(model: nn.Module, names: Iterable[str], out_dtype: torch.dtype = torch.bfloat16) -> None:
    """On a meta skeleton: put empty ``Fp8Linear``s where the block linears are, for a state dict of fp8
    weights to be assigned into (``load_state_dict(..., assign=True)``)."""
    for name in names:
        parent, leaf = _parent(model, name)
        lin = getattr(parent, leaf)
        setattr(parent, leaf, Fp8Linear(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                        out_dtype=out_dtype, device="meta"))


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of a model (fp8 weights count one byte each)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())
