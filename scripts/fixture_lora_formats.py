"""LoRA file-format fixtures: one LoRA saved in every community format, plus diffusers' ground truth.

    /work/venv/bin/python scripts/fixture_lora_formats.py [--out tests/fixtures/lora_formats]

One LoRA (r=4, lora_alpha=8, so scale 2) on the sd1-tiny UNet attention projections
(to_q, to_k, to_v, to_out.0 of attn1 and attn2) and its text encoder (q/k/v/out_proj), with
seeded non-zero A and B rounded to fp16 (exact in f32, f16 and after the ×2 of cloneofsimo's
pre-multiplied up), written as:

| file | how |
|---|---|
| kohya.safetensors | `lora_unet_<path dots→underscores>` / `lora_te_…`, `.lora_down/.lora_up/.alpha` (8), `ss_*` metadata |
| diffusers.safetensors | `save_lora_weights` of `convert_state_dict_to_diffusers(get_peft_model_state_dict(m))` (`unet.….lora.down.weight`, `text_encoder.….lora_linear_layer.down.weight`) with `lora_adapter_metadata` |
| diffusers_peft.safetensors | `save_lora_weights` of the raw PEFT dicts (`unet.….lora_A.weight`) with `lora_adapter_metadata` |
| diffusers_old.safetensors | pre-0.15 attention-processor names (`unet.….attn1.processor.to_q_lora.down.weight`, `text_encoder.….self_attn.to_q_lora.down.weight`), no alpha: up holds scale·B |
| diffusers_old_unet.bin | the UNet part of the above as `unet.save_attn_procs` pickled it (no `unet.` prefix) |
| peft.safetensors | raw `get_peft_model_state_dict` of both models (`<path>.lora_A.weight`) + `lora_adapter_metadata` JSON (r, lora_alpha) |
| peft_nometa.safetensors | `get_peft_model_state_dict` of `get_peft_model(...)` (`base_model.model.<path>.lora_A.weight`), no metadata: scale 1 |
| cloneofsimo.safetensors | `unet:{i}:up` = scale·B, `unet:{i}:down` = A, metadata `unet` / `text_encoder` target classes and `unet:{i}:rank`, i in pre-diffusers-0.15 module order |
| cloneofsimo.pt, cloneofsimo.text_encoder.pt | `torch.save([up0, down0, up1, …])` in f16 (up = scale·B) |
| cloneofsimo_geglu.safetensors | a second LoRA (seed 1) on attention + GEGLU `ff.net.0.proj`, targets CrossAttention/Attention/GEGLU |

`expected.safetensors`: `delta.<layer>` = scale·B·A for a few layers, `fused.<layer>` = the layer
weight after diffusers' `load_lora_weights(diffusers.safetensors)` + `fuse_lora(lora_scale=0.7)`,
and `geglu.<layer>.down` / `.up` for every layer of the GEGLU LoRA (up already scaled as stored).
`expected.json`: rank, alpha, scale, fuse scale, layer lists, layer counts.
The script checks that diffusers loads kohya / diffusers_peft / diffusers_old to the same fused weights.
"""

import argparse
import json
import os
import shutil
import struct
import sys
import tempfile

import torch
from safetensors import safe_open

sys.path.insert(0, os.path.dirname(__file__))
from fixture_common import f32, setup_determinism, write_json  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
MODEL = os.path.join(ROOT, "tests", "fixtures", "sd1-tiny")
RANK, ALPHA, FUSE_SCALE = 4, 8.0, 0.7
SCALE = ALPHA / RANK
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
CHECK_LAYERS = [
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "unet.down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k",
    "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_v",
    "unet.up_blocks.2.attentions.2.transformer_blocks.0.attn2.to_out.0",
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
    "text_encoder.text_model.encoder.layers.2.self_attn.out_proj",
]


