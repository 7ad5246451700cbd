//! Aspect-ratio bucketing with kohya sd-scripts' rules (`--enable-bucket`): a table of
//! resolutions of about `resolution²` pixels, each image assigned to the bucket of the nearest
//! aspect ratio, resized to cover it and cropped to it. Every batch is drawn from one bucket.
//!
//! - [`make_bucket_resolutions`]: from the square side `⌊√area / steps⌋·steps`, then for each width
//!   from `min` to `max` in `steps`, the height `min(max, ⌊(area / width) / steps⌋·steps)` (kept when
//!   at least `min`) and its transpose; sorted.
//! - [`Bucketer::select`]: an image whose size is a bucket keeps it; otherwise the bucket whose
//!   `w / h` is nearest to the image's (the first on a tie). The image is scaled so that it covers
//!   the bucket (the side whose ratio is tighter matches) and rounded (`⌊x + 0.5⌋`). With
//!   `--bucket-no-upscale` the bucket comes from the image itself: an image above the area is
//!   scaled down to it (width or height rounded to the steps, whichever keeps the ratio better),
//!   then each side is floored to the steps.
//! - The crop to the bucket: centred (`⌊trim / 2⌋`) or drawn uniformly, width first.

use crate::rng::Rng;
use anyhow::bail;
use std::collections::BTreeMap;

/// A bucket (or image) size as `(width, height)` in pixels.
pub type Reso = (usize, usize);

/// The bucketing options after kohya's adjustment of min / max to multiples of the steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketSpec {
    /// The training resolution: buckets hold about `resolution²` pixels.
    pub resolution: usize,
    /// The smallest bucket side (ignored with `no_upscale`).
    pub min_reso: usize,
    /// The largest bucket side (ignored with `no_upscale`).
    pub max_reso: usize,
    /// Bucket sides are multiples of this.
    pub steps: usize,
    /// Buckets from the image sizes, never upscaling (`--bucket-no-upscale`).
    pub no_upscale: bool,
}

impl BucketSpec {
    /// Checks the options and rounds `min_reso` down and `max_reso` up to multiples of `steps`
    /// (as sd-scripts does); returns the spec and one note per adjustment. Errors name the option.
    pub fn new(
        resolution: usize,
        min_reso: usize,
        max_reso: usize,
        steps: usize,
        no_upscale: bool,
    ) -> anyhow::Result<(Self, Vec<String>)> {
        if steps == 0 || !steps.is_multiple_of(8) {
            bail!(
                "--bucket-reso-steps {steps}: must be a positive multiple of 8 (the VAE factor; \
                 64 for SD 1.x/2.x as in sd-scripts)"
            );
        }
        let mut notes = vec![];
        let mut lo = min_reso;
        if !lo.is_multiple_of(steps) {
            lo -= lo % steps;
            notes.push(format!(
                "--min-bucket-reso {min_reso} rounded down to {lo}, a multiple of --bucket-reso-steps {steps}"
            ));
        }
        let mut hi = max_reso;
        if !hi.is_multiple_of(steps) {
            hi += steps - hi % steps;
            notes.push(format!(
                "--max-bucket-reso {max_reso} rounded up to {hi}, a multiple of --bucket-reso-steps {steps}"
            ));
        }
        if lo == 0 {
            bail!("--min-bucket-reso {min_reso}: must be at least --bucket-reso-steps {steps}");
        }
        if lo > resolution {
            bail!("--min-bucket-reso {lo} must not exceed --resolution {resolution}");
        }
        if hi < resolution {
            bail!("--max-bucket-reso {hi} must not be below --resolution {resolution}");
        }
        let spec = Self {
            resolution,
            min_reso: lo,
            max_reso: hi,
            steps,
            no_upscale,
        };
        Ok((spec, notes))
    }

    /// The pixel area buckets aim at (`resolution²`).
    pub fn max_area(&self) -> usize {
        self.resolution * self.resolution
    }
}

