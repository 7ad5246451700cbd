"""LyCORIS LoHa / LoKr and DoRA files made by their own code on the sd1-tiny model, with the
weights and images those codes give.

    /work/venv/bin/pip install --no-deps lycoris-lora==4.1.3 && /work/venv/bin/pip install einops toml
    /work/venv/bin/python scripts/fixture_lycoris.py [--out tests/fixtures/lycoris]

LyCORIS files come from `lycoris.kohya.create_network` (the network sd-scripts trains through
`--network_module lycoris.kohya`) on the diffusers UNet and CLIP text encoder, restricted by a
preset to Transformer2DModel + ResnetBlock2D in the UNet and CLIPAttention in the text encoder
(linear and 3×3 / 1×1 conv layers), saved by its own `save_weights`. Every stored tensor but
`alpha` is then replaced by seeded random values (LyCORIS initialises one factor of each pair
to zero) and loaded back with `load_state_dict`:

| file | algo, arguments | what it covers |
|---|---|---|
| `loha.safetensors` | loha, dim 2 / alpha 1, conv_dim 2 / conv_alpha 1.5 | LoHa linear + conv (flattened w*_b) |
| `loha_tucker.safetensors` | loha, use_tucker, ResnetBlock2D only | Tucker `hada_t1/t2` on 3×3 convs |
| `lokr.safetensors` | lokr, dim 2 / alpha 1, conv_dim 8 | full `lokr_w1` + low-rank `lokr_w2_a/b` (linear); full w1 + full w2 (conv: scale 1) |
| `lokr_tucker.safetensors` | lokr, factor 4, use_tucker, conv_dim 2, ResnetBlock2D only | `lokr_t2` |
| `dora_lycoris.safetensors` | lora + dora_wd (wd_on_output True) | `dora_scale` [out, 1, …] |
| `loha_dora_in.safetensors` | loha + dora_wd, wd_on_output False, attention only | `dora_scale` [1, in, …] |

`dora_peft.safetensors`: PEFT `LoraConfig(use_dora=True)` on the UNet (to_q/k/v/out.0, conv1,
conv2) and the text encoder (q/k/v/out_proj), random factors and magnitudes, saved as diffusers'
training scripts save it (`get_peft_model_state_dict` → `convert_state_dict_to_diffusers` →
`StableDiffusionPipeline.save_lora_weights` with `unet_lora_adapter_metadata`).

`expected.safetensors`, per file `<file>.<layer>`:
- `.merged` = W' at multiplier 1 as LyCORIS' own forward builds it (`_current_weight()` and
  `get_weight` / `make_weight`, `apply_weight_decompose`; checked here against the module's
  real forward on a random input), `.merged_half` the same at multiplier 0.5, `.base` = W;
- PEFT: `.merged` = W' after PEFT's `merge()` at scale 1, `.merged_half` after
  `set_adapters(weights=0.5)` on a fresh model.
`<file>.image` / `.image_u8`: the pipeline image (fixed latents and settings of
sd1.pipeline.json) with the adapter applied by LyCORIS' `apply_to` (multiplier 1) / diffusers'
`load_lora_weights` (PEFT DoRA), as float [1, 3, H, W] and as the PNG bytes' values.
`expected.json`: layers, multipliers, and `lycoris_merge_to_vs_forward` (LyCORIS 4.1.3's
`get_merged_weight` of LoHa / LoKr scales ΔW by (alpha/r)² where its forward uses alpha/r:
the max |difference| on one layer).
"""

import argparse
import json
import os
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(__file__))
from fixture_common import f32, setup_determinism, write_json  # noqa: E402
from fixture_lora_formats import save as save_sorted  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
FIX = os.path.join(ROOT, "tests", "fixtures")
MODEL = os.path.join(FIX, "sd1-tiny")

LAYERS = [
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "unet.down_blocks.0.attentions.0.proj_in",
    "unet.down_blocks.0.resnets.0.conv1",
    "unet.down_blocks.1.resnets.0.conv_shortcut",
    "unet.down_blocks.0.resnets.0.time_emb_proj",
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
]

PRESETS = {
    "full": dict(unet_target_module=["Transformer2DModel", "ResnetBlock2D"], unet_target_name=[],
                 text_encoder_target_module=["CLIPAttention"], text_encoder_target_name=[]),
    "resnet": dict(unet_target_module=["ResnetBlock2D"], unet_target_name=[],
                   text_encoder_target_module=[], text_encoder_target_name=[]),
    "attn": dict(unet_target_module=["Transformer2DModel"], unet_target_name=[],
                 text_encoder_target_module=["CLIPAttention"], text_encoder_target_name=[]),
}

