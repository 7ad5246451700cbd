//! Training images: a folder of images with optional captions, decoded, checked, converted to
//! RGB, resized (shorter side = resolution, or to cover its aspect-ratio bucket), then cropped /
//! flipped into `[-1, 1]` tensors.
//!
//! Policy for unusual files (every message names the file):
//! - unreadable or corrupt files, and images that would be upscaled more than twice (shorter side
//!   below half the resolution; with buckets, below half their bucket's size) ("too small"), are
//!   errors; with `--skip-bad-images` they are skipped with a warning;
//! - grayscale images are converted to RGB, 16-bit images to 8-bit, images with an alpha
//!   channel are composited onto white (kohya and diffusers convert to RGB too; compositing
//!   keeps transparent areas from turning into arbitrary colours): each with a warning;
//! - images smaller than the resolution are upscaled, with a warning;
//! - EXIF orientation is applied (as diffusers' `exif_transpose`).
//!
//! Captions: `name.txt` beside `name.png` replaces the prompt for that image; an empty caption
//! file falls back to the prompt with a warning.

use super::bucket::{BucketChoice, Bucketer, Reso};
use crate::rng::Rng;
use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};
use std::path::{Path, PathBuf};

/// File extensions treated as images.
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "gif", "webp", "bmp", "tif", "tiff"];

/// One training image, resized as its [`Fit`] says.
#[derive(Debug, Clone)]
pub struct TrainImage {
    /// The file it came from.
    pub path: PathBuf,
    /// Its prompt (the caption file's text, or the folder's prompt).
    pub caption: String,
    /// The RGB pixels, resized (shorter side = resolution, or covering its bucket).
    pub image: RgbImage,
    /// Its aspect-ratio bucket (with [`Fit::Bucket`]).
    pub bucket: Option<BucketChoice>,
}

/// How the images of a folder are sized when loaded.
#[derive(Debug, Clone, Copy)]
pub enum Fit<'a> {
    /// Shorter side = this resolution (square crops).
    Square(usize),
    /// Each image resized to cover its aspect-ratio bucket.
    Bucket(&'a Bucketer),
    /// Each image kept at the smallest size (never above its own) that covers every one of these
    /// buckets: class images, fitted to the bucket of each batch they join.
    Cover(&'a [Reso]),
}

/// The images of a folder plus the warnings met while reading it.
#[derive(Debug, Clone, Default)]
pub struct ImageFolder {
    /// The usable images, sorted by file name.
    pub images: Vec<TrainImage>,
    /// One line per converted, upscaled or skipped file.
    pub warnings: Vec<String>,
}

/// Whether `path` has an image extension (case-insensitive) and is not a hidden file.
pub fn is_image_file(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase());
    !hidden && path.is_file() && ext.is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str()))
}

/// The image files of `dir`, sorted by name; errors when the folder cannot be read.
pub fn list_images(dir: &Path, what: &str) -> anyhow::Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        bail!(
            "{what} folder {} does not exist or is not a folder",
            dir.display()
        );
    }
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {what} folder {}", dir.display()))?;
    let mut files = vec![];
    for e in entries {
        let e = e.with_context(|| format!("cannot read {what} folder {}", dir.display()))?;
        if is_image_file(&e.path()) {
            files.push(e.path());
        }
    }
    files.sort();
    Ok(files)
}

/// The largest width or height of a training image that is decoded.
const MAX_SIDE: u32 = 16384;
/// The largest decoded size of a training image (a 16384² RGBA image at 8 bits).
const MAX_DECODED_BYTES: u64 = 1 << 30;

/// Decodes `path` with its EXIF orientation applied, refusing images whose header declares
/// more than [`MAX_SIDE`] pixels a side or [`MAX_DECODED_BYTES`]; the error names the file.
pub fn decode(path: &Path) -> anyhow::Result<DynamicImage> {
    let reader = ImageReader::open(path)
        .with_context(|| format!("cannot open image {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read image {}", path.display()))?;
    let mut decoder = reader.into_decoder().with_context(|| {
        format!(
            "{} is not a readable image (corrupt, or a format other than png / jpeg / gif)",
            path.display()
        )
    })?;
    let (w, h) = decoder.dimensions();
    if w > MAX_SIDE || h > MAX_SIDE || decoder.total_bytes() > MAX_DECODED_BYTES {
        bail!(
            "{} declares {w}x{h} pixels ({} MB decoded); training images are limited to \
             {MAX_SIDE} pixels a side and {} MB",
            path.display(),
            decoder.total_bytes() / 1_000_000,
            MAX_DECODED_BYTES / 1_000_000
        );
    }
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder)
        .with_context(|| format!("{} is corrupt: cannot decode its pixels", path.display()))?;
    img.apply_orientation(orientation);
    Ok(img)
}

