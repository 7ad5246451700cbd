"""Learned-token (textual inversion / pivotal tuning) fixtures on the sd1-tiny model:
tests/fixtures/embeddings/.

Files written:
- pti.safetensors: a cloneofsimo pivotal-tuning file: the LoRA of lora_formats/cloneofsimo.safetensors plus
  two learned tokens `<s1>`, `<s2>` (tensors [32], metadata "<s1>": "<embed>"), as cloneofsimo's save_safeloras_with_embeds writes.
- learned_embeds.safetensors / learned_embeds.bin: a diffusers textual-inversion file {"<cat-toy>": [32]}
  (safetensors, and torch.save of the same dict).
- a1111.pt: an A1111 embedding (string_to_token / string_to_param {"*": [3, 32]} / name "mvtok" / step),
  a multi-vector embedding; a1111.safetensors: {"emb_params": [2, 32]}.
- expected.json: token ids of prompts from transformers' CLIPTokenizer after tokenizer.add_tokens(["<s1>", "<s2>"])
  (padding="max_length", max_length=77, truncation=True), and of a prompt with the A1111 token after diffusers'
  load_textual_inversion + maybe_convert_prompt.
- expected.safetensors: `ti.image` / `ti.image_u8`: diffusers' pipeline after pipe.load_textual_inversion(learned_embeds.safetensors);
  `pti.image` / `pti.image_u8`: the pivotal-tuning file applied as cloneofsimo's patch_pipe + apply_learned_embed_in_clip +
  tune_lora_scale(1.0) do. cloneofsimo/lora's own code needs diffusers ~0.11, so its documented application is emulated with
  diffusers 0.35 + transformers: the same LoRA (lora_formats/diffusers.safetensors, equal ΔW) loaded and fused at scale 1.0,
  the tokens added with tokenizer.add_tokens in file order, the token embedding resized and the new rows set to the vectors.
  Both from the fixed latents and settings of sd1.pipeline.json, with the prompts listed in expected.json.

Run after make_fixtures.py and fixture_lora_formats.py:  /work/venv/bin/python scripts/fixture_embeddings.py
"""
import json
import os

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file, save_file
from transformers import CLIPTokenizer

from fixture_common import setup_determinism, write_json
from fixture_lora_formats import save as save_sorted

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
OUT = os.path.join(ROOT, "embeddings")
MODEL = os.path.join(ROOT, "sd1-tiny")
WIDTH = 32
TOKEN_PROMPTS = [
    "<s1><s2>",
    "a <s1>-like castle",
    "photo of <s1>, <s2>.",
    "a photo of <s1><s2> style castle",
    "<S1> <s1>s <s2>_1 x<s2>y",
]
TI_PROMPT = "a photo of <cat-toy> on a table"
PTI_PROMPT = "a photo of <s1><s2> style castle"
A1111_PROMPT = "a mvtok castle, mvtok."


def vec(gen, *shape):
    """Vectors far from the tiny model's token embeddings (std 0.02), so they move the image."""
    return (torch.randn(*shape, generator=gen) * 0.7).to(torch.float32).contiguous()


def pipeline():
    pipe = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


def render(pipe, prompt):
    run = json.load(open(os.path.join(ROOT, "sd1.pipeline.json")))
    latents = load_file(os.path.join(ROOT, "sd1.outputs.safetensors"))["pipeline.latents"]
    kwargs = dict(
        prompt=prompt,
        negative_prompt=run["negative_prompt"],
        num_inference_steps=run["steps"],
        guidance_scale=run["guidance"],
        height=run["height"],
        width=run["width"],
        latents=latents.clone(),
        eta=run["eta"],
    )
    with torch.no_grad():
        img = pipe(output_type="np", **kwargs).images
        pil = pipe(output_type="pil", **kwargs).images[0]
    return (
        torch.from_numpy(np.ascontiguousarray(img.transpose(0, 3, 1, 2))).float(),
        torch.from_numpy(np.asarray(pil).astype(np.float32))[None],
    )