FILES = [
    ("loha", "full", dict(algo="loha", network_dim=2, network_alpha=1.0, conv_dim=2, conv_alpha=1.5), 0.45),
    ("loha_tucker", "resnet", dict(algo="loha", network_dim=2, network_alpha=1.0, conv_dim=2, conv_alpha=1.0, use_tucker=True), 0.45),
    ("lokr", "full", dict(algo="lokr", network_dim=2, network_alpha=1.0, conv_dim=8, conv_alpha=4.0), 0.3),
    ("lokr_tucker", "resnet", dict(algo="lokr", network_dim=2, network_alpha=1.0, conv_dim=2, conv_alpha=1.0, factor=4, use_tucker=True), 0.3),
    ("dora_lycoris", "full", dict(algo="lora", network_dim=2, network_alpha=1.0, conv_dim=2, conv_alpha=1.0, dora_wd=True), 0.3),
    ("loha_dora_in", "attn", dict(algo="loha", network_dim=2, network_alpha=1.0, dora_wd=True, wd_on_output=False), 0.45),
]


def pipeline():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe):
    run = json.load(open(os.path.join(FIX, "sd1.pipeline.json")))
    latents = load_file(os.path.join(FIX, "sd1.outputs.safetensors"))["pipeline.latents"]
    kwargs = dict(prompt=run["prompt"], negative_prompt=run["negative_prompt"], num_inference_steps=run["steps"],
                  guidance_scale=run["guidance"], height=run["height"], width=run["width"], eta=run["eta"])
    with torch.no_grad():
        img = pipe(output_type="np", latents=latents.clone(), **kwargs).images
        pil = pipe(output_type="pil", latents=latents.clone(), **kwargs).images[0]
    return (
        torch.from_numpy(np.ascontiguousarray(img.transpose(0, 3, 1, 2))).float(),
        torch.from_numpy(np.asarray(pil).astype(np.float32))[None],
    )


def kohya_name(layer):
    comp, path = layer.split(".", 1)
    return ("lora_unet_" if comp == "unet" else "lora_te_") + path.replace(".", "_")


def module_of(pipe, layer):
    comp, path = layer.split(".", 1)
    return (pipe.unet if comp == "unet" else pipe.text_encoder).get_submodule(path)


def forward_weight(lyc, multiplier):
    """W' as the module's (non-bypass) forward builds it."""
    base = lyc._current_weight().float()
    if lyc.name == "loha" or lyc.name == "kron":
        diff = lyc.get_weight(lyc.shape).to(base.dtype) * lyc.scalar
    else:
        diff = lyc.make_weight(base.device).to(base.dtype) * lyc.scale
    if lyc.wd:
        return lyc.apply_weight_decompose(base + diff, multiplier)
    return base + diff * multiplier


def check_forward(lyc, weight, multiplier, gen):
    """The module's real forward against op(x, W') + bias on a random input."""
    old = lyc.multiplier
    lyc.multiplier = multiplier
    org = lyc.org_module[0]
    if isinstance(org, torch.nn.Linear):
        x = torch.randn((3, org.in_features), generator=gen)
        want = F.linear(x, weight, org.bias)
    else:
        x = torch.randn((1, org.in_channels, 6, 6), generator=gen)
        want = F.conv2d(x, weight, org.bias, stride=org.stride, padding=org.padding)
    with torch.no_grad():
        got = lyc(x)
    lyc.multiplier = old
    err = float((got - want).abs().max())
    assert err < 1e-4 * max(1.0, float(want.abs().max())), (lyc.lora_name, err)


def randomize(net, gen, std):
    sd = net.state_dict()
    new = {}
    for k, v in sd.items():
        if k.endswith(".alpha"):
            new[k] = v
        elif k.endswith(".dora_scale"):
            # A magnitude near the weight's own norm, moved per row / column.
            new[k] = (v * (1 + 0.3 * torch.randn(v.shape, generator=gen))).abs().contiguous()
        else:
            new[k] = (std * torch.randn(v.shape, generator=gen)).contiguous()
    net.load_state_dict(new)


