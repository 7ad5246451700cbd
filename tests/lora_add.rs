//! `lora_add --mode upl` as a user runs it: parity with diffusers' fuse_lora + save_pretrained,
//! a complete model folder, dtypes kept, and clear errors that leave nothing behind.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{
    copy_dir, expect_failure, expect_success, files, fixtures, hf_cache_model, lora_fixture,
    max_abs_diff_f64, names_in, run_lora_add, s,
};
use lora_diffusion::formats;
use lora_diffusion::hub::ModelSource;
use lora_diffusion::lora::combine::delta_mat;
use lora_diffusion::pipeline::StableDiffusion;
use lora_diffusion::tensor_file::TensorFile;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn model() -> PathBuf {
    fixtures().join("sd1-tiny")
}

/// `lora_add --mode upl --alpha ALPHA` from `p1` and `p2` into `out`, plus `extra`.
fn upl(p1: &Path, p2: &Path, alpha: &str, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["--alpha", alpha];
    args.extend_from_slice(extra);
    run_lora_add(p1, p2, "upl", out, &args)
}

const WEIGHTS: [(&str, &str); 2] = [
    ("unet", "unet/diffusion_pytorch_model.safetensors"),
    ("text_encoder", "text_encoder/model.safetensors"),
];

/// Compares an upl output with diffusers' fused-and-saved model (tests/fixtures/lora_add).
fn compare_with_diffusers(out: &Path) -> f64 {
    let expected = common::read_json(fixtures().join("lora_add/expected.json"));
    let fused = common::load_tensors(fixtures().join("lora_add/fused.safetensors"));
    let mut worst: f64 = 0.0;
    for (comp, rel) in WEIGHTS {
        let e = &expected["components"][comp];
        let ours = TensorFile::open(&out.join(rel)).unwrap();
        let input = TensorFile::open(&model().join(rel)).unwrap();
        let keys: Vec<&String> = e["keys"].as_object().unwrap().keys().collect();
        let our_keys: Vec<&String> = ours.entries.keys().collect();
        assert_eq!(
            our_keys, keys,
            "{comp}: key set differs from diffusers' save_pretrained"
        );
        for (k, meta) in e["keys"].as_object().unwrap() {
            let ent = &ours.entries[k];
            assert_eq!(
                format!("{:?}", ent.dtype),
                meta["dtype"].as_str().unwrap(),
                "{comp}.{k} dtype"
            );
            let shape: Vec<usize> = serde_json::from_value(meta["shape"].clone()).unwrap();
            assert_eq!(ent.shape, shape, "{comp}.{k} shape");
        }
        for k in e["unchanged"].as_array().unwrap() {
            let k = k.as_str().unwrap();
            assert_eq!(
                ours.bytes(k).unwrap(),
                input.bytes(k).unwrap(),
                "{comp}.{k} changed"
            );
        }
        let mut comp_worst: f64 = 0.0;
        for k in e["changed"].as_array().unwrap() {
            let k = k.as_str().unwrap();
            let want = &fused[&format!("{comp}.{k}")];
            let got = Tensor::from_vec(ours.to_f64(k).unwrap(), want.dims(), &Device::Cpu).unwrap();
            comp_worst = comp_worst.max(max_abs_diff_f64(&got, want));
        }
        eprintln!(
            "{comp}: {} fused tensors, max |ours − diffusers| = {comp_worst:.3e}; {} others byte-identical",
            e["changed"].as_array().unwrap().len(),
            e["unchanged"].as_array().unwrap().len()
        );
        worst = worst.max(comp_worst);
    }
    assert!(worst <= 1e-5, "upl differs from diffusers by {worst}");
    worst
}

#[test]
fn upl_equals_diffusers_fuse_lora_for_every_format() {
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "diffusers.safetensors",
        "kohya.safetensors",
        "peft.safetensors",
        "cloneofsimo.safetensors",
    ] {
        let out = dir.path().join(name.replace('.', "_"));
        let o = upl(&model(), &lora_fixture(name), "0.8", &out, &[]);
        assert!(o.status.success(), "{name}");
        eprintln!("LoRA {name}:");
        compare_with_diffusers(&out);
    }
}

