"""Writes tests/fixtures/weights/tiny.bin (a PyTorch state dict, zip + pickle) and the same
tensors as tiny.safetensors, for the weight-loader tests. Run with the fixtures venv."""
import os
import torch
from safetensors.torch import save_file

out = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "weights")
os.makedirs(out, exist_ok=True)
g = torch.Generator().manual_seed(0)
sd = {
    "layer.weight": torch.randn(3, 2, generator=g),
    "layer.bias": torch.randn(3, generator=g),
    "norm.weight": torch.randn(3, generator=g).half(),
}
torch.save(sd, os.path.join(out, "tiny.bin"))
save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(out, "tiny.safetensors"))
print("wrote", out)
