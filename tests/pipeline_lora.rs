//! Generating with LoRAs: run-time adapters and fused weights both equal diffusers' pipeline
//! with `fuse_lora(lora_scale=0.7)`, from the same fixed latents.

use candle_core::{DType, Device, Tensor};
use lora_diffusion::hub::ModelSource;
use lora_diffusion::pipeline::lora::{read_loras, LoraSpec};
use lora_diffusion::pipeline::{GenerateParams, StableDiffusion};
use std::path::PathBuf;
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn params() -> GenerateParams {
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("sd1.pipeline.json")).unwrap(),
    )
    .unwrap();
    let out =
        candle_core::safetensors::load(fixtures().join("sd1.outputs.safetensors"), &Device::Cpu)
            .unwrap();
    GenerateParams {
        prompt: json["prompt"].as_str().unwrap().into(),
        negative_prompt: json["negative_prompt"].as_str().unwrap().into(),
        steps: json["steps"].as_u64().unwrap() as usize,
        guidance: json["guidance"].as_f64().unwrap(),
        scheduler: "ddim".parse().unwrap(),
        height: Some(16),
        width: Some(16),
        init_latents: Some(out["pipeline.latents"].clone()),
        ..Default::default()
    }
}

fn specs(list: &[(&str, f64)]) -> Vec<LoraSpec> {
    list.iter()
        .map(|(f, s)| LoraSpec {
            path: fixtures().join("lora_formats").join(f),
            scale: *s,
        })
        .collect()
}

fn expected() -> (Tensor, Tensor) {
    let t =
        candle_core::safetensors::load(fixtures().join("lora_pipeline.safetensors"), &Device::Cpu)
            .unwrap();
    (t["image"].clone(), t["image_u8"].clone())
}

fn levels(img: &Tensor, want_u8: &Tensor) -> f32 {
    let ours = lora_diffusion::pipeline::image_io::to_rgb8(img).unwrap();
    let theirs: Vec<f32> = want_u8.flatten_all().unwrap().to_vec1().unwrap();
    ours[0]
        .as_raw()
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (*a as f32 - b).abs())
        .fold(0., f32::max)
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
    sd.generate(&params(), &mut |_, _| {}).unwrap()
}

#[test]
fn adapters_and_fused_weights_match_diffusers() {
    let (want, want_u8) = expected();
    let base = generate(&[], false);
    let moved = max_abs(&base, &want);
    for (name, fuse) in [
        ("kohya.safetensors", false),
        ("diffusers.safetensors", true),
        ("peft.safetensors", false),
    ] {
        let img = generate(&[(name, 0.7)], fuse);
        let d = max_abs(&img, &want);
        let l = levels(&img, &want_u8);
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
    let d = max_abs(&img, &want);
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
    let lora = fixtures().join("lora_formats/kohya.safetensors");
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
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
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
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let g = image::open(&grid).unwrap().to_rgb8();
    assert_eq!(g.width(), 3 * 16 + 2 * 2);
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
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr).contains("bad.safetensors"));
}