#[test]
fn upl_writes_a_complete_model_that_loads() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fused");
    let lora = lora_fixture("kohya.safetensors");
    let alpha = 1.3;
    expect_success(&upl(&model(), &lora, "1.3", &out, &[]));
    assert_eq!(
        files(&out),
        files(&model()),
        "the output has other files than the input"
    );
    for f in files(&model()) {
        if !WEIGHTS.iter().any(|(_, rel)| *rel == f) {
            assert_eq!(
                std::fs::read(out.join(&f)).unwrap(),
                std::fs::read(model().join(&f)).unwrap(),
                "{f} not copied as is"
            );
        }
    }
    // Every targeted tensor is W + alpha·ΔW, every other one unchanged.
    let set = formats::read(&lora).unwrap();
    let mut worst: f64 = 0.0;
    let mut fused = 0;
    for (comp, rel) in WEIGHTS {
        let (ours, input) = (
            TensorFile::open(&out.join(rel)).unwrap(),
            TensorFile::open(&model().join(rel)).unwrap(),
        );
        assert_eq!(ours.metadata, input.metadata, "{comp}: metadata not kept");
        for (k, e) in &input.entries {
            let module = format!("{comp}.{}", k.trim_end_matches(".weight"));
            match set
                .layers
                .get(module.as_str())
                .filter(|_| k.ends_with(".weight"))
            {
                None => assert_eq!(
                    ours.bytes(k).unwrap(),
                    input.bytes(k).unwrap(),
                    "{comp}.{k} changed"
                ),
                Some(l) => {
                    fused += 1;
                    let d = delta_mat(l).unwrap();
                    let w = input.to_f64(k).unwrap();
                    let got = ours.to_f64(k).unwrap();
                    assert_eq!(ours.entries[k].dtype, e.dtype);
                    for ((g, w), d) in got.iter().zip(&w).zip(&d.data) {
                        worst = worst.max((g - (w + alpha * d)).abs());
                    }
                }
            }
        }
    }
    eprintln!("{fused} fused tensors: max |W' − (W + {alpha}·ΔW)| = {worst:.3e}");
    assert_eq!(fused, set.layers.len());
    assert!(worst < 1e-6);
    let sd = StableDiffusion::load(&ModelSource::Local(out.clone()), DType::F32, &Device::Cpu);
    assert!(sd.is_ok(), "the fused model does not load: {:?}", sd.err());
}

#[test]
fn upl_keeps_a_half_precision_model_in_half_precision() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("model16");
    copy_dir(&model(), &m);
    let unet = m.join("unet/diffusion_pytorch_model.safetensors");
    let tensors = candle_core::safetensors::load(&unet, &Device::Cpu).unwrap();
    let half: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, t)| (k, t.to_dtype(DType::F16).unwrap()))
        .collect();
    candle_core::safetensors::save(&half, &unet).unwrap();
    let out = dir.path().join("out16");
    expect_success(&upl(
        &m,
        &lora_fixture("diffusers.safetensors"),
        "0.5",
        &out,
        &[],
    ));
    let set = formats::read(&lora_fixture("diffusers.safetensors")).unwrap();
    let (ours, input) = (
        TensorFile::open(&out.join("unet/diffusion_pytorch_model.safetensors")).unwrap(),
        TensorFile::open(&unet).unwrap(),
    );
    let mut fused = 0;
    for (k, e) in &input.entries {
        assert_eq!(ours.entries[k].dtype, e.dtype, "{k}");
        match set
            .layers
            .get(format!("unet.{}", k.trim_end_matches(".weight")).as_str())
        {
            None => assert_eq!(ours.bytes(k).unwrap(), input.bytes(k).unwrap()),
            Some(l) => {
                fused += 1;
                let want: Vec<f64> = input
                    .to_f64(k)
                    .unwrap()
                    .iter()
                    .zip(&delta_mat(l).unwrap().data)
                    .map(|(w, d)| half::f16::from_f64(w + 0.5 * d).to_f64())
                    .collect();
                assert_eq!(ours.to_f64(k).unwrap(), want, "{k}: not f16(W + 0.5·ΔW)");
            }
        }
    }
    eprintln!(
        "f16 UNet: {fused} tensors fused and rounded once to f16, {} others byte-identical",
        input.entries.len() - fused
    );
    assert_eq!(fused, 88);
}

