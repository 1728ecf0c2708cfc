"""The umT5 text encoder: prompt cleaning, loading (original Wan ``.pth`` or a transformers folder), encoding.

Encoding matches diffusers' WanPipeline: cleaned prompt (ftfy, double html unescape, whitespace collapsed),
tokenized to exactly ``max_length`` (512) tokens with the EOS token, run with the attention mask, and the
embeddings past the real token count set to zero. ``TextEncoder`` keeps an LRU cache of embeddings so a
remix with the same prompt skips the encoder.

The original file (``models_t5_umt5-xxl-enc-bf16.pth``, Wan's own ``T5Encoder``) names its tensors
``token_embedding.weight``, ``blocks.{i}.norm1|norm2.weight``, ``blocks.{i}.attn.{q,k,v,o}.weight``,
``blocks.{i}.ffn.gate.0|fc1|fc2.weight``, ``blocks.{i}.pos_embedding.embedding.weight`` (a relative position
bias per layer) and ``norm.weight``. Wan's feed-forward is ``fc2(fc1(x) * gelu_tanh(gate(x)))``, which is
transformers' gated-gelu ``wo(gelu_new(wi_0(x)) * wi_1(x))`` with gate -> wi_0 and fc1 -> wi_1.
"""

from __future__ import annotations

import html
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from generator.engine.offline import ensure_offline

ensure_offline()

import ftfy  # noqa: E402
import torch  # noqa: E402
from transformers import PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel  # noqa: E402

from generator.engine.api import CheckpointError  # noqa: E402
from generator.engine.checkpoints import open_weights  # noqa: E402
from generator.engine.weights import describe_weights  # noqa: E402

MAX_TEXT_TOKENS = 512
UMT5_XXL_SHAPE = {"vocab": 256384, "dim": 4096, "layers": 24, "heads": 64, "ffn": 10240}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")

# Wan block sub-key -> transformers sub-key (inside encoder.block.{i}.)
_BLOCK_MAP = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}


def prompt_clean(text: str) -> str:
    """ftfy repair, html unescape (twice, for double-escaped text), whitespace collapsed and stripped."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


# --------------------------------------------------------------------------------------------------
# The original Wan layout
# --------------------------------------------------------------------------------------------------


def is_wan_t5(keys: Mapping[str, Any] | list[str]) -> bool:
    ks = set(keys)
    return "token_embedding.weight" in ks and "blocks.0.attn.q.weight" in ks


def is_transformers_t5(keys: Mapping[str, Any] | list[str]) -> bool:
    ks = set(keys)
    return "encoder.block.0.layer.0.SelfAttention.q.weight" in ks and (
        "shared.weight" in ks or "encoder.embed_tokens.weight" in ks
    )


def umt5_config(vocab: int, dim: int, dim_attn: int, dim_ffn: int, buckets: int, heads: int,
                 layers: int) -> UMT5Config:
    if dim_attn % heads:
        raise CheckpointError(f"umT5 attention width {dim_attn} is not a multiple of {heads} heads")
    return UMT5Config(
        vocab_size=vocab,
        d_model=dim,
        d_kv=dim_attn // heads,
        d_ff=dim_ffn,
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def wan_t5_config(shapes: Mapping[str, tuple[int, ...]]) -> UMT5Config:
    """A ``UMT5Config`` for the encoder described by an original-layout state dict's shapes."""
    try:
        vocab, dim = shapes["token_embedding.weight"]
        dim_attn = shapes["blocks.0.attn.q.weight"][0]
        dim_ffn = shapes["blocks.0.ffn.fc1.weight"][0]
        buckets, heads = shapes["blocks.0.pos_embedding.embedding.weight"]
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"not a complete Wan umT5 encoder state dict (missing or odd {e})") from None
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := _BLOCK_RE.match(k)))
    return umt5_config(vocab, dim, dim_attn, dim_ffn, buckets, heads, layers)


def transformers_t5_config(shapes: Mapping[str, tuple[int, ...]]) -> UMT5Config:
    """A ``UMT5Config`` from a transformers-named encoder state dict (e.g. a single safetensors file)."""
    pre = "encoder.block.0.layer."
    try:
        vocab, dim = shapes.get("shared.weight") or shapes["encoder.embed_tokens.weight"]
        dim_attn = shapes[pre + "0.SelfAttention.q.weight"][0]
        dim_ffn = shapes[pre + "1.DenseReluDense.wi_0.weight"][0]
        buckets, heads = shapes[pre + "0.SelfAttention.relative_attention_bias.weight"]
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"not a complete umT5 encoder state dict (missing or odd {e})") from None
    layers = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.block."))
    return umt5_config(vocab, dim, dim_attn, dim_ffn, buckets, heads, layers)


def transformers_t5_mapping(keys: list[str]) -> dict[str, str]:
    """Identity mapping of a transformers-named encoder (the tied embedding filled from whichever exists);
    decoder / lm_head tensors of a full T5 are ignored."""
    ks = set(keys)
    emb = "shared.weight" if "shared.weight" in ks else "encoder.embed_tokens.weight"
    mapping = {k: k for k in keys if k.startswith("encoder.") and k != "encoder.embed_tokens.weight"}
    mapping["shared.weight"] = emb
    mapping["encoder.embed_tokens.weight"] = emb
    return mapping


