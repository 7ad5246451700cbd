//! Labelled image grids and animated GIFs (for scale sweeps and training samples).

use anyhow::Context;
use image::{Delay, Frame, Rgb, RgbImage, RgbaImage};
use std::path::Path;

/// 3×5 bitmaps (one u16 per glyph, 15 bits, row-major from the top-left) for label text.
fn glyph(c: char) -> Option<u16> {
    Some(match c.to_ascii_lowercase() {
        '0' => 0b111_101_101_101_111,
        '1' => 0b010_110_010_010_111,
        '2' => 0b111_001_111_100_111,
        '3' => 0b111_001_111_001_111,
        '4' => 0b101_101_111_001_001,
        '5' => 0b111_100_111_001_111,
        '6' => 0b111_100_111_101_111,
        '7' => 0b111_001_001_010_010,
        '8' => 0b111_101_111_101_111,
        '9' => 0b111_101_111_001_111,
        '.' => 0b000_000_000_000_010,
        '-' => 0b000_000_111_000_000,
        '=' => 0b000_111_000_111_000,
        ':' => 0b000_010_000_010_000,
        'a' => 0b000_011_101_101_011,
        'b' => 0b100_110_101_101_110,
        'c' => 0b000_011_100_100_011,
        'd' => 0b001_011_101_101_011,
        'e' => 0b000_011_111_100_011,
        'f' => 0b011_100_110_100_100,
        'g' => 0b011_101_011_001_110,
        'h' => 0b100_110_101_101_101,
        'i' => 0b010_000_010_010_010,
        'j' => 0b001_000_001_101_010,
        'k' => 0b100_101_110_110_101,
        'l' => 0b110_010_010_010_111,
        'm' => 0b000_110_111_101_101,
        'n' => 0b000_110_101_101_101,
        'o' => 0b000_010_101_101_010,
        'p' => 0b000_110_101_110_100,
        'q' => 0b000_011_101_011_001,
        'r' => 0b000_011_100_100_100,
        's' => 0b000_011_110_011_110,
        't' => 0b010_111_010_010_011,
        'u' => 0b000_101_101_101_011,
        'v' => 0b000_101_101_101_010,
        'w' => 0b000_101_101_111_101,
        'x' => 0b000_101_010_101_000,
        'y' => 0b101_101_011_001_110,
        'z' => 0b000_111_011_100_111,
        ',' => 0b000_000_000_010_100,
        '(' => 0b010_100_100_100_010,
        ')' => 0b010_001_001_001_010,
        ' ' => 0,
        _ => return None,
    })
}

/// Draws `text` at (x, y) with each font pixel `px` image pixels wide, in `color`; characters
/// without a glyph are skipped.
pub fn draw_text(img: &mut RgbImage, text: &str, x: u32, y: u32, px: u32, color: Rgb<u8>) {
    let mut cx = x;
    for c in text.chars() {
        if let Some(bits) = glyph(c) {
            for row in 0..5u32 {
                for col in 0..3u32 {
                    if bits >> (14 - (row * 3 + col)) & 1 == 1 {
                        for dy in 0..px {
                            for dx in 0..px {
                                let (px_x, px_y) = (cx + col * px + dx, y + row * px + dy);
                                if px_x < img.width() && px_y < img.height() {
                                    img.put_pixel(px_x, px_y, color);
                                }
                            }
                        }
                    }
                }
            }
        }
        cx += 4 * px;
    }
}

/// Height of the label band above each tile for a tile of width `w`.
fn label_px(w: u32) -> u32 {
    (w / 48).clamp(1, 4)
}

/// One tile with its label drawn in a white band above the image.
pub fn labelled(img: &RgbImage, label: &str) -> RgbImage {
    // Small images (tiny models) are enlarged by an integer factor so they can be seen.
    let zoom = 128u32.div_ceil(img.width().max(1)).max(1);
    let enlarged;
    let img = if zoom > 1 {
        enlarged = image::imageops::resize(
            img,
            img.width() * zoom,
            img.height() * zoom,
            image::imageops::FilterType::Nearest,
        );
        &enlarged
    } else {
        img
    };
    let px = label_px(img.width());
    let band = 7 * px;
    let mut out = RgbImage::from_pixel(img.width(), img.height() + band, Rgb([255, 255, 255]));
    image::imageops::replace(&mut out, img, 0, band as i64);
    draw_text(&mut out, label, px, px, px, Rgb([0, 0, 0]));
    out
}

/// Tiles laid out in `cols` columns with a 2-pixel gap, each labelled.
pub fn grid(tiles: &[(RgbImage, String)], cols: usize) -> RgbImage {
    let cols = cols.max(1);
    let labelled: Vec<RgbImage> = tiles.iter().map(|(i, l)| labelled(i, l)).collect();
    let (tw, th) = labelled
        .first()
        .map(|t| (t.width(), t.height()))
        .unwrap_or((1, 1));
    let rows = labelled.len().div_ceil(cols);
    let gap = 2;
    let mut out = RgbImage::from_pixel(
        cols as u32 * (tw + gap) - gap,
        (rows as u32 * (th + gap)).saturating_sub(gap).max(1),
        Rgb([128, 128, 128]),
    );
    for (i, t) in labelled.iter().enumerate() {
        let (c, r) = ((i % cols) as u32, (i / cols) as u32);
        image::imageops::replace(
            &mut out,
            t,
            (c * (tw + gap)) as i64,
            (r * (th + gap)) as i64,
        );
    }
    out
}

/// Writes an endlessly looping animated GIF of labelled `frames`, `delay_ms` per frame.
pub fn write_gif(
    frames: &[(RgbImage, String)],
    delay_ms: u32,
    path: &Path,
    force: bool,
) -> anyhow::Result<()> {
    crate::atomic::write_file(path, force, |tmp| {
        let file = std::fs::File::create(tmp)
            .with_context(|| format!("cannot write {}", path.display()))?;
        let mut enc = image::codecs::gif::GifEncoder::new_with_speed(file, 10);
        enc.set_repeat(image::codecs::gif::Repeat::Infinite)?;
        for (img, label) in frames {
            let rgba: RgbaImage = image::DynamicImage::ImageRgb8(labelled(img, label)).to_rgba8();
            enc.encode_frame(Frame::from_parts(
                rgba,
                0,
                0,
                Delay::from_numer_denom_ms(delay_ms, 1),
            ))
            .with_context(|| format!("cannot encode {}", path.display()))?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_layout_and_labels() {
        let a = RgbImage::from_pixel(192, 192, Rgb([200, 0, 0]));
        let g = grid(
            &[
                (a.clone(), "a=0.5".into()),
                (a.clone(), "1".into()),
                (a, "-1".into()),
            ],
            2,
        );
        // 2 columns, 2 rows, a label band of 7·4 px per row, 2-px gaps.
        assert_eq!((g.width(), g.height()), (2 * 192 + 2, 2 * 220 + 2));
        // The label drew black pixels in the white band of the first tile.
        let black = (0..48)
            .flat_map(|x| (0..7).map(move |y| (x, y)))
            .filter(|&(x, y)| g.get_pixel(x, y).0 == [0, 0, 0])
            .count();
        assert!(black > 10, "{black}");
        // Image content below the band.
        assert_eq!(g.get_pixel(10, 100).0, [200, 0, 0]);
        // Empty third cell stays gray.
        assert_eq!(g.get_pixel(300, 300).0, [128, 128, 128]);
        // A 16-pixel tile is enlarged 8x so it can be seen.
        let small = grid(&[(RgbImage::new(16, 16), "0".into())], 1);
        assert_eq!(small.width(), 128);
    }
}