/// Converts any decoded image to 8-bit RGB, compositing transparency onto white; returns the
/// notes describing each conversion made.
pub fn to_rgb8(img: DynamicImage) -> (RgbImage, Vec<&'static str>) {
    use image::ColorType as C;
    let color = img.color();
    let mut notes = vec![];
    if matches!(color, C::L8 | C::La8 | C::L16 | C::La16) {
        notes.push("grayscale, converted to RGB");
    }
    if matches!(color, C::L16 | C::La16 | C::Rgb16 | C::Rgba16) {
        notes.push("16-bit, converted to 8-bit");
    }
    if matches!(color, C::Rgb32F | C::Rgba32F) {
        notes.push("floating-point, converted to 8-bit");
    }
    if color == C::Rgb8 {
        return (img.into_rgb8(), notes);
    }
    if !color.has_alpha() {
        return (img.to_rgb8(), notes);
    }
    let rgba = img.to_rgba32f();
    let translucent = rgba.pixels().any(|p| p.0[3] < 1.0);
    notes.push(if translucent {
        "has transparent pixels, composited onto white"
    } else {
        "alpha channel dropped (fully opaque)"
    });
    let (w, h) = rgba.dimensions();
    let to8 = |v: f32| (v.clamp(0.0, 1.0) * 255.0).round() as u8;
    let out = RgbImage::from_fn(w, h, |x, y| {
        let [r, g, b, a] = rgba.get_pixel(x, y).0;
        let a = a.clamp(0.0, 1.0);
        let mix = |c: f32| to8(c * a + (1.0 - a));
        image::Rgb([mix(r), mix(g), mix(b)])
    });
    (out, notes)
}

/// Resizes so the shorter side equals `resolution` (the longer side scaled as torchvision's
/// `Resize(int)`: `int(resolution · long / short)`), bilinear with antialiasing.
pub fn resize_shorter_side(img: &RgbImage, resolution: usize) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let short = w.min(h);
    let long = w.max(h);
    let scaled_long = (resolution * long / short).max(resolution);
    let (nw, nh) = if w <= h {
        (resolution, scaled_long)
    } else {
        (scaled_long, resolution)
    };
    if (nw, nh) == (w, h) {
        return img.clone();
    }
    image::imageops::resize(
        img,
        nw as u32,
        nh as u32,
        image::imageops::FilterType::Triangle,
    )
}

/// Resizes to exactly `(w, h)` (bilinear with antialiasing); a clone when the size is already that.
pub fn resize_to(img: &RgbImage, (w, h): Reso) -> RgbImage {
    if (img.width() as usize, img.height() as usize) == (w, h) {
        return img.clone();
    }
    image::imageops::resize(
        img,
        w as u32,
        h as u32,
        image::imageops::FilterType::Triangle,
    )
}

/// Loads one image sized as `fit` says; `Err` for unreadable or too small files, otherwise the
/// image, its bucket (with [`Fit::Bucket`]) and the notes on its conversion.
pub fn load_fitted(
    path: &Path,
    fit: Fit,
) -> anyhow::Result<(RgbImage, Option<BucketChoice>, Vec<String>)> {
    let (bucketer, cover): (Option<&Bucketer>, &[Reso]) = match fit {
        Fit::Square(r) => {
            let (img, notes) = load_train_image(path, r)?;
            return Ok((img, None, notes));
        }
        Fit::Bucket(b) => (Some(b), &[]),
        Fit::Cover(buckets) => (None, buckets),
    };
    let img = decode(path)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    // The size the image is stored at, and how much it is (or will be) upscaled.
    let (target, choice, upscale, what) = match bucketer {
        Some(b) => {
            let c = b
                .select(w, h)
                .with_context(|| format!("{}", path.display()))?;
            let what = format!(
                "its bucket {}x{} (--resolution {})",
                c.bucket.0, c.bucket.1, b.spec.resolution
            );
            (c.resized, Some(c), c.resized.0 as f64 / w as f64, what)
        }
        None => {
            let buckets = cover;
            let scale = buckets
                .iter()
                .map(|&(bw, bh)| (bw as f64 / w as f64).max(bh as f64 / h as f64))
                .fold(0.0, f64::max);
            let target = if scale < 1.0 {
                let side = |x: usize| ((x as f64 * scale).ceil() as usize).clamp(1, x);
                (side(w), side(h))
            } else {
                (w, h)
            };
            (
                target,
                None,
                scale,
                "the largest bucket of the run".to_string(),
            )
        }
    };
    if upscale > 2.0 {
        bail!(
            "{} is too small: {w}x{h} would be upscaled {upscale:.2}x to cover {what}; \
             at most 2x is allowed",
            path.display()
        );
    }
    let (rgb, notes) = to_rgb8(img);
    let mut notes: Vec<String> = notes.into_iter().map(String::from).collect();
    if upscale > 1.0 {
        notes.push(format!("{w}x{h} is smaller than {what}, upscaled"));
    }
    Ok((resize_to(&rgb, target), choice, notes))
}

