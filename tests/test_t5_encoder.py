"""umT5 text encoder: the original Wan layout loads into transformers' UMT5EncoderModel and computes what
Wan's encoder computes; prompt cleaning, padding/zeroing and the embedding cache."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from engine_synth import wan_t5_state_dict

from generator.engine.api import CheckpointError
from generator.engine.text import TextEncoder, load_text_encoder, prompt_clean
from generator.engine.tiny import tiny_text_encoder, tiny_tokenizer

VOCAB, DIM, HEADS, FFN, LAYERS, BUCKETS = 64, 16, 4, 24, 2, 32


def _buckets(length: int) -> torch.Tensor:
    """Wan's bidirectional relative-position buckets (max distance 128)."""
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    half = BUCKETS // 2
    out = (rel > 0).long() * half
    rel = rel.abs()
    exact = half // 2
    large = exact + (torch.log(rel.float().clamp(min=1) / exact) / math.log(128 / exact) * (half - exact)).long()
    large = large.clamp(max=half - 1)
    return out + torch.where(rel < exact, rel, large)


def wan_reference(sd: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Wan's T5Encoder forward written out (float32): pre-norm blocks, unscaled attention with a per-layer
    relative bias, FFN = fc2(fc1(x) * gelu_tanh(gate(x)))."""
    w = {k: v.float() for k, v in sd.items()}

    def norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    b, n = ids.shape
    x = w["token_embedding.weight"][ids]
    bucket = _buckets(n)
    for i in range(LAYERS):
        p = f"blocks.{i}."
        h = norm(x, w[p + "norm1.weight"])
        q, k, v = (
            (h @ w[p + f"attn.{c}.weight"].T).view(b, n, HEADS, -1) for c in "qkv"
        )
        s = torch.einsum("binc,bjnc->bnij", q, k) + w[p + "pos_embedding.embedding.weight"][bucket].permute(2, 0, 1)
        s = s.masked_fill(mask.view(b, 1, 1, n) == 0, torch.finfo(torch.float32).min)
        a = torch.einsum("bnij,bjnc->binc", s.softmax(-1), v).reshape(b, n, -1)
        x = x + a @ w[p + "attn.o.weight"].T
        h = norm(x, w[p + "norm2.weight"])
        gate = torch.nn.functional.gelu(h @ w[p + "ffn.gate.0.weight"].T, approximate="tanh")
        x = x + ((h @ w[p + "ffn.fc1.weight"].T) * gate) @ w[p + "ffn.fc2.weight"].T
    return norm(x, w["norm.weight"])


@pytest.fixture(scope="module")
def t5_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    sd = wan_t5_state_dict()
    path = tmp_path_factory.mktemp("t5") / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save(sd, path)
    return path, sd


def test_every_original_key_lands_in_its_slot(t5_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, sd = t5_file
    model = load_text_encoder(path, dtype=torch.float32)
    cfg = model.config
    assert (cfg.vocab_size, cfg.d_model, cfg.num_heads, cfg.d_ff, cfg.num_layers) == (VOCAB, DIM, HEADS, FFN, LAYERS)
    blk = model.encoder.block[1]
    pairs = {
        "blocks.1.ffn.gate.0.weight": blk.layer[1].DenseReluDense.wi_0.weight,
        "blocks.1.ffn.fc1.weight": blk.layer[1].DenseReluDense.wi_1.weight,
        "blocks.1.ffn.fc2.weight": blk.layer[1].DenseReluDense.wo.weight,
        "blocks.1.attn.o.weight": blk.layer[0].SelfAttention.o.weight,
        "blocks.1.pos_embedding.embedding.weight": blk.layer[0].SelfAttention.relative_attention_bias.weight,
        "blocks.1.norm2.weight": blk.layer[1].layer_norm.weight,
        "norm.weight": model.encoder.final_layer_norm.weight,
        "token_embedding.weight": model.encoder.embed_tokens.weight,
    }
    for key, param in pairs.items():
        torch.testing.assert_close(param, sd[key].float(), rtol=0, atol=0, msg=key)
    # nothing dropped or duplicated: the loaded tensors are exactly the file's (the tied embedding once)
    loaded = sorted(float(p.double().sum()) for p in model.parameters())
    source = sorted(float(t.double().sum()) for t in sd.values())
    assert loaded == pytest.approx(source, rel=1e-9, abs=1e-9)


def test_loaded_encoder_computes_what_wan_computes(t5_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, sd = t5_file
    model = load_text_encoder(path, dtype=torch.float32)
    ids = torch.tensor([[5, 9, 33, 1, 0, 0, 0], [7, 7, 12, 40, 2, 63, 1]])
    mask = (torch.arange(7)[None] < torch.tensor([[4], [7]])).long()
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, wan_reference(sd, ids, mask), rtol=1e-4, atol=1e-4)


def test_wrong_or_broken_files_get_clear_errors(tmp_path: Path, t5_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    vae_like = tmp_path / "vae.pth"
    torch.save({"decoder.middle.0.residual.0.gamma": torch.ones(4, 1, 1, 1), "conv2.weight": torch.ones(1)}, vae_like)
    with pytest.raises(CheckpointError, match=r"not a umT5 text encoder.*VAE"):
        load_text_encoder(vae_like)
    truncated = tmp_path / "t5.pth"
    truncated.write_bytes(t5_file[0].read_bytes()[:2000])
    with pytest.raises(CheckpointError, match=r"truncated|could not be read"):
        load_text_encoder(truncated)
    partial = {k: v for k, v in t5_file[1].items() if not k.startswith("blocks.1.ffn.fc1")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="missing"):
        load_text_encoder(tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_text_encoder(tmp_path / "nope.pth")


def test_prompt_clean() -> None:
    assert prompt_clean("  a &amp;amp; b\n\n\t c  ") == "a & b c"
    assert prompt_clean("caf\u00c3\u00a9 au lait") == "café au lait"  # ftfy repairs mojibake


def test_embeddings_are_zero_past_the_prompt_and_cached() -> None:
    enc = TextEncoder(tiny_text_encoder(), tiny_tokenizer(), cache_size=2)
    ids, mask = enc.tokenize("a cat")
    assert ids.shape == (1, 512) and int(mask.sum()) == len("a cat") + 1  # bytes + </s>
    assert int(ids[0, int(mask.sum()) - 1]) == 1 and int(ids[0, -1]) == 0
    emb = enc.encode("a cat")
    n = int(mask.sum())
    assert emb.shape == (1, 512, enc.dim)
    assert torch.count_nonzero(emb[0, n:]) == 0 and torch.all(emb[0, :n].abs().sum(-1) > 0)
    assert not torch.equal(enc.encode("a dog")[0, :n], emb[0, :n])
    assert enc.encode("  a   cat ") is emb and (enc.hits, enc.misses) == (1, 2)  # same cleaned prompt
    enc.encode("a bird")  # evicts the least recently used ("a dog")
    assert enc.cached("a cat") and enc.cached("a bird") and not enc.cached("a dog")


def test_long_prompts_truncate_to_512_tokens() -> None:
    enc = TextEncoder(tiny_text_encoder(), tiny_tokenizer())
    ids, mask = enc.tokenize("x" * 2000)
    assert ids.shape == (1, 512) and int(mask.sum()) == 512
