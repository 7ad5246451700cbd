//! Where training batches come from: the instance images (and class images for prior
//! preservation), their augmentation, cached latents and cached prompt embeddings.

use super::batch::{encode_captions, latents_for, next_item, Augment, EmbeddingCache, ImageSet};
use super::state::RunState;
use crate::pipeline::StableDiffusion;
use candle_core::Tensor;

/// The image sets and caches a run draws its batches from.
pub struct BatchSource {
    /// The instance images.
    pub instance: ImageSet,
    /// The class images (prior preservation).
    pub class: Option<ImageSet>,
    /// Resize / crop / flip settings.
    pub aug: Augment,
    /// Prompt embeddings computed so far (frozen text encoder).
    pub emb: EmbeddingCache,
}

/// One micro-batch: latents (instance rows, then class rows) and their text conditioning.
pub struct Batch {
    /// Clean latents `[rows, 4, h, w]`.
    pub latents: Tensor,
    /// Text-encoder hidden states `[rows, 77, dim]`.
    pub context: Tensor,
}

impl BatchSource {
    /// Number of training items per epoch (instance images, or more class images).
    pub fn n_items(&self) -> usize {
        let nc = self.class.as_ref().map_or(0, |c| c.len());
        self.instance.len().max(nc)
    }

    /// The next micro-batch of `batch_size` items, advancing the data order and generators of
    /// `state`. With `train_text_encoder` the captions are encoded through the (adapted) text
    /// encoder every time; otherwise from the embedding cache.
    pub fn next(
        &mut self,
        state: &mut RunState,
        sd: &StableDiffusion,
        batch_size: usize,
        train_text_encoder: bool,
    ) -> anyhow::Result<Batch> {
        let n = self.n_items();
        let items: Vec<usize> = (0..batch_size)
            .map(|_| next_item(&mut state.order, n, &mut state.data_rng))
            .collect();
        let dev = sd.device.clone();
        let sets = std::iter::once(&self.instance).chain(self.class.as_ref());
        let (mut latents, mut captions) = (vec![], vec![]);
        for set in sets {
            let idx: Vec<usize> = items.iter().map(|i| i % set.len()).collect();
            latents.push(latents_for(
                set,
                &idx,
                &sd.vae,
                sd.dtype,
                self.aug,
                &mut state.data_rng,
                &mut state.noise_rng,
                &dev,
            )?);
            captions.extend(idx.iter().map(|&i| set.images()[i].caption.clone()));
        }
        let latents = Tensor::cat(&latents, 0)?;
        let context = if train_text_encoder {
            let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
            encode_captions(&refs, &sd.tokenizer, sd.text_encoder()?, &dev)?
        } else {
            let mut embs = Vec::with_capacity(captions.len());
            for c in &captions {
                embs.push(self.emb.get(c, sd)?);
            }
            Tensor::cat(&embs, 0)?
        };
        Ok(Batch { latents, context })
    }
}
