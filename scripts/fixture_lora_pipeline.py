"""diffusers' pipeline image with a LoRA fused at scale 0.7, from the fixed latents of the sd1 pipeline
fixture: tests/fixtures/lora_pipeline.safetensors (`image` [1,3,16,16] in [0,1], `image_u8` HWC 0..255 as f32).

Run after make_fixtures.py and fixture_lora_formats.py:  /work/venv/bin/python scripts/fixture_lora_pipeline.py
"""
import json
import os

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file, save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
SCALE = 0.7


def main():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(ROOT, "sd1-tiny"), safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(os.path.join(ROOT, "lora_formats"), weight_name="diffusers.safetensors")
    pipe.fuse_lora(lora_scale=SCALE)
    run = json.load(open(os.path.join(ROOT, "sd1.pipeline.json")))
    latents = load_file(os.path.join(ROOT, "sd1.outputs.safetensors"))["pipeline.latents"]
    kwargs = dict(
        prompt=run["prompt"],
        negative_prompt=run["negative_prompt"],
        num_inference_steps=run["steps"],
        guidance_scale=run["guidance"],
        height=run["height"],
        width=run["width"],
        latents=latents.clone(),
        eta=run["eta"],
    )
    with torch.no_grad():
        img = pipe(output_type="np", **kwargs).images  # [1, H, W, 3]
        pil = pipe(output_type="pil", **kwargs).images[0]
    save_file(
        {
            "image": torch.from_numpy(np.ascontiguousarray(img.transpose(0, 3, 1, 2))).float(),
            "image_u8": torch.from_numpy(np.asarray(pil).astype(np.float32))[None],
            "scale": torch.tensor(SCALE, dtype=torch.float32),
        },
        os.path.join(ROOT, "lora_pipeline.safetensors"),
    )
    print("wrote lora_pipeline.safetensors")


if __name__ == "__main__":
    main()
