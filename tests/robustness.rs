//! Inputs that used to crash or pass silently: each gives a clear error naming what is wrong.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use lora_diffusion::formats::{self, Format, WriteOptions};
use lora_diffusion::lora::{inject_trainable, Component, LoraSet, LoraTargets, LoraWeights};
use lora_diffusion::rng::Rng;
use lora_diffusion::tokenizer::ClipTokenizer;
use std::collections::BTreeMap;

const Q: &str = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";

fn one_layer(down: Tensor, up: Tensor) -> LoraSet {
    let mut set = LoraSet::default();
    set.layers
        .insert(Q.into(), LoraWeights::new(down, up, 4.0).unwrap());
    set
}

#[test]
fn a_target_pattern_that_matches_nothing_is_an_error() {
    let unet = load_unet("sd1", DType::F32);
    let targets = LoraTargets::parse("attn,to_qq").unwrap();
    let r = inject_trainable(
        &unet,
        Component::Unet,
        &targets,
        4,
        4.0,
        0.0,
        &mut Rng::new(0),
        &Device::Cpu,
    );
    let e = err_text(r);
    assert!(e.contains("to_qq") && e.contains("match no layer"), "{e}");
    // Presets whose patterns all exist still work.
    let ok = LoraTargets::parse("attn,attn2.to_k").unwrap();
    let r = inject_trainable(
        &unet,
        Component::Unet,
        &ok,
        4,
        4.0,
        0.0,
        &mut Rng::new(0),
        &Device::Cpu,
    );
    assert!(r.is_ok());
}

#[test]
fn non_finite_and_integer_lora_factors_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (r, d_in, d_out) = (4, 32, 32);
    let mut rng = Rng::new(3);
    let down = rng.randn((r, d_in), &Device::Cpu).unwrap();
    let up = rng.randn((d_out, r), &Device::Cpu).unwrap();
    // A NaN in a file: reading names the layer.
    let mut bad = down.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    bad[5] = f32::NAN;
    let bad = Tensor::from_vec(bad, (r, d_in), &Device::Cpu).unwrap();
    let raw: BTreeMap<String, Tensor> = [
        (format!("{Q}.lora_down.weight"), bad),
        (format!("{Q}.lora_up.weight"), up.clone()),
    ]
    .into_iter()
    .collect();
    let p = dir.path().join("nan.safetensors");
    let out = lora_diffusion::tensor_file::out_tensors(&raw).unwrap();
    lora_diffusion::tensor_file::write(&p, out, &BTreeMap::new(), false).unwrap();
    let e = err_text(formats::read(&p));
    assert!(
        e.contains(Q) && e.contains("non-finite") && e.contains("index 5"),
        "{e}"
    );
    // Integer factors are not a LoRA.
    let ints = down.to_dtype(DType::I64).unwrap();
    let e = err_text(LoraWeights::new(
        ints,
        up.to_dtype(DType::I64).unwrap(),
        4.0,
    ));
    assert!(e.contains("floating point") && e.contains("I64"), "{e}");
    // Values f16 cannot hold are refused when writing f16, accepted in f32.
    let big = (up.clone() * 1e6).unwrap();
    let set = one_layer(down.clone(), big);
    let f16 = WriteOptions {
        dtype: Some(DType::F16),
        ..Default::default()
    };
    let out = dir.path().join("big.safetensors");
    let e = err_text(formats::write(&set, &out, Format::Kohya, &f16));
    assert!(e.contains("overflow") && e.contains("F16"), "{e}");
    assert!(!out.exists());
    formats::write(&set, &out, Format::Kohya, &WriteOptions::default()).unwrap();
}

#[test]
fn cli_numbers_must_be_finite() {
    let dir = tempfile::tempdir().unwrap();
    let data = repo().join("tests/fixtures/train-data");
    for (flag, v) in [("--learning-rate", "NaN"), ("--max-grad-norm", "inf")] {
        let o = lora(&[
            "train",
            flag,
            v,
            "--instance-data-dir",
            s(&data),
            "--instance-prompt",
            "sks toy",
            "--output-dir",
            s(&dir.path().join("out")),
        ]);
        expect_failure(&o, &[flag, v, "finite"]);
    }
    let png = dir.path().join("x.png");
    let o = lora(&[
        "generate",
        "--prompt",
        "x",
        "--guidance",
        "NaN",
        "--out",
        s(&png),
    ]);
    expect_failure(&o, &["--guidance", "NaN"]);
    let o = lora(&[
        "generate", "--prompt", "x", "--height", "100000", "--width", "4000000",
    ]);
    assert_eq!(o.status.code(), Some(2), "--out is required");
    let o = lora(&[
        "generate",
        "--prompt",
        "x",
        "--height",
        "100000",
        "--width",
        "4000000",
        "--out",
        s(&png),
    ]);
    expect_failure(&o, &["100000x4000000", "GB", "available"]);
    assert!(!png.exists());
}

