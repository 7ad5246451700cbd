//! LyCORIS LoHa / LoKr and DoRA (LyCORIS `dora_scale`, PEFT `lora_magnitude_vector`): files
//! written by LyCORIS 4.1.3 and PEFT 0.21.2 themselves (scripts/fixture_lycoris.py) give
//! LyCORIS' / PEFT's merged weights and images, as run-time adapters and fused; they write
//! back bit-identically; inspect lists the kinds; malformed files and impossible conversions
//! are clear errors.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{
    err_text, expect_failure, expect_success, fixture_params, fixtures, load_tensors, lora,
    max_abs, max_abs_diff, png_levels, read_json, s, tiny_arch,
};
use lora_diffusion::formats::{self, Format, WriteOptions};
use lora_diffusion::hub::ModelSource;
use lora_diffusion::lora::{merged_weight, LoraSet, LoraWeights};
use lora_diffusion::pipeline::lora::{read_loras, LoraSpec};
use lora_diffusion::pipeline::StableDiffusion;
use std::collections::HashMap;
use std::path::PathBuf;

const LYCORIS: [&str; 6] = [
    "loha",
    "loha_tucker",
    "lokr",
    "lokr_tucker",
    "dora_lycoris",
    "loha_dora_in",
];

fn file(name: &str) -> PathBuf {
    fixtures()
        .join("lycoris")
        .join(format!("{name}.safetensors"))
}

fn expected() -> HashMap<String, Tensor> {
    load_tensors(fixtures().join("lycoris").join("expected.safetensors"))
}

fn model() -> ModelSource {
    ModelSource::Local(fixtures().join("sd1-tiny"))
}

fn read(name: &str) -> LoraSet {
    formats::read_with(&file(name), Some(&tiny_arch("sd1-tiny"))).unwrap()
}

