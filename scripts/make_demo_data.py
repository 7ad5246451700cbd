"""Writes the tiny demo training set assets/demo-data/: five 64x64 PNGs of one object (a red
disc with a yellow star-like centre, "sks toy") on different backgrounds, with captions.

Deterministic (no randomness): re-running gives the same files. Needs numpy + Pillow.
"""
import os
import numpy as np
from PIL import Image

OUT = os.path.join(os.path.dirname(__file__), "..", "assets", "demo-data")
BACKGROUNDS = [
    ((70, 110, 200), "blue"),
    ((90, 170, 90), "green"),
    ((230, 230, 220), "white"),
    ((60, 60, 60), "dark grey"),
    ((200, 150, 90), "wooden"),
]


def draw(bg, cx, cy, r):
    y, x = np.mgrid[0:64, 0:64].astype(np.float32) + 0.5
    img = np.empty((64, 64, 3), np.float32)
    img[:] = bg
    # a soft vertical gradient on the background
    img *= (0.85 + 0.3 * (y / 64.0))[..., None]
    d = np.hypot(x - cx, y - cy)
    disc = np.clip(r - d + 0.5, 0, 1)[..., None]
    img = img * (1 - disc) + np.array([210, 30, 40], np.float32) * disc
    ang = np.arctan2(y - cy, x - cx)
    star_r = 0.45 * r * (1 + 0.35 * np.cos(5 * ang))
    star = np.clip(star_r - d + 0.5, 0, 1)[..., None]
    img = img * (1 - star) + np.array([250, 210, 40], np.float32) * star
    return Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8))


def main():
    os.makedirs(OUT, exist_ok=True)
    spots = [(32, 32, 18), (24, 36, 15), (40, 28, 16), (30, 40, 20), (36, 34, 14)]
    for i, ((bg, name), (cx, cy, r)) in enumerate(zip(BACKGROUNDS, spots)):
        path = os.path.join(OUT, f"toy-{i}.png")
        draw(bg, cx, cy, r).save(path, optimize=True)
        if i % 2 == 0:  # every other image has its own caption; the rest use the prompt
            with open(os.path.join(OUT, f"toy-{i}.txt"), "w") as f:
                f.write(f"a photo of sks toy on a {name} background\n")
    with open(os.path.join(OUT, "README.md"), "w") as f:
        f.write(
            "# demo-data\n\nFive 64x64 images of one object (\"sks toy\": a red disc with a yellow\n"
            "star) on different backgrounds, made by scripts/make_demo_data.py. `toy-N.txt` beside\n"
            "`toy-N.png` is that image's caption; the others use `--instance-prompt`.\n\n"
            "    lora train --instance-data-dir assets/demo-data --instance-prompt \"a photo of sks toy\" \\\n"
            "        --resolution 64 --max-train-steps 100 --output-dir target/demo-lora\n"
        )


if __name__ == "__main__":
    main()
