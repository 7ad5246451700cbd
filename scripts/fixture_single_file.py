"""Single-file (original LDM layout) references for the tiny SD-1-like and SD-2-like models.

For each of tests/fixtures/sd{1,2}-tiny the diffusers folder is converted to the original layout by
diffusers' own scripts/convert_diffusers_to_original_stable_diffusion.py (fetched, not vendored: pass
its path). Its VAE table is built for 4 levels; it is rebuilt by the same loops for the tiny VAE's
level count. Its SD 2 text-encoder branch leaves out OpenCLIP's `transformer.` level and the
top-level names, so those keys get the names of diffusers' DIFFUSERS_TO_LDM_MAPPING["openclip"] table,
the layout `from_single_file` reads. The file is then loaded back with diffusers'
`StableDiffusionPipeline.from_single_file(file, config=<tiny folder>)`; the script checks that every
tensor equals the folder's and runs the fixed-latents pipeline of sd{1,2}.pipeline.json.

Writes tests/fixtures/single_file/sd{1,2}.keys.json (every key: shape, dtype, sum and index-weighted
sum of the values) and sd{1,2}.image.safetensors (the pipeline's image from the single file).
With --ours NAME=FILE it also loads single files our writer made (e.g. kept by
`LORA_SINGLE_FILE_OUT=DIR cargo test --release --test single_file`) and checks that from_single_file
finds every tensor equal to the folder's.

  python scripts/fixture_single_file.py --convert-script /path/to/convert_diffusers_to_original_stable_diffusion.py
"""

import argparse
import importlib.util
import json
import os
import tempfile

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from safetensors.torch import load_file, save_file

from fixture_common import f32, save_tensors, setup_determinism, write_json

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")


