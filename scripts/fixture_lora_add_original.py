"""The original cloneofsimo/lora `lora_add` run on small LoRA files (part `original` of
scripts/fixture_lora_add.py).

The tool's own `add` function is taken from a git clone of cloneofsimo/lora at two commits and
called in-process:

| commit | what it is | spelling |
|---|---|---|
| b64b1d4 (v0.0.5, 2022-12-15) | the seed-era CLI the seed README documents | `--alpha A`: up = A·up₁ + (1−A)·up₂, down likewise; `.pt` lists, `--with_text_lora` merges `X.text_encoder.pt` |
| d84074b (latest) | the later CLI | `--alpha_1`, `--alpha_2` (default 0.5 each) on `.safetensors`, mode `ljl` (`lora_join`) |

Only the modules `add` imports are extracted (`cli_lora_add`, `lora`, `to_ckpt_v2`, and
`lora_manager` for the latest commit) into a package of their own; the package `__init__`
(which imports the training dataset and torchvision) is not run, and python-fire, used only by
`main()`, is replaced by a stub. `add` itself runs unchanged.

Inputs written here (f32; shapes of the sd1-tiny fixture's cloneofsimo LoRA in
tests/fixtures/lora_formats/cloneofsimo.safetensors, values seeded N(0, 0.1²)):

| file | what |
|---|---|
| te_a.safetensors, te_b.safetensors | cloneofsimo safetensors, text-encoder CLIPAttention only, rank 4 |
| te_r1.safetensors | the same layers at rank 1 |
| seed_a.pt (+ seed_a.text_encoder.pt), seed_b.pt (+ .text_encoder.pt) | `.pt` lists [up0, down0, …], UNet attention (+ text encoder), rank 1 |

Outputs: `original.safetensors` holds `<case>/<key>` for every tensor the original wrote
(`.pt` lists named `unet:{i}:up` / `unet:{i}:down` / `text_encoder:{i}:…` by list position);
`original.json` lists each case's inputs, arguments, commit and the metadata it wrote.
"""

import importlib
import os
import subprocess
import sys
import tempfile
import types

import torch
from safetensors import safe_open

sys.path.insert(0, os.path.dirname(__file__))
from fixture_common import write_json  # noqa: E402
from fixture_lora_formats import save  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SHAPES_FROM = os.path.join(ROOT, "tests", "fixtures", "lora_formats", "cloneofsimo.safetensors")
SEED = "b64b1d4a0c7b348b5738faf90dc907c3b9c15c55"
LATEST = "d84074b3e3496f1cfa8a3f49b8b9972ef463b483"
MODULES = {
    SEED: ["cli_lora_add.py", "lora.py", "to_ckpt_v2.py"],
    LATEST: ["cli_lora_add.py", "lora.py", "lora_manager.py", "to_ckpt_v2.py"],
}
CASES = [
    ("lpl_alpha_1_2", LATEST, "te_a.safetensors", "te_b.safetensors", {"alpha_1": 0.8, "alpha_2": 0.4, "mode": "lpl"}),
    ("lpl_defaults", LATEST, "te_a.safetensors", "te_b.safetensors", {"mode": "lpl"}),
    ("lpl_rank1_rank4", LATEST, "te_r1.safetensors", "te_a.safetensors", {"alpha_1": 0.6, "alpha_2": 0.5, "mode": "lpl"}),
    ("ljl", LATEST, "te_a.safetensors", "te_r1.safetensors", {"mode": "ljl"}),
    ("seed_lpl_alpha", SEED, "seed_a.pt", "seed_b.pt", {"alpha": 0.3, "mode": "lpl", "with_text_lora": True}),
]


def load_add(clone, commit, tmp):
    """The original `add` of `commit`, imported from its own package."""
    name = f"lora_diffusion_{commit[:7]}"
    pkg = os.path.join(tmp, name)
    os.makedirs(pkg)
    for f in MODULES[commit]:
        src = subprocess.check_output(["git", "-C", clone, "show", f"{commit}:lora_diffusion/{f}"])
        with open(os.path.join(pkg, f), "wb") as out:
            out.write(src)
    if "fire" not in sys.modules:
        fire = types.ModuleType("fire")
        fire.Fire = lambda f: f
        sys.modules["fire"] = fire
    mod = types.ModuleType(name)
    mod.__path__ = [pkg]
    sys.modules[name] = mod
    return importlib.import_module(f"{name}.cli_lora_add").add


