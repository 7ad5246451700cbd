//! Text-to-image: the Stable Diffusion pipeline as diffusers' `StableDiffusionPipeline` runs it.

pub mod embeddings;
pub mod grid;
pub mod image_io;
mod load;
pub mod lora;

pub use crate::hub::ModelIndex;
pub use load::load_component_config;

use crate::hub::ModelSource;
use crate::models::clip::ClipTextModel;
use crate::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::vae::AutoencoderKL;
use crate::rng::Rng;
use crate::schedulers::{try_build_scheduler, SchedulerConfig, SchedulerKind};
use crate::tokenizer::ClipTokenizer;
use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;

/// A loaded Stable Diffusion model: tokenizer, text encoder, UNet, VAE and scheduler config.
pub struct StableDiffusion {
    /// The CLIP tokenizer.
    pub tokenizer: ClipTokenizer,
    /// The CLIP text encoder (`None` once released: see [`StableDiffusion::text_encoder`]).
    text_encoder: Option<ClipTextModel>,
    /// The denoising UNet.
    pub unet: UNet2DConditionModel,
    /// The UNet's config (unet/config.json).
    pub unet_config: UNet2DConditionConfig,
    /// The autoencoder.
    pub vae: AutoencoderKL,
    /// The scheduler configuration (scheduler/scheduler_config.json).
    pub scheduler_config: SchedulerConfig,
    /// The dtype the weights were loaded in.
    pub dtype: DType,
    /// The device the model runs on.
    pub device: Device,
    /// Where the model came from.
    pub source: ModelSource,
    /// Prompt embeddings `[1, 77, D]` by (prompt, clip skip), kept by
    /// [`cache_prompts`](StableDiffusion::cache_prompts).
    prompt_cache: HashMap<(String, usize), Tensor>,
}

/// What to generate; also the sampling flags of `lora generate` / `lora sweep`.
#[derive(Debug, Clone, clap::Args)]
pub struct GenerateParams {
    /// The prompt.
    #[arg(long)]
    pub prompt: String,
    /// The negative prompt (the unconditional branch of classifier-free guidance).
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// Number of denoising steps.
    #[arg(long, default_value_t = Self::STEPS)]
    pub steps: usize,
    /// Classifier-free guidance scale; guidance is off at 1.0 or below.
    #[arg(long, default_value_t = Self::GUIDANCE)]
    pub guidance: f64,
    /// The sampler (the command line names it by `--scheduler`, parsed with the model).
    #[arg(skip = SchedulerKind::Ddim)]
    pub scheduler: SchedulerKind,
    /// Seed of the initial latents and of stochastic samplers.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Image height in pixels (default: the UNet's sample_size times the VAE factor).
    #[arg(long)]
    pub height: Option<usize>,
    /// Image width in pixels (default: as for the height).
    #[arg(long)]
    pub width: Option<usize>,
    /// How many images.
    #[arg(skip = 1usize)]
    pub num_images: usize,
    /// Initial latents [num_images, C, H/f, W/f] used like diffusers' `latents=` argument.
    #[arg(skip)]
    pub init_latents: Option<Tensor>,
    /// Use the output of the layer `clip_skip` before the last (0: the last layer).
    #[arg(long, default_value_t = 0)]
    pub clip_skip: usize,
    /// DDIM's eta (0: deterministic).
    #[arg(long, default_value_t = 0.0)]
    pub eta: f64,
}

impl GenerateParams {
    /// Default number of denoising steps.
    pub const STEPS: usize = 30;
    /// Default classifier-free guidance scale.
    pub const GUIDANCE: f64 = 7.5;
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            steps: Self::STEPS,
            guidance: Self::GUIDANCE,
            scheduler: SchedulerKind::Ddim,
            seed: 0,
            height: None,
            width: None,
            num_images: 1,
            init_latents: None,
            clip_skip: 0,
            eta: 0.0,
        }
    }
}

