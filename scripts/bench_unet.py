#!/usr/bin/env python3
"""PyTorch CPU reference time for one SD 1.5 UNet step (the figure the Rust UNet is compared with).

SD 1.5 UNet config, random weights, fp32 CPU, latent 32x32 (a 256x256 image), batch 2 (classifier-free
guidance), context [2, 77, 768]; 2 warm-ups then the median of 5 forward passes under torch.no_grad.
Prints one JSON line: {"unet_step_s": ..., "torch": version, "threads": n}.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402

from real_configs import SD15_UNET  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--latent", type=int, default=32, help="latent height = width")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(SD15_UNET).eval()
    sample = torch.randn(2, 4, args.latent, args.latent)
    context = torch.randn(2, 77, SD15_UNET["cross_attention_dim"])
    timestep = torch.tensor(500)

    times = []
    with torch.no_grad():
        for i in range(args.warmup + args.runs):
            start = time.perf_counter()
            out = unet(sample, timestep, context).sample
            elapsed = time.perf_counter() - start
            if i >= args.warmup:
                times.append(elapsed)
    if not torch.isfinite(out).all():
        sys.exit("non-finite UNet output")
    print(
        json.dumps(
            {
                "unet_step_s": round(statistics.median(times), 4),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