def shapes():
    """(component, index) → (up shape, down shape) and the target-class metadata."""
    out = {}
    with safe_open(SHAPES_FROM, "pt") as f:
        meta = f.metadata()
        for k in f.keys():
            comp, i, part = k.split(":")
            out.setdefault((comp, int(i)), {})[part] = list(f.get_tensor(k).shape)
    return out, meta


def random_lora(layers, comps, rank, gen):
    """{(comp, i): (up, down)} at `rank` for the layers of the components `comps`."""
    out = {}
    for (comp, i), s in sorted(layers.items()):
        if comp in comps:
            up = torch.randn([s["up"][0], rank], generator=gen) * 0.1
            down = torch.randn([rank, s["down"][1]], generator=gen) * 0.1
            out[(comp, i)] = (up, down)
    return out


def save_safetensors(lora, path, meta):
    tensors, m = {}, {}
    for (comp, i), (up, down) in lora.items():
        tensors[f"{comp}:{i}:up"] = up
        tensors[f"{comp}:{i}:down"] = down
        m[f"{comp}:{i}:rank"] = str(down.shape[0])
        m[comp] = meta[comp]
    save(tensors, path, m)


def save_pt(lora, path):
    for comp, p in [("unet", path), ("text_encoder", path[: -len(".pt")] + ".text_encoder.pt")]:
        flat = []
        for (c, _), (up, down) in sorted(lora.items(), key=lambda kv: kv[0][1]):
            if c == comp:
                flat += [up, down]
        torch.save(flat, p)


def read_written(path):
    """What the original wrote at `path`: (tensors, metadata)."""
    if path.endswith(".safetensors"):
        with safe_open(path, "pt") as f:
            return {k: f.get_tensor(k).clone() for k in f.keys()}, dict(f.metadata() or {})
    tensors = {}
    for comp, p in [("unet", path), ("text_encoder", path[: -len(".pt")] + ".text_encoder.pt")]:
        if not os.path.exists(p):
            continue
        flat = torch.load(p)
        for i in range(len(flat) // 2):
            tensors[f"{comp}:{i}:up"] = flat[2 * i].detach().clone()
            tensors[f"{comp}:{i}:down"] = flat[2 * i + 1].detach().clone()
    return tensors, {}


def make_original(out, clone):
    os.makedirs(out, exist_ok=True)
    layers, meta = shapes()
    gen = torch.Generator().manual_seed(20221208)
    te = ["text_encoder"]
    save_safetensors(random_lora(layers, te, 4, gen), os.path.join(out, "te_a.safetensors"), meta)
    save_safetensors(random_lora(layers, te, 4, gen), os.path.join(out, "te_b.safetensors"), meta)
    save_safetensors(random_lora(layers, te, 1, gen), os.path.join(out, "te_r1.safetensors"), meta)
    both = ["unet", "text_encoder"]
    save_pt(random_lora(layers, both, 1, gen), os.path.join(out, "seed_a.pt"))
    save_pt(random_lora(layers, both, 1, gen), os.path.join(out, "seed_b.pt"))
    expected, summary = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        adds = {c: load_add(clone, c, tmp) for c in (SEED, LATEST)}
        for name, commit, p1, p2, kwargs in CASES:
            ext = os.path.splitext(p1)[1]
            dst = os.path.join(tmp, name + ext)
            # The original modifies the loaded tensors in place; it reads copies.
            work = os.path.join(tmp, name)
            os.makedirs(work)
            for p in (p1, p2):
                for f in os.listdir(out):
                    if f.startswith(p[: -len(ext)] + "."):
                        subprocess.check_call(["cp", os.path.join(out, f), work])
            adds[commit](os.path.join(work, p1), os.path.join(work, p2), dst, **kwargs)
            tensors, written_meta = read_written(dst)
            for k, v in tensors.items():
                expected[f"{name}/{k}"] = v.to(torch.float32).contiguous()
            summary[name] = {
                "commit": commit,
                "path_1": p1,
                "path_2": p2,
                "kwargs": kwargs,
                "keys": sorted(tensors),
                "metadata": dict(sorted(written_meta.items())),
            }
            print(f"{name}: {len(tensors)} tensors from the original add({p1}, {p2}, **{kwargs})")
    save(expected, os.path.join(out, "original.safetensors"))
    write_json(summary, os.path.join(out, "original.json"))
