"""LoRA styles (generator.engine.lora): synthetic files in each community layout for the tiny DiT, merge and
restore, the fp8 side branch, and the refusals (corrupt file, file for another size, unknown names, limits)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from bots.flags import parse_flags
from generator.engine import fp8
from generator.engine import lora as lo
from generator.engine.transformer import build_transformer
from generator.params import Limits, RequestError
from generator.request import GenerationRequest, validate
from tests.test_checkpoints_synth import BLOCK_KEYS, TINY

# Our diffusers linears -> the original Wan name (from the independent test table) minus ".weight".
TARGETS = ("attn1.to_q", "attn1.to_out.0", "attn2.to_v", "ffn.net.0.proj", "ffn.net.2")
LAYOUTS = ("diffusers", "peft", "wan", "kohya")


def wan_name(linear: str) -> str:
    return BLOCK_KEYS[linear + ".weight"].removesuffix(".weight")


def synth_layers(model: nn.Module, rank: int = 4, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (A [rank, in], B [out, rank]) for a few linears of each block."""
    g = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    out = {}
    for i in range(len(model.blocks)):  # type: ignore[arg-type]
        for t in TARGETS:
            m = mods[f"blocks.{i}.{t}"]
            out[f"blocks.{i}.{t}"] = (torch.randn(rank, m.in_features, generator=g) * 0.1,
                                      torch.randn(m.out_features, rank, generator=g) * 0.1)
    return out


