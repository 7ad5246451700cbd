"""Writes the demo training set assets/demo-data/: five 64x64 PNGs of one object the bundled
model has never seen ("sks toy": an orange disc with a cyan five-pointed star), at the world's
positions on world backgrounds, each with its caption in the world's grammar
("a sks toy on the left, white background").

Deterministic (no randomness): re-running gives the same files. Needs numpy + Pillow.
"""
import os

import numpy as np
from PIL import Image

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "assets", "demo-data")
DISC = (255, 140, 0)
STAR = (0, 210, 220)
# (background name, rgb, position name, x, y)
SHOTS = [
    ("white", (240, 240, 240), "center", 32, 32),
    ("black", (20, 20, 20), "left", 17, 30),
    ("blue", (40, 80, 220), "right", 47, 34),
    ("gray", (128, 128, 128), "center", 31, 35),
    ("green", (40, 170, 60), "left", 18, 33),
]
R = 13


def draw(bg, cx, cy):
    y, x = np.mgrid[0:64, 0:64].astype(np.float32) + 0.5
    img = np.empty((64, 64, 3), np.float32)
    img[:] = bg
    d = np.hypot(x - cx, y - cy)
    disc = np.clip(R - d + 0.5, 0, 1)[..., None]
    img = img * (1 - disc) + np.array(DISC, np.float32) * disc
    ang = np.arctan2(y - cy, x - cx) + np.pi / 2
    star_r = 0.62 * R * (0.68 + 0.32 * np.cos(5 * ang))
    star = np.clip(star_r - d + 0.5, 0, 1)[..., None]
    img = img * (1 - star) + np.array(STAR, np.float32) * star
    return Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8))


def caption(pos, bg):
    where = "in the center" if pos == "center" else f"on the {pos}"
    return f"a sks toy {where}, {bg} background"


def main():
    os.makedirs(OUT, exist_ok=True)
    for f in os.listdir(OUT):
        if f.startswith("toy-"):
            os.remove(os.path.join(OUT, f))
    for i, (bg, rgb, pos, cx, cy) in enumerate(SHOTS):
        draw(rgb, cx, cy).save(os.path.join(OUT, f"toy-{i}.png"), optimize=True)
        with open(os.path.join(OUT, f"toy-{i}.txt"), "w") as f:
            f.write(caption(pos, bg) + "\n")
    with open(os.path.join(OUT, "README.md"), "w") as f:
        f.write(
            "# demo-data\n\nFive 64x64 images of one object the bundled model has never seen (\"sks toy\": an\n"
            "orange disc with a cyan five-pointed star), at the world's positions on world backgrounds,\n"
            "made by scripts/make_demo_data.py. `toy-N.txt` beside `toy-N.png` is its caption, in the\n"
            "grammar the bundled model was trained on (\"a sks toy on the left, white background\").\n\n"
            "    lora train --instance-data-dir assets/demo-data --instance-prompt \"a sks toy\" \\\n"
            "        --resolution 64 --output-dir target/demo-lora\n"
        )


if __name__ == "__main__":
    main()
