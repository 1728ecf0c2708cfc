"""The tiny (TAEHV-layout) decoder: synthetic files in the published key layout, written here from the layout
facts independently of the loader; a frame-by-frame reference in plain ``F.conv2d``; the engine using it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from engine_synth import wan_t5_state_dict, wan_vae_state_dict
from safetensors.torch import save_file

from generator import media
from generator.engine import create_engine, taehv, wan_configs
from generator.engine.api import CheckpointError, EngineError, ModelNotConfigured, RenderJob
from generator.engine.options import EngineOptions, ModelOptions
from generator.engine.runtime import TurboEngine
from generator.engine.tiny import tiny_tokenizer, tiny_transformer_config
from generator.engine.transformer import build_transformer
from generator.request import GenerationRequest
from generator.scheduler.engine_options import engine_options
from turbobot.config import Settings, settings_from_dict

PUBLISHED = (256, 128, 64, 64)
SMALL = (16, 8, 8, 8)
# Float32 convolutions over a different number of frames may sum in another order; values are O(1).
TOL = 1e-5


def taehv_shapes(widths: tuple[int, ...], *, latent: int = 16, patch: int = 1,
                 strides: tuple[int, int, int] = (1, 2, 2), encoder: bool = True) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a TAEHV checkpoint (``decoder.<i>`` Sequential indices), from the layout facts."""
    n0, n1, n2, n3 = widths
    s: dict[str, tuple[int, ...]] = {}

    def conv(i: str, cin: int, cout: int, k: int = 3, bias: bool = True) -> None:
        s[f"{i}.weight"] = (cout, cin, k, k)
        if bias:
            s[f"{i}.bias"] = (cout,)

    def mem(i: int, n: int) -> None:
        conv(f"decoder.{i}.conv.0", 2 * n, n)
        conv(f"decoder.{i}.conv.2", n, n)
        conv(f"decoder.{i}.conv.4", n, n)

    if encoder:  # a few encoder tensors, as the published file has: the loader must ignore them
        conv("encoder.0", 3, 64)
        conv("encoder.2.conv.0", 128, 64)
    conv("decoder.1", latent, n0)
    for start, n, nxt, stride in ((3, n0, n1, strides[0]), (9, n1, n2, strides[1]), (15, n2, n3, strides[2])):
        for i in range(start, start + 3):
            mem(i, n)
        s[f"decoder.{start + 4}.conv.weight"] = (n * stride, n, 1, 1)
        conv(f"decoder.{start + 5}", n, nxt, bias=False)
    conv("decoder.22", n3, 3 * patch * patch)
    return s


def random_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shp in shapes.items():
        fan_in = max(1, int(torch.tensor(shp[1:]).prod())) if len(shp) > 1 else 4
        out[k] = torch.randn(*shp, generator=g) * (0.6 / fan_in**0.5) + (0.5 if k == "decoder.22.bias" else 0.0)
    return out


