//! The one table-driven mapping between file keys and our module paths, for every format.
//!
//! A key is `<prefix><path><suffix>`: the prefix names the component (or leaves it to the
//! path: `text_model.…` is the text encoder), the suffix names the tensor (down, up, alpha) and
//! may carry a legacy tail (`….processor.to_q_lora.down.weight` is the down factor of
//! `….to_q`), and the path is spelled with dots (diffusers, PEFT, ours), with underscores
//! (kohya: resolved against the known module paths of an [`Architecture`], never by guessing
//! which underscores were dots) or as an index into the module-traversal order (cloneofsimo).
//! Each format is one [`KeyScheme`] row set below; [`parse_key`] and [`format_key`] serve them all.

use super::arch::{traversal_key, Architecture};
use crate::lora::{FactorName, LayerKey};
use crate::models::ldm::keys::{unet_key, UnetLayout};
use std::collections::{BTreeMap, HashMap};

pub use crate::lora::Component;

/// The component a bare module path belongs to (`text_model.…` is the text encoder).
fn infer_component(path: &str) -> Component {
    if path.starts_with("text_model.") {
        Component::TextEncoder
    } else {
        Component::Unet
    }
}

/// Which tensor of a layer a key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The down factor (PEFT `lora_A`), applied first.
    Down,
    /// The up factor (PEFT `lora_B`).
    Up,
    /// The 0-d alpha.
    Alpha,
    /// A LyCORIS factor or a DoRA magnitude.
    Extra(FactorName),
}

/// How a format spells the module path between prefix and suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathStyle {
    /// `down_blocks.0.attentions.0…` as in the state dict.
    Dotted,
    /// Dots replaced by underscores (kohya).
    Underscored,
    /// A decimal index into the module-traversal order (cloneofsimo).
    Indexed,
}

/// One suffix of a scheme.
#[derive(Debug)]
pub struct Suffix {
    /// The key's ending.
    pub file: &'static str,
    /// The tensor it holds.
    pub part: Part,
    /// Legacy names: what to append to the path for each component (empty: nothing, any
    /// component).
    pub tails: &'static [(Component, &'static str)],
    /// Components this suffix is written for (first match per part wins).
    pub write: &'static [Component],
}

/// A format's key naming: prefixes, path style, suffixes.
#[derive(Debug)]
pub struct KeyScheme {
    /// What the keys are called in messages.
    pub name: &'static str,
    /// Key prefixes with the component they name (`None`: inferred from the path), tried in
    /// order; writing uses the first one naming the component.
    pub prefixes: &'static [(&'static str, Option<Component>)],
    /// How the path is spelled.
    pub style: PathStyle,
    /// Suffixes, tried in order (longer ones first).
    pub suffixes: &'static [Suffix],
}

const BOTH: &[Component] = &[Component::Unet, Component::TextEncoder];
const NONE: &[Component] = &[];
const U: Component = Component::Unet;
const T: Component = Component::TextEncoder;

const fn sfx(file: &'static str, part: Part, write: &'static [Component]) -> Suffix {
    Suffix {
        file,
        part,
        tails: &[],
        write,
    }
}

const fn legacy(
    file: &'static str,
    part: Part,
    tails: &'static [(Component, &'static str)],
) -> Suffix {
    Suffix {
        file,
        part,
        tails,
        write: NONE,
    }
}

const fn extra(file: &'static str, name: FactorName) -> Suffix {
    sfx(file, Part::Extra(name), BOTH)
}

const KOHYA_SUFFIXES: &[Suffix] = &[
    sfx(".lora_down.weight", Part::Down, BOTH),
    sfx(".lora_up.weight", Part::Up, BOTH),
    sfx(".alpha", Part::Alpha, BOTH),
    extra(".hada_w1_a", FactorName::HadaW1A),
    extra(".hada_w1_b", FactorName::HadaW1B),
    extra(".hada_w2_a", FactorName::HadaW2A),
    extra(".hada_w2_b", FactorName::HadaW2B),
    extra(".hada_t1", FactorName::HadaT1),
    extra(".hada_t2", FactorName::HadaT2),
    extra(".lokr_w1_a", FactorName::LokrW1A),
    extra(".lokr_w1_b", FactorName::LokrW1B),
    extra(".lokr_w1", FactorName::LokrW1),
    extra(".lokr_w2_a", FactorName::LokrW2A),
    extra(".lokr_w2_b", FactorName::LokrW2B),
    extra(".lokr_w2", FactorName::LokrW2),
    extra(".lokr_t2", FactorName::LokrT2),
    extra(".dora_scale", FactorName::DoraScale),
];

