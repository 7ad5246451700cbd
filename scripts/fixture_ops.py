"""PyTorch autograd ground truth for the training ops in src/ops/ (tests/ops.rs).

Run:  /work/venv/bin/python scripts/fixture_ops.py        # rewrites tests/fixtures/ops/

For every case: the inputs, a random upstream gradient `grad_out`, the forward output `y`
and the gradients PyTorch autograd computes for `sum(y * grad_out)`. One safetensors file per
op family (keys `<case>.<name>`, all f32) plus `cases.json` with each case's op and params.
"""

import os
import sys
import zlib

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fixture_common import save_tensors, setup_determinism, write_json  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "ops")


def randn(gen, *shape, scale=1.0, shift=0.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float32) * scale + shift


def run_case(tensors, cases, name, op, params, inputs, fn, grad_names):
    """Evaluate fn(**inputs), backprop a random grad_out, store everything under `name.`."""
    leaves = {k: v.clone().requires_grad_(k in grad_names) for k, v in inputs.items()}
    y = fn(**leaves)
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    grad_out = randn(gen, *y.shape)
    y.backward(grad_out)
    for k, v in inputs.items():
        tensors[f"{name}.{k}"] = v.contiguous()
    tensors[f"{name}.grad_out"] = grad_out.contiguous()
    tensors[f"{name}.y"] = y.detach().contiguous()
    for k in grad_names:
        tensors[f"{name}.grad_{k}"] = leaves[k].grad.detach().contiguous()
    cases[name] = {"op": op, **params}


