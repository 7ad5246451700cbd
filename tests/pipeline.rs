//! The whole text-to-image pipeline against diffusers' StableDiffusionPipeline from fixed latents.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixture_params, fixtures, max_abs_diff, png_levels};
use lora_diffusion::hub::ModelSource;
use lora_diffusion::pipeline::{GenerateParams, StableDiffusion};

fn run(model: &str, outputs: &str, dtype: DType) -> (Tensor, Tensor, Tensor) {
    let src = ModelSource::Local(fixtures().join(model));
    let sd = StableDiffusion::load(&src, dtype, &Device::Cpu).unwrap();
    let out = common::outputs(outputs);
    let params = fixture_params(outputs);
    let mut steps = 0;
    let img = sd.generate(&params, &mut |_, _| steps += 1).unwrap();
    assert_eq!(steps, params.steps);
    (
        img,
        out["pipeline.image"].clone(),
        out["pipeline.image_u8"].clone(),
    )
}

fn check(model: &str, outputs: &str) {
    let (img, want, want_u8) = run(model, outputs, DType::F32);
    let d = max_abs_diff(&img, &want);
    let levels = png_levels(&img, &want_u8);
    let theirs: Vec<f32> = want_u8.flatten_all().unwrap().to_vec1().unwrap();
    let spread =
        theirs.iter().fold(0f32, |m, v| m.max(*v)) - theirs.iter().fold(255f32, |m, v| m.min(*v));
    eprintln!("{model}: image max abs {d:.2e}, PNG max diff {levels} levels of 255 (pixel range {spread})");
    assert!(d < 1e-4, "{model}: image differs by {d}");
    assert!(levels <= 1.0, "{model}: PNG differs by {levels} levels");
    // The image is not flat: the comparison means something.
    assert!(spread > 20.0, "{model}: degenerate image");
}

#[test]
fn sd1_pipeline_matches_diffusers() {
    check("sd1-tiny", "sd1");
}

#[test]
fn sd2_pipeline_matches_diffusers() {
    check("sd2-tiny", "sd2");
}

#[test]
fn f16_pipeline_is_close_to_f32() {
    let (a, _, _) = run("sd1-tiny", "sd1", DType::F32);
    let (b, _, _) = run("sd1-tiny", "sd1", DType::F16);
    let d = max_abs_diff(&a, &b);
    eprintln!("sd1-tiny f16 vs f32 image: max abs {d:.2e}");
    assert!(d < 2e-2, "f16 image differs by {d}");
}

#[test]
fn every_scheduler_runs_and_seeds_reproduce() {
    let src = ModelSource::Local(fixtures().join("sd1-tiny"));
    let sd = StableDiffusion::load(&src, DType::F32, &Device::Cpu).unwrap();
    for name in ["ddim", "euler", "euler-a", "dpm++2m", "ddpm"] {
        let p = GenerateParams {
            prompt: "a cat".into(),
            steps: 3,
            scheduler: name.parse().unwrap(),
            seed: 7,
            ..Default::default()
        };
        let a = sd.generate(&p, &mut |_, _| {}).unwrap();
        let b = sd.generate(&p, &mut |_, _| {}).unwrap();
        assert_eq!(a.dims(), &[1, 3, 16, 16]);
        assert_eq!(max_abs_diff(&a, &b), 0.0, "{name} not reproducible");
        let c = sd
            .generate(
                &GenerateParams {
                    seed: 8,
                    ..p.clone()
                },
                &mut |_, _| {},
            )
            .unwrap();
        assert!(max_abs_diff(&a, &c) > 1e-3, "{name}: seed has no effect");
    }
}
