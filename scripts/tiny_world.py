"""The tiny world the bundled model is trained on: 64x64 images of one flat shape on a flat
background, each with its caption, drawn from a seed (nothing is stored).

    a small red circle on the left, blue background
    a large yellow triangle in the center, black background

Shapes: circle, square, triangle. Colours: red, green, blue, yellow, purple. Backgrounds: those
colours (never the shape's own) plus white, black, gray. Sizes: small, large. Positions: left,
center, right (x = 16 / 32 / 48, +-3 px; y = 32 +-6 px). Each colour is jittered by up to 8 levels.

The palette and the layout are also in src/world/ (the scorer reads images with them): change
both together.

    python scripts/tiny_world.py OUT_DIR COUNT [SEED]   # writes OUT_DIR/NNNNN.png + .txt
"""
import math
import os
import random
import sys

from PIL import Image, ImageDraw

SIZE = 64
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
    "purple": (140, 60, 190),
}
NEUTRALS = {"white": (240, 240, 240), "black": (20, 20, 20), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 7, "large": 13}
POSITIONS = {"left": 16, "center": 32, "right": 48}


def caption(size, colour, shape, pos, bg):
    where = "in the center" if pos == "center" else f"on the {pos}"
    return f"a {size} {colour} {shape} {where}, {bg} background"


def jitter(rgb, rng, amount=8):
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def draw_shape(draw, shape, cx, cy, r, fill):
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.9
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    else:
        h = r * 1.1
        draw.polygon([(cx, cy - h), (cx - h, cy + h * 0.8), (cx + h, cy + h * 0.8)], fill=fill)


def scene(rng):
    """One random scene: (PIL image, caption)."""
    colour = rng.choice(sorted(COLOURS))
    bgs = [b for b in sorted(COLOURS) if b != colour] + sorted(NEUTRALS)
    bg = rng.choice(bgs)
    shape = rng.choice(SHAPES)
    size = rng.choice(sorted(SIZES))
    pos = rng.choice(sorted(POSITIONS))
    bg_rgb = COLOURS.get(bg) or NEUTRALS[bg]
    img = Image.new("RGB", (SIZE, SIZE), jitter(bg_rgb, rng))
    d = ImageDraw.Draw(img)
    cx = POSITIONS[pos] + rng.randint(-3, 3)
    cy = 32 + rng.randint(-6, 6)
    draw_shape(d, shape, cx, cy, SIZES[size], jitter(COLOURS[colour], rng))
    return img, caption(size, colour, shape, pos, bg)


def generic(rng):
    """An image outside the world's language (random colours, polygons, stars, stripes), for the
    autoencoder only, so that it reconstructs colours and shapes the world does not have."""
    img = Image.new("RGB", (SIZE, SIZE), tuple(rng.randint(0, 255) for _ in range(3)))
    d = ImageDraw.Draw(img)
    for _ in range(rng.randint(1, 4)):
        fill = tuple(rng.randint(0, 255) for _ in range(3))
        cx, cy, r = rng.uniform(4, 60), rng.uniform(4, 60), rng.uniform(3, 20)
        kind = rng.randrange(4)
        if kind == 0:
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif kind == 1:
            n = rng.randint(3, 8)
            a0 = rng.uniform(0, math.pi)
            d.polygon(
                [(cx + r * math.cos(a0 + 2 * math.pi * i / n), cy + r * math.sin(a0 + 2 * math.pi * i / n)) for i in range(n)],
                fill=fill,
            )
        elif kind == 2:
            pts = []
            for i in range(10):
                rr = r if i % 2 == 0 else r * 0.45
                a = -math.pi / 2 + math.pi * i / 5
                pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
            d.polygon(pts, fill=fill)
        else:
            w = rng.randint(2, 6)
            for x in range(0, SIZE, 2 * w):
                d.rectangle([x, cy - r, x + w - 1, cy + r], fill=fill)
    return img


def main():
    out, count = sys.argv[1], int(sys.argv[2])
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    rng = random.Random(seed)
    os.makedirs(out, exist_ok=True)
    for i in range(count):
        img, text = scene(rng)
        img.save(os.path.join(out, f"{i:05d}.png"))
        with open(os.path.join(out, f"{i:05d}.txt"), "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