#[test]
fn non_finite_init_latents_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut v = vec![0f32; 4 * 8 * 8];
    v[7] = f32::INFINITY;
    let t = Tensor::from_vec(v, (1, 4, 8, 8), &Device::Cpu).unwrap();
    let p = dir.path().join("lat.safetensors");
    let m: BTreeMap<String, Tensor> = [("latents".to_string(), t)].into_iter().collect();
    let out = lora_diffusion::tensor_file::out_tensors(&m).unwrap();
    lora_diffusion::tensor_file::write(&p, out, &BTreeMap::new(), false).unwrap();
    let e = err_text(lora_diffusion::pipeline::read_init_latents(&p));
    assert!(
        e.contains("lat.safetensors") && e.contains("non-finite"),
        "{e}"
    );
}

#[test]
fn an_empty_vocabulary_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let tok = fixtures().join("sd1-tiny/tokenizer");
    copy_dir(&tok, dir.path());
    std::fs::write(dir.path().join("vocab.json"), "{}").unwrap();
    let e = err_text(ClipTokenizer::from_dir(dir.path()).map(|_| ()));
    assert!(e.contains("vocab.json") && e.contains("empty"), "{e}");
}

#[test]
fn resuming_past_max_train_steps_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let data = repo().join("tests/fixtures/train-data");
    let mut args = vec![
        "train",
        "--instance-data-dir",
        s(&data),
        "--instance-prompt",
        "sks toy",
        "--resolution",
        "64",
        "--output-dir",
        s(&out),
        "--save-steps",
        "2",
        "--max-train-steps",
        "2",
    ];
    expect_success(&lora(&args));
    args.truncate(args.len() - 1);
    args.extend(["1", "--resume", "latest"]);
    expect_failure(
        &lora(&args),
        &[
            "step 2",
            "beyond --max-train-steps 1",
            "raise --max-train-steps",
        ],
    );
}

/// CRC-32 (IEEE) as PNG chunks use it.
fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

#[test]
fn a_png_declaring_a_huge_size_is_refused_before_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let img = image::RgbImage::from_pixel(64, 64, image::Rgb([200, 10, 10]));
    let p = data.join("huge.png");
    img.save(&p).unwrap();
    let mut b = std::fs::read(&p).unwrap();
    assert_eq!(&b[12..16], b"IHDR");
    b[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    b[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    let crc = crc32(&b[12..29]);
    b[29..33].copy_from_slice(&crc.to_be_bytes());
    std::fs::write(&p, &b).unwrap();
    let o = lora(&[
        "train",
        "--instance-data-dir",
        s(&data),
        "--instance-prompt",
        "x",
        "--resolution",
        "64",
        "--output-dir",
        s(&dir.path().join("out")),
    ]);
    expect_failure(&o, &["huge.png", "100000x100000"]);
}

/// Every file under `dir`, recursively.
fn all_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            all_files(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[test]
fn written_files_hold_no_local_paths() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("photos");
    copy_dir(&repo().join("tests/fixtures/train-data"), &data);
    let model = dir.path().join("my-model");
    copy_dir(&repo().join("assets/tiny-sd"), &model);
    let out = dir.path().join("run");
    expect_success(&lora(&[
        "train",
        "--model",
        s(&model),
        "--instance-data-dir",
        s(&data),
        "--instance-prompt",
        "sks toy",
        "--resolution",
        "64",
        "--output-dir",
        s(&out),
        "--save-steps",
        "2",
        "--max-train-steps",
        "2",
    ]));
    let lora_file = out.join("lora.safetensors");
    for to in ["kohya", "diffusers", "peft", "ours"] {
        let conv = out.join(format!("converted-{to}.safetensors"));
        expect_success(&lora(&[
            "convert",
            s(&lora_file),
            "--to",
            to,
            "--out",
            s(&conv),
            "--model",
            s(&model),
        ]));
    }
    let mut files = vec![];
    all_files(&out, &mut files);
    assert!(files.len() >= 8, "{files:?}");
    let root = dir.path().canonicalize().unwrap();
    let needles = [
        dir.path().display().to_string(),
        root.display().to_string(),
        repo().display().to_string(),
    ];
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        for n in &needles {
            assert!(
                !text.contains(n.as_str()),
                "{} contains the path {n}",
                f.display()
            );
        }
    }
    let set = lora_diffusion::formats::read(&lora_file).unwrap();
    assert_eq!(set.metadata["base_model"], "my-model");
}