fn layers_of(name: &str) -> Vec<String> {
    read_json(fixtures().join("lycoris").join("expected.json"))[name]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// Every tensor of a layer (factors, then the DoRA magnitude) as f32 bits.
fn bits(w: &LoraWeights) -> Vec<Vec<u32>> {
    let mut ts: Vec<&Tensor> = w.factors().all();
    if let Some(d) = w.dora() {
        ts.push(&d.magnitude);
    }
    ts.iter()
        .map(|t| {
            let v: Vec<f32> = t
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            v.into_iter().map(f32::to_bits).collect()
        })
        .collect()
}

#[test]
fn merged_weights_equal_lycoris_and_peft() {
    let exp = expected();
    for name in LYCORIS.iter().copied().chain(["dora_peft"]) {
        let set = read(name);
        for layer in layers_of(name) {
            let l = &set.layers[layer.as_str()];
            let base = &exp[&format!("{name}.{layer}.base")];
            for (tag, m) in [("merged", 1.0), ("merged_half", 0.5)] {
                let want = &exp[&format!("{name}.{layer}.{tag}")];
                let got = merged_weight(base, l, m).unwrap();
                // Relative to the change itself, so a tiny ΔW cannot pass by accident.
                let change = max_abs(&(want - base).unwrap());
                let d = max_abs_diff(&got, want);
                eprintln!(
                    "{name} {layer} ({}) at {m}: max |ΔW| {change:.3e}, max diff {d:.2e}",
                    l.kind_label()
                );
                assert!(
                    change > 1e-3,
                    "{name} {layer}: the fixture's change is {change}"
                );
                assert!(
                    d <= 1e-5 * change.max(1.0),
                    "{name} {layer} at {m}: {d} vs {change}"
                );
            }
        }
    }
}

#[test]
fn kinds_are_read_as_lycoris_and_peft_store_them() {
    let kinds = |name: &str| {
        let mut m: std::collections::BTreeMap<String, usize> = Default::default();
        for w in read(name).layers.values() {
            *m.entry(w.kind_label()).or_default() += 1;
        }
        m
    };
    let k = kinds("loha");
    assert_eq!(k.len(), 1);
    assert_eq!(k["LoHa"], 205);
    assert_eq!(kinds("lokr")["LoKr"], 205);
    assert_eq!(kinds("dora_lycoris")["DoRA"], 205);
    assert_eq!(kinds("loha_dora_in")["LoHa+DoRA"], 144);
    // LoKr on a conv with conv_dim 8: both sides full, scale 1 whatever the alpha (4).
    let lokr = read("lokr");
    let conv = &lokr.layers["unet.down_blocks.0.resnets.0.conv1"];
    assert_eq!(conv.low_rank(), None);
    assert_eq!(conv.scale(), 1.0);
    assert_eq!(conv.alpha(), 8.0, "LyCORIS stores lora_dim as alpha there");
    let lin = &lokr.layers["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"];
    assert_eq!((lin.low_rank(), lin.scale()), (Some(2), 0.5));
    // LoHa conv: flattened factors, weight shape from the model.
    let loha = read("loha");
    let c = &loha.layers["unet.down_blocks.0.resnets.0.conv1"];
    assert_eq!(c.delta_shape(), vec![32, 32, 3, 3]);
    assert_eq!(c.scale(), 0.75);
    let peft = read("dora_peft");
    assert!(peft.layers.values().all(|w| w.kind_label() == "DoRA"));
}

fn generate(name: &str, fuse: bool) -> Tensor {
    let specs = [LoraSpec {
        path: file(name),
        scale: 1.0,
    }];
    let sets = read_loras(&model(), &specs).unwrap();
    let fused = if fuse { sets.clone() } else { vec![] };
    let sd = StableDiffusion::load_fused(&model(), DType::F32, &Device::Cpu, &fused).unwrap();
    if !fuse {
        sd.add_lora(&sets[0].0, 1.0).unwrap();
    }
    sd.generate(&fixture_params("sd1"), &mut |_, _| {}).unwrap()
}

#[test]
fn images_match_lycoris_apply_and_diffusers_dora() {
    let exp = expected();
    let plain = &exp["plain.image"];
    for name in LYCORIS.iter().copied().chain(["dora_peft"]) {
        let (img, u8s) = (
            &exp[&format!("{name}.image")],
            &exp[&format!("{name}.image_u8")],
        );
        let moved = max_abs_diff(img, plain);
        for fuse in [false, true] {
            let ours = generate(name, fuse);
            let (d, l) = (max_abs_diff(&ours, img), png_levels(&ours, u8s));
            eprintln!("{name} fuse={fuse}: max abs {d:.2e}, {l} PNG levels (adapter moved the image {moved:.3})");
            assert!(d < 1e-4, "{name} fuse={fuse}: {d}");
            assert!(l <= 1.0, "{name} fuse={fuse}: {l} levels");
        }
        assert!(
            moved > 0.05,
            "{name}: the adapter barely changes the image ({moved})"
        );
    }
}

#[test]
fn round_trips_are_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    for (name, format) in LYCORIS
        .iter()
        .map(|n| (*n, Format::Kohya))
        .chain([("dora_peft", Format::Diffusers)])
    {
        assert_eq!(formats::detect(&file(name)).unwrap(), format, "{name}");
        let set = read(name);
        let out = dir.path().join(format!("{name}.safetensors"));
        formats::write(&set, &out, format, &WriteOptions::default()).unwrap();
        let back = formats::read_with(&out, Some(&tiny_arch("sd1-tiny"))).unwrap();
        assert_eq!(set.layers.len(), back.layers.len());
        for (k, w) in &set.layers {
            let v = &back.layers[k];
            assert_eq!(w.kind_label(), v.kind_label(), "{name} {k}");
            assert_eq!(w.alpha(), v.alpha(), "{name} {k}");
            assert_eq!(bits(w), bits(v), "{name} {k}");
        }
        if format != Format::Kohya {
            // diffusers: the same tensors per layer (checked above); its conv layers, which
            // diffusers saves with PEFT's lora_A / lora_B, are written as lora.down / lora.up.
            continue;
        }
        // The written tensors are the file's own, key for key and bit for bit.
        let (a, b) = (load_tensors(file(name)), load_tensors(&out));
        let only_a: Vec<&String> = a.keys().filter(|k| !b.contains_key(*k)).collect();
        let only_b: Vec<&String> = b.keys().filter(|k| !a.contains_key(*k)).collect();
        assert!(
            only_a.is_empty() && only_b.is_empty(),
            "{name}: keys only in the file {only_a:?}, only written {only_b:?}"
        );
        for (k, t) in &a {
            assert_eq!(t.dims(), b[k].dims(), "{name} {k}");
            assert_eq!(max_abs_diff(t, &b[k]), 0.0, "{name} {k}");
        }
        let meta = formats::read(&out).unwrap().metadata;
        assert_eq!(meta["ss_network_module"], "lycoris.kohya", "{name}");
        assert_eq!(
            meta["ss_network_args"], set.metadata["ss_network_args"],
            "{name}"
        );
    }
}

