"""Builds the model bundled with the project, assets/tiny-sd/, from nothing: a small Stable
Diffusion (SD 1.x-like UNet with cross-attention, CLIP text encoder with the real vocabulary,
AutoencoderKL with the real 8x factor, DDIM scheduler) trained on the tiny world of
scripts/tiny_world.py (64x64 images of flat shapes, from 8x8 latents).

Stages (each deterministic; all of them by default):
  init   random weights for every part (diffusers / transformers initialisation, seed 1234)
  vae    trains the autoencoder here (PyTorch; the tool has no VAE training) on world scenes and
         generic shapes, then sets `scaling_factor` to 1 / std of the latents
  world  writes the captioned training scenes (deleted at the end)
  unet   trains the UNet with the tool itself: `lora train --full --use-ema` from the random init,
         text encoder frozen (its random features are fixed and distinct per word and position)
  pack   writes assets/tiny-sd/ and its README (recipe and the time each stage took)

    /work/venv/bin/python scripts/make_bundled_model.py [--work DIR] [--stage NAME ...]
"""
import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_world as W  # noqa: E402

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
OUT = os.path.join(ROOT, "assets", "tiny-sd")
TOK = os.path.join(ROOT, "..", "shared", "clip-tokenizer")

VAE_STEPS = 1500
VAE_BATCH = 16
VAE_LR = 1e-3
DEC_STEPS = 3000
DEC_LR = 1e-3
WORLD_IMAGES = 6000
# The UNet is trained in two runs of `lora train --full`, the second starting from the first's
# (EMA) weights with a fresh optimizer and a lower rate.
UNET = {
    "steps": 2000,
    "batch_size": 16,
    "learning_rate": 2e-3,
    "lr_warmup_steps": 100,
    "lr_scheduler": "cosine",
    "min_snr_gamma": 5.0,
    "ema_decay": 0.995,
    "seed": 0,
}
UNET2 = dict(UNET, steps=3000, learning_rate=1e-3, seed=1)


def build_random(dst):
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
    if os.path.isdir(dst):
        shutil.rmtree(dst)
    pipe.save_pretrained(dst, safe_serialization=True)


def vae_batch(rng, n):
    ims = [np.asarray(W.scene(rng)[0] if rng.random() < 0.6 else W.generic(rng)) for _ in range(n)]
    return torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).float() / 127.5 - 1


def vae_steps(vae, opt, rng, steps, lr0, held, log, name):
    for step in range(1, steps + 1):
        lr = lr0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, step / 50)
        x = vae_batch(rng, VAE_BATCH)
        post = vae.encode(x).latent_dist
        y = vae.decode(post.sample()).sample
        loss = ((y - x) ** 2).mean() + 0.5 * (y - x).abs().mean() + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps:
            with torch.no_grad():
                r = vae.decode(vae.encode(held).latent_dist.mode()).sample
                err = (r - held).abs().mean().item() * 127.5
            log(f"{name} step {step}: loss {loss.item():.4f}, held-out mean abs error {err:.2f} levels")


def train_vae(model_dir, log):
    """Phase 1: the autoencoder from its random initialisation (posterior noise std ~1 at first)."""
    torch.manual_seed(0)
    torch.set_num_threads(2)
    vae = AutoencoderKL.from_pretrained(os.path.join(model_dir, "vae"))
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=VAE_LR, weight_decay=0.0)
    held = vae_batch(random.Random(99), 32)
    vae_steps(vae, opt, random.Random(1), VAE_STEPS, VAE_LR, held, log, "vae")
    vae.save_pretrained(os.path.join(model_dir, "vae"), safe_serialization=True)
    return {"steps": VAE_STEPS, "batch": VAE_BATCH, "lr": VAE_LR}


def set_scaling_factor(model_dir, log):
    """`scaling_factor` = 1 / std of the (sampled) latents of 256 scenes and generic images."""
    torch.manual_seed(1)
    vae = AutoencoderKL.from_pretrained(os.path.join(model_dir, "vae")).eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(vae_batch(random.Random(7 + i), 64)).latent_dist.sample() for i in range(4)])
    scale = round(float(1.0 / z.std()), 5)
    vae.register_to_config(scaling_factor=scale)
    vae.save_pretrained(os.path.join(model_dir, "vae"), safe_serialization=True)
    log(f"scaling_factor {scale}")
    return {"scaling_factor": scale}


