//! Turning the image folders into training batches: the data order (a fresh permutation per
//! epoch; with buckets, a shuffled list of one-bucket batches), crops / flips from the data RNG,
//! VAE latents (cached once with `--cache-latents`, or encoded per step) sampled with the noise
//! RNG, and text embeddings (cached per caption unless the text encoder is trained).

use super::bucket::{bucket_crop_origin, cover_size, BucketTable, Reso};
use super::checkpoint::DataOrder;
use super::data::{crop_origin, crop_rect_tensor, resize_to, TrainImage};
use crate::models::clip::ClipTextModel;
use crate::models::vae::AutoencoderKL;
use crate::pipeline::StableDiffusion;
use crate::rng::Rng;
use crate::tokenizer::ClipTokenizer;
use candle_core::{DType, Device, Tensor};
use image::RgbImage;
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

/// The unflipped and (with random flips) the flipped latent of one crop.
type LatentPair = [Option<CachedLatent>; 2];

/// The latent cache of one image set.
struct LatentCache {
    /// Per image, at its own crop size.
    own: Vec<LatentPair>,
    /// Per (image, bucket), filled on first use (sets fitted to each batch's bucket).
    fitted: HashMap<(usize, Reso), LatentPair>,
    /// Seed of the crops of `fitted` entries (one generator per entry, so the order of first
    /// use does not matter).
    seed: u64,
    /// The dtype the VAE runs in.
    vae_dtype: DType,
}

/// One image set (instance or class) with its optional latent cache. Images are cropped to
/// their own size (the resolution, or their bucket), or, for a set `fitted` to batches (class
/// images with buckets), resized and cropped to the bucket of each batch they join.
pub struct ImageSet {
    images: Vec<TrainImage>,
    fitted: bool,
    cache: Option<LatentCache>,
}

impl ImageSet {
    /// An image set without a cache, each image cropped to its own size.
    pub fn new(images: Vec<TrainImage>) -> Self {
        Self {
            images,
            fitted: false,
            cache: None,
        }
    }

