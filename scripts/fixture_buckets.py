#!/usr/bin/env python3
"""tests/fixtures/buckets.json: kohya sd-scripts' aspect-ratio buckets, from its own code.

Usage: /work/venv/bin/python scripts/fixture_buckets.py SD_SCRIPTS_DIR [--out tests/fixtures/buckets.json]

SD_SCRIPTS_DIR is a checkout of https://github.com/kohya-ss/sd-scripts (library/model_util.py and
library/train_util.py are read). Importing those modules pulls in torch, cv2, diffusers and more, so
the script parses them with `ast` and executes only `make_bucket_resolutions` and the
`BucketManager` class (which need math and numpy). Recorded per case:
- `resolutions`: make_bucket_resolutions((reso, reso), min, max, steps), sorted (w, h) pairs;
- `select`: for each (width, height) of an image, BucketManager.select_bucket's bucket (w, h),
  resized size (w, h) and aspect-ratio error, with `no_upscale` false (the predefined buckets)
  and true (buckets from the image sizes).
The min / max are given already adjusted to multiples of the steps, as the datasets do first.
"""

import argparse
import ast
import json
import math
import os
import sys
import types

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (resolution, min_bucket_reso, max_bucket_reso, bucket_reso_steps)
CASES = [
    (512, 256, 1024, 64),
    (768, 256, 1024, 64),
    (512, 320, 768, 64),
    (1024, 512, 2048, 64),
    (32, 16, 64, 8),
    (40, 16, 64, 8),
    (64, 32, 128, 16),
]

# Image sizes (width, height) whose buckets are recorded for every case.
SIZES = [
    (512, 512), (768, 512), (512, 768), (1024, 683), (683, 1024), (1920, 1080), (1080, 1920),
    (3000, 1000), (1000, 3000), (640, 480), (480, 640), (2048, 2048), (300, 200), (256, 1024),
    (1024, 256), (48, 32), (32, 48), (40, 40), (64, 24), (24, 64), (100, 37), (33, 95),
    (4000, 3000), (200, 200), (12, 30), (555, 777),
]


def extract(path, names):
    """The top-level function / class definitions `names` of a Python file, as source."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    found = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    missing = [n for n in names if n not in found]
    if missing:
        sys.exit(f"{path}: no definition of {missing}")
    return ast.Module(body=[found[n] for n in names], type_ignores=[])


def load_kohya(sd_scripts):
    """make_bucket_resolutions and BucketManager, executed from the checkout's source."""
    lib = os.path.join(sd_scripts, "library")
    model_util = types.ModuleType("model_util")
    model_util.math = math
    exec(compile(extract(os.path.join(lib, "model_util.py"), ["make_bucket_resolutions"]),
                 "model_util.py", "exec"), model_util.__dict__)
    ns = {"math": math, "np": np, "model_util": model_util, "Tuple": tuple}
    exec(compile(extract(os.path.join(lib, "train_util.py"), ["BucketManager"]),
                 "train_util.py", "exec"), ns)
    return model_util.make_bucket_resolutions, ns["BucketManager"]


def select_all(manager_cls, no_upscale, reso, lo, hi, steps):
    """select_bucket for every size in SIZES (None where kohya's code fails on it)."""
    out = []
    for w, h in SIZES:
        bm = manager_cls(no_upscale, (reso, reso), lo, hi, steps)
        if not no_upscale:
            bm.make_buckets()
        try:
            bucket, resized, err = bm.select_bucket(w, h)
        except (ZeroDivisionError, AssertionError):
            out.append({"size": [w, h], "bucket": None})
            continue
        out.append({
            "size": [w, h],
            "bucket": [int(bucket[0]), int(bucket[1])],
            "resized": [int(resized[0]), int(resized[1])],
            "ar_error": float(err),
        })
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("sd_scripts")
    ap.add_argument("--out", default=os.path.join(ROOT, "tests/fixtures/buckets.json"))
    args = ap.parse_args()
    make_resos, manager = load_kohya(args.sd_scripts)
    cases = []
    for reso, lo, hi, steps in CASES:
        resos = make_resos((reso, reso), lo, hi, steps)
        cases.append({
            "resolution": reso,
            "min_bucket_reso": lo,
            "max_bucket_reso": hi,
            "bucket_reso_steps": steps,
            "resolutions": [[int(w), int(h)] for w, h in resos],
            "select": select_all(manager, False, reso, lo, hi, steps),
            "select_no_upscale": select_all(manager, True, reso, lo, hi, steps),
        })
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"source": "kohya-ss/sd-scripts library/model_util.py, library/train_util.py",
                   "cases": cases}, f, indent=None, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {len(cases)} bucket cases to {args.out}")


if __name__ == "__main__":
    main()
