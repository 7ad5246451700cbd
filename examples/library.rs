//! The crate as a library: load Stable Diffusion, inject a trainable LoRA into the UNet's
//! attention, train only the LoRA for a few steps, save it in the kohya format, load it back and
//! generate at two LoRA scales from one seed.
//!
//!     cargo run --release --example library [OUT_DIR]   (default target/example-library)
//!
//! It runs on the bundled model (a small Stable Diffusion trained on a world of flat shapes, see
//! assets/tiny-sd/README.md) and the demo's concept images.

use candle_core::{DType, Device, Tensor};
use lora_diffusion::formats::{self, Architecture, Format, WriteOptions};
use lora_diffusion::hub::{bundled_model_dir, ModelSource};
use lora_diffusion::lora::{inject_trainable, Component, LoraTargets};
use lora_diffusion::pipeline::image_io::{save_png, to_rgb8};
use lora_diffusion::pipeline::{GenerateParams, StableDiffusion};
use lora_diffusion::rng::Rng;
use lora_diffusion::schedulers::DdpmScheduler;
use lora_diffusion::train::data::{crop_tensor, load_folder};
use lora_diffusion::train::optim::{AdamW, AdamWParams};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Training steps of the hand-written loop.
pub const STEPS: usize = 20;

/// What one run produced.
pub struct Report {
    /// The loss of every training step.
    pub losses: Vec<f64>,
    /// The saved LoRA (kohya format).
    pub lora_file: PathBuf,
    /// Number of adapted layers in the reloaded file.
    pub loaded_layers: usize,
    /// The image [1, 3, H, W] in [0, 1] before any LoRA was attached.
    pub base: Tensor,
    /// The image at scale 0.
    pub scale0: Tensor,
    /// The image at scale 1.
    pub scale1: Tensor,
}

/// Largest absolute difference between two tensors of one shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> anyhow::Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// Whether two f32 tensors hold the same bits.
pub fn bit_equal(a: &Tensor, b: &Tensor) -> anyhow::Result<bool> {
    let bits = |t: &Tensor| -> anyhow::Result<Vec<u32>> {
        Ok(t.flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(f32::to_bits)
            .collect())
    };
    Ok(a.dims() == b.dims() && bits(a)? == bits(b)?)
}

/// Trains, saves, reloads and samples; writes `lora.safetensors` and two PNGs into `out`.
pub fn run(out: &Path) -> anyhow::Result<Report> {
    std::fs::create_dir_all(out)?;
    let dev = Device::Cpu;
    let source = ModelSource::Local(bundled_model_dir());
    let sd = StableDiffusion::load(&source, DType::F32, &dev)?;

    // The reference image: a fixed seed, no LoRA attached yet.
    let params = GenerateParams {
        prompt: "a photo of sks toy".into(),
        steps: 10,
        seed: 7,
        ..Default::default()
    };
    let base = sd.generate(&params, &mut |_, _| {})?;

    // Rank-4 LoRA (alpha 4) on to_q/to_k/to_v/to_out.0 of every UNet attention: `down` random,
    // `up` zero, so the model starts out unchanged. Only these variables are trained.
    let targets = LoraTargets::parse("attn")?;
    let lora = inject_trainable(
        &sd.unet,
        Component::Unet,
        &targets,
        4,
        4.0,
        0.0,
        &mut Rng::new(0),
        &dev,
    )?;
    let vars = lora.named_vars().to_vec();
    println!(
        "LoRA: {} layers, {} parameters",
        lora.handle().len(),
        lora.num_parameters()
    );
    let mut opt = AdamW::new(AdamWParams {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 1e-2,
    });
    opt.add_group(&vars, 1e-3)?;

    // The data: 64×64 images with captions, encoded once by the frozen VAE and text encoder.
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo-data");
    let folder = load_folder(&data, "a photo of sks toy", 64, false, "instance")?;
    let mut examples = vec![];
    for im in &folder.images {
        let pixels = crop_tensor(&im.image, (0, 0), 64, false, &dev)?.unsqueeze(0)?;
        examples.push((
            sd.encode_mean(&pixels)?,
            sd.encode_prompt(&im.caption, 1, 0)?,
        ));
    }

    // The denoising objective: noise a latent to a random timestep with the DDPM schedule and
    // regress the UNet's noise prediction onto the noise (MSE), then step AdamW on the LoRA.
    let ddpm = DdpmScheduler::new(&sd.scheduler_config)?;
    let num_timesteps = ddpm.alphas_cumprod().len() as u64;
    let mut rng = Rng::new(1);
    let mut losses = vec![];
    for step in 0..STEPS {
        let (latents, context) = &examples[step % examples.len()];
        let noise = rng.randn(latents.dims(), &dev)?;
        let t = rng.below(num_timesteps) as usize;
        let noisy = ddpm.add_noise(latents, &noise, &[t])?;
        let ts = Tensor::new(&[t as f32], &dev)?;
        let pred = sd.unet.forward(&noisy, &ts, context)?;
        let loss = (pred - &noise)?.sqr()?.mean_all()?;
        let grads = loss.backward()?;
        let mut by_name = BTreeMap::new();
        for (name, var) in &vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                by_name.insert(name.clone(), g.clone());
            }
        }
        opt.step(&by_name, 1.0)?;
        losses.push(loss.to_scalar::<f32>()? as f64);
        if (step + 1) % 5 == 0 {
            println!("step {:>3}: loss {:.4}", step + 1, losses[step]);
        }
    }

    // Save in the community (kohya / A1111) format, then detach the trained adapters.
    let lora_file = out.join("lora.safetensors");
    let opts = WriteOptions {
        force: true,
        ..Default::default()
    };
    formats::write(&lora.to_lora_set()?, &lora_file, Format::Kohya, &opts)?;
    lora.handle().remove();

    // Reload: kohya keys name layers with `_` for `.`, resolved against this model's layers.
    let arch = Architecture::from_model(&source)?;
    let set = formats::read_with(&lora_file, Some(&arch))?;
    println!(
        "saved and reloaded {} ({} layers)",
        lora_file.display(),
        set.layers.len()
    );

    // Attach the loaded LoRA as run-time adapters; the handles set its scale.
    let handles = sd.add_lora(&set, 1.0)?;
    let at_scale = |scale: f64| {
        handles.iter().for_each(|h| h.set_scale(scale));
        sd.generate(&params, &mut |_, _| {})
    };
    let scale0 = at_scale(0.0)?;
    let scale1 = at_scale(1.0)?;
    for (img, name) in [(&scale0, "scale-0.png"), (&scale1, "scale-1.png")] {
        save_png(&to_rgb8(img)?[0], &out.join(name), true)?;
    }
    Ok(Report {
        losses,
        lora_file,
        loaded_layers: set.layers.len(),
        base,
        scale0,
        scale1,
    })
}

#[allow(dead_code)] // unused where a test includes this file as a module
fn main() -> anyhow::Result<()> {
    let out = std::env::args()
        .nth(1)
        .unwrap_or("target/example-library".into());
    let r = run(Path::new(&out))?;
    let (diff, same) = (
        max_abs_diff(&r.scale1, &r.scale0)?,
        bit_equal(&r.scale0, &r.base)?,
    );
    println!("scale 1 vs scale 0: max abs difference {diff:.6}");
    println!("scale 0 equals the image before any LoRA (bit for bit): {same}");
    anyhow::ensure!(diff > 0.0 && same, "the LoRA scale did not act as expected");
    println!("wrote {out}/scale-0.png and {out}/scale-1.png");
    Ok(())
}
