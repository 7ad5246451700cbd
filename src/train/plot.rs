//! The loss log: `loss.csv` (step, loss, learning rate) and a loss-curve PNG drawn with the
//! `image` crate (raw loss in light blue, an exponential moving average in dark blue, axis
//! ticks labelled with a small built-in bitmap font).

use anyhow::Context;
use image::{Rgb, RgbImage};
use std::path::Path;

/// One logged optimizer step.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossPoint {
    /// Optimizer step (1-based).
    pub step: usize,
    /// Mean loss over the step's micro-batches.
    pub loss: f64,
    /// Learning rate used (UNet group).
    pub lr: f64,
}

/// The CSV text of `points` with a header line.
pub fn csv(points: &[LossPoint]) -> String {
    let mut s = String::from("step,loss,lr\n");
    for p in points {
        s.push_str(&format!("{},{:e},{:e}\n", p.step, p.loss, p.lr));
    }
    s
}

/// 3×5 glyphs (rows top to bottom, 3 bits each, MSB left) for the tick labels.
fn glyph(c: char) -> Option<[u8; 5]> {
    Some(match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        'e' => [0, 7, 7, 4, 7],
        's' => [0, 7, 6, 1, 7],
        't' => [2, 7, 2, 2, 3],
        'p' => [0, 7, 5, 7, 4],
        'l' => [6, 2, 2, 2, 7],
        'o' => [0, 7, 5, 5, 7],
        ' ' => [0; 5],
        _ => return None,
    })
}

/// Draws `text` with its top-left corner at `(x, y)`, each font pixel `scale`² image pixels.
fn draw_text(img: &mut RgbImage, text: &str, x: i64, y: i64, scale: i64, color: Rgb<u8>) {
    let mut cx = x;
    for c in text.chars() {
        if let Some(g) = glyph(c) {
            for (row, bits) in g.iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) != 0 {
                        for dy in 0..scale {
                            for dx in 0..scale {
                                put(
                                    img,
                                    cx + col * scale + dx,
                                    y + row as i64 * scale + dy,
                                    color,
                                );
                            }
                        }
                    }
                }
            }
        }
        cx += 4 * scale;
    }
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

/// A line from `a` to `b` (Bresenham).
fn line(img: &mut RgbImage, a: (i64, i64), b: (i64, i64), c: Rgb<u8>) {
    let (mut x0, mut y0) = a;
    let (dx, dy) = ((b.0 - x0).abs(), -(b.1 - y0).abs());
    let (sx, sy) = (if x0 < b.0 { 1 } else { -1 }, if y0 < b.1 { 1 } else { -1 });
    let mut err = dx + dy;
    loop {
        put(img, x0, y0, c);
        if (x0, y0) == b {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x0 += sx;
        }
        if e2 <= dx {
            err += dx;
            y0 += sy;
        }
    }
}

/// A short label for a tick value.
fn tick_label(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if (0.01..10000.0).contains(&a) {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{v:.1e}")
    }
}