/// Our own format: `unet.<path>.lora_down.weight`, `.lora_up.weight`, `.alpha`.
pub const OURS: KeyScheme = KeyScheme {
    name: "our-format",
    prefixes: &[("unet.", Some(U)), ("text_encoder.", Some(T))],
    style: PathStyle::Dotted,
    suffixes: KOHYA_SUFFIXES,
};

/// kohya-ss / A1111: `lora_unet_<path_with_underscores>.lora_down.weight`, `lora_te_…`.
pub const KOHYA: KeyScheme = KeyScheme {
    name: "kohya",
    prefixes: &[
        ("lora_unet_", Some(U)),
        ("lora_te_", Some(T)),
        ("lora_te1_", Some(T)),
    ],
    style: PathStyle::Underscored,
    suffixes: KOHYA_SUFFIXES,
};

/// diffusers: `unet.<path>.lora.down.weight`, `text_encoder.<path>.lora_linear_layer.down.weight`,
/// PEFT names behind the component prefix, and the attention-processor names of diffusers < 0.15
/// (with or without the `unet.` prefix).
pub const DIFFUSERS: KeyScheme = KeyScheme {
    name: "diffusers",
    prefixes: &[("unet.", Some(U)), ("text_encoder.", Some(T)), ("", None)],
    style: PathStyle::Dotted,
    suffixes: &[
        sfx(".lora.down.weight", Part::Down, &[U]),
        sfx(".lora.up.weight", Part::Up, &[U]),
        sfx(".lora_linear_layer.down.weight", Part::Down, &[T]),
        sfx(".lora_linear_layer.up.weight", Part::Up, &[T]),
        sfx(".lora_A.weight", Part::Down, NONE),
        sfx(".lora_B.weight", Part::Up, NONE),
        legacy(
            ".processor.to_q_lora.down.weight",
            Part::Down,
            &[(U, ".to_q")],
        ),
        legacy(".processor.to_q_lora.up.weight", Part::Up, &[(U, ".to_q")]),
        legacy(
            ".processor.to_k_lora.down.weight",
            Part::Down,
            &[(U, ".to_k")],
        ),
        legacy(".processor.to_k_lora.up.weight", Part::Up, &[(U, ".to_k")]),
        legacy(
            ".processor.to_v_lora.down.weight",
            Part::Down,
            &[(U, ".to_v")],
        ),
        legacy(".processor.to_v_lora.up.weight", Part::Up, &[(U, ".to_v")]),
        legacy(
            ".processor.to_out_lora.down.weight",
            Part::Down,
            &[(U, ".to_out.0")],
        ),
        legacy(
            ".processor.to_out_lora.up.weight",
            Part::Up,
            &[(U, ".to_out.0")],
        ),
        legacy(
            ".to_q_lora.down.weight",
            Part::Down,
            &[(U, ".to_q"), (T, ".q_proj")],
        ),
        legacy(
            ".to_q_lora.up.weight",
            Part::Up,
            &[(U, ".to_q"), (T, ".q_proj")],
        ),
        legacy(
            ".to_k_lora.down.weight",
            Part::Down,
            &[(U, ".to_k"), (T, ".k_proj")],
        ),
        legacy(
            ".to_k_lora.up.weight",
            Part::Up,
            &[(U, ".to_k"), (T, ".k_proj")],
        ),
        legacy(
            ".to_v_lora.down.weight",
            Part::Down,
            &[(U, ".to_v"), (T, ".v_proj")],
        ),
        legacy(
            ".to_v_lora.up.weight",
            Part::Up,
            &[(U, ".to_v"), (T, ".v_proj")],
        ),
        legacy(
            ".to_out_lora.down.weight",
            Part::Down,
            &[(U, ".to_out.0"), (T, ".out_proj")],
        ),
        legacy(
            ".to_out_lora.up.weight",
            Part::Up,
            &[(U, ".to_out.0"), (T, ".out_proj")],
        ),
        sfx(".alpha", Part::Alpha, BOTH),
        extra(".lora_magnitude_vector", FactorName::Magnitude),
    ],
};

