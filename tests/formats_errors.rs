//! LoRA file formats on bad input (truncated / corrupt files, unknown keys, wrong shapes, a
//! LoRA for another model family, existing outputs) and the `lora convert` / `lora inspect`
//! commands. Every failure is a clear error naming the file, key or layer; never a panic.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{
    err_text, expect_failure, expect_success, fixtures, identical, lora, lora_fixture, s, tiny_arch,
};
use lora_diffusion::formats::{self, check_against, Architecture, Format, WriteOptions};
use lora_diffusion::lora::{LoraSet, LoraWeights};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[test]
fn truncated_and_corrupt_files_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["kohya.safetensors", "cloneofsimo.pt"] {
        let bytes = std::fs::read(lora_fixture(name)).unwrap();
        let p = dir.path().join(name);
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
        let e = err_text(formats::read(&p));
        assert!(
            e.contains(p.to_str().unwrap()) && e.contains("truncated"),
            "{e}"
        );
        let mut garbage = bytes.clone();
        garbage[8..40].copy_from_slice(&[b'#'; 32]);
        std::fs::write(&p, &garbage).unwrap();
        let e = err_text(formats::read(&p));
        assert!(e.contains(p.to_str().unwrap()), "{e}");
    }
    let p = dir.path().join("tiny.safetensors");
    std::fs::write(&p, b"abc").unwrap();
    assert!(err_text(formats::read(&p)).contains("too short"));
    assert!(
        err_text(formats::read(&dir.path().join("missing.safetensors"))).contains("does not exist")
    );
}

