//! Turning the image folders into training batches: the data order (a fresh permutation per
//! epoch), crops / flips from the data RNG, VAE latents (cached once with `--cache-latents`, or
//! encoded per step) sampled with the noise RNG, and text embeddings (cached per caption unless
//! the text encoder is trained).

use super::checkpoint::DataOrder;
use super::data::{crop_origin, crop_tensor, TrainImage};
use crate::models::clip::ClipTextModel;
use crate::models::vae::AutoencoderKL;
use crate::pipeline::StableDiffusion;
use crate::rng::Rng;
use crate::tokenizer::ClipTokenizer;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;

/// How images become latents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Augment {
    /// Training resolution.
    pub resolution: usize,
    /// Center crop instead of a random crop.
    pub center_crop: bool,
    /// Random horizontal flips.
    pub random_flip: bool,
}

/// A cached latent distribution (mean and standard deviation, `[1, C, h, w]`).
#[derive(Debug, Clone)]
struct CachedLatent {
    mean: Tensor,
    std: Tensor,
}

/// One image set (instance or class) with its optional latent cache: per image, the
/// unflipped and (with random flips) the flipped distribution.
pub struct ImageSet {
    images: Vec<TrainImage>,
    cache: Option<Vec<[Option<CachedLatent>; 2]>>,
}

impl ImageSet {
    /// An image set without a cache.
    pub fn new(images: Vec<TrainImage>) -> Self {
        Self {
            images,
            cache: None,
        }
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.images.len()
    }

    /// Whether there is no image.
    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// The images.
    pub fn images(&self) -> &[TrainImage] {
        &self.images
    }

    /// Encodes every image once (crops drawn from `rng`, which should be seeded on its own so
    /// that a resumed run rebuilds the same cache).
    pub fn build_cache(
        &mut self,
        vae: &AutoencoderKL,
        vae_dtype: DType,
        aug: Augment,
        rng: &mut Rng,
        device: &Device,
    ) -> anyhow::Result<()> {
        let mut cache = Vec::with_capacity(self.images.len());
        for im in &self.images {
            let (w, h) = (im.image.width() as usize, im.image.height() as usize);
            let origin = crop_origin(w, h, aug.resolution, aug.center_crop, rng);
            let mut pair: [Option<CachedLatent>; 2] = [None, None];
            let flips: &[bool] = if aug.random_flip {
                &[false, true]
            } else {
                &[false]
            };
            for &flip in flips {
                let px = crop_tensor(&im.image, origin, aug.resolution, flip, device)?;
                let dist = vae.encode(&px.unsqueeze(0)?.to_dtype(vae_dtype)?)?;
                pair[flip as usize] = Some(CachedLatent {
                    mean: dist.mean.to_dtype(DType::F32)?.detach(),
                    std: dist.std()?.to_dtype(DType::F32)?.detach(),
                });
            }
            cache.push(pair);
        }
        self.cache = Some(cache);
        Ok(())
    }
}

/// Advances `order` by one item, starting a new permutation of `n` items from `rng` when the
/// current one is used up; returns the item index.
pub fn next_item(order: &mut DataOrder, n: usize, rng: &mut Rng) -> usize {
    if order.cursor >= order.perm.len() || order.perm.len() != n {
        let mut perm: Vec<usize> = (0..n).collect();
        // Fisher–Yates with our RNG.
        for i in (1..n).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            perm.swap(i, j);
        }
        order.perm = perm;
        order.cursor = 0;
        order.epoch += 1;
    }
    let i = order.perm[order.cursor];
    order.cursor += 1;
    i
}

/// Scaled latents `[B, C, h, w]` for images `idx` of `set`: the distribution (cached, or
/// encoded now after a crop / flip drawn from `data_rng`) sampled with noise from `noise_rng`,
/// then `(z − shift) · scaling_factor`.
#[allow(clippy::too_many_arguments)]
pub fn latents_for(
    set: &ImageSet,
    idx: &[usize],
    vae: &AutoencoderKL,
    vae_dtype: DType,
    aug: Augment,
    data_rng: &mut Rng,
    noise_rng: &mut Rng,
    device: &Device,
) -> anyhow::Result<Tensor> {
    let mut means = Vec::with_capacity(idx.len());
    let mut stds = Vec::with_capacity(idx.len());
    match &set.cache {
        Some(cache) => {
            for &i in idx {
                let flip = aug.random_flip && data_rng.below(2) == 1;
                let c = cache[i][flip as usize]
                    .as_ref()
                    .ok_or_else(|| anyhow::anyhow!("latent cache has no entry for image {i}"))?;
                means.push(c.mean.clone());
                stds.push(c.std.clone());
            }
        }
        None => {
            let mut pixels = Vec::with_capacity(idx.len());
            for &i in idx {
                let im = &set.images[i].image;
                let (w, h) = (im.width() as usize, im.height() as usize);
                let origin = crop_origin(w, h, aug.resolution, aug.center_crop, data_rng);
                let flip = aug.random_flip && data_rng.below(2) == 1;
                pixels.push(crop_tensor(im, origin, aug.resolution, flip, device)?);
            }
            let px = Tensor::stack(&pixels, 0)?.to_dtype(vae_dtype)?;
            let dist = vae.encode(&px)?;
            means.push(dist.mean.to_dtype(DType::F32)?.detach());
            stds.push(dist.std()?.to_dtype(DType::F32)?.detach());
        }
    }
    let mean = Tensor::cat(&means, 0)?;
    let std = Tensor::cat(&stds, 0)?;
    let eps = noise_rng.randn(mean.dims(), device)?;
    let z = (mean + (std * eps)?)?;
    Ok(vae.scale_latents(&z)?)
}

/// Text embeddings `[1, 77, D]` per caption, computed once (frozen text encoder).
#[derive(Default)]
pub struct EmbeddingCache {
    map: HashMap<String, Tensor>,
}

impl EmbeddingCache {
    /// The embedding of `caption`, computed on first use (an error once the text encoder
    /// was released and `caption` was not cached before).
    pub fn get(&mut self, caption: &str, sd: &StableDiffusion) -> anyhow::Result<Tensor> {
        if let Some(t) = self.map.get(caption) {
            return Ok(t.clone());
        }
        let te = sd.text_encoder()?;
        let t = encode_captions(&[caption], &sd.tokenizer, te, &sd.device)?.detach();
        self.map.insert(caption.to_string(), t.clone());
        Ok(t)
    }

    /// Computes the embedding of every caption not cached yet.
    pub fn fill<'a>(
        &mut self,
        captions: impl IntoIterator<Item = &'a str>,
        sd: &StableDiffusion,
    ) -> anyhow::Result<()> {
        for c in captions {
            self.get(c, sd)?;
        }
        Ok(())
    }

    /// Number of cached captions.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Runs the text encoder on `captions` (differentiable when it carries trainable LoRA):
/// `[n, 77, D]`.
pub fn encode_captions(
    captions: &[&str],
    tok: &ClipTokenizer,
    te: &ClipTextModel,
    device: &Device,
) -> anyhow::Result<Tensor> {
    let ids = tok.encode_batch(captions)?;
    let len = ids.first().map_or(0, |v| v.len());
    let flat: Vec<u32> = ids.into_iter().flatten().collect();
    let ids = Tensor::from_vec(flat, (captions.len(), len), device)?;
    Ok(te.forward(&ids)?)
}
