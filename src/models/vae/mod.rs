//! diffusers' `AutoencoderKL` (the Stable Diffusion VAE): encoder to a diagonal Gaussian over
//! latents, decoder back to images.
//!
//! Parameter paths equal the diffusers state-dict keys (`encoder.down_blocks.0.resnets.0.conv1`,
//! `encoder.mid_block.attentions.0.to_q`, `quant_conv`, `decoder.up_blocks.0.upsamplers.0.conv`,
//! ...). Checkpoints with the pre-0.14 attention names (`query`, `key`, `value`, `proj_attn`)
//! must be renamed by the loader before they reach this model.

mod coder;
mod config;

pub use coder::{Decoder, DownEncoderBlock2D, Encoder, UpDecoderBlock2D, VaeMidBlock};
pub use config::AutoencoderKLConfig;

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::models::layers::Conv2d;

/// diffusers' `DiagonalGaussianDistribution`: the latent distribution the encoder outputs.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    /// The mean `[B, latent, h, w]`.
    pub mean: Tensor,
    /// The log-variance, clamped to `[-30, 20]` as diffusers does.
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// Splits moments `[B, 2·latent, h, w]` into mean and (clamped) log-variance.
    pub fn from_moments(moments: &Tensor) -> Result<Self> {
        let c = moments.dim(1)?;
        if c % 2 != 0 {
            candle_core::bail!("VAE moments need an even channel count, got {c}");
        }
        let mean = moments.narrow(1, 0, c / 2)?;
        let logvar = moments.narrow(1, c / 2, c / 2)?.clamp(-30.0f64, 20.0f64)?;
        Ok(Self { mean, logvar })
    }

    /// The standard deviation `exp(logvar / 2)`.
    pub fn std(&self) -> Result<Tensor> {
        (&self.logvar * 0.5)?.exp()
    }

    /// The variance `exp(logvar)`.
    pub fn var(&self) -> Result<Tensor> {
        self.logvar.exp()
    }

    /// The mode (the mean).
    pub fn mode(&self) -> &Tensor {
        &self.mean
    }

    /// A sample `mean + std · noise` for standard normal `noise` of the mean's shape.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        if noise.dims() != self.mean.dims() {
            candle_core::bail!(
                "VAE sample: noise shape {:?} differs from the latent shape {:?}",
                noise.dims(),
                self.mean.dims()
            );
        }
        let noise = noise.to_dtype(self.mean.dtype())?;
        self.mean.add(&self.std()?.mul(&noise)?)
    }
}

/// diffusers' `AutoencoderKL`: `encoder` + `quant_conv`, `post_quant_conv` + `decoder`.
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    encoder: Option<Encoder>,
    decoder: Option<Decoder>,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    config: AutoencoderKLConfig,
}

impl AutoencoderKL {
    /// Loads the model from the root of a `vae/` checkpoint.
    pub fn new(vb: VarBuilder, cfg: &AutoencoderKLConfig) -> Result<Self> {
        if let Err(e) = cfg.validate() {
            candle_core::bail!("unsupported AutoencoderKL config: {e:#}");
        }
        let l = cfg.latent_channels;
        let encoder = Encoder::new(vb.pp("encoder"), cfg)?;
        let decoder = Decoder::new(vb.pp("decoder"), cfg)?;
        let quant_conv = if cfg.use_quant_conv {
            Some(Conv2d::new(
                vb.pp("quant_conv"),
                2 * l,
                2 * l,
                1,
                1,
                0,
                true,
            )?)
        } else {
            None
        };
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(Conv2d::new(vb.pp("post_quant_conv"), l, l, 1, 1, 0, true)?)
        } else {
            None
        };
        Ok(Self {
            encoder: Some(encoder),
            decoder: Some(decoder),
            quant_conv,
            post_quant_conv,
            config: cfg.clone(),
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &AutoencoderKLConfig {
        &self.config
    }

    /// The encoder (`None` once released).
    pub fn encoder(&self) -> Option<&Encoder> {
        self.encoder.as_ref()
    }

    /// The decoder (`None` once released).
    pub fn decoder(&self) -> Option<&Decoder> {
        self.decoder.as_ref()
    }

    /// Frees the encoder's weights (e.g. once training latents are cached); `encode` then fails.
    pub fn release_encoder(&mut self) {
        self.encoder = None;
        self.quant_conv = None;
    }

    /// Frees the decoder's weights (e.g. when training draws no samples); `decode` then fails.
    pub fn release_decoder(&mut self) {
        self.decoder = None;
        self.post_quant_conv = None;
    }

    /// Encodes images `x` `[B, in_channels, H, W]` (values in [-1, 1]) to the latent
    /// distribution `[B, latent, H/f, W/f]`.
    pub fn encode(&self, x: &Tensor) -> Result<DiagonalGaussian> {
        let (_, c, h, w) = x.dims4()?;
        if c != self.config.in_channels {
            candle_core::bail!(
                "VAE encode: expected {} image channels, got shape {:?}",
                self.config.in_channels,
                x.dims()
            );
        }
        if h == 0 || w == 0 {
            candle_core::bail!("VAE encode: empty image of shape {:?}", x.dims());
        }
        let Some(encoder) = &self.encoder else {
            candle_core::bail!("VAE encode: the encoder was released (latents were cached)");
        };
        let mut moments = encoder.forward(x)?;
        if let Some(q) = &self.quant_conv {
            moments = q.forward(&moments)?;
        }
        DiagonalGaussian::from_moments(&moments)
    }

    /// Decodes (unscaled) latents `z` `[B, latent, h, w]` to images `[B, out_channels, h·f, w·f]`.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = z.dims4()?;
        if c != self.config.latent_channels {
            candle_core::bail!(
                "VAE decode: expected {} latent channels, got shape {:?}",
                self.config.latent_channels,
                z.dims()
            );
        }
        if h == 0 || w == 0 {
            candle_core::bail!("VAE decode: empty latents of shape {:?}", z.dims());
        }
        let Some(decoder) = &self.decoder else {
            candle_core::bail!("VAE decode: the decoder was released");
        };
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(z)?,
            None => z.clone(),
        };
        decoder.forward(&z)
    }

    /// Latents as the UNet sees them: `(z - shift_factor) · scaling_factor`.
    pub fn scale_latents(&self, z: &Tensor) -> Result<Tensor> {
        let shift = self.config.shift_factor.unwrap_or(0.0);
        let s = self.config.scaling_factor;
        z.affine(s, -shift * s)
    }

    /// The inverse of [`scale_latents`](Self::scale_latents): `z / scaling_factor + shift_factor`.
    pub fn unscale_latents(&self, z: &Tensor) -> Result<Tensor> {
        let shift = self.config.shift_factor.unwrap_or(0.0);
        z.affine(1.0 / self.config.scaling_factor, shift)
    }
}
