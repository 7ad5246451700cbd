//! LoRA file formats against files written by diffusers / PEFT / the documented kohya and
//! cloneofsimo rules (scripts/fixture_lora_formats.py): every file gives the same ΔW, applying it
//! matches diffusers' fuse_lora, conversions round-trip, detection is right. Bad input and the
//! CLI: tests/formats_errors.rs.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixtures, identical, lora_fixture, max_abs_diff, tiny_arch};
use lora_diffusion::formats::cloneofsimo::module_order;
use lora_diffusion::formats::keymap::{Component, KeyIndex};
use lora_diffusion::formats::{self, Architecture, Format, WriteOptions};
use lora_diffusion::lora::{delta_weight, LoraSet, LoraWeights};
use lora_diffusion::tensor_file::read_header;
use safetensors::Dtype;
use std::collections::HashMap;
use std::path::Path;

fn expected() -> HashMap<String, Tensor> {
    common::load_tensors(lora_fixture("expected.safetensors"))
}

fn expected_json() -> serde_json::Value {
    common::read_json(lora_fixture("expected.json"))
}

/// Every layer of `a` and `b` has the same ΔW (within `tol`); returns the max difference.
fn same_deltas(a: &LoraSet, b: &LoraSet, tol: f32) -> f32 {
    let ka: Vec<&lora_diffusion::lora::LayerKey> = a.layers.keys().collect();
    let kb: Vec<&lora_diffusion::lora::LayerKey> = b.layers.keys().collect();
    assert_eq!(ka, kb, "different layers");
    let mut worst = 0f32;
    for (k, w) in &a.layers {
        let d = max_abs_diff(
            &delta_weight(w).unwrap(),
            &delta_weight(&b.layers[k]).unwrap(),
        );
        assert!(d <= tol, "{k}: ΔW differs by {d}");
        worst = worst.max(d);
    }
    worst
}

const FILES: &[(&str, Format)] = &[
    ("kohya.safetensors", Format::Kohya),
    ("diffusers.safetensors", Format::Diffusers),
    ("diffusers_peft.safetensors", Format::Diffusers),
    ("diffusers_old.safetensors", Format::Diffusers),
    ("peft.safetensors", Format::Peft),
    ("peft_nometa.safetensors", Format::Peft),
    ("cloneofsimo.safetensors", Format::Cloneofsimo),
    ("cloneofsimo.pt", Format::Cloneofsimo),
    ("cloneofsimo_geglu.safetensors", Format::Cloneofsimo),
    ("diffusers_old_unet.bin", Format::Diffusers),
];

#[test]
fn detects_every_format() {
    for (name, want) in FILES {
        assert_eq!(
            formats::detect(&lora_fixture(name)).unwrap(),
            *want,
            "{name}"
        );
    }
}

#[test]
fn every_file_gives_the_same_delta_as_diffusers() {
    let exp = expected();
    let json = expected_json();
    let arch = tiny_arch("sd1-tiny");
    let reference = formats::read_with(&lora_fixture("peft.safetensors"), Some(&arch)).unwrap();
    assert_eq!(reference.layers.len(), 100);
    for (name, _) in &FILES[..8] {
        let set = formats::read_with(&lora_fixture(name), Some(&arch)).unwrap();
        let half = *name == "peft_nometa.safetensors"; // no metadata: scale 1 instead of 2
        let mut worst = 0f32;
        for layer in json["check_layers"].as_array().unwrap() {
            let layer = layer.as_str().unwrap();
            let want = (&exp[&format!("delta.{layer}")] * if half { 0.5 } else { 1.0 }).unwrap();
            let w = set
                .layers
                .get(layer)
                .unwrap_or_else(|| panic!("{name}: no {layer}"));
            worst = worst.max(max_abs_diff(&delta_weight(w).unwrap(), &want));
        }
        eprintln!("{name}: max |ΔW - scale·B·A| over the check layers = {worst:e}");
        assert!(worst <= 1e-6, "{name}: {worst}");
        if !half {
            let all = same_deltas(&set, &reference, 1e-6);
            eprintln!(
                "{name}: all {} layers equal the PEFT file's ΔW within {all:e}",
                set.layers.len()
            );
        }
    }
}