    /// An image set fitted to the bucket of each batch it joins (class images with buckets).
    pub fn fitted(images: Vec<TrainImage>) -> Self {
        Self {
            images,
            fitted: true,
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

    /// The images, for changing their captions before training.
    pub fn images_mut(&mut self) -> &mut [TrainImage] {
        &mut self.images
    }

    /// The aspect-ratio buckets of the images (when loaded with buckets).
    pub fn bucket_table(&self) -> Option<BucketTable> {
        let buckets: Option<Vec<Reso>> = self
            .images
            .iter()
            .map(|im| im.bucket.map(|b| b.bucket))
            .collect();
        buckets.map(|b| BucketTable::from_assignments(&b))
    }

    /// Encodes every image once (crops drawn from `rng`, which should be seeded on its own so
    /// that a resumed run rebuilds the same cache). A fitted set only draws the seed of its
    /// entries here; each is encoded on first use.
    pub fn build_cache(
        &mut self,
        vae: &AutoencoderKL,
        vae_dtype: DType,
        aug: Augment,
        rng: &mut Rng,
        device: &Device,
    ) -> anyhow::Result<()> {
        let mut own = Vec::new();
        let seed = if self.fitted { rng.next_u64() } else { 0 };
        if !self.fitted {
            for i in 0..self.images.len() {
                let (img, crop) = self.source(i, None)?;
                let origin = crop_at(&img, crop, aug, rng);
                own.push(encode_pair(
                    &img, origin, crop, aug, vae, vae_dtype, device,
                )?);
            }
        }
        self.cache = Some(LatentCache {
            own,
            fitted: HashMap::new(),
            seed,
            vae_dtype,
        });
        Ok(())
    }

    /// The pixels image `i` is cropped from and the crop size: its own, or fitted to `bucket`.
    fn source(
        &self,
        i: usize,
        bucket: Option<Reso>,
    ) -> anyhow::Result<(std::borrow::Cow<'_, RgbImage>, Crop)> {
        let im = &self.images[i];
        let size = (im.image.width() as usize, im.image.height() as usize);
        match (self.fitted, bucket, im.bucket) {
            (true, Some(b), _) => Ok((
                std::borrow::Cow::Owned(resize_to(&im.image, cover_size(size, b))),
                Crop::Bucket(b),
            )),
            (true, None, _) => anyhow::bail!(
                "internal: image {} of a bucket-fitted set drawn without a bucket",
                im.path.display()
            ),
            (false, _, Some(c)) => Ok((
                std::borrow::Cow::Borrowed(&im.image),
                Crop::Bucket(c.bucket),
            )),
            (false, _, None) => Ok((std::borrow::Cow::Borrowed(&im.image), Crop::Square)),
        }
    }

    /// The cached latent pair of image `i` fitted to `bucket`, encoded on first use.
    fn fitted_entry(
        &mut self,
        i: usize,
        bucket: Reso,
        aug: Augment,
        vae: &AutoencoderKL,
        device: &Device,
    ) -> anyhow::Result<&LatentPair> {
        let Some(cache) = self.cache.as_ref() else {
            anyhow::bail!("internal: no latent cache");
        };
        if !cache.fitted.contains_key(&(i, bucket)) {
            let key = ((i as u64) << 40) ^ ((bucket.0 as u64) << 20) ^ bucket.1 as u64;
            let mut rng = Rng::new(cache.seed ^ key);
            let dtype = cache.vae_dtype;
            let (img, crop) = self.source(i, Some(bucket))?;
            let origin = crop_at(&img, crop, aug, &mut rng);
            let pair = encode_pair(&img, origin, crop, aug, vae, dtype, device)?;
            if let Some(c) = self.cache.as_mut() {
                c.fitted.insert((i, bucket), pair);
            }
        }
        self.cache
            .as_ref()
            .and_then(|c| c.fitted.get(&(i, bucket)))
            .ok_or_else(|| anyhow::anyhow!("internal: latent cache entry missing"))
    }
}

/// The crop an image takes: the square resolution or a bucket.
#[derive(Debug, Clone, Copy)]
enum Crop {
    Square,
    Bucket(Reso),
}

impl Crop {
    fn size(self, aug: Augment) -> Reso {
        match self {
            Crop::Square => (aug.resolution, aug.resolution),
            Crop::Bucket(b) => b,
        }
    }
}

/// Where the crop of `img` starts: torchvision's rule for square crops, sd-scripts' for buckets.
fn crop_at(img: &RgbImage, crop: Crop, aug: Augment, rng: &mut Rng) -> (usize, usize) {
    let size = (img.width() as usize, img.height() as usize);
    match crop {
        Crop::Square => crop_origin(size.0, size.1, aug.resolution, aug.center_crop, rng),
        Crop::Bucket(b) => bucket_crop_origin(size, b, aug.center_crop, rng),
    }
}

/// The latent distributions of one crop, unflipped and (with random flips) flipped.
fn encode_pair(
    img: &RgbImage,
    origin: (usize, usize),
    crop: Crop,
    aug: Augment,
    vae: &AutoencoderKL,
    vae_dtype: DType,
    device: &Device,
) -> anyhow::Result<LatentPair> {
    let mut pair: LatentPair = [None, None];
    let flips: &[bool] = if aug.random_flip {
        &[false, true]
    } else {
        &[false]
    };
    for &flip in flips {
        let px = crop_rect_tensor(img, origin, crop.size(aug), flip, device)?;
        let dist = vae.encode(&px.unsqueeze(0)?.to_dtype(vae_dtype)?)?;
        pair[flip as usize] = Some(CachedLatent {
            mean: dist.mean.to_dtype(DType::F32)?.detach(),
            std: dist.std()?.to_dtype(DType::F32)?.detach(),
        });
    }
    Ok(pair)
}

/// Advances `order` by one item, starting a new permutation of `n` items from `rng` when the
/// current one is used up; returns the item index.
pub fn next_item(order: &mut DataOrder, n: usize, rng: &mut Rng) -> usize {
    if order.cursor >= order.perm.len() || order.perm.len() != n {
        order.perm = permutation(n, rng);
        order.cursor = 0;
        order.epoch += 1;
    }
    let i = order.perm[order.cursor];
    order.cursor += 1;
    i
}

/// A permutation of `0..n` (Fisher–Yates with our RNG).
fn permutation(n: usize, rng: &mut Rng) -> Vec<usize> {
    let mut perm: Vec<usize> = (0..n).collect();
    shuffle(&mut perm, rng);
    perm
}

/// Shuffles `v` in place (Fisher–Yates with our RNG).
fn shuffle<T>(v: &mut [T], rng: &mut Rng) {
    for i in (1..v.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
}

/// The next batch of image indices, all from one bucket of `table`, as sd-scripts forms them:
/// per epoch each bucket's images are shuffled and cut into batches of `batch_size` (the last
/// of a bucket may be smaller), then the list of batches is shuffled. `order.perm` holds the
/// epoch's images batch after batch, `order.batches` the batch lengths. Returns the bucket
/// and the indices.
pub fn next_bucket_batch(
    order: &mut DataOrder,
    table: &BucketTable,
    batch_size: usize,
    rng: &mut Rng,
) -> anyhow::Result<(Reso, Vec<usize>)> {
    let n: usize = table.buckets.values().map(Vec::len).sum();
    let mut bucket_of = vec![None; n];
    for (b, imgs) in &table.buckets {
        for &i in imgs {
            if let Some(slot) = bucket_of.get_mut(i) {
                *slot = Some(*b);
            }
        }
    }
    // A saved order that does not fit the table (other images) starts a new epoch.
    let consistent = order.perm.len() == n
        && order.batches.iter().all(|&l| l > 0)
        && order.batches.iter().sum::<usize>() == n
        && order.perm.iter().all(|&i| i < n)
        && batch_ranges(&order.batches).all(|r| {
            let b = bucket_of[order.perm[r.start]];
            order.perm[r].iter().all(|&i| bucket_of[i] == b)
        });
    if order.cursor >= order.perm.len() || !consistent {
        let mut batches: Vec<Vec<usize>> = vec![];
        for imgs in table.buckets.values() {
            let mut imgs = imgs.clone();
            shuffle(&mut imgs, rng);
            batches.extend(imgs.chunks(batch_size.max(1)).map(<[usize]>::to_vec));
        }
        shuffle(&mut batches, rng);
        order.batches = batches.iter().map(Vec::len).collect();
        order.perm = batches.into_iter().flatten().collect();
        order.cursor = 0;
        order.epoch += 1;
    }
    let range = batch_ranges(&order.batches)
        .find(|r| r.start == order.cursor)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "the data order's position {} is not at a batch boundary",
                order.cursor
            )
        })?;
    let items = order.perm[range.clone()].to_vec();
    order.cursor = range.end;
    let bucket =
        bucket_of[items[0]].ok_or_else(|| anyhow::anyhow!("image {} is in no bucket", items[0]))?;
    Ok((bucket, items))
}