impl StableDiffusion {
    /// Loads every component of a diffusers model in `dtype` on `device`.
    pub fn load(source: &ModelSource, dtype: DType, device: &Device) -> anyhow::Result<Self> {
        Self::load_fused(source, dtype, device, &[])
    }

    /// Loads a model with LoRAs fused into its UNet and text-encoder weights (W + scale·ΔW).
    pub fn load_fused(
        source: &ModelSource,
        dtype: DType,
        device: &Device,
        fuse: &[(crate::lora::LoraSet, f64)],
    ) -> anyhow::Result<Self> {
        if !matches!(source, ModelSource::SingleFile(_)) {
            let index = ModelIndex::read(source)?;
            index.check_supported(source)?;
        }
        let tokenizer = load::tokenizer(source)?;
        let text_encoder = load::text_encoder(source, dtype, device, fuse)?;
        let (unet, unet_config) = load::unet(source, dtype, device, fuse)?;
        let vae = load::vae(source, dtype, device)?;
        let scheduler_config = load::scheduler_config(source)?;
        Ok(Self {
            tokenizer,
            text_encoder: Some(text_encoder),
            prompt_cache: HashMap::new(),
            unet,
            unet_config,
            vae,
            scheduler_config,
            dtype,
            device: device.clone(),
            source: source.clone(),
        })
    }