def reference_decode(sd: dict[str, torch.Tensor], latents: torch.Tensor, strides: tuple[int, int, int] = (1, 2, 2),
                     ) -> torch.Tensor:
    """Frame by frame, as the streaming TAEHV decoder runs: [1, C, T, h, w] -> [1, 3, 4T-3, H, W] in [0, 1]."""

    def c(x: torch.Tensor, i: str, bias: bool = True) -> torch.Tensor:
        w = sd[f"{i}.weight"]
        return F.conv2d(x, w, sd[f"{i}.bias"] if bias else None, padding=w.shape[-1] // 2)

    memory: dict[int, torch.Tensor] = {}

    def mem(i: int, x: torch.Tensor) -> torch.Tensor:
        past = memory.get(i, torch.zeros_like(x))
        memory[i] = x
        h = F.relu(c(torch.cat([x, past], 1), f"decoder.{i}.conv.0"))
        h = F.relu(c(h, f"decoder.{i}.conv.2"))
        return F.relu(c(h, f"decoder.{i}.conv.4") + x)

    def run(x: torch.Tensor, stage: int) -> list[torch.Tensor]:
        if stage == 3:
            return [x]
        base = 3 + 6 * stage
        for i in range(base, base + 3):
            x = mem(i, x)
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        g = F.conv2d(x, sd[f"decoder.{base + 4}.conv.weight"])
        n = x.shape[1]
        groups = [g[:, k * n:(k + 1) * n] for k in range(g.shape[1] // n)][-strides[stage]:]
        out = []
        for grp in groups:  # group 0 is the earlier frame
            h = c(grp, f"decoder.{base + 5}", bias=False)
            out += run(h, stage + 1)
        return out

    frames = []
    for t in range(latents.shape[2]):
        x = torch.tanh(latents[:, :, t] / 3) * 3
        x = F.relu(c(x, "decoder.1"))
        for h in run(x, 0):
            frames.append(c(F.relu(h), "decoder.22").clamp(0, 1))
    return torch.stack(frames[3:], dim=2)


@pytest.fixture(scope="module")
def small_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    sd = random_state(taehv_shapes(SMALL), seed=1)
    path = tmp_path_factory.mktemp("tae") / "taew2_1.pth"
    torch.save(sd, path)
    return path, sd


def latents(t: int = 3, h: int = 4, w: int = 5, seed: int = 7) -> torch.Tensor:
    return torch.randn(1, 16, t, h, w, generator=torch.Generator().manual_seed(seed)) * 2


# --- layout and loading ---------------------------------------------------------------------------------------


def test_published_size_layout_matches_the_keys() -> None:
    shapes = taehv_shapes(PUBLISHED)
    spec = taehv.tiny_spec(shapes)
    assert spec.widths == PUBLISHED and spec.strides == (1, 2, 2) and spec.patch == 1
    with torch.device("meta"):
        model = taehv.TinyDecoder(spec)
    built = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert built == {k: v for k, v in shapes.items() if k.startswith("decoder.")}
    assert model.factors() == (4, 8)


def test_round_trip_matches_the_frame_by_frame_reference(small_file: tuple[Path, dict[str, torch.Tensor]],
                                                         tmp_path: Path) -> None:
    path, sd = small_file
    model = taehv.load_tiny_decoder(path)
    assert model.spec.widths == SMALL and model.factors() == (4, 8)
    z = latents(t=3)
    out = taehv.decode(model, z)
    assert out.shape == (1, 3, 4 * 3 - 3, 32, 40)
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    assert float(((out > 0) & (out < 1)).float().mean()) > 0.5  # mostly unclamped: the comparison below means something
    ref = reference_decode(sd, z)
    assert torch.allclose(out, ref, atol=TOL, rtol=0)
    # the same tensors as safetensors, without encoder keys
    st = tmp_path / "taew2_1.safetensors"
    save_file({k: v for k, v in sd.items() if k.startswith("decoder.")}, str(st))
    assert torch.allclose(taehv.decode(taehv.load_tiny_decoder(st), z), out, atol=TOL, rtol=0)
    u8 = taehv.decode_uint8(model, z)
    assert u8.shape == (9, 32, 40, 3) and u8.dtype.name == "uint8"


@pytest.mark.parametrize("chunk", [1, 2, 4])
def test_chunked_decode_equals_the_whole_decode(small_file: tuple[Path, dict[str, torch.Tensor]], chunk: int) -> None:
    model = taehv.load_tiny_decoder(small_file[0])
    z = latents(t=5, seed=chunk)
    whole = taehv.decode(model, z)
    parts = list(taehv.iter_decoded(model, z, chunk_frames=chunk))
    assert len(parts) == -(-5 // chunk)
    assert parts[0].shape[2] == 4 * min(chunk, 5) - 3  # the first pass already yields frames
    assert torch.allclose(torch.cat(parts, dim=2), whole, atol=TOL, rtol=0)


def test_stride_two_weight_in_a_stride_one_slot_keeps_the_last_group(tmp_path: Path) -> None:
    sd = random_state(taehv_shapes(SMALL, strides=(2, 2, 2)), seed=2)
    path = tmp_path / "lighttaew2_1.pth"
    torch.save(sd, path)
    model = taehv.load_tiny_decoder(path)
    n0 = SMALL[0]
    assert model.spec.file_strides == (2, 2, 2) and model.spec.strides == (1, 2, 2)
    grow = model.decoder[7]
    assert isinstance(grow, taehv.TGrow)
    assert torch.equal(grow.conv.weight, sd["decoder.7.conv.weight"][n0:])  # the same values, sliced
    z = latents(t=2)
    out = taehv.decode(model, z)
    assert out.shape[2] == 5
    assert torch.allclose(out, reference_decode(sd, z), atol=TOL, rtol=0)


# --- refusals ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: wan_vae_state_dict(dim=2), r"is the full Wan VAE \(Wan2\.1_VAE\.pth\), not a tiny decoder"),
        (lambda: {"blocks.0.self_attn.q.weight": torch.zeros(4, 4), "patch_embedding.weight": torch.zeros(4, 16)},
         r"is not a TAEHV tiny decoder .*it looks like a Wan DiT"),
        (lambda: wan_t5_state_dict(), r"is not a TAEHV tiny decoder .*umT5"),
        (lambda: random_state(taehv_shapes(SMALL, latent=48, patch=2)),
         r"tiny decoder for 48-channel latents \(a tiny decoder for Wan2\.2's 48-channel VAE"),
        (lambda: random_state(taehv_shapes(SMALL, latent=32)), r"32-channel latents \(a tiny decoder for HunyuanVideo"),
        (lambda: random_state(taehv_shapes(SMALL, strides=(1, 1, 2))), r"decoder\.13 upsamples time by 1 where"),
        (lambda: {k: v for k, v in random_state(taehv_shapes(SMALL)).items() if k != "decoder.16.conv.2.weight"},
         r"do not match the TAEHV layout \(missing decoder\.16\.conv\.2\.weight\)"),
    ],
)
def test_wrong_family_is_refused_naming_the_file(tmp_path: Path, make: object, needle: str) -> None:
    path = tmp_path / "wrong.pth"
    torch.save(make(), path)  # type: ignore[operator]
    with pytest.raises(CheckpointError, match=needle) as err:
        taehv.load_tiny_decoder(path)
    assert str(path) in str(err.value)


def test_truncated_file_is_refused(small_file: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    data = small_file[0].read_bytes()
    cut = tmp_path / "taew2_1.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"Tiny decoder: .*taew2_1\.pth could not be read .*truncated or corrupt"):
        taehv.load_tiny_decoder(cut)
    st = tmp_path / "taew2_1.safetensors"
    save_file({k: v for k, v in small_file[1].items()}, str(st))
    st.write_bytes(st.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"taew2_1\.safetensors is not a readable safetensors file"):
        taehv.load_tiny_decoder(st)
    with pytest.raises(CheckpointError, match=r"Tiny decoder: .*missing\.pth does not exist"):
        taehv.load_tiny_decoder(tmp_path / "missing.pth")


# --- the engine ----------------------------------------------------------------------------------------------

TEXT_DIM = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, small_file: tuple[Path, dict[str, torch.Tensor]]) -> Path:
    root = tmp_path_factory.mktemp("models")
    cfg = {**tiny_transformer_config("tiny-t2v"), "patch_size": (1, 2, 2), "text_dim": TEXT_DIM}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        build_transformer(cfg).save_pretrained(root / "dit")
    torch.save(wan_t5_state_dict(vocab=259, dim=TEXT_DIM), root / "t5.pth")
    tiny_tokenizer().save_pretrained(root / "umt5-xxl")
    torch.save(wan_vae_state_dict(dim=2), root / "Wan2.1_VAE.pth")
    (root / "taew2_1.pth").write_bytes(small_file[0].read_bytes())
    torch.save(random_state(taehv_shapes(SMALL, patch=2)), root / "tae_16x.pth")
    return root


@pytest.fixture()
def small_wan(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = {**tiny_transformer_config("tiny-t2v"), "patch_size": (1, 2, 2), "text_dim": TEXT_DIM}
    monkeypatch.setitem(wan_configs.WAN_CONFIGS, "wan2.1-t2v-1.3b", cfg)


def settings(root: Path, **model: str) -> Settings:
    entry = {"kind": "wan2.1-t2v-1.3b", "transformer": "dit", "vae": "Wan2.1_VAE.pth", "text_encoder": "t5.pth",
             "tokenizer": "umt5-xxl", **model}
    return settings_from_dict({"engine": {"device": "cpu"}, "models": {"small": entry}}, base_dir=str(root))


def render(eng: TurboEngine, out: Path, decoder: str | None = None) -> object:
    req = GenerationRequest(mode="t2v", prompt="a small boat", model="small", frames=5, steps=1, seed=3,
                            aspect="4:3")
    return eng.render(RenderJob(job_id=1, request=req, output_path=out, decoder=decoder),
                      progress=lambda _p: None, cancelled=lambda: False)


def test_engine_renders_with_the_configured_tiny_decoder(model_dir: Path, small_wan: None, tmp_path: Path) -> None:
    eng = create_engine(engine_options(settings(model_dir, decoder="tiny", tiny_decoder="taew2_1.pth")))
    assert isinstance(eng, TurboEngine)
    eng.load()
    info = eng.info["models"]["small"]  # type: ignore[index]
    assert info["decoder"] == "tiny" and info["tiny_decoder"] is True
    passes: list[int] = []
    tiny = eng._tinies[str(model_dir / "taew2_1.pth")]
    hook = tiny.decoder[22].register_forward_hook(lambda _m, _i, out: passes.append(out.shape[0]))
    try:
        res = render(eng, tmp_path / "tiny.mp4")
    finally:
        hook.remove()
    assert (res.width, res.height, res.frames) == (640, 480, 5)  # type: ignore[attr-defined]
    assert media.is_playable_h264(res.path)  # type: ignore[attr-defined]
    assert sum(passes) == 8  # 2 latent frames x 4 went through the tiny decoder (3 dropped)
    # the full VAE stays loaded (I2V encodes images with it) and a job may still ask for it
    assert eng.resolve_decoder("small", "vae") == "vae" and eng.resolve_decoder("small") == "tiny"
    z = torch.randn(1, 16, 2, 6, 8)
    assert eng.decode_with("small", z, "tiny").shape == eng.decode_with("small", z, "vae").shape == (5, 48, 64, 3)


def test_tiny_decoder_on_request_without_one_is_refused(model_dir: Path, small_wan: None, tmp_path: Path) -> None:
    eng = create_engine(engine_options(settings(model_dir)))
    assert isinstance(eng, TurboEngine)
    eng.load()
    assert eng.info["models"]["small"]["tiny_decoder"] is False  # type: ignore[index]
    with pytest.raises(EngineError, match="no fast \\(tiny\\) decoder configured") as err:
        render(eng, tmp_path / "x.mp4", decoder="tiny")
    assert err.value.code == "tiny_decoder_unavailable"
    assert not (tmp_path / "x.mp4").exists()


def test_engine_refuses_tiny_decoder_setting_without_a_file(model_dir: Path, small_wan: None) -> None:
    base = settings(model_dir)
    bad = dataclasses.replace(base, models={"small": dataclasses.replace(base.models["small"], decoder="tiny")})
    with pytest.raises(ModelNotConfigured, match=r"models\.small\.decoder is 'tiny' but models\.small\.tiny_decoder"):
        create_engine(engine_options(bad)).load()
    with pytest.raises(Exception, match=r"models\.small\.decoder = 'tiny' needs models\.small\.tiny_decoder"):
        settings(model_dir, decoder="tiny")  # the config file is refused at start already


def test_engine_refuses_a_tiny_decoder_of_another_scale(model_dir: Path, small_wan: None) -> None:
    eng = create_engine(engine_options(settings(model_dir, tiny_decoder="tae_16x.pth")))
    with pytest.raises(CheckpointError, match=r"tae_16x\.pth upsamples \(4, 16\) .* VAE \(4, 8\)"):
        eng.load()


def test_demo_models_have_a_tiny_decoder(tmp_path: Path) -> None:
    eng = create_engine(EngineOptions(device="cpu", models={"demo": ModelOptions(kind="tiny-t2v", decoder="tiny")}))
    assert isinstance(eng, TurboEngine)
    req = GenerationRequest(mode="t2v", prompt="a fox", model="demo", frames=5, steps=1, seed=1)
    res = eng.render(RenderJob(job_id=1, request=req, output_path=tmp_path / "d.mp4"),
                     progress=lambda _p: None, cancelled=lambda: False)
    assert (res.width, res.height, res.frames) == (832, 480, 5) and media.is_playable_h264(res.path)
    assert eng.info["models"]["demo"]["decoder"] == "tiny"  # type: ignore[index]