/// Expects exit code 1 with every needle in stderr, no panic, and `dir` left as `before`.
fn expect_error(o: &Output, needles: &[&str], dir: &Path, before: &[String]) {
    expect_failure(o, needles);
    assert_eq!(
        names_in(dir),
        before,
        "the output folder's parent changed (half-written output or temp left behind)"
    );
}

#[test]
fn upl_bad_input_gives_clear_errors_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("out");
    let lora = lora_fixture("kohya.safetensors");
    // P1 a folder that is not a model.
    std::fs::create_dir(d.join("empty")).unwrap();
    let before = vec!["empty".to_string()];
    expect_error(
        &upl(&d.join("empty"), &lora, "1", &out, &[]),
        &["not a diffusers model", "model_index.json"],
        d,
        &before,
    );
    // P1 a file (arguments swapped).
    expect_error(
        &upl(&lora, &model(), "1", &out, &[]),
        &["is a file", "--path_1"],
        d,
        &before,
    );
    // A corrupt (truncated) LoRA.
    let bytes = std::fs::read(&lora).unwrap();
    std::fs::write(d.join("cut.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let before = vec!["cut.safetensors".to_string(), "empty".to_string()];
    expect_error(
        &upl(&model(), &d.join("cut.safetensors"), "1", &out, &[]),
        &["cut.safetensors"],
        d,
        &before,
    );
    // A LoRA for another base model (SD 2 cross-attention width 48 on the SD 1 model's 32).
    let mut rng = lora_diffusion::rng::Rng::new(0);
    let mut set = lora_diffusion::lora::LoraSet::default();
    set.layers.insert(
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k".into(),
        lora_diffusion::lora::LoraWeights::new(
            rng.randn((4, 48), &Device::Cpu).unwrap(),
            rng.randn((32, 4), &Device::Cpu).unwrap(),
            4.0,
        )
        .unwrap(),
    );
    formats::write(
        &set,
        &d.join("sd2.safetensors"),
        formats::Format::Ours,
        &Default::default(),
    )
    .unwrap();
    let before = vec![
        "cut.safetensors".to_string(),
        "empty".to_string(),
        "sd2.safetensors".to_string(),
    ];
    expect_error(
        &upl(&model(), &d.join("sd2.safetensors"), "1", &out, &[]),
        &["attn2.to_k", "48", "32"],
        d,
        &before,
    );
    // The output exists: refused without --force and left untouched; replaced with --force.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let before = vec![
        "cut.safetensors".into(),
        "empty".into(),
        "out".into(),
        "sd2.safetensors".into(),
    ];
    expect_error(
        &upl(&model(), &lora, "1", &out, &[]),
        &["already exists", "--force"],
        d,
        &before,
    );
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "mine"
    );
    expect_success(&upl(&model(), &lora, "1", &out, &["--force"]));
    assert!(!out.join("keep.txt").exists() && out.join("model_index.json").is_file());
    let now: Vec<String> = files(d)
        .into_iter()
        .filter(|f| f.starts_with('.'))
        .collect();
    assert!(now.is_empty(), "temporary files left: {now:?}");
}

#[test]
fn upl_from_a_hugging_face_id_in_the_offline_cache() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    hf_cache_model(&hf, "test/tiny", "abc123", &model());
    let lora = lora_fixture("kohya.safetensors");
    let (hub_out, local_out) = (dir.path().join("from_hub"), dir.path().join("from_folder"));
    let o = Command::new(env!("CARGO_BIN_EXE_lora_add"))
        .env("HF_HOME", &hf)
        .env("HF_HUB_OFFLINE", "1")
        .args([
            "--path_1",
            "test/tiny",
            "--path_2",
            s(&lora),
            "--mode",
            "upl",
            "--alpha",
            "0.7",
        ])
        .args(["--output_path", s(&hub_out)])
        .output()
        .unwrap();
    expect_success(&o);
    expect_success(&upl(&model(), &lora, "0.7", &local_out, &[]));
    assert_eq!(files(&hub_out), files(&local_out));
    for f in files(&local_out) {
        assert_eq!(
            std::fs::read(hub_out.join(&f)).unwrap(),
            std::fs::read(local_out.join(&f)).unwrap(),
            "{f}"
        );
    }
}

