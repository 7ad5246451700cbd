"""Ground truth for `lora_add`: diffusers' fused-and-saved model (upl) and the original
cloneofsimo/lora `cli_lora_add.add` run on LoRA files (lpl, ljl).

    /work/venv/bin/python scripts/fixture_lora_add.py [--out tests/fixtures/lora_add]
        [--part all|upl|original] [--cloneofsimo PATH_TO_A_GIT_CLONE_OF_cloneofsimo/lora]

Part `upl`:

Loads tests/fixtures/sd1-tiny as a StableDiffusionPipeline, loads the LoRA
tests/fixtures/lora_formats/diffusers.safetensors (r=4, lora_alpha=8, on the UNet attention
and text-encoder attention projections), `fuse_lora(lora_scale=0.8)`, `unload_lora_weights()`,
`save_pretrained(safe_serialization=True)` (the documented way to save a fused model), then
compares the saved UNet and text encoder with the input model tensor by tensor:

| file | what |
|---|---|
| fused.safetensors | `<component>.<key>` for every tensor whose saved value differs from the input (f32) |
| expected.json | `lora`, `lora_scale`, and per component: every saved key with dtype and shape, the changed keys, and the keys saved byte-identical to the input |

The saved model is not committed (it would duplicate sd1-tiny); every unchanged tensor is
checked here to be byte-identical to the input, so the Rust test compares those against the
input file. The script fails if any tensor changed that the LoRA does not target.

Part `original` (see scripts/fixture_lora_add_original.py) runs the original tool's own `add`
function, extracted from a clone of cloneofsimo/lora at two commits, on small LoRA files it
writes first, and saves what it wrote.
"""

import argparse
import os
import sys
import tempfile

import torch
from safetensors import safe_open

sys.path.insert(0, os.path.dirname(__file__))
from fixture_common import f32, save_tensors, setup_determinism, write_json  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
MODEL = os.path.join(ROOT, "tests", "fixtures", "sd1-tiny")
LORA_DIR = os.path.join(ROOT, "tests", "fixtures", "lora_formats")
LORA_NAME = "diffusers.safetensors"
LORA_SCALE = 0.8
FILES = {"unet": "diffusion_pytorch_model.safetensors", "text_encoder": "model.safetensors"}
DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


def read(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def lora_targets(path):
    """component → set of weight keys the LoRA file adapts."""
    out = {"unet": set(), "text_encoder": set()}
    with safe_open(path, "pt") as f:
        for k in f.keys():
            comp, rest = k.split(".", 1)
            for marker in (".lora.down.weight", ".lora_linear_layer.down.weight", ".lora_A.weight"):
                if rest.endswith(marker):
                    out[comp].add(rest[: -len(marker)] + ".weight")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "lora_add"))
    ap.add_argument("--part", choices=["all", "upl", "original"], default="all")
    ap.add_argument("--cloneofsimo", help="a git clone of cloneofsimo/lora (part original)")
    args = ap.parse_args()
    setup_determinism()
    if args.part in ("all", "original"):
        if not args.cloneofsimo:
            raise SystemExit("--cloneofsimo PATH (a git clone of cloneofsimo/lora) is needed for part original")
        from fixture_lora_add_original import make_original

        make_original(args.out, args.cloneofsimo)
    if args.part == "original":
        return
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(LORA_DIR, weight_name=LORA_NAME)
    pipe.fuse_lora(lora_scale=LORA_SCALE)
    pipe.unload_lora_weights()
    targets = lora_targets(os.path.join(LORA_DIR, LORA_NAME))
    fused, summary = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for comp, name in FILES.items():
            saved = read(os.path.join(tmp, comp, name))
            orig = read(os.path.join(MODEL, comp, name))
            changed, same = [], []
            for k, v in sorted(saved.items()):
                o = orig.get(k)
                if o is not None and o.dtype == v.dtype and o.shape == v.shape and torch.equal(o, v):
                    same.append(k)
                else:
                    changed.append(k)
                    fused[f"{comp}.{k}"] = f32(v)
            if set(changed) != targets[comp]:
                raise SystemExit(
                    f"{comp}: changed tensors differ from the LoRA targets: "
                    f"extra {sorted(set(changed) - targets[comp])[:5]}, missing {sorted(targets[comp] - set(changed))[:5]}"
                )
            summary[comp] = {
                "keys": {k: {"dtype": DTYPES[v.dtype], "shape": list(v.shape)} for k, v in sorted(saved.items())},
                "changed": changed,
                "unchanged": same,
                "input_keys_not_saved": sorted(set(orig) - set(saved)),
            }
            print(f"{comp}: {len(saved)} tensors saved, {len(changed)} fused, {len(same)} byte-identical")
    os.makedirs(args.out, exist_ok=True)
    save_tensors(fused, os.path.join(args.out, "fused.safetensors"))
    os.chmod(os.path.join(args.out, "fused.safetensors"), 0o644)
    write_json(
        {"lora": f"lora_formats/{LORA_NAME}", "lora_scale": LORA_SCALE, "components": summary},
        os.path.join(args.out, "expected.json"),
    )


if __name__ == "__main__":
    main()