def main():
    setup_determinism()
    os.makedirs(OUT, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    cases = {}

    t = {}
    for name, shape, scale in [("sm_small", (2, 3, 7), 1.0), ("sm_wide", (4, 300), 10.0)]:
        run_case(t, cases, name, "softmax", {}, {"x": randn(gen, *shape, scale=scale)},
                 lambda x: torch.softmax(x, dim=-1), ["x"])
    save_tensors(t, os.path.join(OUT, "softmax.safetensors"))

    t = {}
    for name, shape, eps, shift in [("ln_a", (2, 5, 16), 1e-5, 0.0), ("ln_b", (3, 64), 1e-6, 3.0)]:
        c = shape[-1]
        inputs = {"x": randn(gen, *shape, shift=shift), "w": randn(gen, c, scale=0.5, shift=1.0),
                  "b": randn(gen, c, scale=0.5)}
        run_case(t, cases, name, "layer_norm", {"eps": eps}, inputs,
                 lambda x, w, b, eps=eps: F.layer_norm(x, (x.shape[-1],), w, b, eps), ["x", "w", "b"])
    save_tensors(t, os.path.join(OUT, "layer_norm.safetensors"))

    t = {}
    for name, shape, groups, eps in [("gn_4d", (2, 8, 5, 6), 4, 1e-5), ("gn_3d", (2, 6, 10), 3, 1e-6),
                                     ("gn_g1", (1, 4, 3, 3), 1, 1e-5), ("gn_gc", (2, 4, 3, 3), 4, 1e-5)]:
        c = shape[1]
        inputs = {"x": randn(gen, *shape, scale=2.0, shift=0.5), "w": randn(gen, c, scale=0.5, shift=1.0),
                  "b": randn(gen, c, scale=0.5)}
        run_case(t, cases, name, "group_norm", {"groups": groups, "eps": eps}, inputs,
                 lambda x, w, b, g=groups, eps=eps: F.group_norm(x, g, w, b, eps), ["x", "w", "b"])
    save_tensors(t, os.path.join(OUT, "group_norm.safetensors"))

    t = {}
    run_case(t, cases, "lin_3d", "linear", {"bias": True},
             {"x": randn(gen, 2, 5, 8), "w": randn(gen, 6, 8, scale=0.3), "b": randn(gen, 6)},
             lambda x, w, b: F.linear(x, w, b), ["x"])
    run_case(t, cases, "lin_2d", "linear", {"bias": False},
             {"x": randn(gen, 7, 8), "w": randn(gen, 3, 8, scale=0.3)},
             lambda x, w: F.linear(x, w), ["x"])
    save_tensors(t, os.path.join(OUT, "linear.safetensors"))

    t = {}
    conv_cases = [
        # name, x shape, w shape, stride, padding, dilation, groups
        ("c3s1", (2, 4, 7, 6), (5, 4, 3, 3), 1, 1, 1, 1),
        ("c3s2_odd", (1, 4, 9, 8), (6, 4, 3, 3), 2, 1, 1, 1),
        ("c3s2_even", (1, 3, 8, 8), (4, 3, 3, 3), 2, 1, 1, 1),
        ("c1x1", (2, 6, 5, 5), (4, 6, 1, 1), 1, 0, 1, 1),
        ("c_grp_dil", (1, 4, 8, 8), (6, 2, 3, 3), 1, 2, 2, 2),
        ("c_nonsq_s2", (1, 3, 7, 9), (4, 3, 3, 5), 2, 1, 1, 1),
        ("c_pad_gt_k", (1, 3, 4, 4), (2, 3, 1, 1), 1, 1, 1, 1),
        ("c_s3", (1, 2, 10, 11), (3, 2, 4, 4), 3, 1, 1, 1),
        ("c_grp_s2_nonsq", (1, 4, 9, 8), (6, 2, 3, 5), 2, 1, 1, 2),
    ]
    for name, xs, ws, s, p, d, g in conv_cases:
        inputs = {"x": randn(gen, *xs), "w": randn(gen, *ws, scale=0.3), "b": randn(gen, ws[0])}
        run_case(t, cases, name, "conv2d", {"stride": s, "padding": p, "dilation": d, "groups": g}, inputs,
                 lambda x, w, b, s=s, p=p, d=d, g=g: F.conv2d(x, w, b, s, p, d, g), ["x"])
    save_tensors(t, os.path.join(OUT, "conv2d.safetensors"))

    t = {}
    for name, xs, size in [("up2", (2, 3, 4, 5), (8, 10)), ("up_2x3", (1, 2, 3, 3), (6, 9))]:
        run_case(t, cases, name, "upsample_nearest2d", {"size": list(size)}, {"x": randn(gen, *xs)},
                 lambda x, size=size: F.interpolate(x, size=size, mode="nearest"), ["x"])
    save_tensors(t, os.path.join(OUT, "upsample.safetensors"))

    t = {}
    run_case(t, cases, "silu", "silu", {}, {"x": randn(gen, 3, 50, scale=4.0)},
             lambda x: F.silu(x), ["x"])
    run_case(t, cases, "gelu_erf", "gelu_erf", {}, {"x": randn(gen, 3, 50, scale=4.0)},
             lambda x: F.gelu(x, approximate="none"), ["x"])
    save_tensors(t, os.path.join(OUT, "activation.safetensors"))

    t = {}
    inputs = {"q": randn(gen, 2, 3, 5, 4), "k": randn(gen, 2, 3, 7, 4), "v": randn(gen, 2, 3, 7, 6)}
    run_case(t, cases, "att_4d", "attention", {"scale": 0.5}, inputs,
             lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) * 0.5, dim=-1) @ v, ["q", "k", "v"])
    n = 6
    causal = torch.triu(torch.full((n, n), -1e9), diagonal=1)
    inputs = {"q": randn(gen, 2, n, 8), "k": randn(gen, 2, n, 8), "v": randn(gen, 2, n, 8), "mask": causal}
    scale = 8 ** -0.5
    run_case(t, cases, "att_3d_causal", "attention", {"scale": scale}, inputs,
             lambda q, k, v, mask: torch.softmax(q @ k.transpose(-1, -2) * scale + mask, dim=-1) @ v,
             ["q", "k", "v"])
    # Tiled attention (tests pass `tile_bytes` to ops::attention_tiled): a causal self-attention
    # of 9 tokens in tiles of 2 query rows (2 batches x 2 heads x 9 keys x 4 bytes = 144 B a row),
    # and a cross-attention of 11 queries to 5 keys in tiles of 3 rows; reference from SDPA.
    n = 9
    causal = torch.triu(torch.full((n, n), -1e9), diagonal=1)
    inputs = {"q": randn(gen, 2, 2, n, 4), "k": randn(gen, 2, 2, n, 4), "v": randn(gen, 2, 2, n, 4),
              "mask": causal}
    run_case(t, cases, "att_tiled_causal", "attention", {"scale": 0.5, "tile_bytes": 2 * 144}, inputs,
             lambda q, k, v, mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.5),
             ["q", "k", "v"])
    inputs = {"q": randn(gen, 2, 3, 11, 4), "k": randn(gen, 2, 3, 5, 4), "v": randn(gen, 2, 3, 5, 6)}
    run_case(t, cases, "att_tiled_cross", "attention", {"scale": 0.5, "tile_bytes": 3 * 2 * 3 * 5 * 4},
             inputs, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=0.5), ["q", "k", "v"])
    save_tensors(t, os.path.join(OUT, "attention.safetensors"))

    write_json(cases, os.path.join(OUT, "cases.json"))
    print(f"wrote {len(cases)} cases to {os.path.normpath(OUT)}")


if __name__ == "__main__":
    main()
