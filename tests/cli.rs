//! `lora generate` as a user runs it: success, and a clear error with exit code 1 for bad input.

mod common;

use candle_core::{DType, Device};
use common::{copy_dir, expect_failure, expect_success, fixtures, lora, read_json};
use lora_diffusion::hub::ModelSource;
use lora_diffusion::pipeline::image_io::to_rgb8;
use lora_diffusion::pipeline::{GenerateParams, StableDiffusion};
use std::path::{Path, PathBuf};

/// A writable copy of the tiny SD1 model.
fn model_copy(dir: &Path) -> PathBuf {
    let m = dir.join("model");
    copy_dir(&fixtures().join("sd1-tiny"), &m);
    m
}

/// Runs generate on `model` and expects failure whose message contains every `needles`.
fn expect_error(model: &Path, extra: &[&str], needles: &[&str]) -> String {
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("x.png");
    let m = model.to_str().unwrap();
    let mut args = vec![
        "generate", "--model", m, "--prompt", "a cat", "--steps", "2",
    ];
    args.extend_from_slice(extra);
    let o = out.to_str().unwrap().to_string();
    if !extra.contains(&"--out") {
        args.extend_from_slice(&["--out", &o]);
    }
    let err = expect_failure(&lora(&args), needles);
    assert!(!out.exists(), "output written despite the error");
    err
}

#[test]
fn generate_writes_a_png_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("img.png");
    let m = fixtures().join("sd1-tiny");
    let args = [
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--prompt",
        "a red apple",
        "--steps",
        "3",
        "--seed",
        "3",
        "--num-images",
        "2",
        "--scheduler",
        "euler-a",
        "--out",
        out.to_str().unwrap(),
    ];
    expect_success(&lora(&args));
    for i in 0..2 {
        let p = dir.path().join(format!("img-{i}.png"));
        let img = image::open(&p).unwrap().to_rgb8();
        assert_eq!((img.width(), img.height()), (16, 16));
    }
    let before = std::fs::read(dir.path().join("img-0.png")).unwrap();
    expect_failure(&lora(&args), &["--force"]);
    let mut forced = args.to_vec();
    forced.push("--force");
    assert!(lora(&forced).status.success());
    // Same seed, same bytes.
    assert_eq!(before, std::fs::read(dir.path().join("img-0.png")).unwrap());
    // The CLI frees the UNet before decoding; its images are the library's `generate`.
    let sd =
        StableDiffusion::load(&ModelSource::Local(m.clone()), DType::F32, &Device::Cpu).unwrap();
    let params = GenerateParams {
        prompt: "a red apple".into(),
        steps: 3,
        seed: 3,
        num_images: 2,
        scheduler: "euler-a".parse().unwrap(),
        ..Default::default()
    };
    let images = to_rgb8(&sd.generate(&params, &mut |_, _| {}).unwrap()).unwrap();
    for (i, want) in images.iter().enumerate() {
        let got = image::open(dir.path().join(format!("img-{i}.png"))).unwrap();
        assert_eq!(got.to_rgb8().as_raw(), want.as_raw(), "image {i}");
    }
    // No temporary files left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn missing_model_folder() {
    expect_error(
        Path::new("/nonexistent/sd-model"),
        &[],
        &["/nonexistent/sd-model"],
    );
}

#[test]
fn missing_component() {
    let dir = tempfile::tempdir().unwrap();
    let m = model_copy(dir.path());
    std::fs::remove_dir_all(m.join("vae")).unwrap();
    expect_error(&m, &[], &["vae"]);
}

#[test]
fn corrupt_and_truncated_weights() {
    let dir = tempfile::tempdir().unwrap();
    let m = model_copy(dir.path());
    let f = m.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    expect_error(&m, &[], &["unet/diffusion_pytorch_model.safetensors"]);
    std::fs::write(&f, b"garbage").unwrap();
    expect_error(&m, &[], &["unet/diffusion_pytorch_model.safetensors"]);
}

#[test]
fn missing_extra_and_misshaped_keys_are_listed_together() {
    let dir = tempfile::tempdir().unwrap();
    let m = model_copy(dir.path());
    let f = m.join("unet/diffusion_pytorch_model.safetensors");
    let mut t = common::load_tensors(&f);
    let w = t.remove("conv_in.weight").unwrap();
    t.insert("conv_in.weight_renamed".into(), w);
    let b = t.remove("conv_out.bias").unwrap();
    t.insert(
        "conv_out.bias".into(),
        candle_core::Tensor::cat(&[&b, &b], 0).unwrap(),
    );
    candle_core::safetensors::save(&t, &f).unwrap();
    expect_error(
        &m,
        &[],
        &[
            "missing keys",
            "conv_in.weight [32, 4, 3, 3]",
            "unexpected keys",
            "conv_in.weight_renamed",
            "conv_out.bias: model expects [4], file has [8]",
        ],
    );
}

#[test]
fn config_that_does_not_fit_the_weights() {
    let dir = tempfile::tempdir().unwrap();
    let m = model_copy(dir.path());
    let cfg_path = m.join("unet/config.json");
    let mut cfg = read_json(&cfg_path);
    cfg["cross_attention_dim"] = 24.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    expect_error(
        &m,
        &[],
        &[
            "shape mismatches",
            "attn2.to_k.weight: model expects [32, 24], file has [32, 32]",
        ],
    );
}

#[test]
fn bad_options() {
    let m = fixtures().join("sd1-tiny");
    expect_error(
        &m,
        &["--scheduler", "pndm"],
        &["pndm", "ddim", "euler-a", "dpm++2m"],
    );
    expect_error(&m, &["--height", "15"], &["multiple", "15"]);
    expect_error(&m, &["--dtype", "f8"], &["f8"]);
    expect_error(&m, &["--device", "tpu"], &["tpu"]);
    let bad_latents = tempfile::tempdir().unwrap();
    let f = bad_latents.path().join("l.safetensors");
    let t = candle_core::Tensor::zeros(
        (1, 4, 5, 5),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    candle_core::safetensors::save(&[("latents", t)].into_iter().collect(), &f).unwrap();
    expect_error(
        &m,
        &["--init-latents", f.to_str().unwrap()],
        &["latents", "[1, 4, 5, 5]", "[1, 4, 8, 8]"],
    );
    expect_error(
        &m,
        &["--init-latents", "/nonexistent/l.safetensors"],
        &["/nonexistent/l.safetensors"],
    );
}

#[test]
fn unwritable_output() {
    let m = fixtures().join("sd1-tiny");
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, b"x").unwrap();
    let out = blocker.join("img.png"); // parent is a file
    expect_error(&m, &["--out", out.to_str().unwrap()], &["img.png"]);
    expect_error(
        &m,
        &["--out", "/nonexistent-dir/img.png"],
        &["/nonexistent-dir"],
    );
}
