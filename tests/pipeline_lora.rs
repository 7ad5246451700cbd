//! Generating with LoRAs: run-time adapters and fused weights both equal diffusers' pipeline
//! with `fuse_lora(lora_scale=0.7)`, from the same fixed latents.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{
    expect_failure, expect_success, fixture_params, fixtures, lora_fixture, max_abs_diff,
    png_levels,
};
use lora_diffusion::hub::ModelSource;
use lora_diffusion::pipeline::lora::{read_loras, LoraSpec};
use lora_diffusion::pipeline::StableDiffusion;
use std::path::PathBuf;
use std::process::Command;

fn specs(list: &[(&str, f64)]) -> Vec<LoraSpec> {
    list.iter()
        .map(|(f, s)| LoraSpec {
            path: lora_fixture(f),
            scale: *s,
        })
        .collect()
}

fn expected() -> (Tensor, Tensor) {
    let t = common::load_tensors(fixtures().join("lora_pipeline.safetensors"));
    (t["image"].clone(), t["image_u8"].clone())
}

fn generate(list: &[(&str, f64)], fuse: bool) -> Tensor {
    let src = ModelSource::Local(fixtures().join("sd1-tiny"));
    let loras = read_loras(&src, &specs(list)).unwrap();
    let sd = if fuse {
        StableDiffusion::load_fused(&src, DType::F32, &Device::Cpu, &loras).unwrap()
    } else {
        let sd = StableDiffusion::load(&src, DType::F32, &Device::Cpu).unwrap();
        for (set, s) in &loras {
            sd.add_lora(set, *s).unwrap();
        }
        sd
    };
    sd.generate(&fixture_params("sd1"), &mut |_, _| {}).unwrap()
}

#[test]
fn adapters_and_fused_weights_match_diffusers() {
    let (want, want_u8) = expected();
    let base = generate(&[], false);
    let moved = max_abs_diff(&base, &want);
    for (name, fuse) in [
        ("kohya.safetensors", false),
        ("diffusers.safetensors", true),
        ("peft.safetensors", false),
    ] {
        let img = generate(&[(name, 0.7)], fuse);
        let d = max_abs_diff(&img, &want);
        let l = png_levels(&img, &want_u8);
        eprintln!("{name} (fuse={fuse}): max abs {d:.2e}, {l} levels; the LoRA moved the image by {moved:.3}");
        assert!(d < 1e-4, "{name}: {d}");
        assert!(l <= 1.0, "{name}: {l} levels");
    }
    assert!(
        moved > 0.05,
        "the LoRA barely changes the image ({moved}): the test would prove nothing"
    );
}

#[test]
fn two_loras_scales_add_up() {
    let (want, _) = expected();
    let img = generate(
        &[("kohya.safetensors", 0.35), ("diffusers.safetensors", 0.35)],
        false,
    );
    let d = max_abs_diff(&img, &want);
    eprintln!("0.35 + 0.35: max abs {d:.2e}");
    assert!(d < 1e-4, "{d}");
}

#[test]
fn lora_spec_parsing() {
    let s: LoraSpec = "a/b.safetensors:0.5".parse().unwrap();
    assert_eq!((s.path, s.scale), (PathBuf::from("a/b.safetensors"), 0.5));
    let s: LoraSpec = "a/b.safetensors".parse().unwrap();
    assert_eq!(s.scale, 1.0);
    assert!("x.safetensors:abc".parse::<LoraSpec>().is_err());
    assert!("x.safetensors:inf".parse::<LoraSpec>().is_err());
}

#[test]
fn cli_generate_with_lora_and_sweep() {
    let dir = tempfile::tempdir().unwrap();
    let exe = env!("CARGO_BIN_EXE_lora");
    let model = fixtures().join("sd1-tiny");
    let lora = lora_fixture("kohya.safetensors");
    let base_args = |extra: &[&str]| {
        let mut v: Vec<String> = [
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a red apple",
            "--steps",
            "2",
            "--seed",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let a = dir.path().join("adapter.png");
    let f = dir.path().join("fused.png");
    let l = format!("{}:0.8", lora.display());
    for (out, fuse) in [(&a, false), (&f, true)] {
        let mut args = vec!["generate".to_string()];
        args.extend(base_args(&["--lora", &l, "--out", out.to_str().unwrap()]));
        if fuse {
            args.push("--fuse".into());
        }
        let r = Command::new(exe).args(&args).output().unwrap();
        expect_success(&r);
    }
    let (ia, ib) = (
        image::open(&a).unwrap().to_rgb8(),
        image::open(&f).unwrap().to_rgb8(),
    );
    let worst = ia
        .as_raw()
        .iter()
        .zip(ib.as_raw())
        .map(|(x, y)| (*x as i32 - *y as i32).abs())
        .max()
        .unwrap();
    assert!(
        worst <= 1,
        "adapter and fused images differ by {worst} levels"
    );

    let grid = dir.path().join("sweep.png");
    let mut args = vec!["sweep".to_string()];
    args.extend(base_args(&[
        "--lora",
        lora.to_str().unwrap(),
        "--alphas",
        "0,0.5,1",
        "--out",
        grid.to_str().unwrap(),
    ]));
    let r = Command::new(exe).args(&args).output().unwrap();
    expect_success(&r);
    let g = image::open(&grid).unwrap().to_rgb8();
    assert_eq!(g.width(), 3 * 128 + 2 * 2); // 16-px tiles shown 8x
    let gif = std::fs::File::open(grid.with_extension("gif")).unwrap();
    use image::AnimationDecoder;
    let frames = image::codecs::gif::GifDecoder::new(std::io::BufReader::new(gif))
        .unwrap()
        .into_frames()
        .collect_frames()
        .unwrap();
    assert_eq!(frames.len(), 3);
    // Scale 0 and scale 1 frames differ: the sweep shows the LoRA's effect.
    assert_ne!(frames[0].buffer().as_raw(), frames[2].buffer().as_raw());

    // Bad LoRA: a clear error, exit 1.
    let bad = dir.path().join("bad.safetensors");
    std::fs::write(&bad, b"not a lora").unwrap();
    let mut args = vec!["generate".to_string()];
    args.extend(base_args(&[
        "--lora",
        bad.to_str().unwrap(),
        "--out",
        dir.path().join("x.png").to_str().unwrap(),
    ]));
    let r = Command::new(exe).args(&args).output().unwrap();
    expect_failure(&r, &["bad.safetensors"]);
}
