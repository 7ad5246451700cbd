"""Writes a diffusers folder of the real SD 1.5 (or 2.1) architecture with RANDOM weights, for
measuring memory and speed at the size users train (nothing is downloaded). About 4 GB (fp32).

    /work/venv/bin/python scripts/make_random_sd.py OUT_DIR [--model sd15|sd21]
"""
import argparse
import os
import shutil

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from real_configs import REAL

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TOK = os.path.join(ROOT, "..", "shared", "clip-tokenizer")


def strip(cfg):
    return {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("architectures", "torch_dtype", "transformers_version")}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--model", choices=sorted(REAL), default="sd15")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    cfg = REAL[a.model]
    unet = UNet2DConditionModel(**strip(cfg["unet"]))
    vae = AutoencoderKL(**strip(cfg["vae"]))
    text_encoder = CLIPTextModel(CLIPTextConfig(**strip(cfg["text_encoder"])))
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if a.model == "sd21" else "epsilon",
    )
    tokenizer = CLIPTokenizer(
        os.path.join(TOK, "vocab.json"), os.path.join(TOK, "merges.txt"), pad_token="<|endoftext|>", model_max_length=77
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    if os.path.isdir(a.out):
        shutil.rmtree(a.out)
    pipe.save_pretrained(a.out, safe_serialization=True)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
