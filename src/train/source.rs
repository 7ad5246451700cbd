//! Where training batches come from: the instance images (and class images for prior
//! preservation), their augmentation, aspect-ratio buckets, cached latents and cached prompt
//! embeddings.

use super::batch::{
    encode_captions, latents_for, next_bucket_batch, next_item, Augment, EmbeddingCache, ImageSet,
};
use super::bucket::{BucketTable, Reso};
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
    /// The instance images' aspect-ratio buckets (`--enable-bucket`): every batch comes from one.
    pub buckets: Option<BucketTable>,
}

/// One micro-batch: latents (instance rows, then class rows) and their text conditioning.
pub struct Batch {
    /// Clean latents `[rows, 4, h, w]`.
    pub latents: Tensor,
    /// Text-encoder hidden states `[rows, 77, dim]`.
    pub context: Tensor,
    /// Number of instance rows (the first ones); the rest are class rows.
    pub n_instance: usize,
    /// The bucket `(width, height)` in pixels the batch was drawn from (with buckets).
    pub bucket: Option<Reso>,
    /// The instance images of the batch (indices into the instance set).
    pub items: Vec<usize>,
}

impl BatchSource {
    /// Number of training items per epoch (instance images, or more class images without
    /// buckets).
    pub fn n_items(&self) -> usize {
        if self.buckets.is_some() {
            return self.instance.len();
        }
        let nc = self.class.as_ref().map_or(0, |c| c.len());
        self.instance.len().max(nc)
    }

    /// The next micro-batch of `batch_size` items (with buckets: up to `batch_size` images of
    /// one bucket), advancing the data order and generators of `state`. With
    /// `train_text_encoder` the captions are encoded through the (adapted) text encoder every
    /// time; otherwise from the embedding cache.
    pub fn next(
        &mut self,
        state: &mut RunState,
        sd: &StableDiffusion,
        batch_size: usize,
        train_text_encoder: bool,
    ) -> anyhow::Result<Batch> {
        let (bucket, inst_idx, class_idx) = match &self.buckets {
            Some(table) => {
                let (bucket, items) =
                    next_bucket_batch(&mut state.order, table, batch_size, &mut state.data_rng)?;
                let class_idx: Option<Vec<usize>> = self.class.as_ref().map(|c| {
                    let n = c.len();
                    (0..items.len())
                        .map(|_| next_item(&mut state.class_order, n, &mut state.data_rng))
                        .collect()
                });
                (Some(bucket), items, class_idx)
            }
            None => {
                let n = self.n_items();
                let items: Vec<usize> = (0..batch_size)
                    .map(|_| next_item(&mut state.order, n, &mut state.data_rng))
                    .collect();
                let ni = self.instance.len();
                let inst = items.iter().map(|i| i % ni).collect();
                let class = self
                    .class
                    .as_ref()
                    .map(|c| items.iter().map(|i| i % c.len()).collect());
                (None, inst, class)
            }
        };
        let dev = sd.device.clone();
        let aug = self.aug;
        let mut parts = vec![(&mut self.instance, inst_idx.clone())];
        if let (Some(set), Some(idx)) = (self.class.as_mut(), class_idx) {
            parts.push((set, idx));
        }
        let (mut latents, mut captions) = (vec![], vec![]);
        for (set, idx) in parts {
            latents.push(latents_for(
                set,
                &idx,
                bucket,
                &sd.vae,
                sd.dtype,
                aug,
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
        Ok(Batch {
            latents,
            context,
            n_instance: inst_idx.len(),
            bucket,
            items: inst_idx,
        })
    }
}