/// Loads one image for training at `resolution`; `Err` for unreadable or too small files,
/// `Ok((image, notes))` otherwise.
pub fn load_train_image(path: &Path, resolution: usize) -> anyhow::Result<(RgbImage, Vec<String>)> {
    let img = decode(path)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let min_side = resolution.div_ceil(2);
    if w.min(h) < min_side {
        bail!(
            "{} is too small: {w}x{h}, the shorter side must be at least {min_side} px \
             (half of --resolution {resolution})",
            path.display()
        );
    }
    let (rgb, notes) = to_rgb8(img);
    let mut notes: Vec<String> = notes.into_iter().map(String::from).collect();
    if w.min(h) < resolution {
        notes.push(format!(
            "{w}x{h} is smaller than --resolution {resolution}, upscaled"
        ));
    }
    Ok((resize_shorter_side(&rgb, resolution), notes))
}

/// Reads the caption beside `image` (`name.txt`), if any.
fn caption_for(image: &Path, prompt: &str, warnings: &mut Vec<String>) -> anyhow::Result<String> {
    let txt = image.with_extension("txt");
    if !txt.is_file() {
        return Ok(prompt.to_string());
    }
    let text = std::fs::read_to_string(&txt)
        .with_context(|| format!("cannot read caption file {}", txt.display()))?;
    let text = text.trim();
    if text.is_empty() {
        warnings.push(format!(
            "warning: caption file {} is empty, using the prompt {prompt:?}",
            txt.display()
        ));
        return Ok(prompt.to_string());
    }
    Ok(text.to_string())
}

/// Reads every image of `dir` at `resolution` (`what` names the folder in messages, e.g.
/// "instance").
pub fn load_folder(
    dir: &Path,
    prompt: &str,
    resolution: usize,
    skip_bad: bool,
    what: &str,
) -> anyhow::Result<ImageFolder> {
    load_folder_fit(dir, prompt, Fit::Square(resolution), skip_bad, what)
}

/// Reads every image of `dir`, sized as `fit` says.
pub fn load_folder_fit(
    dir: &Path,
    prompt: &str,
    fit: Fit,
    skip_bad: bool,
    what: &str,
) -> anyhow::Result<ImageFolder> {
    let files = list_images(dir, what)?;
    if files.is_empty() {
        bail!(
            "{what} folder {} has no images (looked for {})",
            dir.display(),
            IMAGE_EXTENSIONS.join(", ")
        );
    }
    let mut out = ImageFolder::default();
    for path in files {
        match load_fitted(&path, fit) {
            Ok((image, bucket, notes)) => {
                for n in notes {
                    out.warnings
                        .push(format!("warning: {}: {n}", path.display()));
                }
                let caption = caption_for(&path, prompt, &mut out.warnings)?;
                out.images.push(TrainImage {
                    path,
                    caption,
                    image,
                    bucket,
                });
            }
            Err(e) if skip_bad => out.warnings.push(format!("warning: skipped: {e:#}")),
            Err(e) => {
                return Err(e.context(
                    "bad training image (pass --skip-bad-images to skip such files with a warning)",
                ))
            }
        }
    }
    if out.images.is_empty() {
        bail!(
            "{what} folder {}: no usable image left after skipping bad files",
            dir.display()
        );
    }
    Ok(out)
}