def write_lora(path: Path, layers: dict[str, tuple[torch.Tensor, torch.Tensor]], layout: str,
               alpha: float | None = None, metadata: dict[str, str] | None = None) -> Path:
    sd: dict[str, torch.Tensor] = {}
    for module, (a, b) in layers.items():
        _, idx, linear = module.split(".", 2)
        if layout == "diffusers":
            base, down, up = f"transformer.{module}", "lora_A.weight", "lora_B.weight"
        elif layout == "peft":
            base, down, up = f"base_model.model.{module}", "lora_A.weight", "lora_B.weight"
        elif layout == "wan":
            base, down, up = f"diffusion_model.blocks.{idx}.{wan_name(linear)}", "lora_down.weight", "lora_up.weight"
        else:
            flat = wan_name(linear).replace(".", "_")
            base, down, up = f"lora_unet_blocks_{idx}_{flat}", "lora_down.weight", "lora_up.weight"
        sd[f"{base}.{down}"] = a.contiguous()
        sd[f"{base}.{up}"] = b.contiguous()
        if alpha is not None:
            sd[f"{base}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return build_transformer(TINY, attention="dense")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_read_and_merge(layout: str, model: nn.Module, tmp_path: Path) -> None:
    layers = synth_layers(model, rank=4)
    path = write_lora(tmp_path / f"style_{layout}.safetensors", layers, layout, alpha=2.0)
    lora = lo.read_lora(path)
    assert set(lora.layers) == set(layers) and lora.rank == 4
    lo.check_lora(lora, model)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    scale = 0.7
    applied = lo.apply_loras(model, [(lora, scale)])
    after = model.state_dict()
    for module, (a, b) in layers.items():
        expect = before[module + ".weight"].double() + scale * (2.0 / 4) * (b.double() @ a.double())
        # float32 weights, delta computed in float32: ~1e-7 relative; 1e-5 leaves margin.
        torch.testing.assert_close(after[module + ".weight"].double(), expect, rtol=1e-5, atol=1e-6)
    untouched = [n for n in before if n.removesuffix(".weight") not in layers]
    assert all(torch.equal(after[n], before[n]) for n in untouched)
    applied.restore()
    # Restore is exact: the original tensors are put back, bit for bit.
    assert all(torch.equal(model.state_dict()[n], before[n]) for n in before)


def test_two_loras_on_one_layer_add_and_no_alpha_means_rank(model: nn.Module, tmp_path: Path) -> None:
    l1, l2 = synth_layers(model, rank=4, seed=1), synth_layers(model, rank=8, seed=2)
    f1 = lo.read_lora(write_lora(tmp_path / "a.safetensors", l1, "wan"))
    f2 = lo.read_lora(write_lora(tmp_path / "b.safetensors", l2, "diffusers", alpha=4.0))
    key = "blocks.1.ffn.net.2"
    w0 = dict(model.named_modules())[key].weight.detach().clone()
    applied = lo.apply_loras(model, [(f1, 1.0), (f2, -0.5)])
    w = dict(model.named_modules())[key].weight
    (a1, b1), (a2, b2) = l1[key], l2[key]
    expect = w0.double() + 1.0 * (b1.double() @ a1.double()) - 0.5 * (4.0 / 8) * (b2.double() @ a2.double())
    torch.testing.assert_close(w.double(), expect, rtol=1e-5, atol=1e-6)
    applied.restore()
    assert torch.equal(dict(model.named_modules())[key].weight, w0)


def test_bf16_merge_and_restore_exact(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = build_transformer(TINY, attention="dense", dtype=torch.bfloat16)
    layers = synth_layers(m)
    f = lo.read_lora(write_lora(tmp_path / "s.safetensors", layers, "kohya", alpha=4.0))
    before = {n: p.detach().clone() for n, p in m.state_dict().items()}
    applied = lo.apply_loras(m, [(f, 1.0)])
    key = "blocks.0.attn1.to_q"
    a, b = layers[key]
    w = m.state_dict()[key + ".weight"]
    assert w.dtype == torch.bfloat16
    # one bf16 rounding of the float32 sum: relative 2^-8
    torch.testing.assert_close(w.float(), before[key + ".weight"].float() + b @ a, rtol=2**-8, atol=1e-3)
    applied.restore()
    assert all(torch.equal(m.state_dict()[n], before[n]) for n in before)


def test_fp8_side_branch_matches_float_reference(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref_model = build_transformer(TINY, attention="dense")
    torch.manual_seed(0)
    q_model = build_transformer(TINY, attention="dense", precision="fp8")
    layers = synth_layers(ref_model)
    f = lo.read_lora(write_lora(tmp_path / "s.safetensors", layers, "wan", alpha=2.0))
    lo.check_lora(f, q_model)
    g = torch.Generator().manual_seed(3)
    lin_ref = ref_model.blocks[0].ffn.net[0].proj
    lin_q = q_model.blocks[0].ffn.net[0].proj
    assert isinstance(lin_q, fp8.Fp8Linear)
    x = torch.randn(2, 20, lin_ref.in_features, generator=g)
    plain_q = lin_q(x)
    ra, rq = lo.apply_loras(ref_model, [(f, 1.5)]), lo.apply_loras(q_model, [(f, 1.5)])
    with torch.no_grad():
        ref, out = lin_ref(x), lin_q(x)
    err = float((out - ref).norm() / ref.norm())
    assert err < fp8.LINEAR_REL_L2_BOUND, err
    # the branch itself is float: output minus the plain fp8 output is exactly the LoRA term (float32 tol)
    a, b = layers["blocks.0.ffn.net.0.proj"]
    torch.testing.assert_close(out - plain_q, 1.5 * 0.5 * (x @ a.t() @ b.t()), rtol=1e-4, atol=1e-5)
    # the rank is padded to the smallest bucket with zeros, and the whole model runs with the branches
    assert lin_q.lora_down is not None and lin_q.lora_down.shape == (lo.MIN_BRANCH_RANK, lin_q.in_features)
    with torch.no_grad():
        q_model(**_inputs(), return_dict=False)
    ra.restore()
    rq.restore()
    assert lin_q.lora_down is None and lin_q.lora_up is None
    assert not any(k.startswith("lora") or ".lora_" in k for k in q_model.state_dict())
    torch.testing.assert_close(lin_q(x), plain_q, rtol=0, atol=0)


def test_fp8_branch_shapes_agree_across_blocks(tmp_path: Path) -> None:
    """A LoRA on block 0's q only: every block's q gets a (zero) branch of the same padded rank, so compiled
    blocks share one variant; other linears get none, and block 1's output is unchanged."""
    torch.manual_seed(0)
    q_model = build_transformer(TINY, attention="dense", precision="fp8")
    g = torch.Generator().manual_seed(1)
    q0 = q_model.blocks[0].attn1.to_q
    layers = {"blocks.0.attn1.to_q": (torch.randn(20, q0.in_features, generator=g) * 0.1,
                                      torch.randn(q0.out_features, 20, generator=g) * 0.1)}
    f = lo.read_lora(write_lora(tmp_path / "q.safetensors", layers, "diffusers"))
    assert lo.branch_signature([f]) == (32, frozenset({"attn1.to_q"}))
    q1 = q_model.blocks[1].attn1.to_q
    x = torch.randn(3, q1.in_features, generator=g)
    before = q1(x)
    applied = lo.apply_loras(q_model, [(f, 1.0)])
    for blk in q_model.blocks:
        assert blk.attn1.to_q.lora_down.shape == (32, q0.in_features)
        assert blk.attn1.to_q.lora_up.shape == (q0.out_features, 32)
        assert blk.attn1.to_k.lora_down is None
    torch.testing.assert_close(q1(x), before, rtol=0, atol=0)  # zero branch: x @ 0 adds exact zeros
    applied.restore()
    assert all(blk.attn1.to_q.lora_down is None for blk in q_model.blocks)


def test_fp8_branch_is_used_by_compiled_blocks(tmp_path: Path) -> None:
    """Regionally compiled fp8 blocks (the Hopper default) run the LoRA: same output as the eager model with
    the same LoRA, and LoRAs of ranks 4, 8 and 4+8 share one compiled variant (one rank bucket)."""
    import copy

    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    compiled = build_transformer(TINY, attention="dense", precision="fp8")
    eager = copy.deepcopy(compiled)
    f4 = lo.read_lora(write_lora(tmp_path / "a.safetensors", synth_layers(compiled, 4, 1), "wan", alpha=2.0))
    f8 = lo.read_lora(write_lora(tmp_path / "b.safetensors", synth_layers(compiled, 8, 2), "kohya"))
    counter = CompileCounter()  # the "eager" backend that counts compiled frames: dynamo's guards are real
    compiled.compile_repeated_blocks(backend=counter)
    inputs = _inputs()
    with torch.no_grad():
        plain = compiled(**inputs, return_dict=False)[0]
        frames = None
        for chosen in ([(f4, 1.0)], [(f8, 0.7)], [(f4, 1.0), (f8, 0.5)]):
            a, b = lo.apply_loras(compiled, chosen), lo.apply_loras(eager, chosen)
            try:
                got = compiled(**inputs, return_dict=False)[0]
                want = eager(**inputs, return_dict=False)[0]
            finally:
                a.restore()
                b.restore()
            # Same float32 ops in the same order (the counting backend runs the captured graph as is); the
            # tolerance only allows a different reduction order, ~1e-6 relative at these magnitudes.
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert float((got - plain).abs().max()) > 1e-3, "the LoRA did not change the compiled output"
            frames = counter.frame_count if frames is None else frames
            assert counter.frame_count == frames, "a LoRA of another rank in the same bucket recompiled"
        torch.testing.assert_close(compiled(**inputs, return_dict=False)[0], plain, rtol=0, atol=0)


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {"hidden_states": torch.randn(1, 4, 1, 8, 8, generator=g),
            "timestep": torch.tensor([500.0]),
            "encoder_hidden_states": torch.randn(1, 6, TINY["text_dim"], generator=g)}


def test_file_for_another_size_is_refused_naming_it(model: nn.Module, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    big = {"blocks.0.attn1.to_q": (torch.randn(4, 128, generator=g), torch.randn(128, 4, generator=g))}
    f = lo.read_lora(write_lora(tmp_path / "big_style.safetensors", big, "wan"))
    with pytest.raises(lo.LoraError, match=r"big_style\.safetensors is for another model size"):
        lo.check_lora(f, model)
    deep = {"blocks.30.attn1.to_q": (torch.randn(4, 64), torch.randn(64, 4))}
    f = lo.read_lora(write_lora(tmp_path / "deep.safetensors", deep, "diffusers"))
    with pytest.raises(lo.LoraError, match=r"deep\.safetensors targets blocks\.30\.attn1\.to_q"):
        lo.check_lora(f, model)


def test_corrupt_and_malformed_files(tmp_path: Path) -> None:
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(lo.LoraError, match=r"broken\.safetensors is not a readable safetensors file"):
        lo.read_lora(bad)
    half = tmp_path / "half.safetensors"
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 64)}, str(half))
    with pytest.raises(lo.LoraError, match="half a LoRA pair"):
        lo.read_lora(half)
    vae = tmp_path / "vae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(2, 2)}, str(vae))
    with pytest.raises(lo.LoraError, match="not LoRA weights"):
        lo.read_lora(vae)
    neg = tmp_path / "neg.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 64),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(64, 4),
               "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(-1.0)}, str(neg))
    with pytest.raises(lo.LoraError, match="alpha"):
        lo.read_lora(neg)


def test_description_discovery_and_cache(model: nn.Module, tmp_path: Path) -> None:
    layers = synth_layers(model)
    write_lora(tmp_path / "ink.safetensors", layers, "wan", metadata={"description": "Ink wash\nmore"})
    write_lora(tmp_path / "neon.safetensors", layers, "diffusers")
    (tmp_path / "neon.txt").write_text("Neon city glow\nsecond line\n")
    found = lo.discover(tmp_path)
    assert list(found) == ["ink", "neon"]
    assert lo.read_lora(found["ink"]).description == "Ink wash"
    assert lo.read_lora(found["neon"]).description == "Neon city glow"
    cache = lo.LoraCache(size=1)
    a = cache.get(found["ink"])
    assert cache.get(found["ink"]) is a
    cache.get(found["neon"])
    assert cache.get(found["ink"]) is not a  # evicted (size 1), read again


# --- request parameter and submission checks ---------------------------------------------------------------

def _limits(**kw: object) -> Limits:
    return Limits(t2v_models=("tiny-t2v",), loras=("ink_wash", "neon_city", "pastel"), **kw)  # type: ignore[arg-type]


def test_lora_parameter_normalises_and_refuses() -> None:
    req = GenerationRequest(mode="t2v", prompt="x", loras=" Ink_Wash:0.5 , neon_city")
    assert validate(req, _limits()).loras == "ink_wash:0.5,neon_city:1"
    with pytest.raises(RequestError, match=r"Unknown LoRA style 'ink_wsh'\. Did you mean ink_wash\?"):
        validate(req.replace(loras="ink_wsh"), _limits())
    with pytest.raises(RequestError, match=r"At most 2 LoRA styles"):
        validate(req.replace(loras="ink_wash,neon_city,pastel"), _limits(max_loras=2))
    with pytest.raises(RequestError, match=r"from -2 to 2 \(got pastel:2\.5\)"):
        validate(req.replace(loras="pastel:2.5"), _limits())
    with pytest.raises(RequestError, match="scale must be a number"):
        validate(req.replace(loras="pastel:strong"), _limits())
    assert parse_flags("a cat --lora ink_wash:0.5 --lora pastel").options == {"loras": "ink_wash:0.5,pastel"}


# --- end to end: turbobot generate on the embedded demo model -------------------------------------------


def test_cli_generate_with_a_lora(tmp_path: Path) -> None:
    from generator.engine.tiny import tiny_transformer_config
    from tests.test_cli import FAST, ROOT, db_rows, turbobot

    (tmp_path / "config.toml").write_text((ROOT / "config.toml").read_text())
    folder = tmp_path / "loras"
    folder.mkdir()
    torch.manual_seed(0)
    tiny_model = build_transformer(tiny_transformer_config("tiny-t2v"), attention="dense")
    g = torch.Generator().manual_seed(0)
    layers = {}
    for name, m in tiny_model.named_modules():
        if name.startswith("blocks.") and name.endswith(("attn1.to_v", "ffn.net.2")):
            layers[name] = (torch.randn(4, m.in_features, generator=g), torch.randn(m.out_features, 4, generator=g))
    write_lora(folder / "Bold.safetensors", layers, "wan", alpha=4.0)
    (folder / "broken.safetensors").write_bytes(b"garbage")

    plain = turbobot(tmp_path, "generate", "a fox", "--seed", "5", "--json", *FAST)
    styled = turbobot(tmp_path, "generate", "a fox", "--seed", "5", "--lora", "bold:1.5", "--json", *FAST)
    assert plain.returncode == 0 and styled.returncode == 0, (plain.stderr, styled.stderr)
    a, b = (json.loads(o.stdout.strip().splitlines()[-1]) for o in (plain, styled))
    assert Path(a["output"]).read_bytes() != Path(b["output"]).read_bytes()
    stored = [json.loads(r[0]) for r in db_rows(tmp_path, "select request from jobs order by id")]
    assert [s.get("loras") for s in stored] == ["", "bold:1.5"]

    unknown = turbobot(tmp_path, "generate", "a fox", "--lora", "bld", *FAST)
    assert unknown.returncode != 0 and "Did you mean bold?" in unknown.stdout + unknown.stderr
    bad = turbobot(tmp_path, "generate", "a fox", "--lora", "broken", *FAST)
    assert bad.returncode != 0 and "broken.safetensors is not a readable safetensors file" in bad.stdout + bad.stderr


def test_loras_listing_from_the_configured_folder(model: nn.Module, tmp_path: Path) -> None:
    from bots.texts import help_text, loras_text
    from turbobot.config import settings_from_dict

    settings = settings_from_dict({"loras": {"folder": "styles", "max_per_job": 2, "max_scale": 1.5}},
                                  base_dir=str(tmp_path))
    assert loras_text(settings.lora_catalog(), settings.request_limits) == "This server offers no LoRA styles."
    (tmp_path / "styles").mkdir()
    layers = synth_layers(model)
    write_lora(tmp_path / "styles" / "Ink.safetensors", layers, "wan", metadata={"description": "Ink <wash>"})
    write_lora(tmp_path / "styles" / "neon.safetensors", layers, "diffusers")
    (tmp_path / "styles" / "neon.txt").write_text("Neon glow\n")
    assert settings.lora_catalog() == [("ink", "Ink <wash>"), ("neon", "Neon glow")]
    limits = settings.request_limits
    assert (limits.loras, limits.max_loras, limits.max_lora_scale) == (("ink", "neon"), 2, 1.5)
    text = loras_text(settings.lora_catalog(), limits, "telegram")
    assert "<code>ink</code>: Ink &lt;wash&gt;" in text and "up to 2, scale -1.5 to 1.5" in text
    assert "/loras" in help_text("discord") and "--lora" in help_text("plain")


def test_engine_start_lists_bad_files_as_unavailable(tmp_path: Path) -> None:
    from generator.engine.options import EngineOptions
    from generator.engine.runtime import TurboEngine
    from generator.engine.tiny import tiny_transformer_config

    torch.manual_seed(0)
    tiny_model = build_transformer(tiny_transformer_config("tiny-t2v"), attention="dense")
    write_lora(tmp_path / "good.safetensors", synth_layers(tiny_model), "kohya")
    g = torch.Generator().manual_seed(0)
    big = {"blocks.0.attn1.to_q": (torch.randn(4, 128, generator=g), torch.randn(128, 4, generator=g))}
    write_lora(tmp_path / "big.safetensors", big, "wan")
    (tmp_path / "junk.safetensors").write_bytes(b"nope")
    engine = TurboEngine(EngineOptions(device="cpu", compile=False, lora_folder=tmp_path), device="cpu")
    engine.load()  # no crash: the bad files are only marked
    status = engine.info["loras"]
    assert isinstance(status, dict) and status["good"] == ""
    assert "big.safetensors is for another model size" in status["big"]
    assert "junk.safetensors is not a readable safetensors file" in status["junk"]


def test_warm_up_compiles_one_branch_variant_per_signature(tmp_path: Path) -> None:
    """The worker's warm-up runs one usable LoRA per fp8 branch signature (padded rank, linears): ranks 4 and 8
    on the same linears share one; a LoRA on other linears is another; unusable files and bf16 experts none."""
    from generator.engine import tiny
    from generator.engine.options import EngineOptions
    from generator.engine.runtime import TurboEngine
    from generator.engine.tiny import tiny_transformer_config

    cfg = tiny_transformer_config("tiny-t2v")
    torch.manual_seed(0)
    fp8_model = build_transformer(cfg, attention="dense", precision="fp8")
    write_lora(tmp_path / "a.safetensors", synth_layers(fp8_model, 4, 1), "kohya")
    write_lora(tmp_path / "b.safetensors", synth_layers(fp8_model, 8, 2), "wan")
    q = fp8_model.blocks[0].attn1.to_q
    g = torch.Generator().manual_seed(3)
    write_lora(tmp_path / "q.safetensors", {"blocks.0.attn1.to_q": (torch.randn(4, q.in_features, generator=g),
                                                                   torch.randn(q.out_features, 4, generator=g))},
               "diffusers")
    (tmp_path / "junk.safetensors").write_bytes(b"nope")
    engine = TurboEngine(EngineOptions(device="cpu", compile=False, lora_folder=tmp_path), device="cpu")
    parts = {"text_encoder": tiny.tiny_text_encoder(), "tokenizer": tiny.tiny_tokenizer(), "vae": tiny.tiny_vae()}
    bundle = engine.adopt("tiny-t2v", experts=[fp8_model], **parts)
    engine.check_loras()
    assert [lora.name for lora in engine._lora_variants(bundle)] == ["a", "q"]
    plain = engine.adopt("tiny-t2v", experts=[build_transformer(cfg, attention="dense")], **parts)
    assert engine._lora_variants(plain) == []  # fused LoRAs change no shape: nothing to compile