/// Raw PEFT: `[base_model.model.]<path>.lora_A.weight` / `.lora_B.weight`; the component comes
/// from the path.
pub const PEFT: KeyScheme = KeyScheme {
    name: "PEFT",
    prefixes: &[("base_model.model.", None), ("", None)],
    style: PathStyle::Dotted,
    suffixes: &[
        sfx(".lora_A.weight", Part::Down, BOTH),
        sfx(".lora_B.weight", Part::Up, BOTH),
        extra(".lora_magnitude_vector", FactorName::Magnitude),
    ],
};

/// cloneofsimo/lora safetensors: `unet:<i>:up`, `unet:<i>:down`, `text_encoder:<i>:…`.
pub const CLONEOFSIMO: KeyScheme = KeyScheme {
    name: "cloneofsimo",
    prefixes: &[("unet:", Some(U)), ("text_encoder:", Some(T))],
    style: PathStyle::Indexed,
    suffixes: &[sfx(":up", Part::Up, BOTH), sfx(":down", Part::Down, BOTH)],
};

/// The single-file UNet layout of `arch`, read off its layer paths (resnets per down block,
/// levels, which up blocks have attentions).
fn ldm_layout(arch: &Architecture) -> UnetLayout {
    let mut per = 0;
    let mut levels = 0;
    let mut up_attention = vec![];
    let index = |rest: &str| rest.split('.').next().and_then(|i| i.parse::<usize>().ok());
    for layer in arch.layers().keys() {
        let Some(path) = layer.path_in(Component::Unet) else {
            continue;
        };
        if let Some(rest) = path.strip_prefix("down_blocks.") {
            if let Some(b) = index(rest) {
                levels = levels.max(b + 1);
            }
            if let Some(j) = rest.strip_prefix("0.resnets.").and_then(index) {
                per = per.max(j + 1);
            }
        }
        if let Some(rest) = path.strip_prefix("up_blocks.") {
            if let Some(b) = index(rest) {
                if up_attention.len() <= b {
                    up_attention.resize(b + 1, false);
                }
                if rest.split('.').nth(1) == Some("attentions") {
                    up_attention[b] = true;
                }
            }
        }
    }
    UnetLayout {
        layers_per_block: per,
        levels,
        up_attention,
    }
}

/// What a path spelled without dots or by index resolves to.
#[derive(Debug, Default)]
pub struct KeyIndex {
    underscored: HashMap<(Component, String), Vec<String>>,
    ordered: BTreeMap<Component, Vec<String>>,
}

impl KeyIndex {
    /// Underscored spellings of every layer of `archs` (for kohya): the module path and, for
    /// the UNet, its name in the original single-file layout (`input_blocks_1_1_…`).
    pub fn underscored(archs: &[&Architecture]) -> Self {
        let mut underscored: HashMap<(Component, String), Vec<String>> = HashMap::new();
        for arch in archs {
            let layout = ldm_layout(arch);
            for layer in arch.layers().keys() {
                if let Some(c) = layer.component() {
                    let path = layer.path();
                    let mut names = vec![path.replace('.', "_")];
                    if c == Component::Unet {
                        if let Ok(k) = unet_key(&format!("{path}.weight"), &layout) {
                            names.push(k.trim_end_matches(".weight").replace('.', "_"));
                        }
                    }
                    for name in names {
                        let paths = underscored.entry((c, name)).or_default();
                        if !paths.iter().any(|p| p == path) {
                            paths.push(path.to_string());
                        }
                    }
                }
            }
        }
        Self {
            underscored,
            ordered: BTreeMap::new(),
        }
    }

