"""Tiny SD-1-like and SD-2-like diffusers pipelines with random weights, and their reference outputs."""

import os
import shutil

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from fixture_common import f32, i64, perturb_affine_params, round_params_to_bf16, save_tensors, write_json

TOKENIZER_SRC = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "clip-tokenizer")

# Prompts for tokenizer.json and clip.* outputs: punctuation, numbers, accents (also decomposed),
# CJK, emoji, empty, whitespace only, control chars, > 77 tokens, special tokens typed in the text.
PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "",
    "A Painting Of A CAT, by Greg Rutkowski!!! 4k, (masterpiece:1.2), [ugly]",
    "   extra   whitespace\tand\nnew lines   ",
    "numbers 1234567 3.14159 1,000,000 2nd 10x 0.5",
    "café naïve résumé Ångström Øre crème brûlée",
    "cafe\u0301 decomposed accent",
    "東京の夜景 漢字とかな 한국어 中文",
    "emoji 🐱🚀 👩‍🚀 ❤️ 👍🏽",
    "contains <|endoftext|> written in the text and <|startoftext|> too",
    "it's don't we'll I'M they're you've",
    "hyphen-ated under_score slash/back\\slash #hashtag @user a+b=c ~~~ ... ???",
    "control\x00chars\x07and\u200bzero width",
    "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ ﬁ ligature ½ ℃",
    " ".join(["a very long prompt that keeps going"] * 14),
    "   ",
]

TINY = {
    "sd1": {
        "seed": 0,
        "unet": dict(attention_head_dim=4, use_linear_projection=False, upcast_attention=False, cross_attention_dim=32),
        "text": dict(hidden_size=32, intermediate_size=64, hidden_act="quick_gelu", projection_dim=32),
        "pad": "<|endoftext|>",
        "sched": dict(prediction_type="epsilon", timestep_spacing="leading"),
    },
    "sd2": {
        "seed": 1,
        "unet": dict(attention_head_dim=[2, 4, 4], use_linear_projection=True, upcast_attention=True, cross_attention_dim=48),
        "text": dict(hidden_size=48, intermediate_size=96, hidden_act="gelu", projection_dim=48),
        "pad": "!",
        "sched": dict(prediction_type="v_prediction", timestep_spacing="trailing"),
    },
}

PIPELINE_RUN = {
    "prompt": "a red apple on a wooden table, studio light",
    "negative_prompt": "blurry, low quality",
    "steps": 4,
    "guidance": 7.5,
    "scheduler": "ddim",
    "height": 16,
    "width": 16,
    "eta": 0.0,
}

UNET_TIMESTEPS = [0.0, 1.0, 250.5, 999.0]


def build_pipeline(name):
    """Build one tiny pipeline (random weights, seeded) in memory."""
    spec = TINY[name]
    torch.manual_seed(spec["seed"])
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        norm_num_groups=8,
        **spec["unet"],
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=77,
            layer_norm_eps=1e-5,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
            **spec["text"],
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=16,
    )
    g = torch.Generator().manual_seed(100 + spec["seed"])
    for m in (unet, text_encoder, vae):
        perturb_affine_params(m, g)
        round_params_to_bf16(m)
        m.eval()
    tokenizer = CLIPTokenizer(
        os.path.join(TOKENIZER_SRC, "vocab.json"),
        os.path.join(TOKENIZER_SRC, "merges.txt"),
        pad_token=spec["pad"],
        model_max_length=77,
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        **spec["sched"],
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tokenize(tokenizer, prompts):
    """[P, 77] ids the way the pipelines tokenize."""
    return tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


@torch.no_grad()
def model_outputs(pipe, name):
    """Reference outputs of text encoder, UNet, VAE and a short pipeline run."""
    out = {}
    g = torch.Generator().manual_seed(1000 + TINY[name]["seed"])

    ids = tokenize(pipe.tokenizer, PROMPTS)
    enc = pipe.text_encoder(ids, output_hidden_states=True)
    out["clip.input_ids"] = i64(ids)
    out["clip.last_hidden_state"] = f32(enc.last_hidden_state)
    out["clip.skip1"] = f32(pipe.text_encoder.text_model.final_layer_norm(enc.hidden_states[-2]))

    cross = pipe.unet.config.cross_attention_dim
    sample = torch.randn(2, 4, 8, 8, generator=g)
    ehs = torch.randn(2, 77, cross, generator=g)
    outs = [pipe.unet(sample, torch.tensor(t, dtype=torch.float32), ehs).sample for t in UNET_TIMESTEPS]
    out["unet.sample"] = f32(sample)
    out["unet.encoder_hidden_states"] = f32(ehs)
    out["unet.timesteps"] = f32(UNET_TIMESTEPS)
    out["unet.output"] = f32(torch.stack(outs))

    image = torch.rand(1, 3, 16, 16, generator=g) * 2.0 - 1.0
    dist = pipe.vae.encode(image).latent_dist
    z = torch.randn(1, 4, 8, 8, generator=g)
    out["vae.image"] = f32(image)
    out["vae.latent_mean"] = f32(dist.mean)
    out["vae.latent_logvar"] = f32(dist.logvar)
    out["vae.decode_input"] = f32(z)
    out["vae.decoded"] = f32(pipe.vae.decode(z).sample)

    latents = torch.randn(1, 4, 8, 8, generator=g)
    run = PIPELINE_RUN
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    kwargs = dict(
        prompt=run["prompt"],
        negative_prompt=run["negative_prompt"],
        num_inference_steps=run["steps"],
        guidance_scale=run["guidance"],
        eta=run["eta"],
        height=run["height"],
        width=run["width"],
    )
    img_np = pipe(latents=latents.clone(), output_type="np", **kwargs).images
    img_pil = pipe(latents=latents.clone(), output_type="pil", **kwargs).images[0]
    out["pipeline.latents"] = f32(latents)
    out["pipeline.image"] = f32(np.transpose(img_np, (0, 3, 1, 2)))
    out["pipeline.image_u8"] = f32(np.asarray(img_pil, dtype=np.uint8)[None])
    return out


def write_tiny(name, fixtures_dir):
    """Save the tiny pipeline folder, its outputs and the pipeline-run JSON; return the tokenizer."""
    pipe = build_pipeline(name)
    folder = os.path.join(fixtures_dir, f"{name}-tiny")
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    # save_pretrained re-serializes vocab.json (sorted, indented); keep the original bytes instead.
    for fname in ("vocab.json", "merges.txt"):
        shutil.copyfile(os.path.join(TOKENIZER_SRC, fname), os.path.join(folder, "tokenizer", fname))
    save_tensors(model_outputs(pipe, name), os.path.join(fixtures_dir, f"{name}.outputs.safetensors"))
    write_json(PIPELINE_RUN, os.path.join(fixtures_dir, f"{name}.pipeline.json"))
    return pipe.tokenizer