#[test]
fn inspect_lists_kinds_ranks_and_parameters() {
    let o = lora(&[
        "inspect",
        s(&file("lokr")),
        "--model",
        s(&fixtures().join("sd1-tiny")),
    ]);
    expect_success(&o);
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(text.contains("kind:        LoKr"), "{text}");
    assert!(text.contains("full (LoKr, both sides full)"), "{text}");
    let set = read("lokr");
    let params: usize = set.layers.values().map(|w| w.parameters()).sum();
    let stored: usize = load_tensors(file("lokr"))
        .iter()
        .filter(|(k, _)| !k.ends_with(".alpha"))
        .map(|(_, t)| t.elem_count())
        .sum();
    assert_eq!(params, stored);
    assert!(text.contains(&format!("parameters:  {params}")), "{text}");
    let o = lora(&[
        "inspect",
        s(&file("loha_dora_in")),
        "--model",
        s(&fixtures().join("sd1-tiny")),
    ]);
    expect_success(&o);
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(text.contains("kind:        LoHa+DoRA"), "{text}");
}

/// `name`'s tensors with `edit` applied, written to `dir/out`.
fn edited(
    name: &str,
    dir: &std::path::Path,
    out: &str,
    edit: impl FnOnce(&mut HashMap<String, Tensor>),
) -> PathBuf {
    let mut t = load_tensors(file(name));
    edit(&mut t);
    let path = dir.join(out);
    let tensors: Vec<(String, lora_diffusion::tensor_file::OutTensor<'static>)> = t
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                lora_diffusion::tensor_file::OutTensor::from_tensor(v).unwrap(),
            )
        })
        .collect();
    lora_diffusion::tensor_file::write(&path, tensors, &Default::default(), true).unwrap();
    path
}