#[test]
fn pickled_state_dict_of_old_diffusers_reads() {
    let set = formats::read(&lora_fixture("diffusers_old_unet.bin")).unwrap();
    let mut reference = formats::read(&lora_fixture("peft.safetensors")).unwrap();
    reference
        .layers
        .retain(|k, _| k.as_str().starts_with("unet."));
    let d = same_deltas(&set, &reference, 1e-6);
    eprintln!(
        "diffusers_old_unet.bin: {} UNet layers, max ΔW diff {d:e}",
        set.layers.len()
    );
}

#[test]
fn kohya_and_peft_read_without_a_model_but_cloneofsimo_needs_one() {
    // sd1-tiny's module paths are a subset of SD 1.5's, so kohya names resolve without a model.
    let a = formats::read(&lora_fixture("kohya.safetensors")).unwrap();
    let b = formats::read_with(
        &lora_fixture("kohya.safetensors"),
        Some(&tiny_arch("sd1-tiny")),
    )
    .unwrap();
    identical(&a, &b);
    let err = format!(
        "{:#}",
        formats::read(&lora_fixture("cloneofsimo.safetensors")).unwrap_err()
    );
    eprintln!("{err}");
    assert!(
        err.contains("--model") && err.contains("cloneofsimo.safetensors"),
        "{err}"
    );
}

#[test]
fn fusing_at_scale_matches_diffusers_fuse_lora() {
    let exp = expected();
    let json = expected_json();
    let s = json["fuse_scale"].as_f64().unwrap();
    let set = formats::read(&lora_fixture("kohya.safetensors")).unwrap();
    let unet = common::unet_tensors("sd1");
    let te = common::load_tensors(fixtures().join("sd1-tiny/text_encoder/model.safetensors"));
    let mut worst = 0f32;
    for layer in json["check_layers"].as_array().unwrap() {
        let layer = layer.as_str().unwrap();
        let (comp, path) = layer.split_once('.').unwrap();
        let base = if comp == "unet" { &unet } else { &te }[&format!("{path}.weight")].clone();
        let fused = (base + (delta_weight(&set.layers[layer]).unwrap() * s).unwrap()).unwrap();
        worst = worst.max(max_abs_diff(&fused, &exp[&format!("fused.{layer}")]));
    }
    eprintln!("W + {s}·ΔW vs diffusers fuse_lora(lora_scale={s}): max abs diff {worst:e}");
    assert!(worst <= 1e-5);
}

#[test]
fn cloneofsimo_order_is_the_pre_015_traversal() {
    let json = expected_json();
    let arch = tiny_arch("sd1-tiny");
    let strs = |v: &serde_json::Value, prefix: &str| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| format!("{prefix}.{}", s.as_str().unwrap()))
            .collect()
    };
    let t = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let order = module_order(
        &arch,
        Component::Unet,
        &t(&["CrossAttention", "Attention"]),
        false,
    )
    .unwrap();
    assert_eq!(order, strs(&json["cloneofsimo_order"]["unet"], "unet"));
    let order = module_order(
        &arch,
        Component::Unet,
        &t(&["CrossAttention", "Attention", "GEGLU"]),
        false,
    )
    .unwrap();
    assert_eq!(order, strs(&json["cloneofsimo_order"]["geglu"], "unet"));
    assert!(
        order[3].ends_with("attn1.to_out.0")
            && order[4].ends_with("ff.net.0.proj")
            && order[5].ends_with("attn2.to_q")
    );
    let order = module_order(&arch, Component::TextEncoder, &t(&["CLIPAttention"]), false).unwrap();
    assert_eq!(
        order,
        strs(&json["cloneofsimo_order"]["text_encoder"], "text_encoder")
    );
    // And the GEGLU file reads to exactly the stored factors by path.
    let exp = expected();
    let set =
        formats::read_with(&lora_fixture("cloneofsimo_geglu.safetensors"), Some(&arch)).unwrap();
    assert_eq!(set.layers.len(), 99);
    for (k, w) in &set.layers {
        assert_eq!(w.alpha(), w.rank() as f64);
        assert_eq!(
            max_abs_diff(w.down(), &exp[&format!("geglu.{k}.down")]),
            0.0,
            "{k}"
        );
        assert_eq!(
            max_abs_diff(w.up(), &exp[&format!("geglu.{k}.up")]),
            0.0,
            "{k}"
        );
    }
}

