"""Builds the small model bundled with the project, assets/tiny-sd/: Stable Diffusion architecture
(SD 1.x-like UNet with cross-attention, CLIP text encoder, AutoencoderKL with the real 8x factor),
the real CLIP vocabulary, RANDOM weights. 64x64 images from 8x8 latents.

Run with the fixtures venv:  /work/venv/bin/python scripts/make_bundled_model.py
"""
import os
import shutil

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "assets", "tiny-sd")
TOK = os.path.join(ROOT, "..", "shared", "clip-tokenizer")


def main():
    torch.manual_seed(1234)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=4,
        cross_attention_dim=32,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=32,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    tokenizer = CLIPTokenizer(
        os.path.join(TOK, "vocab.json"), os.path.join(TOK, "merges.txt"), pad_token="<|endoftext|>"
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    pipe.save_pretrained(OUT, safe_serialization=True)
    with open(os.path.join(OUT, "README.md"), "w") as f:
        f.write(
            "# tiny-sd (bundled)\n\nStable Diffusion architecture, real CLIP vocabulary, **random weights**"
            " (made by scripts/make_bundled_model.py). 64x64 images; they are noise-like patterns.\n"
        )
    print("wrote", OUT)


if __name__ == "__main__":
    main()