#[test]
fn malformed_files_name_file_key_and_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let arch = tiny_arch("sd1-tiny");
    let layer = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let missing = edited("loha", dir.path(), "missing.safetensors", |t| {
        t.remove(&format!("{layer}.hada_w2_b"));
    });
    let e = err_text(formats::read_with(&missing, Some(&arch)));
    assert!(e.contains("missing.safetensors"), "{e}");
    assert!(
        e.contains("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
        "{e}"
    );
    assert!(e.contains("no hada_w2_b"), "{e}");
    let bad = edited("loha", dir.path(), "shape.safetensors", |t| {
        t.insert(
            format!("{layer}.hada_w2_b"),
            Tensor::zeros((2, 31), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let e = err_text(formats::read_with(&bad, Some(&arch)));
    assert!(
        e.contains("shape.safetensors") && e.contains("attn1.to_q"),
        "{e}"
    );
    assert!(
        e.contains("hada_w2_b has shape [2, 31], expected [2, 32]"),
        "{e}"
    );
    let bad = edited("lokr", dir.path(), "kron.safetensors", |t| {
        t.insert(
            format!("{layer}.lokr_w1"),
            Tensor::zeros((4, 3), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    // Self-consistent factors of another shape: refused where the LoRA meets the model.
    let specs = [LoraSpec {
        path: bad.clone(),
        scale: 1.0,
    }];
    let e = err_text(read_loras(&model(), &specs));
    assert!(
        e.contains("kron.safetensors")
            && e.contains("attn1.to_q: LoRA ΔW [32, 24], model weight [32, 32]"),
        "{e}"
    );
    let both = edited("lokr", dir.path(), "both.safetensors", |t| {
        let w = t[&format!("{layer}.lokr_w1")].clone();
        t.insert(format!("{layer}.lokr_w1_a"), w);
    });
    let e = err_text(formats::read_with(&both, Some(&arch)));
    assert!(
        e.contains("lokr_w1_a without lokr_w1_b") || e.contains("both lokr_w1"),
        "{e}"
    );
    let dora = edited("dora_lycoris", dir.path(), "dora.safetensors", |t| {
        t.insert(
            format!("{layer}.dora_scale"),
            Tensor::ones((31, 1), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let e = err_text(formats::read_with(&dora, Some(&arch)));
    assert!(
        e.contains("dora_scale: DoRA magnitude has shape [31, 1]; for the weight [32, 32]"),
        "{e}"
    );
    let mixed = edited("loha", dir.path(), "mixed.safetensors", |t| {
        t.insert(
            format!("{layer}.lora_down.weight"),
            Tensor::zeros((2, 32), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let e = err_text(formats::read_with(&mixed, Some(&arch)));
    assert!(e.contains("several kinds"), "{e}");
}

#[test]
fn conversions_and_joins_refuse_what_they_cannot_hold() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = fixtures().join("sd1-tiny");
    let out = dir.path().join("x.safetensors");
    let o = lora(&[
        "convert",
        s(&file("loha")),
        "--to",
        "diffusers",
        "--model",
        s(&tiny),
        "--out",
        s(&out),
    ]);
    let e = expect_failure(&o, &["LoHa layer has no diffusers keys"]);
    assert!(e.contains("unet.") || e.contains("text_encoder."), "{e}");
    assert!(!out.exists());
    let o = lora(&[
        "convert",
        s(&file("dora_peft")),
        "--to",
        "kohya",
        "--model",
        s(&tiny),
        "--out",
        s(&out),
    ]);
    expect_failure(&o, &["lora_magnitude_vector", "PEFT's"]);
    let o = lora(&[
        "convert",
        s(&file("dora_lycoris")),
        "--to",
        "peft",
        "--model",
        s(&tiny),
        "--out",
        s(&out),
    ]);
    expect_failure(&o, &["dora_scale", "LyCORIS'"]);
    let o = lora(&[
        "convert",
        s(&file("lokr")),
        "--to",
        "cloneofsimo",
        "--model",
        s(&tiny),
        "--out",
        s(&out),
    ]);
    expect_failure(
        &o,
        &["cloneofsimo files hold plain LoRA factors only", "(LoKr)"],
    );
    // LoHa between kohya and our own format keeps every bit.
    let o = lora(&[
        "convert",
        s(&file("loha")),
        "--to",
        "ours",
        "--model",
        s(&tiny),
        "--out",
        s(&out),
    ]);
    expect_success(&o);
    let back = formats::read_with(&out, Some(&tiny_arch("sd1-tiny"))).unwrap();
    for (k, w) in &read("loha").layers {
        assert_eq!(bits(w), bits(&back.layers[k]), "{k}");
    }
    let a = read("loha");
    let e = err_text(lora_diffusion::lora::combine::ljl(&a, &a, 1.0, 1.0));
    assert!(e.contains("not plain LoRA") && e.contains("(LoHa)"), "{e}");
}

/// The tensors of `rel` in a diffusers folder written by `lora_add --mode upl`.
fn folder_tensors(dir: &std::path::Path, rel: &str) -> HashMap<String, Tensor> {
    load_tensors(dir.join(rel))
}

#[test]
fn lora_add_upl_writes_lycoris_and_dora_merged_weights() {
    let exp = expected();
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("sd1-tiny");
    for name in ["loha", "lokr_tucker", "loha_dora_in", "dora_peft"] {
        let out = dir.path().join(name);
        let o = common::lora_add(&[
            "--path_1",
            s(&model),
            "--path_2",
            s(&file(name)),
            "--mode",
            "upl",
            "--alpha",
            "0.5",
            "--output_path",
            s(&out),
        ]);
        expect_success(&o);
        let unet = folder_tensors(&out, "unet/diffusion_pytorch_model.safetensors");
        let te = folder_tensors(&out, "text_encoder/model.safetensors");
        for layer in layers_of(name) {
            let (comp, path) = layer.split_once('.').unwrap();
            let got = if comp == "unet" { &unet } else { &te }[&format!("{path}.weight")].clone();
            let base = &exp[&format!("{name}.{layer}.base")];
            let want = &exp[&format!("{name}.{layer}.merged_half")];
            let change = max_abs(&(want - base).unwrap());
            let d = max_abs_diff(&got, want);
            eprintln!("upl {name} {layer} at 0.5: max diff {d:.2e} (change {change:.3e})");
            assert!(d <= 1e-5 * change.max(1.0), "upl {name} {layer}: {d}");
        }
    }
}