    /// The VAE's spatial downsampling factor, 2^(len(block_out_channels) - 1).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.config().downsample_factor()
    }

    /// Default image (height, width): the UNet's sample_size times the VAE factor (64 when the
    /// config has none, as diffusers assumes).
    pub fn default_size(&self) -> (usize, usize) {
        let f = self.vae_scale_factor();
        let as_usize = |v: &serde_json::Value| v.as_u64().map(|x| x as usize);
        match &self.unet_config.sample_size {
            Some(serde_json::Value::Array(a)) if a.len() == 2 => (
                as_usize(&a[0]).unwrap_or(64) * f,
                as_usize(&a[1]).unwrap_or(64) * f,
            ),
            Some(v) => {
                let s = as_usize(v).unwrap_or(64) * f;
                (s, s)
            }
            None => (64 * f, 64 * f),
        }
    }

    /// The CLIP text encoder; an error once [`release_text_encoder`](Self::release_text_encoder)
    /// freed it.
    pub fn text_encoder(&self) -> anyhow::Result<&ClipTextModel> {
        self.text_encoder.as_ref().context(
            "the text encoder was released (training cached the prompt embeddings); \
             this needs it",
        )
    }

    /// The text encoder for changing its settings (`None` once released).
    pub fn text_encoder_mut(&mut self) -> Option<&mut ClipTextModel> {
        self.text_encoder.as_mut()
    }

    /// Frees the text encoder's weights (training with cached prompt embeddings).
    pub fn release_text_encoder(&mut self) {
        self.text_encoder = None;
    }

    /// Encodes `prompts` once and keeps their embeddings, so that generating from them no
    /// longer runs the text encoder (which may then be released).
    pub fn cache_prompts(&mut self, prompts: &[&str], clip_skip: usize) -> anyhow::Result<()> {
        for p in prompts {
            let e = self.encode_prompt(p, 1, clip_skip)?;
            self.prompt_cache.insert((p.to_string(), clip_skip), e);
        }
        Ok(())
    }

    /// Forgets the prompts kept by [`cache_prompts`](Self::cache_prompts) (after the token
    /// embeddings changed).
    pub fn clear_prompt_cache(&mut self) {
        self.prompt_cache.clear();
    }

    /// Text embeddings [n, 77, D] of `text`, repeated `n` times.
    pub fn encode_prompt(&self, text: &str, n: usize, clip_skip: usize) -> anyhow::Result<Tensor> {
        if let Some(e) = self.prompt_cache.get(&(text.to_string(), clip_skip)) {
            return Ok(e.repeat((n, 1, 1))?);
        }
        let ids = self.tokenizer.encode(text)?;
        let ids = Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?;
        let emb = self
            .text_encoder()?
            .forward_with_clip_skip(&ids, clip_skip)?;
        Ok(emb.repeat((n, 1, 1))?)
    }

    /// Checks an image size against the VAE factor and returns the latent size.
    pub fn latent_size(&self, height: usize, width: usize) -> anyhow::Result<(usize, usize)> {
        let f = self.vae_scale_factor();
        if height == 0 || width == 0 || !height.is_multiple_of(f) || !width.is_multiple_of(f) {
            bail!(
                "height and width must be positive multiples of the VAE factor {f} for this model; \
                 got {height}x{width}"
            );
        }
        Ok((height / f, width / f))
    }

    /// An error when `images` images of `height`×`width` cannot fit in the available memory:
    /// the VAE holds a few full-resolution maps of its widest channel count per image.
    pub fn check_activation_memory(
        &self,
        height: usize,
        width: usize,
        images: usize,
        what: &str,
    ) -> anyhow::Result<()> {
        let cfg = self.vae.config();
        let c0 = cfg.block_out_channels.first().copied().unwrap_or(128) as u64;
        let need = (images as u64)
            .saturating_mul(16 * c0)
            .saturating_mul(height as u64)
            .saturating_mul(width as u64);
        crate::sys::check_memory(need, &format!("{what} {height}x{width} x{images}"))
    }

    /// Runs the denoising loop and decodes: images [num_images, 3, H, W] in [0, 1] (f32).
    /// `progress` is called after each step with (step, total).
    pub fn generate(
        &self,
        p: &GenerateParams,
        progress: &mut dyn FnMut(usize, usize),
    ) -> anyhow::Result<Tensor> {
        self.decode(&self.denoise(p, progress)?)
    }

    /// The denoising loop of [`StableDiffusion::generate`]: the final latents
    /// [num_images, C, H/f, W/f] (f32), not yet decoded.
    pub fn denoise(
        &self,
        p: &GenerateParams,
        progress: &mut dyn FnMut(usize, usize),
    ) -> anyhow::Result<Tensor> {
        if p.steps == 0 {
            bail!("--steps must be at least 1");
        }
        if p.num_images == 0 {
            bail!("--num-images must be at least 1");
        }
        if !p.guidance.is_finite() || !p.eta.is_finite() || !(0.0..=1.0).contains(&p.eta) {
            bail!(
                "--guidance {} / --eta {}: guidance must be a finite number and eta in [0, 1]",
                p.guidance,
                p.eta
            );
        }
        let (dh, dw) = self.default_size();
        let (h, w) = (p.height.unwrap_or(dh), p.width.unwrap_or(dw));
        self.check_activation_memory(h, w, p.num_images, "generating")?;
        let (lh, lw) = self.latent_size(h, w)?;
        let n = p.num_images;
        let c = self.unet_config.in_channels;
        let mut rng = Rng::new(p.seed);

        let mut scheduler = try_build_scheduler(p.scheduler, &self.scheduler_config, p.eta)?;
        scheduler.set_timesteps(p.steps)?;
        let latents = match &p.init_latents {
            Some(l) => {
                let want = [n, c, lh, lw];
                if l.dims() != want {
                    bail!(
                        "--init-latents: tensor `latents` has shape {:?}, expected {want:?} \
                         (num_images, latent channels, height/{f}, width/{f})",
                        l.dims(),
                        f = self.vae_scale_factor()
                    );
                }
                l.to_dtype(DType::F32)?.to_device(&self.device)?
            }
            None => rng.randn((n, c, lh, lw), &self.device)?,
        };
        let mut latents = (latents * scheduler.init_noise_sigma())?;

        let cfg = p.guidance > 1.0;
        let cond = self.encode_prompt(&p.prompt, n, p.clip_skip)?;
        let context = if cfg {
            let uncond = self.encode_prompt(&p.negative_prompt, n, p.clip_skip)?;
            Tensor::cat(&[uncond, cond], 0)?
        } else {
            cond
        };
        let timesteps = scheduler.timesteps().to_vec();
        let total = timesteps.len();
        for (i, &t) in timesteps.iter().enumerate() {
            let input = if cfg {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let input = scheduler.scale_model_input(&input, t)?;
            let batch = input.dim(0)?;
            let ts = Tensor::full(t as f32, batch, &self.device)?;
            let out = self
                .unet
                .forward(&input.to_dtype(self.dtype)?, &ts, &context)?
                .to_dtype(DType::F32)?;
            let noise_pred = if cfg {
                let uncond = out.narrow(0, 0, n)?;
                let text = out.narrow(0, n, n)?;
                (&uncond + ((text - &uncond)? * p.guidance)?)?
            } else {
                out
            };
            let noise = if scheduler.needs_noise() {
                Some(rng.randn(latents.dims(), &self.device)?)
            } else {
                None
            };
            latents = scheduler.step(&noise_pred, t, &latents, noise.as_ref())?;
            // A NaN or infinity anywhere makes the f32 sum non-finite.
            let finite = latents
                .to_dtype(DType::F32)?
                .abs()?
                .sum_all()?
                .to_scalar::<f32>()?;
            if !finite.is_finite() {
                bail!(
                    "denoising step {} of {total} (timestep {t}) made the latents non-finite: \
                     check the model weights, LoRA scales and --guidance",
                    i + 1
                );
            }
            progress(i + 1, total);
        }
        Ok(latents)
    }

    /// Decodes latents to images in [0, 1]: vae.decode(latents / scaling_factor + shift).
    pub fn decode(&self, latents: &Tensor) -> anyhow::Result<Tensor> {
        decode_latents(&self.vae, self.dtype, latents)
    }

    /// The autoencoder alone, the rest of the model freed: what decoding the latents of
    /// [`StableDiffusion::denoise`] needs (the SD 1.5 UNet is 3.4 GB in f32, more than the
    /// VAE decoder's activations at 512 px).
    pub fn into_vae(self) -> AutoencoderKL {
        self.vae
    }

    /// Encodes images in [-1, 1] to scaled latents (the latent distribution's mean).
    pub fn encode_mean(&self, images: &Tensor) -> anyhow::Result<Tensor> {
        let cfg = self.vae.config();
        let dist = self.vae.encode(&images.to_dtype(self.dtype)?)?;
        let mut z = dist.mean.to_dtype(DType::F32)?;
        if let Some(shift) = cfg.shift_factor {
            z = (z - shift)?;
        }
        Ok((z * cfg.scaling_factor)?)
    }
}

