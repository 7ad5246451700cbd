//! Turning image tensors into files: PNG with the same rounding as diffusers' PIL output,
//! written through [`crate::atomic`] so that no half-written file is ever left.

use anyhow::{bail, Context};
use candle_core::{DType, Tensor};
use image::RgbImage;
use std::path::{Path, PathBuf};

/// Converts images [N, 3, H, W] in [0, 1] to 8-bit RGB, rounding like `(x * 255).round()`.
pub fn to_rgb8(images: &Tensor) -> anyhow::Result<Vec<RgbImage>> {
    let (n, c, h, w) = images.dims4()?;
    if c != 3 {
        bail!("expected 3-channel images, got {c} channels");
    }
    let data = images
        .to_dtype(DType::F32)?
        .permute((0, 2, 3, 1))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let per = h * w * 3;
    (0..n)
        .map(|i| {
            let px: Vec<u8> = data[i * per..(i + 1) * per]
                .iter()
                .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
                .collect();
            RgbImage::from_raw(w as u32, h as u32, px).context("image buffer has the wrong size")
        })
        .collect()
}

/// Saves one RGB image as PNG (atomically).
pub fn save_png(img: &RgbImage, path: &Path, force: bool) -> anyhow::Result<()> {
    crate::atomic::write_file(path, force, |tmp| {
        img.save_with_format(tmp, image::ImageFormat::Png)
            .with_context(|| format!("cannot write {}", path.display()))
    })
}

/// The output paths for `n` images: `out.png` for one, `out-0.png`, `out-1.png`, … for several.
pub fn numbered_paths(out: &Path, n: usize) -> Vec<PathBuf> {
    if n == 1 {
        return vec![out.to_path_buf()];
    }
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let ext = out
        .extension()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "png".into());
    (0..n)
        .map(|i| out.with_file_name(format!("{stem}-{i}.{ext}")))
        .collect()
}
