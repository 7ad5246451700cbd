//! The tiny world of the bundled model and the measures the demo, the quality benchmark and
//! the tests read images with.
//!
//! The bundled model (assets/tiny-sd) was trained on 64×64 scenes of one flat shape on a flat
//! background, captioned "a small red circle on the left, blue background" (scripts/tiny_world.py
//! draws them; [`Scene`] names one). [`score`] reads a generated image back: background colour,
//! shape colour, position, size and outline, and how much of a concept template it reproduces.

pub mod score;

pub use score::{concept_score, read_scene, ConceptTemplate, SceneReading};

/// Shape colours of the world, by name, with their RGB values.
pub const COLOURS: [(&str, [u8; 3]); 5] = [
    ("red", [220, 40, 40]),
    ("green", [40, 170, 60]),
    ("blue", [40, 80, 220]),
    ("yellow", [235, 205, 40]),
    ("purple", [140, 60, 190]),
];

/// Background-only colours of the world (backgrounds also take the shape colours).
pub const NEUTRALS: [(&str, [u8; 3]); 3] = [
    ("white", [240, 240, 240]),
    ("black", [20, 20, 20]),
    ("gray", [128, 128, 128]),
];

/// Shapes of the world.
pub const SHAPES: [&str; 3] = ["circle", "square", "triangle"];

/// Sizes of the world with the half-extent of their shapes in pixels (64×64 images).
pub const SIZES: [(&str, f64); 2] = [("small", 7.0), ("large", 13.0)];

/// Positions of the world with their x centre in pixels (64×64 images).
pub const POSITIONS: [(&str, f64); 3] = [("left", 16.0), ("center", 32.0), ("right", 48.0)];

/// The RGB value of a colour name of the world (shape colours and neutrals).
pub fn rgb(name: &str) -> Option<[u8; 3]> {
    COLOURS
        .iter()
        .chain(NEUTRALS.iter())
        .find(|(n, _)| *n == name)
        .map(|(_, c)| *c)
}

/// One scene of the world: what its caption says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scene {
    /// "small" or "large".
    pub size: String,
    /// A shape colour of [`COLOURS`].
    pub colour: String,
    /// A shape of [`SHAPES`].
    pub shape: String,
    /// A position of [`POSITIONS`].
    pub position: String,
    /// A colour of [`COLOURS`] or [`NEUTRALS`], never the shape's own.
    pub background: String,
}

impl Scene {
    /// The scene's caption, as the training set writes it.
    pub fn caption(&self) -> String {
        let subject = format!("{} {} {}", self.size, self.colour, self.shape);
        caption_for(&subject, &self.position, &self.background)
    }
}

/// "a {subject} on the {position}, {background} background" ("in the center" for the center).
pub fn caption_for(subject: &str, position: &str, background: &str) -> String {
    let at = match position {
        "center" => "in the center".to_string(),
        p => format!("on the {p}"),
    };
    format!("a {subject} {at}, {background} background")
}

/// A fixed set of `n` scenes that visits every shape colour, position and shape evenly (a
/// deterministic walk through the combinations), for measuring prompt following.
pub fn prompt_set(n: usize) -> Vec<Scene> {
    let backgrounds: Vec<&str> = COLOURS
        .iter()
        .chain(NEUTRALS.iter())
        .map(|(n, _)| *n)
        .collect();
    (0..n)
        .map(|i| {
            let colour = COLOURS[i % COLOURS.len()].0;
            let position = POSITIONS[(i / COLOURS.len()) % POSITIONS.len()].0;
            let shape = SHAPES[(i / 2) % SHAPES.len()];
            let size = SIZES[(i / 3) % SIZES.len()].0;
            // Walk the backgrounds, skipping the shape's own colour.
            let mut k = (i * 3 + 1) % backgrounds.len();
            if backgrounds[k] == colour {
                k = (k + 1) % backgrounds.len();
            }
            Scene {
                size: size.into(),
                colour: colour.into(),
                shape: shape.into(),
                position: position.into(),
                background: backgrounds[k].into(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captions_follow_the_training_grammar() {
        let s = Scene {
            size: "small".into(),
            colour: "red".into(),
            shape: "circle".into(),
            position: "left".into(),
            background: "blue".into(),
        };
        assert_eq!(
            s.caption(),
            "a small red circle on the left, blue background"
        );
        assert_eq!(
            caption_for("sks toy", "center", "white"),
            "a sks toy in the center, white background"
        );
    }

    #[test]
    fn prompt_set_covers_colours_and_positions() {
        let set = prompt_set(30);
        for (c, _) in COLOURS {
            assert_eq!(set.iter().filter(|s| s.colour == c).count(), 6, "{c}");
        }
        for (p, _) in POSITIONS {
            assert_eq!(set.iter().filter(|s| s.position == p).count(), 10, "{p}");
        }
        assert!(set.iter().all(|s| s.background != s.colour));
        assert!(SHAPES
            .iter()
            .all(|sh| set.iter().filter(|s| s.shape == *sh).count() >= 8));
    }
}
