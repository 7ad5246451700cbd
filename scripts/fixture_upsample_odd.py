#!/usr/bin/env python3
"""tests/fixtures/upsample_odd.safetensors: nearest upsampling to sizes that are not integer
multiples (the UNet's `upsample_size` path for odd latent sizes, e.g. aspect-ratio buckets), forward
and backward from PyTorch's F.interpolate(mode="nearest").

Usage: /work/venv/bin/python scripts/fixture_upsample_odd.py [--out tests/fixtures/upsample_odd.safetensors]

Per case i: `i.x` [2, 3, h, w], `i.g` (the upstream gradient), `i.y` = interpolate(x, size), `i.dx`
= d(sum(y * g))/dx; `i.size` = [h, w, target_h, target_w] as i64.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fixture_common import f32, i64, save_tensors, setup_determinism  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = [(1, 2, 2, 3), (2, 3, 3, 5), (3, 5, 5, 10), (4, 4, 7, 9), (5, 3, 10, 5)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "tests/fixtures/upsample_odd.safetensors"))
    args = ap.parse_args()
    setup_determinism()
    gen = torch.Generator().manual_seed(0)
    out = {}
    for i, (h, w, th, tw) in enumerate(CASES):
        x = torch.randn((2, 3, h, w), generator=gen, requires_grad=True)
        g = torch.randn((2, 3, th, tw), generator=gen)
        y = F.interpolate(x, size=(th, tw), mode="nearest")
        (y * g).sum().backward()
        out[f"{i}.x"] = f32(x)
        out[f"{i}.g"] = f32(g)
        out[f"{i}.y"] = f32(y)
        out[f"{i}.dx"] = f32(x.grad)
        out[f"{i}.size"] = i64([h, w, th, tw])
    save_tensors(out, args.out)
    print(f"wrote {len(CASES)} upsample cases to {args.out}")


if __name__ == "__main__":
    main()