def lycoris_file(name, preset, kw, std, out, expected, result, gen):
    from lycoris import kohya as lk

    pipe = pipeline()
    with tempfile.TemporaryDirectory() as tmp:
        import toml

        preset_path = os.path.join(tmp, "preset.toml")
        with open(preset_path, "w") as f:
            toml.dump(PRESETS[preset], f)
        kw = dict(kw)
        dim, alpha = kw.pop("network_dim"), kw.pop("network_alpha")
        net = lk.create_network(1.0, dim, alpha, None, pipe.text_encoder, pipe.unet, preset=preset_path, **kw)
    net.apply_to(pipe.text_encoder, pipe.unet, True, True)
    randomize(net, gen, std)
    path = os.path.join(out, f"{name}.safetensors")
    net.save_weights(path, torch.float32, {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({k: str(v) for k, v in kw.items()}), "ss_network_dim": str(dim), "ss_network_alpha": str(alpha)})
    by_name = {m.lora_name: m for m in net.loras}
    layers = [l for l in LAYERS if kohya_name(l) in by_name]
    for layer in layers:
        lyc = by_name[kohya_name(layer)]
        expected[f"{name}.{layer}.base"] = f32(lyc._current_weight())
        for m, tag in [(1.0, "merged"), (0.5, "merged_half")]:
            w = forward_weight(lyc, m)
            check_forward(lyc, w, m, gen)
            expected[f"{name}.{layer}.{tag}"] = f32(w)
    entry = {"layers": layers, "modules": len(net.loras), "multipliers": {"merged": 1.0, "merged_half": 0.5}}
    if not lyc.wd and lyc.name in ("loha", "kron"):
        merged, _ = lyc.get_merged_weight(1.0, lyc.shape)
        entry["lycoris_merge_to_vs_forward"] = float((merged - forward_weight(lyc, 1.0)).abs().max())
    img, img_u8 = render(pipe)
    expected[f"{name}.image"] = img
    expected[f"{name}.image_u8"] = img_u8
    result[name] = entry
    print(name, json.dumps(entry))


def peft_dora(out, expected, result, gen):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

    unet_cfg = LoraConfig(r=2, lora_alpha=3.0, use_dora=True, init_lora_weights="gaussian",
                          target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])
    te_cfg = LoraConfig(r=2, lora_alpha=1.0, use_dora=True, init_lora_weights="gaussian",
                        target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    pipe = pipeline()
    pipe.unet.add_adapter(unet_cfg)
    pipe.text_encoder.add_adapter(te_cfg)
    parts = {}
    for comp, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        sd = get_peft_model_state_dict(model)
        for k, v in sd.items():
            if "lora_magnitude_vector" in k:
                sd[k] = (v * (1 + 0.3 * torch.randn(v.shape, generator=gen))).abs().contiguous()
            else:
                sd[k] = (0.3 * torch.randn(v.shape, generator=gen)).contiguous()
        res = set_peft_model_state_dict(model, sd)
        assert not res.unexpected_keys, res.unexpected_keys
        parts[comp] = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
    # Configs as saved, without the local model path PEFT records.
    meta = {c: {**cfg.to_dict(), "base_model_name_or_path": None} for c, cfg in (("unet", unet_cfg), ("text_encoder", te_cfg))}
    StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers=parts["unet"], text_encoder_lora_layers=parts["text_encoder"],
        weight_name="dora_peft.safetensors", unet_lora_adapter_metadata=meta["unet"],
        text_encoder_lora_adapter_metadata=meta["text_encoder"], safe_serialization=True)
    layers = [l for l in LAYERS if any(l.endswith("." + t) for t in ["to_q", "conv1", "q_proj"])]
    # diffusers' own loading of the saved file, then PEFT's merge at 1 and at 0.5.
    for scale, tag in [(1.0, "merged"), (0.5, "merged_half")]:
        p = pipeline()
        for layer in layers:
            expected[f"dora_peft.{layer}.base"] = f32(module_of(p, layer).weight)
        p.load_lora_weights(out, weight_name="dora_peft.safetensors", adapter_name="d")
        p.set_adapters(["d"], adapter_weights=[scale])
        if scale == 1.0:
            img, img_u8 = render(p)
            expected["dora_peft.image"] = img
            expected["dora_peft.image_u8"] = img_u8
        p.fuse_lora(lora_scale=1.0, adapter_names=["d"])
        for layer in layers:
            m = module_of(p, layer)
            w = m.base_layer.weight if hasattr(m, "base_layer") else m.weight
            expected[f"dora_peft.{layer}.{tag}"] = f32(w)
    result["dora_peft"] = {"layers": layers, "multipliers": {"merged": 1.0, "merged_half": 0.5}}
    print("dora_peft", json.dumps(result["dora_peft"]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(FIX, "lycoris"))
    args = ap.parse_args()
    setup_determinism()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    gen = torch.Generator().manual_seed(21)
    expected, result = {}, {}
    plain, plain_u8 = render(pipeline())
    expected["plain.image"] = plain
    expected["plain.image_u8"] = plain_u8
    for name, preset, kw, std in FILES:
        lycoris_file(name, preset, kw, std, out, expected, result, gen)
    peft_dora(out, expected, result, gen)
    save_sorted(expected, os.path.join(out, "expected.safetensors"))
    write_json(result, os.path.join(out, "expected.json"))


if __name__ == "__main__":
    main()