def load_models():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(os.path.join(MODEL, "unet"))
    te = CLIPTextModel.from_pretrained(os.path.join(MODEL, "text_encoder"))
    return unet, te


def lora_config(targets):
    from peft import LoraConfig

    return LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=True)


def seed_lora(model, generator):
    """Seeded non-zero A and B, rounded to fp16 so every format stores them exactly."""
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                v = 0.3 * torch.randn(p.shape, generator=generator)
                p.copy_(v.half().float())


def peft_state(model):
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def layers_of(peft_sd):
    """{module path: (A, B)} from a PEFT state dict (`<path>.lora_A.weight`)."""
    out = {}
    for k, v in peft_sd.items():
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if k.endswith(suffix):
                out.setdefault(k[: -len(suffix)], {})[part] = v
    return {p: (d["lora_A"], d["lora_B"]) for p, d in out.items()}


def pre015_modules(module, prefix=""):
    """Module traversal of diffusers < 0.15: BasicTransformerBlock registered attn1, ff, attn2
    (newer versions register attn1, attn2, ff); everything else keeps registration order."""
    yield prefix, module
    names = [n for n, _ in module.named_children()]
    if type(module).__name__ == "BasicTransformerBlock":
        first = [n for n in ("attn1", "ff", "attn2") if n in names]
        names = first + [n for n in names if n not in first]
    children = dict(module.named_children())
    for n in names:
        yield from pre015_modules(children[n], f"{prefix}.{n}" if prefix else n)


def cloneofsimo_order(model, targets):
    """cloneofsimo's `_find_modules`: every nn.Linear under an ancestor whose class is a target,
    ancestors in (pre-0.15) traversal order, descendants in registration order."""
    paths = []
    for anc_path, anc in pre015_modules(model):
        if type(anc).__name__ not in targets:
            continue
        for sub, m in anc.named_modules():
            if isinstance(m, torch.nn.Linear):
                paths.append(f"{anc_path}.{sub}" if sub else anc_path)
    return paths


def kohya_file(unet_layers, te_layers):
    sd = {}
    for prefix, layers in (("lora_unet", unet_layers), ("lora_te", te_layers)):
        for path, (a, b) in layers.items():
            name = f"{prefix}_{path.replace('.', '_')}"
            sd[f"{name}.lora_down.weight"] = a
            sd[f"{name}.lora_up.weight"] = b
            sd[f"{name}.alpha"] = torch.tensor(ALPHA)
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(RANK),
        "ss_network_alpha": str(ALPHA),
        "ss_v2": "False",
        "ss_base_model_version": "sd_v1",
    }
    return sd, meta


def old_diffusers_file(unet_layers, te_layers):
    """Attention-processor names of diffusers 0.12–0.14 (UNet) and the old text-encoder names."""
    unet_map = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}
    te_map = {"q_proj": "to_q_lora", "k_proj": "to_k_lora", "v_proj": "to_v_lora", "out_proj": "to_out_lora"}
    sd = {}
    for path, (a, b) in unet_layers.items():
        for t, old in unet_map.items():
            if path.endswith("." + t):
                base = path[: -len(t) - 1]
                sd[f"unet.{base}.processor.{old}.down.weight"] = a
                sd[f"unet.{base}.processor.{old}.up.weight"] = SCALE * b
    for path, (a, b) in te_layers.items():
        for t, old in te_map.items():
            if path.endswith("." + t):
                base = path[: -len(t) - 1]
                sd[f"text_encoder.{base}.{old}.down.weight"] = a
                sd[f"text_encoder.{base}.{old}.up.weight"] = SCALE * b
    return sd


