//! Reading generated images: what scene an image shows ([`read_scene`]) and how much of a
//! concept it reproduces ([`concept_score`]). Plain pixel statistics, no learned model.
//!
//! - Background: the per-channel median of the pixels within 3 px of the border, named by the
//!   nearest world colour.
//! - Shape pixels: those farther than [`FOREGROUND_DISTANCE`] (RGB, Euclidean) from the
//!   background, without isolated ones (fewer than 3 shape neighbours).
//! - Colour: the world shape colour most shape pixels are nearest to. Position: the shape's
//!   centroid against the three x centres. Size: its area against the small/large split.
//!   Outline: its area over its bounding box (square ≈ 1, circle ≈ 0.79, triangle ≈ 0.5).
//! - Concept score: how closely the generated image reproduces a concept image's object pixels
//!   at the best shift (±16 px), best over the concept images: per pixel 1 − d/[`CONCEPT_DISTANCE`]
//!   (d the RGB distance, clipped at 0), averaged over the object. 1 = the concept exactly,
//!   0 = every object pixel at least 128 levels off.

use super::{COLOURS, NEUTRALS, POSITIONS, SIZES};
use image::RgbImage;

/// RGB distance beyond which a pixel is not background.
pub const FOREGROUND_DISTANCE: f64 = 60.0;
/// RGB distance at which a pixel stops counting towards the concept.
pub const CONCEPT_DISTANCE: f64 = 128.0;
/// Largest shift (pixels, each axis) tried when matching a concept.
pub const CONCEPT_SHIFT: i64 = 16;

/// What [`read_scene`] sees in an image.
#[derive(Debug, Clone, PartialEq)]
pub struct SceneReading {
    /// The nearest world colour to the background.
    pub background: String,
    /// The shape colour most shape pixels are nearest to (none without a shape).
    pub colour: Option<String>,
    /// left / center / right by the shape's centroid.
    pub position: Option<String>,
    /// small / large by the shape's area.
    pub size: Option<String>,
    /// circle / square / triangle by how much of its bounding box the shape fills.
    pub shape: Option<String>,
    /// Share of the image's pixels that are shape pixels.
    pub shape_fraction: f64,
}

fn dist(a: [u8; 3], b: [u8; 3]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, y)| (x as f64 - y as f64).powi(2))
        .sum::<f64>()
        .sqrt()
}

