#!/usr/bin/env python3
"""PyTorch reference for a whole text-to-image call: diffusers' StableDiffusionPipeline from a
diffusers folder (e.g. one written by scripts/make_random_sd.py), DDIM, fp32 CPU. Prints one JSON
line: load_s, generate_s, peak_rss_mb. Compare with `lora generate` on the same folder.

    python scripts/bench_generate.py MODEL_DIR [--size 512] [--steps 4] [--guidance 7.5]
"""
import argparse
import json
import resource
import time

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--guidance", type=float, default=7.5)
    a = p.parse_args()
    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(a.model, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    with torch.no_grad():
        pipe("a photo of a toy", height=a.size, width=a.size, num_inference_steps=a.steps,
             guidance_scale=a.guidance, generator=torch.Generator().manual_seed(0))
    gen_s = time.perf_counter() - t1
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"load_s": round(load_s, 2), "generate_s": round(gen_s, 2), "peak_rss_mb": round(rss, 1),
                      "torch": torch.__version__, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
