"""Our writers' files in the real consumers: diffusers `load_lora_weights` and kohya sd-scripts'
`networks/lora.py`, plus sd-scripts' own hash function on our kohya files.

    cargo build --release
    /work/venv/bin/python scripts/fixture_kohya.py --sd-scripts /path/to/sd-scripts \\
        [--out tests/fixtures/kohya]

`--sd-scripts` is a checkout of kohya-ss/sd-scripts (not vendored; its `networks/lora.py` and
the hash functions of `library/train_util.py` run from that source; modules it imports but
the LoRA network never uses, torchvision and cv2, are stubbed; einops must be importable,
e.g. `pip install --target DIR einops` and `--extra-path DIR`).

Made here (Python, seeded) and committed:
- `source.safetensors`: a LoRA on the sd1-tiny UNet attention projections and text-encoder
  q/k/v/out with a DIFFERENT rank (1..4) and alpha (0.5..8) per layer, in the kohya layout with
  per-layer `.alpha` (as sd-scripts / ComfyUI read it);
- `diffusers_nometa.safetensors`: diffusers keys, ranks varying per layer, no alpha and no
  `lora_adapter_metadata`.

Written by our binary (`target/release/lora`) and committed, so the Rust tests can check that
the writers still produce these bytes:
- `kohya.safetensors` (`lora convert --to kohya`: one alpha per file), `kohya_per_layer.safetensors`
  (`--per-layer-alpha`), `diffusers.safetensors`, `peft.safetensors`, `ours.safetensors`;
- `train/lora.safetensors`: `lora train` on sd1-tiny (default save format) with the text encoder.

`expected.safetensors`: `delta.<layer>` = (alpha / r)·B·A of the source per layer;
`train.diffusers.<layer>` = the ΔW diffusers applies for the trained file (sd-scripts' equals it:
`max_diff_vs_sd_scripts`). PEFT itself loads `peft.safetensors` (diffusers takes no raw PEFT dict).
`expected.json`: per file and consumer the max |ΔW − ΔW_source| over layers, the number of
layers the consumer adapted, the warnings it logged; diffusers' per-layer scale for
`diffusers_nometa`; sd-scripts' `sshs_model_hash` / `sshs_legacy_hash` of each of our kohya
files and of a >1 MiB one built from a formula the Rust test repeats (`hash_big`).
"""

import argparse
import ast
import hashlib
import importlib.machinery
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import types
import warnings

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(__file__))
from fixture_common import f32, setup_determinism, write_json  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
MODEL = os.path.join(ROOT, "tests", "fixtures", "sd1-tiny")
LORA = os.path.join(ROOT, "target", "release", "lora")
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
ALPHAS = [0.5, 1.0, 2.0, 3.0, 8.0]


def linear_paths(model, targets):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and any(n.endswith("." + t) for t in targets)]


def varied_layers(unet, te):
    """{component.path: (A, B, alpha)} with rank and alpha varying per layer."""
    g = torch.Generator().manual_seed(5)
    out = {}
    paths = [("unet", p, unet) for p in linear_paths(unet, UNET_TARGETS)]
    paths += [("text_encoder", p, te) for p in linear_paths(te, TE_TARGETS)]
    for i, (comp, path, model) in enumerate(paths):
        w = model.get_submodule(path).weight
        r = 1 + i % 4
        alpha = ALPHAS[i % len(ALPHAS)]
        a = (0.3 * torch.randn((r, w.shape[1]), generator=g)).half().float()
        b = (0.3 * torch.randn((w.shape[0], r), generator=g)).half().float()
        out[f"{comp}.{path}"] = (a, b, alpha)
    return out


def kohya_name(layer):
    comp, path = layer.split(".", 1)
    prefix = "lora_unet" if comp == "unet" else "lora_te"
    return f"{prefix}_{path.replace('.', '_')}"


def write_source(layers, path):
    sd = {}
    for layer, (a, b, alpha) in layers.items():
        n = kohya_name(layer)
        sd[f"{n}.lora_down.weight"] = a
        sd[f"{n}.lora_up.weight"] = b
        sd[f"{n}.alpha"] = torch.tensor(alpha)
    save_file(sd, path, {"ss_network_module": "networks.lora", "ss_output_name": "varied"})


