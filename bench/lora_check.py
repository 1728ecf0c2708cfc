"""GPU check that a LoRA reaches regionally compiled fp8 blocks (the Hopper default), issue 17.

Run on a CUDA machine:  PYTHONPATH=. python bench/lora_check.py [--out DIR] [--layers 4]
The 1.3B Wan config (fewer blocks: only the block code matters), random bf16 weights, fp8 block linears, dense
attention, 480p-sized tokens (21x30x52). One random LoRA (rank 32, every block linear) at scale 1:
  * eager: plain output and LoRA output (the LoRA's effect: |lora - plain|);
  * compiled (``compile_repeated_blocks``, Inductor): plain and LoRA output, after a warm-up of each.
Passes when the compiled LoRA output is as close to the eager LoRA output as compiled plain is to eager plain
(both within 2x + 1e-3 of it, relative L2) and the effect is visible in the compiled output (at least half
of the eager effect). Exit status 1 otherwise. Writes DIR/lora_check.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generator.engine.offline import ensure_offline

ensure_offline()

from generator.engine import lora as lo  # noqa: E402
from generator.engine.fp8 import BLOCK_LINEARS  # noqa: E402
from generator.engine.transformer import build_transformer  # noqa: E402
from generator.engine.wan_configs import wan_config  # noqa: E402

DEV = torch.device("cuda")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    from safetensors.torch import save_file

    cfg = dict(wan_config("wan2.1-t2v-1.3b"), num_layers=args.layers)
    torch.manual_seed(0)
    model = build_transformer(cfg, attention="dense", device=DEV, dtype=torch.bfloat16, precision="fp8")
    mods = dict(model.named_modules())
    g = torch.Generator().manual_seed(1)
    sd = {}
    for i in range(args.layers):
        for leaf in BLOCK_LINEARS:
            m = mods[f"blocks.{i}.{leaf}"]
            sd[f"transformer.blocks.{i}.{leaf}.lora_A.weight"] = torch.randn(32, m.in_features, generator=g) * 0.02
            sd[f"transformer.blocks.{i}.{leaf}.lora_B.weight"] = torch.randn(m.out_features, 32, generator=g) * 0.02
    path = Path(tempfile.mkdtemp()) / "r32.safetensors"
    save_file(sd, str(path))
    lora = lo.read_lora(path)
    lo.check_lora(lora, model)
    g = torch.Generator(device=DEV).manual_seed(2)
    inputs = {"hidden_states": torch.randn(1, 16, 21, 60, 104, generator=g, device=DEV, dtype=torch.bfloat16),
              "timestep": torch.tensor([900.0], device=DEV),
              "encoder_hidden_states": torch.randn(1, 512, cfg["text_dim"], generator=g, device=DEV,
                                                   dtype=torch.bfloat16)}

    @torch.no_grad()
    def run(with_lora: bool) -> torch.Tensor:
        applied = lo.apply_loras(model, [(lora, 1.0)]) if with_lora else None
        try:
            return model(**inputs, return_dict=False)[0]
        finally:
            if applied is not None:
                applied.restore()

    eager_plain, eager_lora = run(False), run(True)
    model.compile_repeated_blocks(fullgraph=False)
    run(False), run(True)  # compile both variants
    comp_plain, comp_lora = run(False), run(True)
    effect = rel(eager_lora, eager_plain)
    res = {
        "card": torch.cuda.get_device_name(DEV), "date": dt.date.today().isoformat(), "torch": torch.__version__,
        "layers": args.layers, "lora_effect_eager": effect,
        "lora_effect_compiled": rel(comp_lora, comp_plain),
        "compiled_vs_eager_plain": rel(comp_plain, eager_plain),
        "compiled_vs_eager_lora": rel(comp_lora, eager_lora),
    }
    res["ok"] = (res["compiled_vs_eager_lora"] <= 2 * res["compiled_vs_eager_plain"] + 1e-3
                 and res["lora_effect_compiled"] >= 0.5 * effect)
    print(json.dumps(res, indent=2))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "lora_check.json").write_text(json.dumps(res, indent=2))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
