"""Shared helpers for make_fixtures.py: deterministic setup, tensor dict saving, JSON writing."""

import json
import os

import numpy as np
import torch
from safetensors.torch import save_file


def setup_determinism():
    """Fixed thread count and deterministic kernels so two runs give identical bytes."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def f32(t):
    """Contiguous f32 CPU copy of a tensor / array / number."""
    if isinstance(t, np.ndarray):
        t = torch.from_numpy(np.array(t, copy=True))
    elif not torch.is_tensor(t):
        t = torch.tensor(t)
    return t.detach().to(torch.float32).cpu().contiguous().clone()


def i64(t):
    """Contiguous i64 CPU copy."""
    if not torch.is_tensor(t):
        t = torch.tensor(t)
    return t.detach().to(torch.int64).cpu().contiguous().clone()


def save_tensors(tensors, path):
    """Save a dict of tensors as safetensors, checking every float is finite."""
    for k, v in tensors.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"{path}: tensor {k} has non-finite values")
    save_file(dict(sorted(tensors.items())), path)


def write_json(obj, path):
    """Stable JSON (sorted keys only where the object is a dict built by us)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")


def perturb_affine_params(model, generator):
    """Move every 1-D parameter (norm weights, biases) away from its default init.

    transformers' CLIP init zeroes all Linear biases, and every LayerNorm / GroupNorm starts
    at weight 1, bias 0; with those a Rust port that drops or swaps them would still match.
    1-D weights (only norms have them) become 1 + 0.1 N(0,1), 1-D biases get + 0.1 N(0,1).
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim != 1:
                continue
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            if name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.add_(0.1 * noise)


def round_params_to_bf16(model):
    """Round every parameter to the nearest bf16 value (kept as f32).

    The low 16 bits of each stored f32 are then zero, so the weight files compress ~2x in git,
    and a bf16 load of the same files holds exactly the weights the f32 reference used.
    """
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(p.dtype))