def train_decoder(model_dir, log):
    """Phase 2: the decoder alone on the frozen encoder's sampled latents (the latent space the
    UNet is trained in does not move, so this can run beside the UNet stage)."""
    torch.manual_seed(2)
    torch.set_num_threads(1)
    vae = AutoencoderKL.from_pretrained(os.path.join(model_dir, "vae"))
    for m in (vae.encoder, vae.quant_conv):
        m.requires_grad_(False)
    vae.train()
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=DEC_LR, weight_decay=0.0)
    held = vae_batch(random.Random(99), 32)
    rng = random.Random(3)
    for step in range(1, DEC_STEPS + 1):
        lr = DEC_LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / DEC_STEPS)))
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, step / 50)
        x = vae_batch(rng, VAE_BATCH)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
        y = vae.decode(z).sample
        loss = ((y - x) ** 2).mean() + 0.5 * (y - x).abs().mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == DEC_STEPS:
            with torch.no_grad():
                r = vae.decode(vae.encode(held).latent_dist.mode()).sample
                err = (r - held).abs().mean().item() * 127.5
            log(f"decoder step {step}: loss {loss.item():.4f}, held-out mean abs error {err:.2f} levels")
            vae.save_pretrained(os.path.join(model_dir, "vae-decoder-run"), safe_serialization=True)
    vae.save_pretrained(os.path.join(model_dir, "vae"), safe_serialization=True)
    shutil.rmtree(os.path.join(model_dir, "vae-decoder-run"), ignore_errors=True)
    return {"steps": DEC_STEPS, "lr": DEC_LR, "held_out_mean_abs_error_levels": round(err, 2)}


def write_world(dst):
    if os.path.isdir(dst):
        shutil.rmtree(dst)
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "tiny_world.py"), dst, str(WORLD_IMAGES), "0"],
                   check=True)


def lora_binary():
    if os.environ.get("LORA_BIN"):
        return os.environ["LORA_BIN"]
    subprocess.run(["cargo", "build", "--release", "--bin", "lora"], cwd=ROOT, check=True)
    return os.path.join(ROOT, "target", "release", "lora")


def train_unet(model_dir, world, work, log, UNET, run="unet-run"):
    out = os.path.join(work, run)
    cmd = [
        lora_binary(), "train", "--full", "--use-ema",
        "--model", model_dir,
        "--instance-data-dir", world,
        "--instance-prompt", "a shape",
        "--resolution", "64",
        "--cache-latents",
        "--batch-size", str(UNET["batch_size"]),
        "--learning-rate", str(UNET["learning_rate"]),
        "--lr-scheduler", UNET["lr_scheduler"],
        "--lr-warmup-steps", str(UNET["lr_warmup_steps"]),
        "--ema-decay", str(UNET["ema_decay"]),
        "--min-snr-gamma", str(UNET["min_snr_gamma"]),
        "--max-train-steps", str(UNET["steps"]),
        "--save-steps", "250",
        "--seed", str(UNET["seed"]),
        "--output-dir", out,
        "--force",
    ]
    log("running: lora " + " ".join(os.path.basename(c) if os.path.isabs(c) else c for c in cmd[1:]))
    # One thread: on a shared 2-core machine candle's spinning thread pool loses more than
    # the second core gains.
    env = dict(os.environ, CANDLE_NUM_THREADS="1", RAYON_NUM_THREADS="1")
    subprocess.run(cmd, check=True, env=env)
    shutil.copy(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"),
                os.path.join(model_dir, "unet", "diffusion_pytorch_model.safetensors"))
    shutil.copy(os.path.join(out, "loss.png"), os.path.join(work, f"{run}-loss.png"))
    return dict(UNET)