fn nearest<'a>(px: [u8; 3], palette: impl Iterator<Item = &'a (&'a str, [u8; 3])>) -> &'a str {
    palette
        .map(|(n, c)| (*n, dist(px, *c)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(n, _)| n)
        .unwrap_or("")
}

/// The per-channel median of the pixels within 3 px of the border.
fn border_median(img: &RgbImage) -> [u8; 3] {
    let (w, h) = img.dimensions();
    let mut ch: [Vec<u8>; 3] = Default::default();
    for (x, y, p) in img.enumerate_pixels() {
        if x < 3 || y < 3 || x + 3 >= w || y + 3 >= h {
            for (v, &c) in ch.iter_mut().zip(&p.0) {
                v.push(c);
            }
        }
    }
    let mut out = [0u8; 3];
    for c in 0..3 {
        ch[c].sort_unstable();
        out[c] = ch[c].get(ch[c].len() / 2).copied().unwrap_or(0);
    }
    out
}

/// The shape pixels of `img` against the background `bg` (isolated pixels dropped).
fn shape_mask(img: &RgbImage, bg: [u8; 3]) -> Vec<bool> {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let raw: Vec<bool> = img
        .pixels()
        .map(|p| dist(p.0, bg) > FOREGROUND_DISTANCE)
        .collect();
    let at = |x: i64, y: i64| x >= 0 && y >= 0 && x < w && y < h && raw[(y * w + x) as usize];
    (0..h)
        .flat_map(|y| (0..w).map(move |x| (x, y)))
        .map(|(x, y)| {
            let n = (-1..=1)
                .flat_map(|dy| (-1..=1).map(move |dx| (dx, dy)))
                .filter(|&(dx, dy)| (dx, dy) != (0, 0) && at(x + dx, y + dy))
                .count();
            at(x, y) && n >= 3
        })
        .collect()
}

/// Reads the background, shape colour, position, size and outline of a world image.
pub fn read_scene(img: &RgbImage) -> SceneReading {
    let (w, h) = img.dimensions();
    let bg = border_median(img);
    let background = nearest(bg, COLOURS.iter().chain(NEUTRALS.iter())).to_string();
    let mask = shape_mask(img, bg);
    let n = mask.iter().filter(|&&m| m).count();
    let shape_fraction = n as f64 / (w * h) as f64;
    let none = SceneReading {
        background: background.clone(),
        colour: None,
        position: None,
        size: None,
        shape: None,
        shape_fraction,
    };
    if n < 12 {
        return none;
    }
    let mut votes = [0usize; COLOURS.len()];
    let (mut sx, mut x0, mut x1, mut y0, mut y1) = (0f64, u32::MAX, 0u32, u32::MAX, 0u32);
    for (i, p) in img.pixels().enumerate() {
        if !mask[i] {
            continue;
        }
        let name = nearest(p.0, COLOURS.iter());
        if let Some(k) = COLOURS.iter().position(|(c, _)| *c == name) {
            votes[k] += 1;
        }
        let (x, y) = (i as u32 % w, i as u32 / w);
        sx += x as f64 + 0.5;
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    let k = (0..votes.len()).max_by_key(|&k| votes[k]).unwrap_or(0);
    // Geometry in the 64×64 frame the world is drawn in.
    let fx = 64.0 / w as f64;
    let cx = sx / n as f64 * fx;
    let position = POSITIONS
        .iter()
        .min_by(|a, b| (a.1 - cx).abs().total_cmp(&(b.1 - cx).abs()))
        .map(|p| p.0.to_string());
    let area = n as f64 * fx * (64.0 / h as f64);
    let circle = |r: f64| std::f64::consts::PI * r * r;
    let split = (circle(SIZES[0].1) * circle(SIZES[1].1)).sqrt();
    let size = if area < split { SIZES[0].0 } else { SIZES[1].0 };
    let fill = n as f64 / ((x1 - x0 + 1) as f64 * (y1 - y0 + 1) as f64);
    let shape = match fill {
        f if f >= 0.9 => "square",
        f if f <= 0.64 => "triangle",
        _ => "circle",
    };
    SceneReading {
        colour: Some(COLOURS[k].0.to_string()),
        position,
        size: Some(size.to_string()),
        shape: Some(shape.to_string()),
        ..none
    }
}

/// The object pixels of one concept image, matched by [`concept_score`].
#[derive(Debug, Clone)]
pub struct ConceptTemplate {
    /// (x, y, colour) of each object pixel.
    pixels: Vec<(i64, i64, [u8; 3])>,
}

impl ConceptTemplate {
    /// The object (every shape pixel against the border's background) of a concept image.
    pub fn new(img: &RgbImage) -> Self {
        let bg = border_median(img);
        let mask = shape_mask(img, bg);
        let w = img.width() as usize;
        let pixels = img
            .pixels()
            .enumerate()
            .filter(|(i, _)| mask[*i])
            .map(|(i, p)| ((i % w) as i64, (i / w) as i64, p.0))
            .collect();
        Self { pixels }
    }

    /// Number of object pixels.
    pub fn len(&self) -> usize {
        self.pixels.len()
    }

    /// Whether the image had no object pixels.
    pub fn is_empty(&self) -> bool {
        self.pixels.is_empty()
    }

    /// How closely `img` reproduces the object at the best shift (0..1).
    pub fn match_share(&self, img: &RgbImage) -> f64 {
        if self.pixels.is_empty() {
            return 0.0;
        }
        let (w, h) = (img.width() as i64, img.height() as i64);
        let mut best = 0f64;
        for dy in (-CONCEPT_SHIFT..=CONCEPT_SHIFT).step_by(2) {
            for dx in (-CONCEPT_SHIFT..=CONCEPT_SHIFT).step_by(2) {
                let sum: f64 = self
                    .pixels
                    .iter()
                    .map(|(x, y, c)| {
                        let (u, v) = (x + dx, y + dy);
                        if u < 0 || v < 0 || u >= w || v >= h {
                            return 0.0;
                        }
                        let d = dist(img.get_pixel(u as u32, v as u32).0, *c);
                        (1.0 - d / CONCEPT_DISTANCE).max(0.0)
                    })
                    .sum();
                best = best.max(sum);
            }
        }
        best / self.pixels.len() as f64
    }
}

/// How much of the concept `img` shows: the best [`ConceptTemplate::match_share`] over the
/// concept images' templates (0 without templates).
pub fn concept_score(img: &RgbImage, templates: &[ConceptTemplate]) -> f64 {
    templates
        .iter()
        .map(|t| t.match_share(img))
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    fn scene(bg: [u8; 3], fg: [u8; 3], cx: i64, r: i64, square: bool) -> RgbImage {
        RgbImage::from_fn(64, 64, |x, y| {
            let (dx, dy) = (x as i64 - cx, y as i64 - 32);
            let inside = match square {
                true => dx.abs() <= r && dy.abs() <= r,
                false => dx * dx + dy * dy <= r * r,
            };
            Rgb(if inside { fg } else { bg })
        })
    }

    #[test]
    fn reads_drawn_scenes() {
        let img = scene([240, 240, 240], [220, 40, 40], 16, 7, false);
        let r = read_scene(&img);
        assert_eq!(r.background, "white");
        assert_eq!(r.colour.as_deref(), Some("red"));
        assert_eq!(r.position.as_deref(), Some("left"));
        assert_eq!(r.size.as_deref(), Some("small"));
        assert_eq!(r.shape.as_deref(), Some("circle"));
        let img = scene([40, 80, 220], [235, 205, 40], 48, 12, true);
        let r = read_scene(&img);
        assert_eq!(
            (
                r.background.as_str(),
                r.colour.as_deref(),
                r.position.as_deref()
            ),
            ("blue", Some("yellow"), Some("right"))
        );
        assert_eq!(
            (r.size.as_deref(), r.shape.as_deref()),
            (Some("large"), Some("square"))
        );
        let blank = RgbImage::from_pixel(64, 64, Rgb([20, 20, 20]));
        assert_eq!(read_scene(&blank).colour, None);
    }

    #[test]
    fn concept_score_finds_shifted_copies_only() {
        let concept = scene([240, 240, 240], [255, 140, 0], 32, 12, false);
        let t = [ConceptTemplate::new(&concept)];
        assert!(t[0].len() > 400);
        let shifted = scene([20, 20, 20], [255, 140, 0], 42, 12, false);
        assert!(concept_score(&shifted, &t) > 0.95);
        let other = scene([240, 240, 240], [40, 80, 220], 32, 12, false);
        assert!(concept_score(&other, &t) < 0.05);
        // A smaller copy: (8/12)² of the object matches exactly, the rest is 255+ levels off.
        let half = scene([240, 240, 240], [255, 140, 0], 32, 8, false);
        let s = concept_score(&half, &t);
        assert!(s > 0.35 && s < 0.55, "{s}");
        // A near colour counts in part: 32 levels off in one channel → 0.75.
        let near = scene([240, 240, 240], [223, 140, 0], 32, 12, false);
        let s = concept_score(&near, &t);
        assert!((s - 0.75).abs() < 0.02, "{s}");
    }
}