/// Renders the loss curve of `points` as an RGB image `width`×`height`.
pub fn render(points: &[LossPoint], width: u32, height: u32) -> RgbImage {
    let mut img = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    let (l, r, t, b) = (70i64, 20i64, 20i64, 40i64);
    let (w, h) = (width as i64 - l - r, height as i64 - t - b);
    let finite: Vec<&LossPoint> = points.iter().filter(|p| p.loss.is_finite()).collect();
    let grey = Rgb([220, 220, 220]);
    let black = Rgb([0, 0, 0]);
    if w <= 10 || h <= 10 {
        return img;
    }
    let (xmin, xmax) = match (finite.first(), finite.last()) {
        (Some(a), Some(z)) => (a.step as f64, (z.step as f64).max(a.step as f64 + 1.0)),
        _ => (0.0, 1.0),
    };
    let mut ymin = finite.iter().map(|p| p.loss).fold(f64::INFINITY, f64::min);
    let mut ymax = finite
        .iter()
        .map(|p| p.loss)
        .fold(f64::NEG_INFINITY, f64::max);
    if !ymin.is_finite() {
        (ymin, ymax) = (0.0, 1.0);
    }
    if ymax - ymin < 1e-12 {
        ymax = ymin + 1e-3_f64.max(ymin.abs() * 0.1);
    }
    let pad = (ymax - ymin) * 0.05;
    let (ymin, ymax) = (ymin - pad, ymax + pad);
    let px = |s: f64| l + ((s - xmin) / (xmax - xmin) * w as f64).round() as i64;
    let py = |v: f64| t + h - ((v - ymin) / (ymax - ymin) * h as f64).round() as i64;
    for i in 0..=4 {
        let v = ymin + (ymax - ymin) * i as f64 / 4.0;
        let y = py(v);
        line(&mut img, (l, y), (l + w, y), grey);
        draw_text(&mut img, &tick_label(v), 4, y - 5, 2, black);
        let s = xmin + (xmax - xmin) * i as f64 / 4.0;
        let x = px(s);
        line(&mut img, (x, t), (x, t + h), grey);
        let label = format!("{}", s.round() as i64);
        draw_text(
            &mut img,
            &label,
            x - 4 * label.len() as i64,
            t + h + 8,
            2,
            black,
        );
    }
    line(&mut img, (l, t), (l, t + h), black);
    line(&mut img, (l, t + h), (l + w, t + h), black);
    draw_text(&mut img, "step", l + w - 30, t + h + 24, 2, black);
    draw_text(&mut img, "loss", 4, 2, 2, black);
    let raw = Rgb([160, 190, 235]);
    let smooth = Rgb([20, 60, 160]);
    let mut ema: Option<f64> = None;
    let mut prev_raw: Option<(i64, i64)> = None;
    let mut prev_ema: Option<(i64, i64)> = None;
    for p in &finite {
        let x = px(p.step as f64);
        let e = match ema {
            Some(e) => 0.9 * e + 0.1 * p.loss,
            None => p.loss,
        };
        ema = Some(e);
        let a = (x, py(p.loss));
        let s = (x, py(e));
        match prev_raw {
            Some(q) => line(&mut img, q, a, raw),
            None => put(&mut img, a.0, a.1, raw),
        }
        if let Some(q) = prev_ema {
            line(&mut img, q, s, smooth);
        }
        prev_raw = Some(a);
        prev_ema = Some(s);
    }
    // Draw the smoothed curve again on top of the raw one where they overlap.
    let mut ema: Option<f64> = None;
    let mut prev: Option<(i64, i64)> = None;
    for p in &finite {
        let e = ema.map_or(p.loss, |e| 0.9 * e + 0.1 * p.loss);
        ema = Some(e);
        let s = (px(p.step as f64), py(e));
        if let Some(q) = prev {
            line(&mut img, q, s, smooth);
        }
        prev = Some(s);
    }
    img
}

/// Writes `loss.csv` and `loss.png` into `dir` (each through a temporary file).
pub fn write_loss_log(dir: &Path, points: &[LossPoint]) -> anyhow::Result<()> {
    let csv_path = dir.join("loss.csv");
    crate::atomic::write_file(&csv_path, true, |tmp| {
        std::fs::write(tmp, csv(points))
            .with_context(|| format!("cannot write {}", csv_path.display()))
    })?;
    let img = render(points, 640, 360);
    crate::pipeline::image_io::save_png(&img, &dir.join("loss.png"), true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_falling_curve() {
        let pts: Vec<LossPoint> = (1..=50)
            .map(|s| LossPoint {
                step: s,
                loss: 1.0 / s as f64,
                lr: 1e-4,
            })
            .collect();
        let img = render(&pts, 320, 200);
        let blue = img.pixels().filter(|p| p.0 == [20, 60, 160]).count();
        assert!(blue > 100, "{blue} curve pixels");
        assert!(csv(&pts).lines().count() == 51);
    }
}