def main():
    setup_determinism()
    os.makedirs(OUT, exist_ok=True)
    gen = torch.Generator().manual_seed(10)
    s1, s2 = vec(gen, WIDTH), vec(gen, WIDTH)
    cat_toy = vec(gen, WIDTH)
    mv = vec(gen, 3, WIDTH)
    emb_params = vec(gen, 2, WIDTH)

    # The pivotal-tuning file: cloneofsimo's LoRA tensors plus the two tokens.
    clone = os.path.join(ROOT, "lora_formats", "cloneofsimo.safetensors")
    from safetensors import safe_open

    with safe_open(clone, "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["<s1>"], tensors["<s2>"] = s1, s2
    meta["<s1>"] = meta["<s2>"] = "<embed>"
    save_sorted(tensors, os.path.join(OUT, "pti.safetensors"), meta)

    save_file({"<cat-toy>": cat_toy}, os.path.join(OUT, "learned_embeds.safetensors"))
    torch.save({"<cat-toy>": cat_toy.clone()}, os.path.join(OUT, "learned_embeds.bin"))
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": mv.clone()},
            "name": "mvtok",
            "step": 100,
            "sd_checkpoint": None,
            "sd_checkpoint_name": None,
        },
        os.path.join(OUT, "a1111.pt"),
    )
    save_file({"emb_params": emb_params}, os.path.join(OUT, "a1111.safetensors"))

    # Token ids with the added tokens (transformers' add_tokens).
    tok = CLIPTokenizer.from_pretrained(os.path.join(MODEL, "tokenizer"))
    base_len = len(tok)
    assert tok.add_tokens(["<s1>", "<s2>"]) == 2
    ids = {
        p: tok(p, padding="max_length", max_length=77, truncation=True).input_ids for p in TOKEN_PROMPTS
    }

    # diffusers' textual inversion.
    pipe = pipeline()
    pipe.load_textual_inversion(os.path.join(OUT, "learned_embeds.safetensors"))
    ti_image, ti_u8 = render(pipe, TI_PROMPT)

    # A1111 multi-vector: diffusers' expansion of the prompt, then the ids.
    pipe = pipeline()
    pipe.load_textual_inversion(os.path.join(OUT, "a1111.pt"))
    converted = pipe.maybe_convert_prompt(A1111_PROMPT, pipe.tokenizer)
    a1111_ids = pipe.tokenizer(converted, padding="max_length", max_length=77, truncation=True).input_ids
    a1111_rows = pipe.text_encoder.get_input_embeddings().weight[-3:].detach().clone()
    assert torch.equal(a1111_rows, mv)

    # cloneofsimo's application, emulated: LoRA at scale 1, tokens appended in file order.
    pipe = pipeline()
    pipe.load_lora_weights(os.path.join(ROOT, "lora_formats"), weight_name="diffusers.safetensors")
    pipe.fuse_lora(lora_scale=1.0)
    for name, v in [("<s1>", s1), ("<s2>", s2)]:
        assert pipe.tokenizer.add_tokens(name) == 1
        pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
        token_id = pipe.tokenizer.convert_tokens_to_ids(name)
        with torch.no_grad():
            pipe.text_encoder.get_input_embeddings().weight[token_id] = v
    pti_image, pti_u8 = render(pipe, PTI_PROMPT)

    # The same pipelines without the tokens' vectors show how much the tokens move the image.
    pipe = pipeline()
    plain_image, _ = render(pipe, TI_PROMPT.replace("<cat-toy>", "cat toy"))

    save_file(
        {
            "ti.image": ti_image,
            "ti.image_u8": ti_u8,
            "pti.image": pti_image,
            "pti.image_u8": pti_u8,
            "plain.image": plain_image,
        },
        os.path.join(OUT, "expected.safetensors"),
    )
    write_json(
        {
            "vocab_len": base_len,
            "token_ids": ids,
            "ti_prompt": TI_PROMPT,
            "pti_prompt": PTI_PROMPT,
            "a1111_prompt": A1111_PROMPT,
            "a1111_converted": converted,
            "a1111_ids": a1111_ids,
        },
        os.path.join(OUT, "expected.json"),
    )
    print("wrote", OUT)


if __name__ == "__main__":
    main()