/// The fixture LoRA with some variety: one layer at rank 2 and one with another alpha.
fn varied() -> LoraSet {
    let mut set = formats::read(&lora_fixture("kohya.safetensors")).unwrap();
    let k = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k".to_string();
    let w = set.layers[k.as_str()].clone();
    set.layers.insert(
        k.into(),
        LoraWeights::new(
            w.down().narrow(0, 0, 2).unwrap(),
            w.up().narrow(1, 0, 2).unwrap(),
            1.5,
        )
        .unwrap(),
    );
    let v = set
        .layers
        .get_mut("text_encoder.text_model.encoder.layers.1.self_attn.v_proj")
        .unwrap();
    *v = v.clone().with_alpha(3.0);
    set
}

fn write_read(
    set: &LoraSet,
    format: Format,
    dir: &Path,
    opts: WriteOptions,
    arch: Option<&Architecture>,
) -> LoraSet {
    let out = dir.join(format!("{}.safetensors", format.name()));
    formats::write(
        set,
        &out,
        format,
        &WriteOptions {
            force: true,
            ..opts
        },
    )
    .unwrap();
    assert_eq!(formats::detect(&out).unwrap(), format);
    formats::read_with(&out, arch).unwrap()
}

#[test]
fn conversions_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let set = varied();
    for f in [Format::Ours, Format::Kohya, Format::Diffusers, Format::Peft] {
        // ours -> F -> ours: factors and alphas bit-identical.
        let ours = write_read(
            &set,
            Format::Ours,
            dir.path(),
            WriteOptions::default(),
            None,
        );
        identical(&set, &ours);
        // kohya keeps per-layer alphas only on request (else it folds them into up).
        let exact = WriteOptions {
            per_layer_alpha: true,
            ..Default::default()
        };
        let back = write_read(&ours, f, dir.path(), exact, None);
        identical(&set, &back);
        let again = write_read(
            &back,
            Format::Ours,
            dir.path(),
            WriteOptions::default(),
            None,
        );
        identical(&set, &again);
        eprintln!(
            "ours -> {f} -> ours: identical ({} layers)",
            set.layers.len()
        );
    }
    // kohya by default: one alpha per file, ΔW equal within f32 rounding.
    let k = write_read(
        &set,
        Format::Kohya,
        dir.path(),
        WriteOptions::default(),
        None,
    );
    let d = same_deltas(&set, &k, 1e-6);
    eprintln!("ours -> kohya (one alpha) -> ours: max ΔW diff {d:e}");
    let first = k.layers.values().next().unwrap().alpha();
    assert!(k.layers.values().all(|w| w.alpha() == first));
    // cloneofsimo stores scale·up: ΔW equal within f32 rounding, alpha becomes the rank.
    let arch = tiny_arch("sd1-tiny");
    let opts = WriteOptions {
        arch: Some(&arch),
        ..Default::default()
    };
    let c = write_read(&set, Format::Cloneofsimo, dir.path(), opts, Some(&arch));
    let d = same_deltas(&set, &c, 1e-6);
    eprintln!("ours -> cloneofsimo -> ours: max ΔW diff {d:e}");
    assert!(c.layers.values().all(|w| w.alpha() == w.rank() as f64));
    // f16 / bf16 output.
    for dt in [DType::F16, DType::BF16] {
        let h = write_read(
            &set,
            Format::Kohya,
            dir.path(),
            WriteOptions {
                dtype: Some(dt),
                per_layer_alpha: true,
                ..Default::default()
            },
            None,
        );
        for (k, w) in &h.layers {
            assert_eq!(w.down().dtype(), dt);
            assert_eq!(w.alpha(), set.layers[k].alpha());
            assert_eq!(
                max_abs_diff(w.up(), &set.layers[k].up().to_dtype(dt).unwrap()),
                0.0
            );
        }
    }
}