def wan_t5_to_transformers(keys: list[str]) -> dict[str, str]:
    """transformers key -> original key, for every tensor of the encoder; raises on unknown/missing keys."""
    mapping: dict[str, str] = {}
    unknown: list[str] = []
    for key in keys:
        if key == "token_embedding.weight":
            mapping["shared.weight"] = key
            mapping["encoder.embed_tokens.weight"] = key  # tied in UMT5EncoderModel
        elif key == "norm.weight":
            mapping["encoder.final_layer_norm.weight"] = key
        elif (m := _BLOCK_RE.match(key)) and m.group(2) in _BLOCK_MAP:
            mapping[f"encoder.block.{m.group(1)}.{_BLOCK_MAP[m.group(2)]}"] = key
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"unexpected tensors for a Wan umT5 encoder: {', '.join(unknown[:5])}"
            + (" (this looks like a full T5 with a decoder)" if any(k.startswith("decoder.") for k in unknown) else "")
        )
    return mapping


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _folder_with(path: Path, marker: str, sub: str) -> Path:
    """A diffusers pipeline root holds the component in ``sub``; accept either."""
    if (path / marker).exists():
        return path
    if (path / sub / marker).exists():
        return path / sub
    return path


def load_text_encoder(path: str | Path, *, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> UMT5EncoderModel:
    """umT5 encoder from the original Wan ``.pth`` or a transformers ``UMT5EncoderModel`` folder, offline."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"text encoder {p} does not exist")
    if p.is_dir():
        folder = _folder_with(p, "config.json", "text_encoder")
        try:
            model = UMT5EncoderModel.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
        except Exception as e:
            raise CheckpointError(f"{folder} is not a transformers UMT5EncoderModel folder: {e}") from e
        return model.to(device).eval().requires_grad_(False)
    src = open_weights(p)
    shapes = dict(src.shapes)
    if is_wan_t5(shapes):
        config = wan_t5_config(shapes)
        mapping = wan_t5_to_transformers(list(shapes))
    elif is_transformers_t5(shapes):
        config = transformers_t5_config(shapes)
        mapping = transformers_t5_mapping(list(shapes))
    else:
        raise CheckpointError(
            f"{p} is not a umT5 text encoder (models_t5_umt5-xxl-enc-bf16.pth layout); it looks like "
            f"{describe_weights(shapes)}"
        )
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    expected = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    missing = sorted(set(expected) - set(mapping))
    if missing:
        raise CheckpointError(f"{p}: umT5 tensors missing: {', '.join(missing[:5])}")
    tensors: dict[str, torch.Tensor] = {}
    cache: dict[str, torch.Tensor] = {}
    for target, source in mapping.items():
        if shapes[source] != expected[target]:
            raise CheckpointError(f"{p}: {source} has shape {shapes[source]}, expected {expected[target]}")
        if source not in cache:  # the tied embedding is converted once and shared
            cache[source] = src.get(source).to(device=device, dtype=dtype)
        tensors[target] = cache[source]
    model.load_state_dict(tensors, strict=True, assign=True)
    model.encoder.embed_tokens = model.shared  # keep the tie after assign
    return model.eval().requires_grad_(False)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The umT5 tokenizer from a local folder (google/umt5-xxl files, or a pipeline's ``tokenizer`` folder)."""
    from transformers import AutoTokenizer

    p = Path(path).expanduser()
    if not p.is_dir():
        raise CheckpointError(f"tokenizer folder {p} does not exist (download google/umt5-xxl's tokenizer files)")
    folder = p if any((p / n).exists() for n in ("tokenizer.json", "spiece.model", "tokenizer_config.json")) \
        else p / "tokenizer"
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise CheckpointError(f"{p} holds no usable umT5 tokenizer: {e}") from e


# --------------------------------------------------------------------------------------------------
# Encoding with a cache
# --------------------------------------------------------------------------------------------------


class TextEncoder:
    """umT5 + tokenizer + an LRU cache of prompt embeddings (kept on the CPU, [1, max_length, dim])."""

    def __init__(self, model: UMT5EncoderModel, tokenizer: PreTrainedTokenizerBase, *,
                 max_length: int = MAX_TEXT_TOKENS, cache_size: int = 64) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.cache_size = max(0, cache_size)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        return int(self.model.config.d_model)

    def cached(self, prompt: str) -> bool:
        return prompt_clean(prompt) in self._cache

    def tokenize(self, cleaned: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask [1, max_length] of an already cleaned prompt (cleaning is not idempotent)."""
        out = self.tokenizer(
            [cleaned], padding="max_length", max_length=self.max_length, truncation=True,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        return out.input_ids, out.attention_mask

    @torch.no_grad()
    def _run(self, text: str) -> torch.Tensor:
        ids, mask = self.tokenize(text)
        device = self.device
        hidden = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        n = int(mask.gt(0).sum())
        hidden[:, n:] = 0  # WanPipeline: the DiT sees zeros past the real tokens (no mask)
        return hidden.to("cpu")

    def encode(self, prompt: str) -> torch.Tensor:
        """[1, max_length, dim] embedding on the CPU in the encoder's dtype (cached by cleaned prompt)."""
        key = prompt_clean(prompt)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            self.hits += 1
            return hit
        self.misses += 1
        emb = self._run(key)
        if self.cache_size:
            self._cache[key] = emb
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return emb

    def clear_cache(self) -> None:
        self._cache.clear()