/// The index ranges of consecutive non-empty batches of lengths `lens`.
fn batch_ranges(lens: &[usize]) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    lens.iter().scan(0, |start, &l| {
        let r = *start..*start + l;
        *start += l;
        Some(r)
    })
}

/// Scaled latents `[B, C, h, w]` for images `idx` of `set` (fitted to `bucket` for a fitted
/// set): the distribution (cached, or encoded now after a crop / flip drawn from `data_rng`)
/// sampled with noise from `noise_rng`, then `(z − shift) · scaling_factor`.
#[allow(clippy::too_many_arguments)]
pub fn latents_for(
    set: &mut ImageSet,
    idx: &[usize],
    bucket: Option<Reso>,
    vae: &AutoencoderKL,
    vae_dtype: DType,
    aug: Augment,
    data_rng: &mut Rng,
    noise_rng: &mut Rng,
    device: &Device,
) -> anyhow::Result<Tensor> {
    let mut means = Vec::with_capacity(idx.len());
    let mut stds = Vec::with_capacity(idx.len());
    if set.cache.is_some() {
        for &i in idx {
            let flip = aug.random_flip && data_rng.below(2) == 1;
            let pair = match (set.fitted, bucket) {
                (true, Some(b)) => set.fitted_entry(i, b, aug, vae, device)?,
                _ => set
                    .cache
                    .as_ref()
                    .and_then(|c| c.own.get(i))
                    .ok_or_else(|| anyhow::anyhow!("latent cache has no entry for image {i}"))?,
            };
            let c = pair[flip as usize]
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("latent cache has no entry for image {i}"))?;
            means.push(c.mean.clone());
            stds.push(c.std.clone());
        }
    } else {
        let mut pixels = Vec::with_capacity(idx.len());
        for &i in idx {
            let (img, crop) = set.source(i, bucket)?;
            let origin = crop_at(&img, crop, aug, data_rng);
            let flip = aug.random_flip && data_rng.below(2) == 1;
            pixels.push(crop_rect_tensor(
                &img,
                origin,
                crop.size(aug),
                flip,
                device,
            )?);
        }
        let px = Tensor::stack(&pixels, 0)?.to_dtype(vae_dtype)?;
        let dist = vae.encode(&px)?;
        means.push(dist.mean.to_dtype(DType::F32)?.detach());
        stds.push(dist.std()?.to_dtype(DType::F32)?.detach());
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
