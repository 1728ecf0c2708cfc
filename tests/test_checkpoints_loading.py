"""load_transformer on synthetic files in the real layouts (tiny config): round trips and error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel
from test_checkpoints_synth import (
    QUANT_LINEARS,
    TINY,
    dequantize_reference,
    quantize_reference,
    to_turbo_layout,
    turbo_name,
)

from generator import load_transformer
from generator.engine.api import CheckpointError
from generator.engine.checkpoints import inspect_checkpoint
from generator.engine.transformer import build_transformer

TOPK = 0.5  # 288 tokens = 5 key blocks: keeps 2, so the sparse branch really is sparse


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "hidden_states": torch.randn(1, 4, 2, 24, 24, generator=g),
        "timestep": torch.tensor([700.0]),
        "encoder_hidden_states": torch.randn(1, 8, 32, generator=g),
    }


def _run(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs(), return_dict=False)[0]


def assert_same_outputs(got: torch.Tensor, want: torch.Tensor) -> None:
    """Forward passes of two model instances (or load paths) holding the same weights.

    Not bitwise: the BLAS picks its kernels, and so the summation order, by CPU and by the memory
    alignment of each instance's tensors (4.8e-7 apart on an AMD EPYC). Reordering a K-term float32 dot
    product moves it by about sqrt(K)*u relative (u = 2**-24 ~ 6e-8), at most (K-1)*u; the longest
    reductions here are K <= 288 (keys per query, ffn_dim 192), i.e. ~1e-6 typical, 1.7e-5 worst case, on
    outputs of size ~2 (max |out| 1.9) through two blocks. 1e-5 covers that with room; a wrong weight or
    attention path moves the output by > 1e-3 (see test_dense_equals_stock_diffusers).
    """
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def source() -> WanTransformer3DModel:
    """A random SLA model whose weights are bf16-representable, so bf16 storage is lossless."""
    torch.manual_seed(0)
    model = build_transformer(TINY, attention="sla", sla_topk=TOPK)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:  # uniform init gives every 128x128 tile the same amax: make the tiles differ
                rows = torch.linspace(0.5, 1.5, p.shape[0])[:, None]
                cols = torch.linspace(0.5, 1.5, p.shape[1])[None, :]
                p.mul_(rows * cols)
            p.copy_(p.to(torch.bfloat16).float())
    return model


@pytest.fixture(scope="module")
def files(source: WanTransformer3DModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ckpt")
    sd = source.state_dict()
    plain_sd = {k: v for k, v in sd.items() if ".proj_l." not in k}
    out = {
        "sla": d / "TurboWan-tiny.pth",
        "quant": d / "TurboWan-tiny-quant.pth",
        "wrapped": d / "wrapped.pth",
        "plain": d / "plain-wan.pth",
    }
    torch.save(to_turbo_layout(sd), out["sla"])
    torch.save(to_turbo_layout(sd, quant=True), out["quant"])
    torch.save(to_turbo_layout(sd, wrap=True), out["wrapped"])
    torch.save(to_turbo_layout(plain_sd, patch_2d=False), out["plain"])  # original Wan: 5-D patch, no SLA
    return out


def test_sla_file_loads_exactly(source: WanTransformer3DModel, files: dict[str, Path]) -> None:
    model = load_transformer(files["sla"], config=TINY, attention="sla", sla_topk=TOPK)
    src_sd, sd = source.state_dict(), model.state_dict()
    assert sd.keys() == src_sd.keys()
    for k in src_sd:
        assert torch.equal(sd[k], src_sd[k]), k  # stored values: a lossless copy, so bit for bit
    assert_same_outputs(_run(model), _run(source))
    assert model.turbo_attention == "sla"
    assert model.turbo_checkpoint.sla and not model.turbo_checkpoint.quant


def test_wrapper_infix_is_stripped(source: WanTransformer3DModel, files: dict[str, Path]) -> None:
    raw = torch.load(files["wrapped"], weights_only=True)
    assert any("_checkpoint_wrapped_module." in k for k in raw)
    model = load_transformer(files["wrapped"], config=TINY, attention="sla", sla_topk=TOPK)
    assert_same_outputs(_run(model), _run(source))


def test_dense_equals_stock_diffusers(source: WanTransformer3DModel, files: dict[str, Path]) -> None:
    stock = WanTransformer3DModel(**TINY).eval()
    stock.load_state_dict({k: v for k, v in source.state_dict().items() if ".proj_l." not in k})
    model = load_transformer(files["sla"], config=TINY, attention="dense")
    assert_same_outputs(_run(model), _run(stock))
    # SLA output is a different function of the same weights.
    sla = load_transformer(files["sla"], config=TINY, attention="sla", sla_topk=TOPK)
    assert (_run(sla) - _run(stock)).abs().max() > 1e-3


def test_quant_file_dequantizes_per_tile(source: WanTransformer3DModel, files: dict[str, Path]) -> None:
    model = load_transformer(files["quant"], config=TINY, attention="sla", sla_topk=TOPK, quantized=True)
    assert model.turbo_checkpoint.quant
    sd, src_sd = model.state_dict(), source.state_dict()
    n_quant = 0
    for k, v in src_sd.items():
        name = turbo_name(k)
        linear = name.split(".", 2)[2].removesuffix(".weight") if name.startswith("blocks.") else ""
        if name.endswith(".weight") and linear in QUANT_LINEARS:
            expected = dequantize_reference(*quantize_reference(v))
            n_quant += 1
        else:
            expected = v
        assert torch.equal(sd[k], expected), k  # exact: q * scale is one correctly rounded product
    assert n_quant == 10 * TINY["num_layers"]
    scale = torch.load(files["quant"], weights_only=True)["blocks.0.ffn.0.scale"]
    assert scale.shape == (2, 1) and scale[0, 0] != scale[1, 0]  # the tile test is not vacuous
    ref, out = _run(source), _run(model)
    assert not torch.equal(out, ref)
    assert (out - ref).norm() / ref.norm() < 0.05


def test_bf16_load_keeps_fp32_modules(files: dict[str, Path]) -> None:
    model = load_transformer(files["quant"], config=TINY, attention="dense", dtype=torch.bfloat16)
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    assert dtypes["blocks.0.attn1.to_q.weight"] == torch.bfloat16
    assert dtypes["blocks.0.attn1.proj_l.weight"] == torch.bfloat16
    assert dtypes["blocks.0.attn1.norm_q.weight"] == torch.bfloat16
    assert dtypes["blocks.0.norm2.weight"] == torch.float32
    assert dtypes["blocks.1.scale_shift_table"] == torch.float32
    assert dtypes["condition_embedder.time_embedder.linear_1.weight"] == torch.float32
    assert dtypes["condition_embedder.time_proj.weight"] == torch.bfloat16
    inp = _inputs()
    with torch.no_grad():
        out = model(
            hidden_states=inp["hidden_states"].bfloat16(),
            timestep=inp["timestep"],
            encoder_hidden_states=inp["encoder_hidden_states"].bfloat16(),
            return_dict=False,
        )[0]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_plain_wan_file(source: WanTransformer3DModel, files: dict[str, Path]) -> None:
    info = inspect_checkpoint(files["plain"])
    assert (info.sla, info.quant, info.key_count, info.layout) == (
        False,
        False,
        15 + 27 * 2,
        "turbodiffusion",
    )
    with pytest.raises(CheckpointError, match=r"without SLA proj_l.*use attention 'dense'"):
        load_transformer(files["plain"], config=TINY, attention="sla")
    with pytest.raises(CheckpointError, match="without SLA proj_l"):
        load_transformer(files["plain"], config=TINY, attention="sagesla")
    model = load_transformer(files["plain"], config=TINY, attention="auto")
    assert model.turbo_attention == "dense"
    assert not any(".proj_l." in k for k in model.state_dict())
    dense_src = load_transformer(files["sla"], config=TINY, attention="dense")
    assert_same_outputs(_run(model), _run(dense_src))


def test_quant_vs_plain_expectation(files: dict[str, Path]) -> None:
    with pytest.raises(CheckpointError, match=r"not quantized.*but a -quant checkpoint \(int8 weights\) was"):
        load_transformer(files["sla"], config=TINY, quantized=True)
    with pytest.raises(CheckpointError, match=r"int8 -quant.*but a plain \(not quantized\) checkpoint was"):
        load_transformer(files["quant"], config=TINY, quantized=False)


def test_other_size_is_named(files: dict[str, Path]) -> None:
    bigger = {**TINY, "num_layers": 3, "num_attention_heads": 4}
    with pytest.raises(CheckpointError) as err:
        load_transformer(files["quant"], config=bigger)
    msg = str(err.value)
    assert "TurboDiffusion custom Wan DiT checkpoint (dim 64, 2 layers" in msg
    assert "dim 64 (configured 128)" in msg and "num_layers 2 (configured 3)" in msg


def _save_variant(sd: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save(sd, path)
    return path


def test_broken_state_dicts(files: dict[str, Path], tmp_path: Path) -> None:
    sd = torch.load(files["quant"], weights_only=True)
    missing = dict(sd)
    del missing["blocks.1.ffn.2.bias"]
    with pytest.raises(CheckpointError, match=r"1 missing \(e\.g\. blocks\.1\.ffn\.net\.2\.bias\)"):
        load_transformer(_save_variant(missing, tmp_path / "m.pth"), config=TINY)
    extra = {**sd, "blocks.0.self_attn.extra.weight": torch.zeros(2)}
    with pytest.raises(CheckpointError, match=r"1 unexpected \(e\.g\. blocks\.0\.self_attn\.extra\.weight\)"):
        load_transformer(_save_variant(extra, tmp_path / "x.pth"), config=TINY)
    half = dict(sd)
    del half["blocks.0.ffn.0.scale"]
    with pytest.raises(CheckpointError, match=r"ffn\.0\.int8_weight"):
        load_transformer(_save_variant(half, tmp_path / "h.pth"), config=TINY)
    bad_scale = {**sd, "blocks.0.ffn.0.scale": torch.ones(1, 1)}
    with pytest.raises(CheckpointError, match=r"ffn\.0\.scale has shape \[1, 1\], expected \[2, 1\]"):
        load_transformer(_save_variant(bad_scale, tmp_path / "s.pth"), config=TINY)
    bad_shape = {**sd, "blocks.1.self_attn.norm_q.weight": torch.ones(32)}
    with pytest.raises(CheckpointError, match=r"blocks\.1\.attn1\.norm_q\.weight has shape \[32\]"):
        load_transformer(_save_variant(bad_shape, tmp_path / "b.pth"), config=TINY)
    wrapped = {"state_dict": sd, "step": torch.tensor(3)}
    assert load_transformer(_save_variant(wrapped, tmp_path / "w.pth"), config=TINY).turbo_checkpoint.quant


def test_unreadable_files(files: dict[str, Path], tmp_path: Path) -> None:
    data = files["sla"].read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_transformer(truncated, config=TINY)
    garbage = tmp_path / "notes.pth"
    garbage.write_text("hello, not weights\n" * 10)
    with pytest.raises(CheckpointError, match="not a PyTorch or safetensors checkpoint"):
        load_transformer(garbage, config=TINY)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty"):
        load_transformer(empty, config=TINY)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_transformer(tmp_path / "nope.pth", config=TINY)
    with pytest.raises(CheckpointError, match="not a state dict: it holds a list"):
        load_transformer(_save_variant([torch.zeros(1)], tmp_path / "l.pth"), config=TINY)  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match="not a flat state dict of tensors"):
        load_transformer(_save_variant({"epoch": 3}, tmp_path / "e.pth"), config=TINY)  # type: ignore[dict-item]
    vae = {"decoder.conv1.weight": torch.zeros(2), "encoder.conv1.weight": torch.zeros(2)}
    with pytest.raises(
        CheckpointError, match="not a Wan diffusion-transformer checkpoint: it looks like a VAE"
    ):
        load_transformer(_save_variant(vae, tmp_path / "vae.pth"), config=TINY)


def test_diffusers_folders(source: WanTransformer3DModel, tmp_path: Path) -> None:
    stock = WanTransformer3DModel(**TINY).eval()
    stock.load_state_dict({k: v for k, v in source.state_dict().items() if ".proj_l." not in k})
    ref = _run(stock)
    single = tmp_path / "pipe" / "transformer"
    stock.save_pretrained(single)
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    for path in (single, tmp_path / "pipe"):  # a pipeline root resolves to its transformer/ folder
        model = load_transformer(path, config=TINY, attention="auto")
        assert model.turbo_attention == "dense" and model.turbo_checkpoint.layout == "diffusers"
        assert_same_outputs(_run(model), ref)
    with pytest.raises(CheckpointError, match=r"diffusers-format .* without SLA proj_l"):
        load_transformer(single, config=TINY, attention="sla")

    # Our own SLA model saved by diffusers keeps proj_l, sharded with an index.
    sharded = tmp_path / "sharded"
    source.save_pretrained(sharded, max_shard_size="40KB")
    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) > 2 and (sharded / "diffusion_pytorch_model.safetensors.index.json").is_file()
    model = load_transformer(sharded, config=TINY, attention="sla", sla_topk=TOPK)
    assert_same_outputs(_run(model), _run(source))

    cfg = json.loads((sharded / "config.json").read_text())
    (sharded / "config.json").write_text(
        json.dumps({**cfg, "num_attention_heads": 4, "attention_head_dim": 16})
    )
    with pytest.raises(CheckpointError, match=r"config\.json says num_attention_heads=4"):
        load_transformer(sharded, config=TINY, attention="sla")
    (sharded / "config.json").write_text(json.dumps(cfg))

    shards[1].unlink()
    with pytest.raises(CheckpointError, match=rf"missing 1 of {len(shards)} weight shards.*{shards[1].name}"):
        load_transformer(sharded, config=TINY)
    (single / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        load_transformer(single, config=TINY)
    with pytest.raises(CheckpointError, match=r"config\.json is missing \(a pipeline folder"):
        load_transformer(tmp_path / "pipe", config=TINY)


def test_truncated_safetensors(source: WanTransformer3DModel, tmp_path: Path) -> None:
    folder = tmp_path / "st"
    source.save_pretrained(folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_transformer(folder, config=TINY)
