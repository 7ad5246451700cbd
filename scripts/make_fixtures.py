#!/usr/bin/env python3
"""Regenerate tests/fixtures/ (see tests/fixtures/README.md for the contract).

Usage: /work/venv/bin/python scripts/make_fixtures.py [--out tests/fixtures] [--only tokenizer,tiny,schedulers,structure]

Everything runs on CPU in fp32 with fixed seeds and one thread, so two runs give identical files.
No network access is needed: the CLIP vocabulary comes from ../shared/clip-tokenizer and the real
SD 1.5 / 2.1 configs are written in scripts/real_configs.py.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from accelerate import init_empty_weights  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

import fixture_models  # noqa: E402
from fixture_common import save_tensors, setup_determinism, write_json  # noqa: E402
from fixture_schedulers import scheduler_cases  # noqa: E402
from real_configs import REAL  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check_environment():
    """transformers' CLIPTokenizer changes behaviour when ftfy is importable."""
    try:
        import ftfy  # noqa: F401
    except ImportError:
        return
    sys.exit("ftfy is installed; uninstall it (the fixtures use CLIPTokenizer's BasicTokenizer path)")


def make_tiny(out):
    """sd1-tiny/, sd2-tiny/, their outputs, and tokenizer.json."""
    token_ids = {}
    for name in ("sd1", "sd2"):
        tokenizer = fixture_models.write_tiny(name, out)
        token_ids[name] = fixture_models.tokenize(tokenizer, fixture_models.PROMPTS).tolist()
        print(f"wrote {name}-tiny", flush=True)
    write_json({"prompts": fixture_models.PROMPTS, **token_ids}, os.path.join(out, "tokenizer.json"))


def make_schedulers(out):
    """schedulers.json + schedulers.safetensors."""
    cases, tensors = scheduler_cases()
    write_json(cases, os.path.join(out, "schedulers.json"))
    save_tensors(tensors, os.path.join(out, "schedulers.safetensors"))
    print(f"wrote {len(cases)} scheduler cases", flush=True)


def structure_of(kind, config):
    """Instantiate a real-size model without memory (meta tensors) and list its state-dict shapes."""
    with init_empty_weights():
        if kind == "unet":
            model = UNet2DConditionModel.from_config(config)
        elif kind == "vae":
            model = AutoencoderKL.from_config(config)
        else:
            model = CLIPTextModel(CLIPTextConfig(**config))
    keys = {k: list(v.shape) for k, v in model.state_dict().items()}
    return {"config": config, "keys": keys}


def make_structure(out):
    """structure/{sd15,sd21}.{unet,vae,text_encoder}.json."""
    for model_name, parts in REAL.items():
        for kind, config in parts.items():
            data = structure_of(kind, config)
            write_json(data, os.path.join(out, "structure", f"{model_name}.{kind}.json"))
            n = sum(int(torch.tensor(s).prod()) if s else 1 for s in data["keys"].values())
            print(f"structure {model_name}.{kind}: {len(data['keys'])} tensors, {n} parameters", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures"))
    parser.add_argument("--only", default="tiny,schedulers,structure", help="comma list of parts")
    args = parser.parse_args()
    check_environment()
    setup_determinism()
    os.makedirs(args.out, exist_ok=True)
    parts = set(args.only.split(","))
    if "tiny" in parts or "tokenizer" in parts:
        make_tiny(args.out)
    if "schedulers" in parts:
        make_schedulers(args.out)
    if "structure" in parts:
        make_structure(args.out)


if __name__ == "__main__":
    main()