/// sd-scripts' `make_bucket_resolutions((side, side), min, max, steps)`: the bucket table for a
/// `side × side` area, sorted by (width, height).
pub fn make_bucket_resolutions(side: usize, min: usize, max: usize, steps: usize) -> Vec<Reso> {
    let area = side * side;
    let mut set = std::collections::BTreeSet::new();
    let square = ((area as f64).sqrt() / steps as f64).floor() as usize * steps;
    set.insert((square, square));
    let mut w = min;
    while w <= max {
        let h = max.min((area / w) / steps * steps);
        if h >= min {
            set.insert((w, h));
            set.insert((h, w));
        }
        w += steps;
    }
    set.into_iter().collect()
}

/// Where one image goes: its bucket, the size it is resized to before the crop, and the
/// aspect-ratio error `bucket w/h − image w/h`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketChoice {
    /// The bucket (crop size).
    pub bucket: Reso,
    /// The size the image is resized to (covers the bucket).
    pub resized: Reso,
    /// Bucket aspect ratio minus image aspect ratio.
    pub ar_error: f64,
}

/// Assigns images to buckets (sd-scripts' `BucketManager.select_bucket`).
#[derive(Debug, Clone)]
pub struct Bucketer {
    /// The options.
    pub spec: BucketSpec,
    predefined: Vec<Reso>,
}

/// `int(x + 0.5)` for a non-negative `x`.
fn round_half_up(x: f64) -> usize {
    (x + 0.5).floor() as usize
}

/// The size an image of `(w, h)` is scaled to so that it covers `bucket`, sd-scripts' rule: the
/// height matches when the image is wider than the bucket, else the width.
pub fn cover_size((w, h): Reso, bucket: Reso) -> Reso {
    let ar = w as f64 / h as f64;
    let bucket_ar = bucket.0 as f64 / bucket.1 as f64;
    let scale = if ar > bucket_ar {
        bucket.1 as f64 / h as f64
    } else {
        bucket.0 as f64 / w as f64
    };
    (
        round_half_up(w as f64 * scale).max(bucket.0),
        round_half_up(h as f64 * scale).max(bucket.1),
    )
}

impl Bucketer {
    /// A bucketer for `spec` (the predefined table unless `no_upscale`).
    pub fn new(spec: BucketSpec) -> Self {
        let predefined = if spec.no_upscale {
            vec![]
        } else {
            make_bucket_resolutions(spec.resolution, spec.min_reso, spec.max_reso, spec.steps)
        };
        Self { spec, predefined }
    }

    /// The predefined bucket table (empty with `no_upscale`).
    pub fn predefined(&self) -> &[Reso] {
        &self.predefined
    }

    /// The bucket of an image of `width × height`; an error when it has none (with
    /// `no_upscale`, a side below one step).
    pub fn select(&self, width: usize, height: usize) -> anyhow::Result<BucketChoice> {
        if width == 0 || height == 0 {
            bail!("an image of {width}x{height} pixels has no bucket");
        }
        let ar = width as f64 / height as f64;
        let (bucket, resized) = if !self.spec.no_upscale {
            let bucket = if self.predefined.contains(&(width, height)) {
                (width, height)
            } else {
                let mut best = 0;
                let mut best_err = f64::INFINITY;
                for (i, &(bw, bh)) in self.predefined.iter().enumerate() {
                    let e = (bw as f64 / bh as f64 - ar).abs();
                    if e < best_err {
                        best = i;
                        best_err = e;
                    }
                }
                self.predefined[best]
            };
            (bucket, cover_size((width, height), bucket))
        } else {
            let steps = self.spec.steps;
            let round = |x: f64| {
                let x = round_half_up(x);
                x - x % steps
            };
            let area = self.spec.max_area();
            let resized = if width * height > area {
                let rw = (area as f64 * ar).sqrt();
                let rh = area as f64 / rw;
                let w_r = round(rw);
                let h_in_wr = round(w_r as f64 / ar);
                let h_r = round(rh);
                let w_in_hr = round(h_r as f64 * ar);
                if h_in_wr == 0 || h_r == 0 || w_r == 0 {
                    bail!(
                        "an image of {width}x{height} pixels is too narrow for buckets of \
                         --bucket-reso-steps {steps} at --resolution {}",
                        self.spec.resolution
                    );
                }
                let ar_w = w_r as f64 / h_in_wr as f64;
                let ar_h = w_in_hr as f64 / h_r as f64;
                if (ar_w - ar).abs() < (ar_h - ar).abs() {
                    (w_r, round_half_up(w_r as f64 / ar))
                } else {
                    (round_half_up(h_r as f64 * ar), h_r)
                }
            } else {
                (width, height)
            };
            let bucket = (resized.0 - resized.0 % steps, resized.1 - resized.1 % steps);
            if bucket.0 == 0 || bucket.1 == 0 {
                bail!(
                    "an image of {width}x{height} pixels is smaller than --bucket-reso-steps \
                     {steps} on a side, so --bucket-no-upscale leaves it no bucket"
                );
            }
            (bucket, resized)
        };
        let ar_error = bucket.0 as f64 / bucket.1 as f64 - ar;
        Ok(BucketChoice {
            bucket,
            resized,
            ar_error,
        })
    }
}