#[test]
fn ours_metadata_is_documented() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.safetensors");
    let mut set = formats::read(&lora_fixture("kohya.safetensors")).unwrap();
    set.metadata
        .insert("training_args".into(), "{\"steps\":10}".into());
    formats::write(&set, &out, Format::Ours, &WriteOptions::default()).unwrap();
    let h = read_header(&out).unwrap();
    let m = &h.metadata;
    assert_eq!(m["lora_diffusion.format"], "1");
    assert_eq!(m["rank"], "4");
    assert_eq!(m["alpha"], "8");
    assert_eq!(
        m["targets"],
        r#"["k_proj","out_proj","q_proj","to_k","to_out.0","to_q","to_v","v_proj"]"#
    );
    assert_eq!(m["training_args"], "{\"steps\":10}");
    assert!(
        !m.contains_key("ss_network_module"),
        "kohya's format keys are not carried over"
    );
    let alpha = &h.entries["unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.alpha"];
    assert_eq!((alpha.dtype, alpha.shape.len()), (Dtype::F32, 0));
}

#[test]
fn kohya_names_are_unambiguous_for_sd1_and_sd2() {
    let idx = KeyIndex::underscored(&Architecture::known());
    assert!(idx.ambiguous().is_empty(), "{:?}", idx.ambiguous());
    assert_eq!(Architecture::sd15().cross_attention_dim(), Some(768));
    assert_eq!(Architecture::sd21().cross_attention_dim(), Some(1024));
    eprintln!(
        "SD 1.5: {} layers, SD 2.1: {} layers",
        Architecture::sd15().layers().len(),
        Architecture::sd21().layers().len()
    );
}

/// A LoCon-style LoRA on every ResnetBlock2D layer (3×3 and 1×1 convs, time_emb_proj) of sd1-tiny.
fn resnet_lora(arch: &Architecture) -> LoraSet {
    let mut rng = lora_diffusion::rng::Rng::new(7);
    let mut set = LoraSet::default();
    for (k, s) in arch.layers() {
        if !k.as_str().contains(".resnets.") {
            continue;
        }
        let r = 2;
        let mut down_shape = vec![r, s[1]];
        down_shape.extend_from_slice(&s[2..]);
        let mut up_shape = vec![s[0], r];
        up_shape.extend(std::iter::repeat_n(1, s.len() - 2));
        let down = rng.randn(down_shape, &Device::Cpu).unwrap();
        let up = rng.randn(up_shape, &Device::Cpu).unwrap();
        set.layers
            .insert(k.clone(), LoraWeights::new(down, up, 1.0).unwrap());
    }
    set
}

#[test]
fn conv_layers_round_trip_in_every_format() {
    let arch = tiny_arch("sd1-tiny");
    let set = resnet_lora(&arch);
    assert!(set
        .layers
        .values()
        .any(|w| w.is_conv() && w.down().dims()[2] == 3));
    formats::check_against(&set, &arch).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for f in [Format::Ours, Format::Kohya, Format::Diffusers, Format::Peft] {
        identical(
            &set,
            &write_read(&set, f, dir.path(), WriteOptions::default(), None),
        );
    }
    // cloneofsimo: whole ResnetBlock2D modules, convs included (its "extended" injection).
    let opts = WriteOptions {
        arch: Some(&arch),
        ..Default::default()
    };
    let c = write_read(&set, Format::Cloneofsimo, dir.path(), opts, Some(&arch));
    let d = same_deltas(&set, &c, 1e-5);
    let h = read_header(&dir.path().join("cloneofsimo.safetensors")).unwrap();
    assert_eq!(h.metadata["unet"], r#"["ResnetBlock2D"]"#);
    let first = h.entries["unet:0:down"].shape.clone();
    assert_eq!(
        first,
        set.layers["unet.down_blocks.0.resnets.0.conv1"]
            .down()
            .dims()
            .to_vec()
    );
    eprintln!(
        "{} resnet layers (convs + time_emb_proj) round-trip; cloneofsimo ΔW diff {d:e}",
        set.layers.len()
    );
}
