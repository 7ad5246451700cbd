#!/usr/bin/env python3
"""PyTorch reference for `lora bench train`: forward, LoRA step and full step (ms) and peak RSS.

Workloads (fp32 CPU, random weights, batch 1), the same as the Rust benchmark:
  block: one SD-1.5 down-block slice, diffusers ResnetBlock2D (320 ch, 1280 time embedding,
         eps 1e-5) then Transformer2DModel (8 heads x 40, 1 layer, context 77x768, conv
         proj_in/out) on a 32x32 latent;
  block2: two such slices in a row (resnet, attention, resnet, attention: SD 1.5 down_blocks.0
         at 256 px without its downsampler), so the second resnet runs inside the LoRA graph;
  unet:  the SD 1.5 UNet on a (resolution/8)^2 latent (--resolution, default 256), context
         77x768, timestep 500.
"LoRA step": PEFT LoRA rank 4, alpha 4 on --target-modules (default to_q, to_k, to_v, to_out.0; frozen rest),
MSE loss to a random target, backward, AdamW on the LoRA parameters. "Full step": every
weight trained with AdamW. Forward runs under torch.no_grad. Attention uses diffusers' default
processor (scaled_dot_product_attention); --plain-attention switches to AttnProcessor.
--gradient-checkpointing calls diffusers' enable_gradient_checkpointing() (UNet, or the block's
Transformer2DModel). --mixed-precision bf16|fp16 casts the frozen model and its inputs to that
dtype and keeps the LoRA parameters in f32 (PEFT casts activations to and from them), loss in
f32, fp16 with a GradScaler. (torch.autocast on CPU cannot run group_norm with half weights.) --no-full skips the full step (its peak RSS is then the LoRA phase's).

Prints one JSON line: {"forward_ms", "lora_step_ms", "full_step_ms", "lora_peak_rss_mb",
"peak_rss_mb", "lora_params", "full_params", "torch", "threads"}. Peak RSS is the process's
(ru_maxrss), so run one workload per process.
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch import nn  # noqa: E402


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        from diffusers.models.resnet import ResnetBlock2D
        from diffusers.models.transformers.transformer_2d import Transformer2DModel

        self.resnet = ResnetBlock2D(in_channels=320, out_channels=320, temb_channels=1280, groups=32, eps=1e-5)
        self.attn = Transformer2DModel(
            num_attention_heads=8,
            attention_head_dim=40,
            in_channels=320,
            num_layers=1,
            cross_attention_dim=768,
            norm_num_groups=32,
            use_linear_projection=False,
        )

    def forward(self, x, temb, ctx):
        return self.attn(self.resnet(x, temb), encoder_hidden_states=ctx).sample


class Block2(nn.Module):
    def __init__(self):
        super().__init__()
        self.slices = nn.ModuleList([Block(), Block()])

    def forward(self, x, temb, ctx):
        for s in self.slices:
            x = s(x, temb, ctx)
        return x

    def enable_gradient_checkpointing(self):
        for s in self.slices:
            s.attn.enable_gradient_checkpointing()


def build(workload, latent, dtype=torch.float32, device="cpu", batch=1):
    torch.manual_seed(0)
    if workload in ("block", "block2"):
        model = Block() if workload == "block" else Block2()
        inputs = tuple(t.to(device, dtype) for t in (torch.randn(1, 320, 32, 32), torch.randn(1, 1280), torch.randn(1, 77, 768)))
        run = lambda m: m(*inputs)  # noqa: E731
    else:
        from diffusers import UNet2DConditionModel
        from real_configs import SD15_UNET

        model = UNet2DConditionModel.from_config(SD15_UNET)
        x = torch.randn(batch, 4, latent, latent).to(device, dtype)
        ctx = torch.randn(batch, 77, 768).to(device, dtype)
        t = torch.full((batch,), 500, device=device)
        run = lambda m: m(x, t, ctx).sample  # noqa: E731
    return model.to(device), run


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def device_mb(device):
    """Memory in use on the device (total minus free, as ours counts it), MB; 0 on the CPU."""
    if not device.startswith("cuda"):
        return 0.0
    free, total = torch.cuda.mem_get_info(device)
    return (total - free) / 1e6


def set_plain_attention(model):
    from diffusers.models.attention_processor import Attention, AttnProcessor

    for mod in model.modules():
        if isinstance(mod, Attention):
            mod.set_processor(AttnProcessor())


def timed(warmup, runs, fn, device="cpu"):
    times = []
    for i in range(warmup + runs):
        start = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=["block", "block2", "unet"], default="block")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=None, help="default: 2 (block), 1 (unet)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--plain-attention", action="store_true")
    p.add_argument("--resolution", type=int, default=256, help="unet workload: image size")
    p.add_argument("--batch", type=int, default=1, help="unet workload: batch size")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    p.add_argument("--no-full", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu or cuda:N (timings synchronise the device)")
    p.add_argument("--target-modules", default="to_q,to_k,to_v,to_out.0",
                   help="comma list of module names PEFT adapts (lora bench train passes its --targets)")
    args = p.parse_args()
    latent = args.resolution // 8
    half = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]

    if args.threads:
        torch.set_num_threads(args.threads)
    warmup = args.warmup if args.warmup is not None else (1 if args.workload == "unet" else 2)
    from peft import LoraConfig, inject_adapter_in_model

    res = {}
    dev = args.device
    model, run = build(args.workload, latent, half or torch.float32, dev, args.batch)
    if args.plain_attention:
        set_plain_attention(model)
    if half is not None:
        model.to(half)
    model.eval()
    with torch.no_grad():
        res["forward_ms"] = timed(warmup, args.runs, lambda: run(model), dev)
        target = torch.randn_like(run(model).float())
    if args.gradient_checkpointing:
        (model.attn if args.workload == "block" else model).enable_gradient_checkpointing()
        model.train()

    # LoRA: PEFT adapters on the target modules (default: the attention projections), everything
    # else frozen.
    cfg = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=args.target_modules.split(","))
    model = inject_adapter_in_model(cfg, model)
    for n, prm in model.named_parameters():
        prm.requires_grad_("lora_" in n)
        if "lora_" in n:
            prm.data = prm.data.float()
    params = [prm for prm in model.parameters() if prm.requires_grad]
    res["lora_params"] = sum(prm.numel() for prm in params)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    scaler = torch.amp.GradScaler(dev.split(":")[0]) if args.mixed_precision == "fp16" else None
    mem = [0.0]

    def step(m, o):
        out = run(m)
        loss = torch.nn.functional.mse_loss(out.float(), target)
        sync(dev)
        mem[0] = max(mem[0], device_mb(dev))
        if scaler is None:
            loss.backward()
            sync(dev)
            mem[0] = max(mem[0], device_mb(dev))
            o.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(o)
            scaler.update()
        o.zero_grad(set_to_none=True)

    res["lora_step_ms"] = timed(warmup, args.runs, lambda: step(model, opt), dev)
    res["lora_device_mb"] = mem[0]
    res["lora_graph_mb"] = saved_tensor_mb(model, lambda: torch.nn.functional.mse_loss(run(model).float(), target))
    res["lora_peak_rss_mb"] = peak_rss_mb()
    del model, opt, params
    if args.no_full:
        return finish(res, args)

    scaler = None
    model, run = build(args.workload, latent, device=dev, batch=args.batch)
    if args.plain_attention:
        set_plain_attention(model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=1e-2)
    res["full_params"] = sum(prm.numel() for prm in model.parameters())
    res["full_step_ms"] = timed(warmup, args.runs, lambda: step(model, opt), dev)
    res["peak_rss_mb"] = peak_rss_mb()
    finish(res, args)


def saved_tensor_mb(model, loss_fn):
    """MB of the distinct storages autograd saves for the backward of one forward, parameters
    and buffers left out: the activations the graph keeps."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in own:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values()) / 1e6


def finish(res, args):
    res.setdefault("peak_rss_mb", res["lora_peak_rss_mb"])
    res = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in res.items()}
    res["torch"] = torch.__version__
    res["threads"] = torch.get_num_threads()
    res["resolution"] = args.resolution
    res["gradient_checkpointing"] = args.gradient_checkpointing
    res["mixed_precision"] = args.mixed_precision
    res["device"] = args.device
    res["batch"] = args.batch
    print(json.dumps(res))


if __name__ == "__main__":
    main()