def cloneofsimo_tensors(name, plain_model, layers, targets):
    """`plain_model` has no adapters injected (PEFT wraps each Linear in a non-Linear module)."""
    order = cloneofsimo_order(plain_model, targets)
    if sorted(order) != sorted(layers):
        raise RuntimeError(f"{name}: cloneofsimo order does not cover the LoRA layers")
    tensors, meta, flat = {}, {name: json.dumps(targets)}, []
    for i, path in enumerate(order):
        a, b = layers[path]
        tensors[f"{name}:{i}:up"] = (SCALE * b).contiguous()
        tensors[f"{name}:{i}:down"] = a
        meta[f"{name}:{i}:rank"] = str(a.shape[0])
        flat += [(SCALE * b).half(), a.half()]
    return tensors, meta, flat, order


def fused_weights(pipe_dir, weight_dir, weight_name):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(weight_dir, weight_name=weight_name)
    pipe.fuse_lora(lora_scale=FUSE_SCALE)
    sd = {}
    for layer in CHECK_LAYERS:
        comp, path = layer.split(".", 1)
        mod = getattr(pipe, comp).get_submodule(path)
        w = mod.base_layer.weight if hasattr(mod, "base_layer") else mod.weight
        sd[layer] = f32(w)
    return sd


DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


def save(tensors, path, metadata=None):
    """safetensors with a sorted header (safetensors' own writer orders metadata at random,
    so its files differ from run to run)."""
    header, blobs, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    for k, v in sorted(tensors.items()):
        data = v.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b""
        header[k] = {"dtype": DTYPES[v.dtype], "shape": list(v.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def resave(path):
    """Rewrites a safetensors file written by another library with a sorted header."""
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    save(tensors, path, meta)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "lora_formats"))
    args = parser.parse_args()
    setup_determinism()
    os.makedirs(args.out, exist_ok=True)
    out = args.out

    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model

    unet, te = load_models()
    unet.add_adapter(lora_config(UNET_TARGETS))
    te.add_adapter(lora_config(TE_TARGETS))
    g = torch.Generator().manual_seed(0)
    seed_lora(unet, g)
    seed_lora(te, g)
    unet_sd, te_sd = peft_state(unet), peft_state(te)
    unet_layers, te_layers = layers_of(unet_sd), layers_of(te_sd)

    # diffusers (training-script form, converted names) and diffusers with PEFT names.
    unet_meta = unet.peft_config["default"].to_dict()
    te_meta = te.peft_config["default"].to_dict()
    for m in (unet_meta, te_meta):
        m["base_model_name_or_path"] = None  # an absolute local path otherwise
        m["target_modules"] = sorted(m["target_modules"])  # a set: random order
    with tempfile.TemporaryDirectory() as tmp:
        for name, u, t in (
            ("diffusers.safetensors", convert_state_dict_to_diffusers(unet_sd), convert_state_dict_to_diffusers(te_sd)),
            ("diffusers_peft.safetensors", unet_sd, te_sd),
        ):
            StableDiffusionPipeline.save_lora_weights(
                tmp,
                unet_lora_layers=u,
                text_encoder_lora_layers=t,
                unet_lora_adapter_metadata=dict(unet_meta),
                text_encoder_lora_adapter_metadata=dict(te_meta),
                weight_name=name,
            )
            shutil.copy(os.path.join(tmp, name), os.path.join(out, name))
            resave(os.path.join(out, name))

    old = old_diffusers_file(unet_layers, te_layers)
    save(old, os.path.join(out, "diffusers_old.safetensors"))
    # diffusers 0.12–0.14 `unet.save_attn_procs`: a pickled UNet-only dict without the prefix.
    old_bin = {k.removeprefix("unet."): v for k, v in old.items() if k.startswith("unet.")}
    torch.save(dict(sorted(old_bin.items())), os.path.join(out, "diffusers_old_unet.bin"))
    sd, meta = kohya_file(unet_layers, te_layers)
    save(sd, os.path.join(out, "kohya.safetensors"), meta)

    # Raw PEFT: both state dicts in one file (text-encoder paths start with text_model.).
    peft_meta = {"r": RANK, "lora_alpha": ALPHA, "target_modules": sorted(UNET_TARGETS + TE_TARGETS), "peft_type": "LORA"}
    save({**unet_sd, **te_sd}, os.path.join(out, "peft.safetensors"), {"lora_adapter_metadata": json.dumps(peft_meta, sort_keys=True)})
    u2, t2 = load_models()
    pu, pt = get_peft_model(u2, lora_config(UNET_TARGETS)), get_peft_model(t2, lora_config(TE_TARGETS))
    with torch.no_grad():
        for m, layers in ((pu, unet_layers), (pt, te_layers)):
            for name, p in m.named_parameters():
                for part, idx in (("lora_A", 0), ("lora_B", 1)):
                    if f".{part}." in name:
                        path = name.split(f".{part}.")[0].removeprefix("base_model.model.")
                        p.copy_(layers[path][idx])
    save({**peft_state(pu), **peft_state(pt)}, os.path.join(out, "peft_nometa.safetensors"))

    # cloneofsimo: safetensors (up pre-multiplied) and .pt pickled lists.
    plain_unet, plain_te = load_models()
    ut, um, uflat, uorder = cloneofsimo_tensors("unet", plain_unet, unet_layers, ["CrossAttention", "Attention"])
    tt, tm, tflat, torder = cloneofsimo_tensors("text_encoder", plain_te, te_layers, ["CLIPAttention"])
    save({**ut, **tt}, os.path.join(out, "cloneofsimo.safetensors"), {**um, **tm})
    torch.save(uflat, os.path.join(out, "cloneofsimo.pt"))
    torch.save(tflat, os.path.join(out, "cloneofsimo.text_encoder.pt"))

    # A second LoRA with GEGLU targets: checks the attn1, ff, attn2 order of diffusers < 0.15.
    ug, _ = load_models()
    ug.add_adapter(lora_config(UNET_TARGETS + ["ff.net.0.proj"]))
    seed_lora(ug, torch.Generator().manual_seed(1))
    g_layers = layers_of(peft_state(ug))
    gt, gm, _, gorder = cloneofsimo_tensors("unet", plain_unet, g_layers, ["CrossAttention", "Attention", "GEGLU"])
    save(gt, os.path.join(out, "cloneofsimo_geglu.safetensors"), gm)

    # Ground truth.
    expected = {}
    for layer in CHECK_LAYERS:
        comp, path = layer.split(".", 1)
        a, b = (unet_layers if comp == "unet" else te_layers)[path]
        expected[f"delta.{layer}"] = f32(SCALE * (b.double() @ a.double()))
    fused = fused_weights(MODEL, out, "diffusers.safetensors")
    for other in ("kohya.safetensors", "diffusers_peft.safetensors", "diffusers_old.safetensors"):
        f2 = fused_weights(MODEL, out, other)
        for k in fused:
            diff = (f2[k] - fused[k]).abs().max().item()
            if diff > 1e-6:
                raise RuntimeError(f"diffusers fuses {other} differently at {k}: {diff}")
    for k, v in fused.items():
        expected[f"fused.{k}"] = v
    for path, (a, b) in g_layers.items():
        expected[f"geglu.unet.{path}.down"] = a
        expected[f"geglu.unet.{path}.up"] = (SCALE * b).contiguous()
    save(expected, os.path.join(out, "expected.safetensors"))
    write_json(
        {
            "rank": RANK,
            "alpha": ALPHA,
            "scale": SCALE,
            "fuse_scale": FUSE_SCALE,
            "check_layers": CHECK_LAYERS,
            "num_layers": {"unet": len(unet_layers), "text_encoder": len(te_layers)},
            "cloneofsimo_order": {"unet": uorder, "text_encoder": torder, "geglu": gorder},
        },
        os.path.join(out, "expected.json"),
    )
    print(f"wrote {out}: {len(unet_layers)} UNet + {len(te_layers)} text-encoder layers")


if __name__ == "__main__":
    main()
