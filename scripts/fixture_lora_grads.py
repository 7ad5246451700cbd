"""LoRA gradient ground truth from PyTorch + PEFT for tests/grad_parity.rs and tests/lora.rs.

For each case, PEFT (LoraConfig, dropout 0) is injected into the tiny UNet and text encoder of
tests/fixtures/<model>-tiny, every lora_A / lora_B is set to seeded random NON-ZERO values, and
for one fixed batch

    loss = mse(unet(noisy, t, text_encoder(ids)), noise)

is back-propagated in float64 (the reference; weights are exact f32 values). Written to
tests/fixtures/lora_grads/<case>.safetensors (all floats f32, ids and timesteps i64):

    input.latents [2,4,8,8]   `unet.sample` of <model>.outputs.safetensors
    input.noise [2,4,8,8]     seeded N(0,1)
    input.timesteps [2] i64   TIMESTEPS
    input.noisy [2,4,8,8]     DDPMScheduler(scheduler_config).add_noise(latents, noise, t)
    input.input_ids [2,77]    tokenizer.json ids of prompts PROMPT_IDX
    output.encoder_hidden_states, output.pred, output.loss []
    lora.<component>.<path>.lora_down.weight / .lora_up.weight    (PEFT lora_A / lora_B)
    grad.<component>.<path>.lora_down.weight / .lora_up.weight    d loss / d factor

and <case>.json: {model, rank, alpha, unet_targets, text_targets, loss (f64),
unet_lora_layers, text_lora_layers (adapted module paths in named_modules() order),
unet_modules, text_modules (every Linear / Conv2d path in named_modules() order)}.

Run: /work/venv/bin/python scripts/fixture_lora_grads.py [--out DIR]   (~5 s, deterministic)
"""

import argparse
import json
import os

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import CLIPTextModel

from fixture_common import f32, i64, save_tensors, setup_determinism, write_json

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "tests", "fixtures")

ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ATTN = ["q_proj", "k_proj", "v_proj", "out_proj"]
TEXT_ALL = TEXT_ATTN + ["fc1", "fc2"]
TIMESTEPS = [37, 812]
PROMPT_IDX = [0, 2]

# name: (model, rank, alpha, unet targets ("ALL" = every Linear and Conv2d), text targets, seed)
CASES = {
    "sd1_attn": ("sd1", 4, 8.0, ATTN, TEXT_ATTN, 11),
    "sd2_attn": ("sd2", 4, 4.0, ATTN, TEXT_ATTN, 12),
    "sd1_all": ("sd1", 4, 4.0, "ALL", TEXT_ALL, 13),
}


def layer_names(model):
    """Every Linear / Conv2d module path in named_modules() order."""
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def inject(model, rank, alpha, targets):
    """PEFT LoRA on `targets`; only the LoRA factors require gradients. Returns adapted paths."""
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, bias="none")
    model = inject_adapter_in_model(cfg, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model, [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def randomize(model, names, gen):
    """lora_A ~ N(0,1)/sqrt(fan_in), lora_B ~ 0.2 N(0,1)/sqrt(r), drawn in layer order."""
    mods = dict(model.named_modules())
    for n in names:
        a = mods[n].lora_A["default"].weight
        b = mods[n].lora_B["default"].weight
        with torch.no_grad():
            fan_in = a[0].numel()
            a.copy_(torch.randn(a.shape, generator=gen, dtype=torch.float32) / fan_in**0.5)
            b.copy_(torch.randn(b.shape, generator=gen, dtype=torch.float32) * 0.2 / a.shape[0] ** 0.5)


def record(model, names, component, out):
    """LoRA factors and their gradients under our key names."""
    mods = dict(model.named_modules())
    for n in names:
        for peft_key, ours in (("lora_A", "lora_down"), ("lora_B", "lora_up")):
            w = getattr(mods[n], peft_key)["default"].weight
            if w.grad is None:
                raise RuntimeError(f"{component}.{n}.{peft_key} got no gradient")
            out[f"lora.{component}.{n}.{ours}.weight"] = f32(w)
            out[f"grad.{component}.{n}.{ours}.weight"] = f32(w.grad)


def run_case(name, out_dir):
    model, rank, alpha, unet_targets, text_targets, seed = CASES[name]
    root = os.path.join(FIXTURES, f"{model}-tiny")
    unet = UNet2DConditionModel.from_pretrained(os.path.join(root, "unet"))
    text = CLIPTextModel.from_pretrained(os.path.join(root, "text_encoder"), attn_implementation="eager")
    unet_modules, text_modules = layer_names(unet), layer_names(text)
    if unet_targets == "ALL":
        unet_targets = unet_modules
    unet, unet_lora = inject(unet, rank, alpha, unet_targets)
    text, text_lora = inject(text, rank, alpha, text_targets)
    gen = torch.Generator().manual_seed(seed)
    randomize(unet, unet_lora, gen)
    randomize(text, text_lora, gen)
    unet, text = unet.double().train(), text.double().train()

    outputs = load_file(os.path.join(FIXTURES, f"{model}.outputs.safetensors"))
    latents = outputs["unet.sample"].double()
    noise = torch.randn(latents.shape, generator=gen, dtype=torch.float32).double()
    timesteps = torch.tensor(TIMESTEPS, dtype=torch.long)
    sched = DDPMScheduler.from_pretrained(os.path.join(root, "scheduler"))
    noisy = sched.add_noise(latents, noise, timesteps)
    with open(os.path.join(FIXTURES, "tokenizer.json"), encoding="utf-8") as f:
        all_ids = json.load(f)[model]
    ids = torch.tensor([all_ids[i] for i in PROMPT_IDX], dtype=torch.long)

    # transformers builds the f64 causal mask with torch.full at the default dtype.
    torch.set_default_dtype(torch.float64)
    try:
        ehs = text(ids).last_hidden_state
        pred = unet(noisy, timesteps, ehs).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
    finally:
        torch.set_default_dtype(torch.float32)

    tensors = {
        "input.latents": f32(latents),
        "input.noise": f32(noise),
        "input.timesteps": i64(timesteps),
        "input.noisy": f32(noisy),
        "input.input_ids": i64(ids),
        "output.encoder_hidden_states": f32(ehs),
        "output.pred": f32(pred),
        "output.loss": f32(loss),
    }
    record(unet, unet_lora, "unet", tensors)
    record(text, text_lora, "text_encoder", tensors)
    for n, p in list(unet.named_parameters()) + list(text.named_parameters()):
        if "lora_" not in n and p.grad is not None:
            raise RuntimeError(f"base parameter {n} got a gradient")
    os.makedirs(out_dir, exist_ok=True)
    save_tensors(tensors, os.path.join(out_dir, f"{name}.safetensors"))
    meta = {
        "model": model,
        "rank": rank,
        "alpha": alpha,
        "unet_targets": unet_targets if unet_targets is not unet_modules else "ALL",
        "text_targets": text_targets,
        "loss": loss.item(),
        "unet_lora_layers": unet_lora,
        "text_lora_layers": text_lora,
        "unet_modules": unet_modules,
        "text_modules": text_modules,
    }
    write_json(meta, os.path.join(out_dir, f"{name}.json"))
    print(f"{name}: loss {loss.item():.8f}, {len(unet_lora)} unet + {len(text_lora)} text LoRA layers")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(FIXTURES, "lora_grads"))
    args = ap.parse_args()
    setup_determinism()
    for name in CASES:
        run_case(name, args.out)


if __name__ == "__main__":
    main()