#[test]
fn configs_with_absurd_sizes_are_refused_before_building() {
    use lora_diffusion::models::clip::ClipTextConfig;
    use lora_diffusion::models::unet::UNet2DConditionConfig;
    use lora_diffusion::models::vae::AutoencoderKLConfig;
    let dir = tempfile::tempdir().unwrap();
    let edit = |component: &str, key: &str| {
        let src = fixtures().join(format!("sd1-tiny/{component}/config.json"));
        let mut v = read_json(&src);
        v[key] = serde_json::json!(1_000_000_000u64);
        let p = dir.path().join(format!("{component}.json"));
        std::fs::write(&p, v.to_string()).unwrap();
        p
    };
    let e = err_text(UNet2DConditionConfig::from_file(edit(
        "unet",
        "layers_per_block",
    )));
    assert!(
        e.contains("layers_per_block") && e.contains("1000000000"),
        "{e}"
    );
    let e = err_text(ClipTextConfig::from_file(edit(
        "text_encoder",
        "num_hidden_layers",
    )));
    assert!(
        e.contains("num_hidden_layers") && e.contains("maximum"),
        "{e}"
    );
    let e = err_text(AutoencoderKLConfig::from_file(edit(
        "vae",
        "layers_per_block",
    )));
    assert!(
        e.contains("layers_per_block") && e.contains("maximum"),
        "{e}"
    );
}

#[test]
fn scheduler_configs_with_impossible_betas_are_refused() {
    use lora_diffusion::schedulers::SchedulerConfig;
    for text in [
        r#"{"beta_start": 0.02, "beta_end": 0.001}"#,
        r#"{"beta_start": 0.0001, "beta_end": 1.5}"#,
    ] {
        let e = err_text(SchedulerConfig::from_json_str(text));
        assert!(e.contains("beta_start") && e.contains("beta_end"), "{e}");
    }
    assert!(
        SchedulerConfig::from_json_str(r#"{"beta_start": 0.00085, "beta_end": 0.012}"#).is_ok()
    );
}

#[test]
fn a_non_finite_model_weight_is_named_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    copy_dir(&repo().join("assets/tiny-sd"), &model);
    let f = model.join("unet/diffusion_pytorch_model.safetensors");
    let mut t: BTreeMap<String, Tensor> = load_tensors(&f).into_iter().collect();
    let key = "conv_in.weight".to_string();
    let w = &t[&key];
    let mut v = w
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    v[3] = f32::NAN;
    let bad = Tensor::from_vec(v, w.dims(), &Device::Cpu)
        .unwrap()
        .to_dtype(w.dtype())
        .unwrap();
    t.insert(key, bad);
    let out = lora_diffusion::tensor_file::out_tensors(&t).unwrap();
    lora_diffusion::tensor_file::write(&f, out, &BTreeMap::new(), true).unwrap();
    let png = dir.path().join("x.png");
    let o = lora(&[
        "generate",
        "--model",
        s(&model),
        "--prompt",
        "x",
        "--steps",
        "1",
        "--out",
        s(&png),
    ]);
    expect_failure(
        &o,
        &[
            "conv_in.weight",
            "non-finite",
            "diffusion_pytorch_model.safetensors",
        ],
    );
    assert!(!png.exists());
}

#[test]
fn convert_refuses_f16_overflow_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(5);
    let down = rng.randn((4, 32), &Device::Cpu).unwrap();
    let up = (rng.randn((32, 4), &Device::Cpu).unwrap() * 1e6).unwrap();
    let src = dir.path().join("big.safetensors");
    formats::write(
        &one_layer(down, up),
        &src,
        Format::Ours,
        &WriteOptions::default(),
    )
    .unwrap();
    let out = dir.path().join("big-f16.safetensors");
    let args = [
        "convert",
        s(&src),
        "--to",
        "kohya",
        "--dtype",
        "f16",
        "--out",
        s(&out),
    ];
    expect_failure(&lora(&args), &["overflow", "F16", "--allow-nonfinite"]);
    assert!(!out.exists());
    let mut allowed = args.to_vec();
    allowed.push("--allow-nonfinite");
    expect_success(&lora(&allowed));
    assert!(out.exists());
}