/// A copy of a fixture with tensors added / replaced.
fn edited(dir: &Path, name: &str, edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> PathBuf {
    let mut t = common::load_tensors(lora_fixture(name));
    edit(&mut t);
    let p = dir.join(name);
    candle_core::safetensors::save(&t, &p).unwrap();
    p
}

#[test]
fn unknown_keys_are_listed_together() {
    let dir = tempfile::tempdir().unwrap();
    let z = Tensor::zeros((4, 32), DType::F32, &Device::Cpu).unwrap();
    let p = edited(dir.path(), "kohya.safetensors", |t| {
        t.insert(
            "lora_unet_down_blocks_0_nonexistent_to_q.lora_down.weight".into(),
            z.clone(),
        );
        t.insert(
            "lora_unet_up_blocks_9_attentions_0_proj_in.lora_up.weight".into(),
            z.clone(),
        );
    });
    let e = err_text(formats::read(&p));
    assert!(
        e.contains("2 of 302 keys") && e.contains("nonexistent_to_q") && e.contains("up_blocks_9"),
        "{e}"
    );
    let p = edited(dir.path(), "diffusers.safetensors", |t| {
        t.insert("unet.down_blocks.0.something.weird".into(), z.clone());
    });
    assert!(err_text(formats::read(&p)).contains("unet.down_blocks.0.something.weird"));
}

#[test]
fn mismatched_shapes_name_the_layer_and_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let layer = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let p = edited(dir.path(), "kohya.safetensors", |t| {
        t.insert(
            format!("{layer}.lora_up.weight"),
            Tensor::zeros((32, 8), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let e = err_text(formats::read(&p));
    assert!(
        e.contains("attn1.to_q") && e.contains("[4, 32]") && e.contains("[32, 8]"),
        "{e}"
    );
    // Against a model: the tiny SD1 LoRA on the tiny SD2 model.
    let set = formats::read(&lora_fixture("kohya.safetensors")).unwrap();
    let e = err_text(check_against(&set, &tiny_arch("sd2-tiny")));
    assert!(
        e.contains("cross-attention dim 32 in the LoRA, 48 in the model"),
        "{e}"
    );
    assert!(
        e.contains("attn2.to_k: LoRA ΔW [32, 32], model weight [32, 48]"),
        "{e}"
    );
    check_against(&set, &tiny_arch("sd1-tiny")).unwrap();
    // Real size: an SD 2 LoRA layer on SD 1.5.
    let k = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k";
    let mut sd2 = LoraSet::default();
    let w = LoraWeights::new(
        Tensor::zeros((4, 1024), DType::F32, &Device::Cpu).unwrap(),
        Tensor::zeros((320, 4), DType::F32, &Device::Cpu).unwrap(),
        4.0,
    )
    .unwrap();
    sd2.layers.insert(k.into(), w);
    check_against(&sd2, Architecture::sd21()).unwrap();
    let e = err_text(check_against(&sd2, Architecture::sd15()));
    assert!(
        e.contains(
            "cross-attention dim 1024 in the LoRA, 768 in the model (a LoRA for SD 2.x on SD 1.x)"
        ),
        "{e}"
    );
}

#[test]
fn output_exists_needs_force_and_nothing_is_half_written() {
    let dir = tempfile::tempdir().unwrap();
    let set = formats::read(&lora_fixture("kohya.safetensors")).unwrap();
    let out = dir.path().join("out.safetensors");
    std::fs::write(&out, b"user data").unwrap();
    let e = err_text(formats::write(
        &set,
        &out,
        Format::Ours,
        &WriteOptions::default(),
    ));
    assert!(e.contains("already exists") && e.contains("--force"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), b"user data");
    // A format that cannot hold the LoRA fails before touching the file.
    let e = err_text(formats::write(
        &set,
        &out,
        Format::Cloneofsimo,
        &WriteOptions {
            force: true,
            ..Default::default()
        },
    ));
    assert!(e.contains("--model"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), b"user data");
    formats::write(
        &set,
        &out,
        Format::Ours,
        &WriteOptions {
            force: true,
            ..Default::default()
        },
    )
    .unwrap();
    identical(&set, &formats::read(&out).unwrap());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .collect();
    assert_eq!(leftovers.len(), 1, "temporary files left: {leftovers:?}");
}

#[test]
fn cloneofsimo_rejects_partial_module_classes() {
    let arch = tiny_arch("sd1-tiny");
    let mut set = formats::read(&lora_fixture("kohya.safetensors")).unwrap();
    set.layers
        .retain(|k, _| !k.as_str().ends_with("attn1.to_v"));
    let dir = tempfile::tempdir().unwrap();
    let e = err_text(formats::write(
        &set,
        &dir.path().join("c.safetensors"),
        Format::Cloneofsimo,
        &WriteOptions {
            arch: Some(&arch),
            ..Default::default()
        },
    ));
    assert!(
        e.contains("whole module classes") && e.contains("attn1.to_q"),
        "{e}"
    );
}

#[test]
fn cli_convert_and_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    let o = s(&out);
    let convert = |input: &Path, to: &str, extra: &[&str]| {
        let mut args = vec!["convert", s(input), "--to", to, "--out", o];
        args.extend_from_slice(extra);
        lora(&args)
    };
    let kohya = lora_fixture("kohya.safetensors");
    expect_success(&convert(&kohya, "diffusers", &["--dtype", "f16"]));
    assert_eq!(formats::detect(&out).unwrap(), Format::Diffusers);
    expect_failure(&convert(&kohya, "ours", &[]), &["--force"]);
    let r = lora(&["inspect", o]);
    let text = String::from_utf8_lossy(&r.stdout).to_string();
    eprintln!("{text}");
    assert!(r.status.success());
    for needle in [
        "format:      diffusers",
        "unknown (cross-attention dim 32)",
        "rank:        4",
        "alpha:       8 (scale 2)",
        "f16",
        "parameters:  ",
        "to_out.0",
        "88 unet",
    ] {
        assert!(text.contains(needle), "inspect output lacks {needle:?}");
    }
    let m = fixtures().join("sd1-tiny");
    let pt = lora_fixture("cloneofsimo.pt");
    expect_success(&convert(&pt, "kohya", &["--force", "--model", s(&m)]));
    expect_failure(&lora(&["inspect", s(&pt)]), &["--model"]);
}
