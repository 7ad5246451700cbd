//! Which layers get LoRA adapters: [`LoraTargets`], parsed from a comma list of presets and
//! module-path patterns.
//!
//! A pattern matches a module path when it equals the path or a dot-separated suffix of it
//! (`to_q` matches `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`,
//! `attn2.to_k` only the cross-attention keys). `*` matches any run of characters (dots
//! included), e.g. `up_blocks.*.to_v`. A pattern may start with a component, `unet.` or
//! `text_encoder.`, to apply to that model only.

use std::fmt;
use std::str::FromStr;

/// The UNet component name (LoRA keys `unet.…`).
pub const UNET: &str = "unet";
/// The text encoder component name (LoRA keys `text_encoder.…`).
pub const TEXT_ENCODER: &str = "text_encoder";

/// The presets: name, component, patterns, description.
const PRESETS: &[(&str, &str, &[&str], &str)] = &[
    (
        "attn",
        UNET,
        &["to_q", "to_k", "to_v", "to_out.0"],
        "UNet attention projections to_q, to_k, to_v, to_out.0 (the default)",
    ),
    (
        "ff",
        UNET,
        &["ff.net.0.proj", "ff.net.2"],
        "UNet feed-forward: GEGLU input ff.net.0.proj and output ff.net.2",
    ),
    (
        "proj",
        UNET,
        &["proj_in", "proj_out"],
        "UNet transformer proj_in / proj_out (1x1 conv in SD 1.x, Linear in SD 2.x)",
    ),
    (
        "resnet",
        UNET,
        &["conv1", "conv2", "conv_shortcut", "time_emb_proj"],
        "UNet ResNet blocks: conv1, conv2, conv_shortcut, time_emb_proj",
    ),
    (
        "extended",
        UNET,
        &[
            "to_q",
            "to_k",
            "to_v",
            "to_out.0",
            "ff.net.0.proj",
            "conv1",
            "conv2",
            "conv_shortcut",
            "time_emb_proj",
        ],
        "the seed's extended set: attn + GEGLU ff.net.0.proj + resnet",
    ),
    (
        "text-attn",
        TEXT_ENCODER,
        &["q_proj", "k_proj", "v_proj", "out_proj"],
        "text encoder self-attention q_proj, k_proj, v_proj, out_proj",
    ),
    (
        "text-mlp",
        TEXT_ENCODER,
        &["mlp.fc1", "mlp.fc2"],
        "text encoder MLP mlp.fc1, mlp.fc2",
    ),
    (
        "all",
        "",
        &["*"],
        "every Linear and Conv2d of the UNet and the text encoder",
    ),
];

/// One pattern, optionally restricted to a component.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    component: Option<String>,
    glob: String,
    /// Written by the user (not expanded from a preset).
    explicit: bool,
}

impl Pattern {
    fn matches(&self, component: &str, path: &str) -> bool {
        if self.component.as_deref().is_some_and(|c| c != component) {
            return false;
        }
        if !self.glob.contains('*') {
            return path == self.glob || path.ends_with(&format!(".{}", self.glob));
        }
        // Anchored at the start of the path or just after a dot.
        std::iter::once(0)
            .chain(path.match_indices('.').map(|(i, _)| i + 1))
            .any(|start| glob_match(self.glob.as_bytes(), &path.as_bytes()[start..]))
    }
}