/// Reads the tensor `latents` from a safetensors file (for `--init-latents`).
pub fn read_init_latents(path: &std::path::Path) -> anyhow::Result<Tensor> {
    let tensors = crate::tensor_file::TensorFile::open(path)
        .and_then(|f| f.load_all(&Device::Cpu))
        .with_context(|| format!("cannot read --init-latents file {}", path.display()))?;
    match tensors.get("latents") {
        Some(t) => {
            let what = format!("--init-latents file {} (tensor latents)", path.display());
            crate::tensor_file::check_finite(t, &what)?;
            Ok(t.clone())
        }
        None => {
            let mut names: Vec<&String> = tensors.keys().collect();
            names.sort();
            bail!(
                "--init-latents file {} has no tensor named `latents` (it has: {names:?})",
                path.display()
            )
        }
    }
}

/// Decodes latents with `vae` (weights in `dtype`) to images in [0, 1] (f32):
/// `vae.decode(latents / scaling_factor + shift)`.
pub fn decode_latents(
    vae: &AutoencoderKL,
    dtype: DType,
    latents: &Tensor,
) -> anyhow::Result<Tensor> {
    let cfg = vae.config();
    let mut z = (latents / cfg.scaling_factor)?;
    if let Some(shift) = cfg.shift_factor {
        z = (z + shift)?;
    }
    let img = vae.decode(&z.to_dtype(dtype)?)?.to_dtype(DType::F32)?;
    Ok(((img / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
}