/// Where a `crop` crop starts in an image of `size`: `⌊trim / 2⌋` when centred, else drawn from
/// `rng` (left, then top; a draw only where the image is larger than the crop).
pub fn bucket_crop_origin(size: Reso, crop: Reso, center: bool, rng: &mut Rng) -> (usize, usize) {
    let mut pick = |trim: usize| {
        if trim == 0 {
            0
        } else if center {
            trim / 2
        } else {
            rng.below(trim as u64 + 1) as usize
        }
    };
    let left = pick(size.0 - crop.0);
    let top = pick(size.1 - crop.1);
    (left, top)
}

/// The buckets in use and their images: bucket → indices of the images in it, in image order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BucketTable {
    /// Bucket → image indices, sorted by (width, height).
    pub buckets: BTreeMap<Reso, Vec<usize>>,
}

impl BucketTable {
    /// The table of images whose buckets are `buckets` (image i in `buckets[i]`).
    pub fn from_assignments(buckets: &[Reso]) -> Self {
        let mut t = Self::default();
        for (i, &b) in buckets.iter().enumerate() {
            t.buckets.entry(b).or_default().push(i);
        }
        t
    }

    /// The lines printed at the start of a run: one per bucket (width x height: images), then
    /// the mean absolute aspect-ratio error.
    pub fn describe(&self, mean_ar_error: f64) -> Vec<String> {
        let mut lines = vec![format!(
            "aspect-ratio buckets ({} in use, width x height: images):",
            self.buckets.len()
        )];
        for (i, ((w, h), imgs)) in self.buckets.iter().enumerate() {
            lines.push(format!("  bucket {i}: {w}x{h}: {}", imgs.len()));
        }
        lines.push(format!("  mean aspect-ratio error: {mean_ar_error:.4}"));
        lines
    }

    /// The largest bucket by area.
    pub fn largest(&self) -> Option<Reso> {
        self.buckets.keys().copied().max_by_key(|(w, h)| w * h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_rounds_min_down_and_max_up() {
        let (s, notes) = BucketSpec::new(512, 250, 1000, 64, false).unwrap();
        assert_eq!((s.min_reso, s.max_reso), (192, 1024));
        assert_eq!(notes.len(), 2);
        assert!(BucketSpec::new(512, 256, 1024, 60, false).is_err());
        assert!(BucketSpec::new(512, 576, 1024, 64, false).is_err());
        assert!(BucketSpec::new(512, 256, 448, 64, false).is_err());
    }

    #[test]
    fn cover_size_covers_the_bucket() {
        assert_eq!(cover_size((768, 512), (640, 384)), (640, 427));
        assert_eq!(cover_size((1920, 1080), (640, 384)), (683, 384));
    }

    #[test]
    fn centred_and_random_crops() {
        let mut rng = Rng::new(3);
        assert_eq!(
            bucket_crop_origin((45, 40), (40, 40), true, &mut rng),
            (2, 0)
        );
        let before = rng.clone();
        let (l, t) = bucket_crop_origin((45, 40), (40, 40), false, &mut rng);
        assert!(l <= 5 && t == 0);
        let mut one = before;
        one.below(6);
        assert_eq!(rng, one, "one draw, for the width only");
    }
}