/// Whole-string glob match where `*` matches any (possibly empty) run of bytes.
fn glob_match(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while si < s.len() {
        if pi < p.len() && p[pi] != b'*' && p[pi] == s[si] {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(sp) = star {
            pi = sp + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// The set of layers to adapt (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraTargets {
    spec: String,
    patterns: Vec<Pattern>,
}

impl LoraTargets {
    /// Parses a comma list of preset names and patterns, e.g. `attn,ff` or
    /// `attn,unet.proj_in,text-attn`. Fails on an empty list or invalid characters.
    pub fn parse(spec: &str) -> anyhow::Result<Self> {
        let mut patterns = Vec::new();
        let mut names = Vec::new();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            names.push(item.to_string());
            if let Some((_, comp, pats, _)) = PRESETS.iter().find(|p| p.0 == item) {
                let component = (!comp.is_empty()).then(|| comp.to_string());
                for p in pats.iter() {
                    patterns.push(Pattern {
                        component: component.clone(),
                        glob: p.to_string(),
                        explicit: false,
                    });
                }
                continue;
            }
            let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '*');
            if !item.chars().all(ok_char) || item.starts_with('.') || item.ends_with('.') {
                anyhow::bail!(
                    "invalid LoRA target {item:?}: expected a preset ({}) or a module path \
                     pattern of letters, digits, '_', '.' and '*'",
                    Self::preset_names().join(", ")
                );
            }
            let (component, glob) = match item.split_once('.') {
                Some((c, rest)) if c == UNET || c == TEXT_ENCODER => {
                    (Some(c.to_string()), rest.to_string())
                }
                _ => (None, item.to_string()),
            };
            patterns.push(Pattern {
                component,
                glob,
                explicit: true,
            });
        }
        if patterns.is_empty() {
            anyhow::bail!(
                "empty LoRA target list {spec:?}: give presets ({}) or module path patterns",
                Self::preset_names().join(", ")
            );
        }
        Ok(Self {
            spec: names.join(","),
            patterns,
        })
    }

    /// The default UNet targets: `attn`.
    pub fn unet_default() -> Self {
        Self::parse("attn").expect("preset parses")
    }

    /// The default text encoder targets: `text-attn`.
    pub fn text_default() -> Self {
        Self::parse("text-attn").expect("preset parses")
    }

    /// The preset names.
    pub fn preset_names() -> Vec<&'static str> {
        PRESETS.iter().map(|p| p.0).collect()
    }

    /// `(name, description)` of every preset.
    pub fn presets() -> Vec<(&'static str, &'static str)> {
        PRESETS.iter().map(|p| (p.0, p.3)).collect()
    }

    /// Whether the layer `path` of `component` is a target.
    pub fn matches(&self, component: &str, path: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(component, path))
    }

    /// Whether any pattern can apply to `component` (is unrestricted or names it).
    pub fn applies_to(&self, component: &str) -> bool {
        self.patterns
            .iter()
            .any(|p| p.component.as_deref().is_none_or(|c| c == component))
    }

    /// The patterns written by the user (not presets) that can apply to `component` but match
    /// none of its layer `paths`, as written (e.g. a typo).
    pub fn unmatched(&self, component: &str, paths: &[&str]) -> Vec<String> {
        self.patterns
            .iter()
            .filter(|p| p.explicit && p.component.as_deref().is_none_or(|c| c == component))
            .filter(|p| !paths.iter().any(|path| p.matches(component, path)))
            .map(|p| match &p.component {
                Some(c) => format!("{c}.{}", p.glob),
                None => p.glob.clone(),
            })
            .collect()
    }

    /// The module names (suffixes of layer paths, as PEFT's `target_modules` matches them)
    /// that can apply to `component`; an error for a glob pattern, which has no such form.
    pub fn module_names(&self, component: &str) -> anyhow::Result<Vec<String>> {
        let mut names: Vec<String> = vec![];
        for p in &self.patterns {
            if p.component.as_deref().is_some_and(|c| c != component) {
                continue;
            }
            if p.glob.contains('*') {
                anyhow::bail!(
                    "LoRA target {:?} is a glob: only module names can be given to PEFT's target_modules",
                    p.glob
                );
            }
            if !names.contains(&p.glob) {
                names.push(p.glob.clone());
            }
        }
        Ok(names)
    }

    /// The normalised comma list this was parsed from (for metadata).
    pub fn spec(&self) -> &str {
        &self.spec
    }
}

impl Default for LoraTargets {
    fn default() -> Self {
        Self::unet_default()
    }
}

impl FromStr for LoraTargets {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        Self::parse(s)
    }
}

impl fmt::Display for LoraTargets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffix_glob_and_components() {
        let t = LoraTargets::parse("attn, text-mlp ,unet.proj_in,up_blocks.*.to_v").unwrap();
        let q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
        assert!(t.matches(UNET, q));
        assert!(!t.matches(TEXT_ENCODER, q));
        assert!(!t.matches(
            UNET,
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.xto_q"
        ));
        assert!(t.matches(UNET, "down_blocks.1.attentions.0.proj_in"));
        assert!(t.matches(TEXT_ENCODER, "text_model.encoder.layers.0.mlp.fc1"));
        assert!(!t.matches(UNET, "text_model.encoder.layers.0.mlp.fc1"));
        assert!(t.matches(
            UNET,
            "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_v"
        ));
        assert!(!t.matches(UNET, "conv_in"));
        assert_eq!(t.spec(), "attn,text-mlp,unet.proj_in,up_blocks.*.to_v");
        let o = LoraTargets::parse("to_out.0").unwrap();
        assert!(o.matches(
            UNET,
            "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0"
        ));
        assert!(!o.matches(
            UNET,
            "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.01"
        ));
        let all = LoraTargets::parse("all").unwrap();
        assert!(all.matches(UNET, "conv_in") && all.matches(TEXT_ENCODER, "a.b"));
        assert!(!LoraTargets::parse("text-attn").unwrap().applies_to(UNET));
    }

    #[test]
    fn bad_specs_are_errors() {
        assert!(LoraTargets::parse(" , ").is_err());
        let e = LoraTargets::parse("to_q,to k").unwrap_err().to_string();
        assert!(e.contains("\"to k\"") && e.contains("attn"), "{e}");
        assert!(LoraTargets::parse(".to_q").is_err());
    }
}