#[test]
fn upl_leaves_out_stale_weight_copies_and_keeps_other_files() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("model");
    copy_dir(&model(), &m);
    std::fs::write(m.join("unet/diffusion_pytorch_model.bin"), b"stale pickle").unwrap();
    std::fs::write(
        m.join("unet/diffusion_pytorch_model.fp16.safetensors"),
        b"stale variant",
    )
    .unwrap();
    std::fs::write(m.join("v1-5-pruned.safetensors"), b"single-file checkpoint").unwrap();
    std::fs::write(m.join("README.md"), b"# my model").unwrap();
    std::fs::create_dir(m.join("vae_extra")).unwrap();
    std::fs::write(
        m.join("vae/diffusion_pytorch_model.bin"),
        b"untouched component",
    )
    .unwrap();
    let out = dir.path().join("out");
    let o = upl(&m, &lora_fixture("kohya.safetensors"), "1", &out, &[]);
    expect_success(&o);
    let stdout = String::from_utf8_lossy(&o.stdout);
    for f in [
        "unet/diffusion_pytorch_model.bin",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "v1-5-pruned.safetensors",
    ] {
        assert!(!out.join(f).exists(), "{f} copied");
        assert!(
            stdout.contains(&format!("not copied: {f}")),
            "{f} not reported: {stdout}"
        );
    }
    assert_eq!(std::fs::read(out.join("README.md")).unwrap(), b"# my model");
    assert_eq!(
        std::fs::read(out.join("vae/diffusion_pytorch_model.bin")).unwrap(),
        b"untouched component"
    );
}

#[test]
fn upl_fuses_convolution_layers() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = lora_diffusion::rng::Rng::new(3);
    let dev = Device::Cpu;
    let mut set = lora_diffusion::lora::LoraSet::default();
    let mut add = |name: &str, down: &[usize], up: &[usize], alpha: f64| {
        let layer = lora_diffusion::lora::LoraWeights::new(
            rng.randn(down, &dev).unwrap(),
            rng.randn(up, &dev).unwrap(),
            alpha,
        )
        .unwrap();
        set.layers.insert(name.to_string().into(), layer);
    };
    add(
        "unet.down_blocks.0.resnets.0.conv1",
        &[2, 32, 3, 3],
        &[32, 2, 1, 1],
        1.0,
    );
    add("unet.conv_in", &[3, 4, 3, 3], &[32, 3, 1, 1], 6.0);
    add(
        "unet.down_blocks.0.attentions.0.proj_in",
        &[4, 32, 1, 1],
        &[32, 4, 1, 1],
        2.0,
    );
    add(
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
        &[4, 32],
        &[256, 4],
        4.0,
    );
    let p = dir.path().join("locon.safetensors");
    formats::write(&set, &p, formats::Format::Kohya, &Default::default()).unwrap();
    let out = dir.path().join("out");
    expect_success(&upl(&model(), &p, "0.6", &out, &[]));
    let rel = "unet/diffusion_pytorch_model.safetensors";
    let (ours, input) = (
        TensorFile::open(&out.join(rel)).unwrap(),
        TensorFile::open(&model().join(rel)).unwrap(),
    );
    let mut worst: f64 = 0.0;
    for (name, l) in &set.layers {
        let key = format!("{}.weight", name.as_str().trim_start_matches("unet."));
        let d = delta_mat(l).unwrap();
        let (w, got) = (input.to_f64(&key).unwrap(), ours.to_f64(&key).unwrap());
        assert_eq!(ours.entries[&key].shape, input.entries[&key].shape);
        for ((g, w), d) in got.iter().zip(&w).zip(&d.data) {
            worst = worst.max((g - (w + 0.6 * d)).abs());
        }
    }
    eprintln!("conv / 1x1 conv / linear layers: max |W' − (W + 0.6·ΔW)| = {worst:.2e}");
    assert!(worst < 1e-5);
    let changed = input
        .entries
        .keys()
        .filter(|k| ours.bytes(k).unwrap() != input.bytes(k).unwrap())
        .count();
    assert_eq!(changed, 4);
}