    /// Component-prefixed layer keys in file order, per component (for cloneofsimo).
    pub fn ordered(ordered: BTreeMap<Component, Vec<String>>) -> Self {
        Self {
            underscored: HashMap::new(),
            ordered,
        }
    }

    /// Underscored spellings that several module paths share (none for SD 1/2).
    pub fn ambiguous(&self) -> Vec<(String, Vec<String>)> {
        self.underscored
            .iter()
            .filter(|(_, v)| v.len() > 1)
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// A key resolved to our naming.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedKey {
    /// The layer (a key of `LoraSet::layers`).
    pub layer: LayerKey,
    /// The tensor the key holds.
    pub part: Part,
}

/// Resolves `key` under `scheme`; `None` when it matches no row (or names no known module).
pub fn parse_key(scheme: &KeyScheme, key: &str, index: &KeyIndex) -> Option<ParsedKey> {
    for (prefix, comp) in scheme.prefixes {
        let Some(rest) = key.strip_prefix(prefix) else {
            continue;
        };
        for s in scheme.suffixes {
            let Some(body) = rest.strip_suffix(s.file) else {
                continue;
            };
            if body.is_empty() {
                continue;
            }
            let component = comp.unwrap_or_else(|| infer_component(body));
            let tail = if s.tails.is_empty() {
                ""
            } else {
                match s.tails.iter().find(|(c, _)| *c == component) {
                    Some((_, t)) => t,
                    None => continue,
                }
            };
            let path = match scheme.style {
                PathStyle::Dotted => format!("{body}{tail}"),
                PathStyle::Underscored => {
                    match index.underscored.get(&(component, body.to_string())) {
                        Some(paths) if paths.len() == 1 => format!("{}{tail}", paths[0]),
                        _ => continue,
                    }
                }
                PathStyle::Indexed => {
                    let Ok(i) = body.parse::<usize>() else {
                        continue;
                    };
                    match index.ordered.get(&component).and_then(|v| v.get(i)) {
                        Some(layer) => match LayerKey::from(layer.as_str()).path_in(component) {
                            Some(p) => p.to_string(),
                            None => continue,
                        },
                        None => continue,
                    }
                }
            };
            return Some(ParsedKey {
                layer: LayerKey::new(component, &path),
                part: s.part,
            });
        }
    }
    None
}

/// The key `scheme` writes for `part` of `layer` (component-prefixed path); for indexed
/// schemes `index_of` gives the position. `None` when the scheme cannot name it.
pub fn format_key(
    scheme: &KeyScheme,
    layer: &LayerKey,
    part: Part,
    index_of: Option<usize>,
) -> Option<String> {
    let (component, path) = (layer.component()?, layer.path());
    let prefix = scheme
        .prefixes
        .iter()
        .find(|(_, c)| *c == Some(component))
        .map(|(p, _)| *p)
        .or_else(|| {
            scheme
                .prefixes
                .iter()
                .find(|(_, c)| c.is_none())
                .map(|(p, _)| *p)
        })?;
    let suffix = scheme
        .suffixes
        .iter()
        .find(|s| s.part == part && s.write.contains(&component))?;
    let body = match scheme.style {
        PathStyle::Dotted => path.to_string(),
        PathStyle::Underscored => path.replace('.', "_"),
        PathStyle::Indexed => index_of?.to_string(),
    };
    Some(format!("{prefix}{body}{}", suffix.file))
}

/// Sorts component-prefixed layer keys into the module-traversal order of diffusers < 0.15.
pub fn sort_traversal(layers: &mut [String]) {
    layers.sort_by_cached_key(|l| traversal_key(l));
}

/// Items one per line, at most `max` of them, for error messages.
pub fn short_list(items: &[impl std::fmt::Display], max: usize) -> String {
    let mut s: Vec<String> = items
        .iter()
        .take(max)
        .map(|k| format!("\n    {k}"))
        .collect();
    if items.len() > max {
        s.push(format!("\n    ... and {} more", items.len() - max));
    }
    s.concat()
}
