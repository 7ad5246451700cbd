"""Pivotal-tuning fixtures on the sd1-tiny model: tests/fixtures/pti/ (not run in CI).

It runs our own binaries first (build them with `cargo build --release`), then checks and records
what transformers / diffusers make of their outputs:
1. `lora train --pivotal` on sd1-tiny (the training-test images tests/fixtures/train-data, 16 px, placeholders <s1>|<s2> initialised
   from "toy", 6 textual-inversion + 4 LoRA steps, UNet LoRA only) writes `lora_pti.safetensors`
   (--save-format ours: tokens as `learned_embeds.<token>`) and `lora_pti_kohya.safetensors` (the same
   run, kohya layout: bundle_emb). `lora convert --to cloneofsimo` turns the first into
   `lora_pti_cloneofsimo.safetensors` (tensors `<s1>`, `<s2>` with metadata "<s1>": "<embed>"), whose
   tokens are read below as the original's `parse_safeloras_embeds` reads them.
2. `lora_add --mode upl` fuses lora_pti.safetensors into sd1-tiny (a temporary folder): the tokens
   go into its tokenizer files and text-encoder embedding.
3. transformers: CLIPTokenizer + CLIPTextModel from sd1-tiny, the tokens added as the original
   code does (tokenizer.add_tokens in file order, resize_token_embeddings, the new rows set to the
   file's vectors). For each prompt of PROMPTS: the token ids and last_hidden_state.
   The upl folder, loaded by diffusers' StableDiffusionPipeline.from_pretrained, must give the same
   ids and hidden states (checked here, within 1e-5; printed).

Files written: lora_pti.safetensors, lora_pti_kohya.safetensors, lora_pti_cloneofsimo.safetensors, expected.json (prompts, ids),
expected.safetensors (`hidden.<i>`: [1, 77, 32] f32).

Run:  cargo build --release && /work/venv/bin/python scripts/fixture_pti.py
"""
import json
import os
import shutil
import subprocess
import tempfile

import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.join(HERE, "..")
ROOT = os.path.join(REPO, "tests", "fixtures")
OUT = os.path.join(ROOT, "pti")
MODEL = os.path.join(ROOT, "sd1-tiny")
DATA = os.path.join(REPO, "tests", "fixtures", "train-data")
BIN = os.path.join(REPO, "target", "release")
PROMPTS = ["a photo of <s1><s2>", "a <s1>-like toy, <s2>.", "<s2> <s1>"]


def train(out_dir, save_format, data):
    subprocess.run(
        [os.path.join(BIN, "lora"), "train", "--model", MODEL, "--instance-data-dir", data,
         "--instance-prompt", "a photo of {}", "--resolution", "16", "--pivotal",
         "--placeholder-tokens", "<s1>|<s2>", "--initializer-tokens", "toy|toy",
         "--ti-steps", "6", "--max-train-steps", "4", "--learning-rate-ti", "5e-2",
         "--clip-ti-decay", "false", "--seed", "5", "--center-crop", "--save-format", save_format,
         "--output-dir", out_dir],
        check=True,
    )
    return os.path.join(out_dir, "lora.safetensors")


def learned_tokens(path):
    """cloneofsimo's convention: tensors named by the token, metadata value "<embed>"."""
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        return [(k, f.get_tensor(k)) for k in f.keys() if meta.get(k) == "<embed>"]


def encode(tokenizer, text_encoder, prompt):
    ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = text_encoder(ids)[0]
    return ids[0].tolist(), hidden.to(torch.float32).contiguous()


def main():
    os.makedirs(OUT, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        os.makedirs(data)
        for name in sorted(os.listdir(DATA)):
            if name.endswith(".png"):
                shutil.copy(os.path.join(DATA, name), data)
        ours = train(os.path.join(tmp, "ours"), "ours", data)
        kohya = train(os.path.join(tmp, "kohya"), "kohya", data)
        shutil.copy(ours, os.path.join(OUT, "lora_pti.safetensors"))
        shutil.copy(kohya, os.path.join(OUT, "lora_pti_kohya.safetensors"))
        clone = os.path.join(OUT, "lora_pti_cloneofsimo.safetensors")
        subprocess.run([os.path.join(BIN, "lora"), "convert", ours, "--to", "cloneofsimo", "--out",
                        clone, "--model", MODEL, "--force"], check=True)
        fused = os.path.join(tmp, "fused")
        subprocess.run([os.path.join(BIN, "lora_add"), MODEL, ours, fused, "--mode", "upl",
                        "--alpha", "1.0"], check=True)

        tokens = learned_tokens(clone)
        assert [t for t, _ in tokens] == ["<s1>", "<s2>"], tokens
        tokenizer = CLIPTokenizer.from_pretrained(MODEL, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(MODEL, subfolder="text_encoder").eval()
        for tok, vec in tokens:
            assert tokenizer.add_tokens(tok) == 1, tok
            text_encoder.resize_token_embeddings(len(tokenizer))
            tid = tokenizer.convert_tokens_to_ids(tok)
            with torch.no_grad():
                text_encoder.get_input_embeddings().weight[tid] = vec

        pipe = StableDiffusionPipeline.from_pretrained(fused, safety_checker=None)
        pipe.text_encoder.eval()
        expected, tensors = {"prompts": PROMPTS, "ids": []}, {}
        for i, p in enumerate(PROMPTS):
            ids, hidden = encode(tokenizer, text_encoder, p)
            ids_f, hidden_f = encode(pipe.tokenizer, pipe.text_encoder, p)
            diff = (hidden - hidden_f).abs().max().item()
            print(f"{p!r}: ids {ids[:10]}..., upl folder in diffusers: same ids {ids == ids_f}, "
                  f"hidden states max |diff| {diff:.2e}")
            assert ids == ids_f and diff <= 1e-5, (p, ids, ids_f, diff)
            expected["ids"].append(ids)
            tensors[f"hidden.{i}"] = hidden
    save_file(tensors, os.path.join(OUT, "expected.safetensors"))
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