def load_script(path):
    spec = importlib.util.spec_from_file_location("convert_d2o", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def open_clip_names(sd):
    """The script's v2 output keys → the OpenCLIP names from_single_file reads."""
    top = DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"]
    out = {}
    for k, v in sd.items():
        if k in top:
            if k == "text_projection.weight":
                continue
            out[top[k]] = v
        elif k.startswith("resblocks."):
            out["transformer." + k] = v
        else:
            raise KeyError(f"unexpected text-encoder key from the conversion script: {k}")
    return out


def vae_map_for_levels(n):
    """The script's vae_conversion_map with its fixed 4 levels (decoder `up.{3 - i}`) replaced by n:
    the same entries built by the same loops, for the tiny VAE's level count."""
    m = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"), ("mid.attn_1.", "mid_block.attentions.0.")]
    for i in range(n):
        for j in range(2):
            m.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        if i < n - 1:
            m.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
            m.append((f"up.{n - 1 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
        for j in range(3):
            m.append((f"decoder.up.{n - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
    for i in range(2):
        m.append((f"mid.block_{i + 1}.", f"mid_block.resnets.{i}."))
    return m


def reference_file(conv, folder, v2):
    unet = load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
    vae = load_file(os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors"))
    te = load_file(os.path.join(folder, "text_encoder", "model.safetensors"))
    levels = len(json.load(open(os.path.join(folder, "vae", "config.json")))["block_out_channels"])
    conv.vae_conversion_map[:] = vae_map_for_levels(levels)
    sd = {"model.diffusion_model." + k: v for k, v in conv.convert_unet_state_dict(unet).items()}
    sd.update({"first_stage_model." + k: v for k, v in conv.convert_vae_state_dict(vae).items()})
    if v2:
        te = open_clip_names(conv.convert_text_enc_state_dict_v20(te))
        sd.update({"cond_stage_model.model." + k: v for k, v in te.items()})
    else:
        te.pop("text_model.embeddings.position_ids", None)
        sd.update({"cond_stage_model.transformer." + k: v for k, v in conv.convert_text_enc_state_dict(te).items()})
    return {k: v.contiguous() for k, v in sd.items()}


def key_listing(sd):
    out = {}
    for k in sorted(sd):
        v = sd[k].to(torch.float64).flatten()
        w = torch.arange(v.numel(), dtype=torch.float64) % 7 + 1
        out[k] = {
            "shape": list(sd[k].shape),
            "dtype": str(sd[k].dtype).replace("torch.", ""),
            "sum": float(v.sum()),
            "weighted": float((v * w).sum()),
        }
    return out


def check_loads_equal(path, folder):
    """from_single_file(path, config=folder) holds exactly the folder's tensors."""
    single = StableDiffusionPipeline.from_single_file(path, config=folder, safety_checker=None)
    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    for comp in ["unet", "vae", "text_encoder"]:
        a = getattr(single, comp).state_dict()
        b = getattr(ref, comp).state_dict()
        b = {k: v for k, v in b.items() if not k.endswith("position_ids")}
        a = {k: v for k, v in a.items() if not k.endswith("position_ids")}
        assert a.keys() == b.keys(), f"{path} {comp}: keys differ: {sorted(a.keys() ^ b.keys())[:5]}"
        for k in a:
            assert torch.equal(a[k], b[k]), f"{path} {comp}.{k} differs"
    return single


def image_from(pipe, name):
    run = json.load(open(os.path.join(FIXTURES, f"{name}.pipeline.json")))
    latents = load_file(os.path.join(FIXTURES, f"{name}.outputs.safetensors"))["pipeline.latents"]
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    kwargs = dict(
        prompt=run["prompt"],
        negative_prompt=run["negative_prompt"],
        num_inference_steps=run["steps"],
        guidance_scale=run["guidance"],
        eta=run["eta"],
        height=run["height"],
        width=run["width"],
    )
    img_np = pipe(latents=latents.clone(), output_type="np", **kwargs).images
    img_pil = pipe(latents=latents.clone(), output_type="pil", **kwargs).images[0]
    return {
        "pipeline.image": f32(np.transpose(img_np, (0, 3, 1, 2))),
        "pipeline.image_u8": f32(np.asarray(img_pil, dtype=np.uint8)[None]),
    }


def kohya_ldm_names(conv, out_dir):
    """tests/fixtures/lora_formats/kohya.safetensors with its UNet layers under their original (LDM)
    names (`lora_unet_input_blocks_1_1_…`), named by the conversion script's UNet map."""
    lora = load_file(os.path.join(FIXTURES, "lora_formats", "kohya.safetensors"))
    unet = load_file(os.path.join(FIXTURES, "sd1-tiny", "unet", "diffusion_pytorch_model.safetensors"))
    ldm_of = {}
    # convert_unet_state_dict keeps insertion order: pair each input key with its output key.
    inputs = list(unet.keys())
    outputs = list(conv.convert_unet_state_dict({k: None for k in inputs}).keys())
    assert len(inputs) == len(outputs)
    for hf_name, sd_name in zip(inputs, outputs):
        if hf_name.endswith(".weight"):
            ldm_of[hf_name[: -len(".weight")].replace(".", "_")] = sd_name[: -len(".weight")].replace(".", "_")
    out = {}
    renamed = 0
    for k, v in lora.items():
        if k.startswith("lora_unet_"):
            body, suffix = k[len("lora_unet_"):].split(".", 1)
            new = ldm_of[body]
            renamed += new != body
            out[f"lora_unet_{new}.{suffix}"] = v
        else:
            out[k] = v
    save_file(out, os.path.join(out_dir, "kohya_ldm.safetensors"), metadata={"ss_network_module": "networks.lora"})
    print(f"kohya_ldm.safetensors: {renamed} UNet keys under LDM names")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--convert-script", required=True)
    ap.add_argument("--ours", nargs="*", default=[], help="NAME=FILE pairs, NAME sd1 or sd2")
    args = ap.parse_args()
    setup_determinism()
    conv = load_script(args.convert_script)
    out_dir = os.path.join(FIXTURES, "single_file")
    os.makedirs(out_dir, exist_ok=True)
    for name, v2 in [("sd1", False), ("sd2", True)]:
        folder = os.path.join(FIXTURES, f"{name}-tiny")
        sd = reference_file(conv, folder, v2)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"{name}.safetensors")
            save_file(sd, path)
            pipe = check_loads_equal(path, folder)
            save_tensors(image_from(pipe, name), os.path.join(out_dir, f"{name}.image.safetensors"))
        write_json(key_listing(sd), os.path.join(out_dir, f"{name}.keys.json"))
        print(f"{name}: {len(sd)} keys; from_single_file loads every tensor equal")
    kohya_ldm_names(conv, out_dir)
    for pair in args.ours:
        name, path = pair.split("=", 1)
        check_loads_equal(path, os.path.join(FIXTURES, f"{name}-tiny"))
        print(f"ours {path}: from_single_file loads every tensor equal to {name}-tiny")


if __name__ == "__main__":
    main()