def write_nometa(layers, path):
    sd = {}
    for layer, (a, b, _) in layers.items():
        comp, p = layer.split(".", 1)
        mid = "lora" if comp == "unet" else "lora_linear_layer"
        sd[f"{layer}.{mid}.down.weight"] = a
        sd[f"{layer}.{mid}.up.weight"] = b
    save_file(sd, path)


def run_lora(*args):
    subprocess.run([LORA, *args], check=True, cwd=ROOT)


class Captured(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def base_models():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(os.path.join(MODEL, "unet"))
    te = CLIPTextModel.from_pretrained(os.path.join(MODEL, "text_encoder"))
    return unet, te


def weights_of(unet, te, layers):
    out = {}
    for layer in layers:
        comp, path = layer.split(".", 1)
        m = (unet if comp == "unet" else te).get_submodule(path)
        w = m.base_layer.weight if hasattr(m, "base_layer") else m.weight
        out[layer] = w.detach().clone()
    return out


def diffusers_deltas(path, layers):
    """ΔW per layer after diffusers' load_lora_weights + fuse_lora(1.0); logged warnings."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as dlogging

    pipe = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None, requires_safety_checker=False)
    base = weights_of(pipe.unet, pipe.text_encoder, layers)
    handler = Captured()
    dlogging.get_logger("diffusers").addHandler(handler)
    logging.getLogger("peft").addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.load_lora_weights(os.path.dirname(path), weight_name=os.path.basename(path))
    dlogging.get_logger("diffusers").removeHandler(handler)
    logging.getLogger("peft").removeHandler(handler)
    adapted = sum(1 for n, m in list(pipe.unet.named_modules()) + list(pipe.text_encoder.named_modules()) if hasattr(m, "lora_A") and len(m.lora_A) > 0)
    pipe.fuse_lora(lora_scale=1.0)
    fused = weights_of(pipe.unet, pipe.text_encoder, layers)
    msgs = handler.messages + [str(w.message) for w in caught if "lora" in str(w.message).lower() or "key" in str(w.message).lower()]
    return {k: fused[k] - base[k] for k in layers}, adapted, msgs


def load_sd_scripts(root, extra):
    for p in extra:
        sys.path.insert(0, p)
    sys.path.insert(0, root)
    for n in ["torchvision", "torchvision.transforms", "cv2"]:
        if n in sys.modules:
            continue
        m = types.ModuleType(n)
        m.__spec__ = importlib.machinery.ModuleSpec(n, None)
        m.__path__ = []
        sys.modules[n] = m
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    import networks.lora as kohya_lora

    # The hash functions of library/train_util.py, taken from its source (the module itself
    # imports the whole training stack).
    src_path = os.path.join(root, "library", "train_util.py")
    tree = ast.parse(open(src_path).read())
    wanted = {"precalculate_safetensors_hashes", "addnet_hash_legacy", "addnet_hash_safetensors"}
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    ns = {"hashlib": hashlib, "BytesIO": io.BytesIO, "safetensors": __import__("safetensors.torch")}
    exec(compile(ast.Module(body=funcs, type_ignores=[]), src_path, "exec"), ns)
    return kohya_lora, ns["precalculate_safetensors_hashes"]


def sd_scripts_deltas(kohya_lora, path, layers):
    """ΔW per layer after sd-scripts' create_network_from_weights + merge_to (multiplier 1)."""
    unet, te = base_models()
    base = weights_of(unet, te, layers)
    weights_sd = load_file(path)
    network, weights_sd = kohya_lora.create_network_from_weights(1.0, None, None, te, unet, weights_sd, for_inference=True)
    applied = len(network.text_encoder_loras) + len(network.unet_loras)
    network.merge_to(te, unet, weights_sd, torch.float32, "cpu")
    merged = weights_of(unet, te, layers)
    return {k: merged[k] - base[k] for k in layers}, applied


def peft_deltas(path, layers):
    """ΔW per layer after PEFT itself loads a raw PEFT file: a LoraConfig from the file's
    `lora_adapter_metadata`, `inject_adapter_in_model` + `set_peft_model_state_dict` per model,
    then `merge_and_unload`-equivalent `merge()` of every LoRA layer."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    with safe_open(path, "pt") as f:
        cfg = json.loads(f.metadata()["lora_adapter_metadata"])
    keep = {k: v for k, v in cfg.items() if k in {"r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora", "lora_dropout", "bias"}}
    sd = {k.removeprefix("base_model.model."): v for k, v in load_file(path).items()}
    unet, te = base_models()
    base = weights_of(unet, te, layers)
    adapted = 0
    for comp, model in (("unet", unet), ("text_encoder", te)):
        names = {n for n, _ in model.named_modules()}
        targets = [t for t in keep["target_modules"] if t in names]
        config = LoraConfig(**{**keep, "target_modules": targets})
        model = inject_adapter_in_model(config, model)
        part = {k: v for k, v in sd.items() if k.split(".lora_")[0] in names}
        res = set_peft_model_state_dict(model, part)
        assert not res.unexpected_keys, res.unexpected_keys
        for _, m in model.named_modules():
            if hasattr(m, "lora_A") and "default" in m.lora_A:
                adapted += 1
                m.merge()
    merged = weights_of(unet, te, layers)
    return {k: merged[k] - base[k] for k in layers}, adapted


def max_diff(got, want):
    return max(float((got[k] - want[k]).abs().max()) for k in want)


def layer_names(path):
    """The component.path of every layer in one of our files (via `lora inspect`-free parsing)."""
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
    return keys


def hash_big_source(path):
    """A >1 MiB LoRA from a formula (repeated by the Rust test): rank 32 on every UNet and
    text-encoder attention projection of sd1-tiny, value (((j·7919 + i·104729) mod 1000) − 500) / 1024
    for element j of tensor i (tensors in sorted key order), alpha 16."""
    unet, te = base_models()
    paths = [("unet", p, unet) for p in linear_paths(unet, UNET_TARGETS)]
    paths += [("text_encoder", p, te) for p in linear_paths(te, TE_TARGETS)]
    shapes = {}
    for comp, p, model in paths:
        w = model.get_submodule(p).weight
        n = kohya_name(f"{comp}.{p}")
        shapes[f"{n}.lora_down.weight"] = (32, w.shape[1])
        shapes[f"{n}.lora_up.weight"] = (w.shape[0], 32)
    sd = {}
    for i, k in enumerate(sorted(shapes)):
        numel = shapes[k][0] * shapes[k][1]
        j = torch.arange(numel, dtype=torch.int64)
        sd[k] = (((j * 7919 + i * 104729) % 1000 - 500).float() / 1024).reshape(shapes[k])
    for k in list(sd):
        if k.endswith(".lora_down.weight"):
            sd[k.replace(".lora_down.weight", ".alpha")] = torch.tensor(16.0)
    save_file(sd, path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "kohya"))
    ap.add_argument("--sd-scripts", required=True)
    ap.add_argument("--extra-path", action="append", default=[])
    args = ap.parse_args()
    setup_determinism()
    out = os.path.abspath(args.out)
    os.makedirs(os.path.join(out, "train"), exist_ok=True)
    kohya_lora, precalc = load_sd_scripts(os.path.abspath(args.sd_scripts), args.extra_path)
    rel = lambda p: os.path.relpath(p, ROOT)  # noqa: E731

    unet, te = base_models()
    layers = varied_layers(unet, te)
    write_source(layers, os.path.join(out, "source.safetensors"))
    write_nometa(layers, os.path.join(out, "diffusers_nometa.safetensors"))
    delta = {k: (alpha / a.shape[0]) * (b @ a) for k, (a, b, alpha) in layers.items()}
    model = rel(MODEL)
    src = rel(os.path.join(out, "source.safetensors"))
    for name, extra in [
        ("kohya", ["--to", "kohya"]),
        ("kohya_per_layer", ["--to", "kohya", "--per-layer-alpha"]),
        ("diffusers", ["--to", "diffusers"]),
        ("peft", ["--to", "peft"]),
        ("ours", ["--to", "ours"]),
    ]:
        run_lora("convert", src, *extra, "--model", model, "--force", "--out", rel(os.path.join(out, f"{name}.safetensors")))
    train_dir = os.path.join(out, "train")
    run_lora(
        "train", "--model", model, "--instance-data-dir", "tests/fixtures/train-data", "--instance-prompt", "a photo of sks toy",
        "--resolution", "16", "--max-train-steps", "3", "--learning-rate", "0.05", "--train-text-encoder",
        "--learning-rate-text", "0.05", "--seed", "3", "--output-dir", rel(train_dir), "--force",
    )
    for leftover in ["loss.csv", "loss.png"]:
        os.remove(os.path.join(train_dir, leftover))

    result = {"files": {}, "hashes": {}}
    for name in ["kohya", "kohya_per_layer", "diffusers", "peft"]:
        path = os.path.join(out, f"{name}.safetensors")
        entry = {}
        try:
            got, adapted, msgs = diffusers_deltas(path, delta)
            entry["diffusers"] = {"max_diff": max_diff(got, delta), "adapted": adapted, "warnings": msgs}
        except Exception as e:  # noqa: BLE001 - recorded: which consumer refuses which file
            entry["diffusers"] = {"error": f"{type(e).__name__}: {e}"}
        if name == "peft":
            got, adapted = peft_deltas(path, delta)
            entry["peft"] = {"max_diff": max_diff(got, delta), "adapted": adapted}
        if name.startswith("kohya"):
            got, applied = sd_scripts_deltas(kohya_lora, path, delta)
            entry["sd_scripts"] = {"max_diff": max_diff(got, delta), "applied": applied}
        entry["layers"] = len(delta)
        result["files"][name] = entry
        print(name, json.dumps(entry)[:400])

    # The trained file in both consumers.
    train_file = os.path.join(train_dir, "lora.safetensors")
    with safe_open(train_file, "pt") as f:
        train_keys = [k for k in f.keys() if k.endswith(".lora_down.weight")]
    train_layers = {}
    for k in train_keys:
        n = k[: -len(".lora_down.weight")]
        comp = "unet" if n.startswith("lora_unet_") else "text_encoder"
        train_layers[n] = comp
    # kohya names -> module paths through the models' own module lists.
    names = {kohya_name(f"unet.{p}"): f"unet.{p}" for p in linear_paths(unet, UNET_TARGETS)}
    names.update({kohya_name(f"text_encoder.{p}"): f"text_encoder.{p}" for p in linear_paths(te, TE_TARGETS)})
    train_paths = {names[n]: None for n in train_layers}
    expected = {f"delta.{k}": f32(v) for k, v in delta.items()}
    got_d, adapted, msgs = diffusers_deltas(train_file, train_paths)
    got_k, applied = sd_scripts_deltas(kohya_lora, train_file, train_paths)
    result["files"]["train"] = {
        "layers": len(train_paths),
        "diffusers": {"adapted": adapted, "warnings": msgs, "max_diff_vs_sd_scripts": max_diff(got_d, got_k)},
        "sd_scripts": {"applied": applied},
    }
    for k in train_paths:
        expected[f"train.diffusers.{k}"] = f32(got_d[k])

    # diffusers' alpha rule for a file without alpha: scale per layer = <ΔW, BA> / <BA, BA>.
    got, adapted, msgs = diffusers_deltas(os.path.join(out, "diffusers_nometa.safetensors"), delta)
    scales = {}
    for k, (a, b, _) in layers.items():
        ba = (b @ a).double()
        scales[k] = float((got[k].double() * ba).sum() / (ba * ba).sum())
    result["nometa"] = {"scales": scales, "adapted": adapted, "warnings": msgs}

    for name in ["kohya", "kohya_per_layer", "train/lora"]:
        path = os.path.join(out, f"{name}.safetensors")
        with safe_open(path, "pt") as f:
            meta = f.metadata()
        model_hash, legacy = precalc(load_file(path), meta)
        result["hashes"][name] = {"sshs_model_hash": model_hash, "sshs_legacy_hash": legacy, "in_file": [meta.get("sshs_model_hash"), meta.get("sshs_legacy_hash")]}
    with tempfile.TemporaryDirectory() as tmp:
        big_src = os.path.join(tmp, "big_source.safetensors")
        big = os.path.join(tmp, "big.safetensors")
        hash_big_source(big_src)
        run_lora("convert", big_src, "--to", "kohya", "--model", model, "--out", big)
        with safe_open(big, "pt") as f:
            meta = f.metadata()
        model_hash, legacy = precalc(load_file(big), meta)
        result["hashes"]["hash_big"] = {"sshs_model_hash": model_hash, "sshs_legacy_hash": legacy, "in_file": [meta.get("sshs_model_hash"), meta.get("sshs_legacy_hash")], "file_size": os.path.getsize(big)}
    save_file(dict(sorted(expected.items())), os.path.join(out, "expected.safetensors"))
    write_json(result, os.path.join(out, "expected.json"))
    print(json.dumps(result["hashes"], indent=1))


if __name__ == "__main__":
    main()