def pack(model_dir, recipe):
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    shutil.copytree(model_dir, OUT)
    with open(os.path.join(OUT, "recipe.json"), "w") as f:
        json.dump(recipe, f, indent=2, sort_keys=True)
        f.write("\n")
    v, dec, u, u2, t = (recipe[k] for k in ("vae", "decoder", "unet", "unet2", "seconds"))
    text = f"""# tiny-sd (bundled)

A small Stable Diffusion trained on the tiny world of `scripts/tiny_world.py`: 64x64 images of one
flat shape (circle, square, triangle; red, green, blue, yellow, purple; small or large; on the
left, in the center or on the right) on a flat background, captioned like
"a small red circle on the left, blue background". It has never seen anything else (the demo's
"sks toy" is outside its world). `lora bench following` measures how well it follows such
prompts; the README of the project gives the figures.

Architecture: SD 1.x-like UNet (block channels 32/64/64, cross-attention width 32, 8x8 latents),
CLIP text encoder (2 layers, width 32, the real 49408-token vocabulary), AutoencoderKL (8x, 4
latent channels), DDIM scheduler (scaled-linear betas, epsilon prediction). It was trained
without caption dropout: generate with `--guidance 1` (no classifier-free guidance).

Made from nothing by `scripts/make_bundled_model.py` (deterministic), {recipe['total_minutes']} min of
stages on a shared 2-core CPU:
- random initialisation of every part (diffusers / transformers defaults, seed 1234);
- VAE trained in PyTorch ({v['steps']} steps, batch {v['batch']}, AdamW lr {v['lr']}, MSE + 0.5 L1 +
  1e-6 KL) on world scenes and generic shapes/colours ({t['vae']:.0f} s); `scaling_factor`
  {recipe['scale']['scaling_factor']} = 1 / std of its latents; then its decoder alone on the frozen
  encoder's latents ({dec['steps']} steps, lr {dec['lr']}, {t['decoder']:.0f} s): held-out mean abs error
  {dec['held_out_mean_abs_error_levels']} levels of 255;
- UNet trained by this tool, `lora train --full --use-ema` from the random init on
  {WORLD_IMAGES} world scenes with their captions (cached latents, no flips: captions name left and
  right), batch {u['batch_size']}, AdamW, min-SNR gamma {u['min_snr_gamma']}, EMA decay {u['ema_decay']}:
  {u['steps']} steps at lr {u['learning_rate']} ({u['lr_scheduler']}, {u['lr_warmup_steps']} warm-up) ({t['unet']:.0f} s),
  then {u2['steps']} more from those weights at lr {u2['learning_rate']} ({t['unet2']:.0f} s);
- the text encoder keeps its random initialisation (frozen).

`recipe.json` holds the same figures.
"""
    with open(os.path.join(OUT, "README.md"), "w") as f:
        f.write(text)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=os.path.join(ROOT, "target", "bundled-model"))
    ap.add_argument("--stage", action="append", choices=["init", "vae", "scale", "world", "unet", "unet2", "decoder", "pack"])
    a = ap.parse_args()
    stages = a.stage or ["init", "vae", "scale", "world", "unet", "unet2", "decoder", "pack"]
    os.makedirs(a.work, exist_ok=True)
    model_dir = os.path.join(a.work, "model")
    world = os.path.join(a.work, "world")
    recipe_path = os.path.join(a.work, "recipe.json")
    recipe = json.load(open(recipe_path)) if os.path.exists(recipe_path) else {"seconds": {}}
    logf = open(os.path.join(a.work, "log.txt"), "a")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    for stage in stages:
        t0 = time.time()
        if stage == "init":
            build_random(model_dir)
        elif stage == "vae":
            recipe["vae"] = train_vae(model_dir, log)
        elif stage == "scale":
            recipe["scale"] = set_scaling_factor(model_dir, log)
        elif stage == "decoder":
            recipe["decoder"] = train_decoder(model_dir, log)
        elif stage == "world":
            write_world(world)
        elif stage == "unet":
            recipe["unet"] = train_unet(model_dir, world, a.work, log, UNET)
        elif stage == "unet2":
            recipe["unet2"] = train_unet(model_dir, world, a.work, log, UNET2, "unet2-run")
        elif stage == "pack":
            recipe["total_minutes"] = round(sum(recipe["seconds"].values()) / 60)
            pack(model_dir, recipe)
            shutil.rmtree(world, ignore_errors=True)
        if stage != "pack":
            recipe["seconds"][stage] = round(time.time() - t0, 1)
        log(f"stage {stage}: {time.time() - t0:.0f} s")
        with open(recipe_path, "w") as f:
            json.dump(recipe, f, indent=2, sort_keys=True)


if __name__ == "__main__":
    main()