/// Where a `res`×`res` crop starts in a `w`×`h` image: centred (torchvision's `CenterCrop`
/// rounding) or drawn uniformly from `rng` (top first, then left).
pub fn crop_origin(w: usize, h: usize, res: usize, center: bool, rng: &mut Rng) -> (usize, usize) {
    if center {
        let top = ((h - res) as f64 / 2.0).round() as usize;
        let left = ((w - res) as f64 / 2.0).round() as usize;
        (left, top)
    } else {
        let top = rng.below((h - res + 1) as u64) as usize;
        let left = rng.below((w - res + 1) as u64) as usize;
        (left, top)
    }
}

/// The `res`×`res` crop at `(left, top)`, optionally mirrored, as a `[3, res, res]` f32 tensor
/// in `[-1, 1]` (`2·x/255 − 1`, as ToTensor + Normalize(0.5, 0.5)).
pub fn crop_tensor(
    img: &RgbImage,
    origin: (usize, usize),
    res: usize,
    flip: bool,
    device: &Device,
) -> candle_core::Result<Tensor> {
    crop_rect_tensor(img, origin, (res, res), flip, device)
}

/// The `w`×`h` crop at `(left, top)`, optionally mirrored, as a `[3, h, w]` f32 tensor in
/// `[-1, 1]`.
pub fn crop_rect_tensor(
    img: &RgbImage,
    (left, top): (usize, usize),
    (w, h): Reso,
    flip: bool,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let mut data = vec![0f32; 3 * w * h];
    for y in 0..h {
        for x in 0..w {
            let sx = if flip { left + w - 1 - x } else { left + x };
            let p = img.get_pixel(sx as u32, (top + y) as u32).0;
            for c in 0..3 {
                data[c * w * h + y * w + x] = p[c] as f32 / 255.0 * 2.0 - 1.0;
            }
        }
    }
    Tensor::from_vec(data, (3, h, w), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_and_crop() -> anyhow::Result<()> {
        let img = RgbImage::from_fn(40, 20, |x, _| image::Rgb([x as u8 * 6, 0, 255]));
        let r = resize_shorter_side(&img, 10);
        assert_eq!((r.width(), r.height()), (20, 10));
        let mut rng = Rng::new(0);
        assert_eq!(crop_origin(20, 10, 10, true, &mut rng), (5, 0));
        let t = crop_tensor(&r, (0, 0), 10, false, &Device::Cpu)?;
        let f = crop_tensor(&r, (0, 0), 10, true, &Device::Cpu)?;
        assert_eq!(t.dims(), [3, 10, 10]);
        let a: Vec<f32> = t.narrow(2, 0, 1)?.flatten_all()?.to_vec1()?;
        let b: Vec<f32> = f.narrow(2, 9, 1)?.flatten_all()?.to_vec1()?;
        assert_eq!(a, b);
        let blue: Vec<f32> = t.get(2)?.flatten_all()?.to_vec1()?;
        assert!(blue.iter().all(|&v| v == 1.0));
        Ok(())
    }

    #[test]
    fn cover_keeps_the_smallest_size_covering_every_bucket() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("a.png");
        RgbImage::from_fn(80, 60, |x, _| image::Rgb([x as u8, 0, 0])).save(&p)?;
        // 40/60 (the 24x40 bucket's height) is the largest need: 80x60 -> 54x40.
        let (img, bucket, notes) = load_fitted(&p, Fit::Cover(&[(24, 40), (40, 24)]))?;
        assert_eq!((img.width(), img.height()), (54, 40));
        assert!(bucket.is_none() && notes.is_empty(), "{notes:?}");
        let (img, _, notes) = load_fitted(&p, Fit::Cover(&[(96, 96)]))?;
        assert_eq!((img.width(), img.height()), (80, 60));
        assert_eq!(notes.len(), 1, "{notes:?}");
        let e = load_fitted(&p, Fit::Cover(&[(200, 200)])).unwrap_err();
        assert!(format!("{e}").contains("upscaled 3.33x"), "{e}");
        Ok(())
    }

    #[test]
    fn alpha_composited_onto_white() {
        let img = image::RgbaImage::from_fn(2, 1, |x, _| {
            image::Rgba([0, 0, 0, if x == 0 { 0 } else { 255 }])
        });
        let (rgb, notes) = to_rgb8(DynamicImage::ImageRgba8(img));
        assert_eq!(rgb.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(rgb.get_pixel(1, 0).0, [0, 0, 0]);
        assert_eq!(notes, ["has transparent pixels, composited onto white"]);
    }
}
