//! cloneofsimo/lora files: modules identified by their position in a module traversal.
//!
//! - `.safetensors`: `unet:<i>:up`, `unet:<i>:down`, `text_encoder:<i>:…`; metadata `unet` /
//!   `text_encoder` = JSON list of the target module classes, `unet:<i>:rank`; learned token
//!   embeddings (metadata value `<embed>`) are read and written by [`super::embeddings`]. up is
//!   stored pre-multiplied by the scale.
//! - `.pt`: `torch.save([up0, down0, up1, down1, …])` for the UNet, `X.text_encoder.pt` beside
//!   it for the text encoder; read with candle's pickle parser (no code is executed). The
//!   target classes are not stored: the usual sets are tried until count and shapes fit.
//!
//! Position i is the i-th Linear (and, for conv targets, Conv2d) under an ancestor module of a
//! target class, ancestors in the module traversal of diffusers < 0.15 (down, up, mid blocks;
//! in a transformer block attn1, ff, attn2; CLIP attention k, v, q, out). The file does not say
//! which model it is for: positions resolve against the model's architecture, or SD 1.x / SD 2.x,
//! whichever fits every shape. alpha is not stored: read layers get alpha = rank (scale 1).

use super::arch::{traversal_key, Architecture};
use super::check::{check_against, guess_arch, guess_base};
use super::io::Container;
use super::keymap::{format_key, short_list, Component, KeyIndex, Part, CLONEOFSIMO};
use super::{finish, gather, Cast, Encoded, Format, LoraFile, LoraFormat, ReadContext};
use crate::lora::{LayerKey, LoraSet};
use anyhow::{anyhow, bail, Context};
use candle_core::{DType, Tensor};
use regex::Regex;
use std::collections::{BTreeMap, BTreeSet};

/// Target module classes and the module paths (relative to the component) they are found at.
const CLASSES: &[(&str, Component, &str)] = &[
    (
        "CrossAttention",
        Component::Unet,
        r"(^|\.)transformer_blocks\.\d+\.attn[12]$",
    ),
    (
        "Attention",
        Component::Unet,
        r"(^|\.)transformer_blocks\.\d+\.attn[12]$",
    ),
    ("GEGLU", Component::Unet, r"(^|\.)ff\.net\.0$"),
    ("ResnetBlock2D", Component::Unet, r"(^|\.)resnets\.\d+$"),
    (
        "Transformer2DModel",
        Component::Unet,
        r"(^|\.)attentions\.\d+$",
    ),
    ("Downsample2D", Component::Unet, r"(^|\.)downsamplers\.\d+$"),
    ("Upsample2D", Component::Unet, r"(^|\.)upsamplers\.\d+$"),
    ("CLIPAttention", Component::TextEncoder, r"(^|\.)self_attn$"),
    (
        "CLIPSdpaAttention",
        Component::TextEncoder,
        r"(^|\.)self_attn$",
    ),
    ("CLIPMLP", Component::TextEncoder, r"(^|\.)mlp$"),
];

/// Target sets tried for `.pt` files (which do not record theirs), most common first.
const PT_TARGETS: &[(Component, &[&str])] = &[
    (Component::Unet, &["CrossAttention", "Attention", "GEGLU"]),
    (Component::Unet, &["CrossAttention", "Attention"]),
    (
        Component::Unet,
        &["ResnetBlock2D", "CrossAttention", "Attention", "GEGLU"],
    ),
    (Component::TextEncoder, &["CLIPAttention"]),
    (Component::TextEncoder, &["CLIPAttention", "CLIPMLP"]),
];

/// The layers (component-prefixed) cloneofsimo's module search yields for `targets` in `arch`,
/// in file order; `conv` also yields Conv2d layers (its "extended" injection).
pub fn module_order(
    arch: &Architecture,
    component: Component,
    targets: &[String],
    conv: bool,
) -> anyhow::Result<Vec<String>> {
    let mut res = vec![];
    for t in targets {
        match CLASSES
            .iter()
            .find(|(c, comp, _)| c == t && *comp == component)
        {
            Some((_, _, re)) => res.push(Regex::new(re)?),
            None => bail!(
                "unknown {} target class {t:?} (known: {})",
                component.name(),
                class_names(component)
            ),
        }
    }
    let layers: Vec<(&str, &Vec<usize>)> = arch
        .layers()
        .iter()
        .filter_map(|(k, s)| k.path_in(component).map(|p| (p, s)))
        .filter(|(_, s)| s.len() == 2 || (conv && s.len() == 4))
        .collect();
    let mut ancestors = BTreeSet::new();
    for (p, _) in &layers {
        let mut end = 0;
        while let Some(i) = p[end..].find('.') {
            end += i;
            let a = &p[..end];
            if res.iter().any(|re| re.is_match(a)) {
                ancestors.insert(a.to_string());
            }
            end += 1;
        }
    }
    let mut ancestors: Vec<String> = ancestors.into_iter().collect();
    ancestors.sort_by_cached_key(|a| traversal_key(a));
    let mut out = vec![];
    let mut seen = BTreeSet::new();
    for a in &ancestors {
        let mut under: Vec<&str> = layers
            .iter()
            .map(|(p, _)| *p)
            .filter(|p| p.starts_with(&format!("{a}.")))
            .collect();
        under.sort_by_cached_key(|p| traversal_key(p));
        for p in under {
            if seen.insert(p) {
                out.push(format!("{}.{p}", component.name()));
            }
        }
    }
    Ok(out)
}

fn class_names(component: Component) -> String {
    CLASSES
        .iter()
        .filter(|(_, c, _)| *c == component)
        .map(|(n, _, _)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Indexed (up, down) pairs of one component, as found in a file.
type Pairs = BTreeMap<usize, (Tensor, Tensor)>;

/// Whether each (up, down) fits the layer at the same position.
fn fits(arch: &Architecture, order: &[String], pairs: &Pairs) -> Result<(), String> {
    if order.len() != pairs.len() {
        return Err(format!(
            "{} layers in the file, {} in {}",
            pairs.len(),
            order.len(),
            arch.name
        ));
    }
    for ((i, (up, down)), layer) in pairs.iter().zip(order) {
        let w = arch.get(layer).unwrap_or(&[]);
        let (u, d) = (up.dims(), down.dims());
        if d.len() != w.len() || w.is_empty() || u[0] != w[0] || d[1..] != w[1..] {
            return Err(format!(
                "position {i}: up {u:?} / down {d:?} do not fit {layer} {w:?} in {}",
                arch.name
            ));
        }
    }
    Ok(())
}

/// Resolves the positions of one component: the first (architecture, targets, conv) whose
/// module order fits every shape.
fn resolve(
    component: Component,
    pairs: &Pairs,
    target_sets: &[Vec<String>],
    ctx: &ReadContext,
) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let mut tried = vec![];
    for arch in ctx.candidates() {
        for targets in target_sets {
            for conv in [false, true] {
                let order = module_order(arch, component, targets, conv)?;
                match fits(arch, &order, pairs) {
                    Ok(()) => return Ok((order, targets.clone())),
                    Err(e) => tried.push(format!(
                        "targets {targets:?}{}: {e}",
                        if conv { " with convs" } else { "" }
                    )),
                }
            }
        }
    }
    tried.dedup();
    let hint = if ctx.model.is_none() {
        "\n  (for a model other than SD 1.x / 2.x, pass its folder with --model)"
    } else {
        ""
    };
    bail!(
        "the {} positions fit no known module order:{}{hint}",
        component.name(),
        short_list(&tried, 12)
    )
}

/// Splits indexed keys into per-component (up, down) pairs.
fn pairs_of(
    file: &LoraFile,
    skip: &dyn Fn(&str) -> bool,
) -> anyhow::Result<BTreeMap<Component, Pairs>> {
    let mut ups: BTreeMap<(Component, usize), Tensor> = BTreeMap::new();
    let mut downs: BTreeMap<(Component, usize), Tensor> = BTreeMap::new();
    for (k, t) in &file.tensors {
        if skip(k) {
            continue;
        }
        let parts: Vec<&str> = k.split(':').collect();
        let comp = Component::ALL
            .into_iter()
            .find(|c| parts.first() == Some(&c.name()));
        match (
            comp,
            parts.get(1).and_then(|i| i.parse::<usize>().ok()),
            parts.get(2),
            parts.len(),
        ) {
            (Some(c), Some(i), Some(&"up"), 3) => ups.insert((c, i), t.clone()),
            (Some(c), Some(i), Some(&"down"), 3) => downs.insert((c, i), t.clone()),
            _ => None,
        };
    }
    let mut out: BTreeMap<Component, Pairs> = BTreeMap::new();
    for ((c, i), up) in ups {
        let down = downs.remove(&(c, i)).ok_or_else(|| {
            anyhow!(
                "{}: {}:{i}:up has no {}:{i}:down",
                file.path.display(),
                c.name(),
                c.name()
            )
        })?;
        out.entry(c).or_default().insert(i, (up, down));
    }
    if let Some(((c, i), _)) = downs.into_iter().next() {
        bail!(
            "{}: {}:{i}:down has no {}:{i}:up",
            file.path.display(),
            c.name(),
            c.name()
        );
    }
    for (c, p) in &out {
        if let Some((last, _)) = p.iter().next_back() {
            if *last + 1 != p.len() {
                bail!(
                    "{}: {} positions are not 0..{} (found {} pairs up to {last})",
                    file.path.display(),
                    c.name(),
                    p.len(),
                    p.len()
                );
            }
        }
    }
    Ok(out)
}

/// A `.pt` list (and its `.text_encoder.pt` sibling) as indexed keys.
fn from_pickles(file: &LoraFile) -> anyhow::Result<LoraFile> {
    let name = file
        .path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    let mut lists = vec![];
    if name.ends_with(".text_encoder.pt") {
        lists.push((Component::TextEncoder, file.list.clone()));
    } else {
        lists.push((Component::Unet, file.list.clone()));
        let te = file
            .path
            .with_file_name(format!("{}.text_encoder.pt", name.trim_end_matches(".pt")));
        if te.is_file() {
            lists.push((Component::TextEncoder, super::io::read_pickle_list(&te)?));
        }
    }
    let mut tensors = BTreeMap::new();
    for (c, list) in lists {
        if list.len() % 2 != 0 {
            bail!(
                "{}: {} tensors in the {} list; expected (up, down) pairs",
                file.path.display(),
                list.len(),
                c.name()
            );
        }
        for (i, pair) in list.chunks(2).enumerate() {
            tensors.insert(format!("{}:{i}:up", c.name()), pair[0].clone());
            tensors.insert(format!("{}:{i}:down", c.name()), pair[1].clone());
        }
    }
    Ok(LoraFile {
        tensors,
        container: Container::Safetensors,
        list: vec![],
        ..file.clone()
    })
}

/// The cloneofsimo format.
pub struct Cloneofsimo;

impl LoraFormat for Cloneofsimo {
    fn format(&self) -> Format {
        Format::Cloneofsimo
    }

    fn read(&self, file: &LoraFile, ctx: &ReadContext) -> anyhow::Result<LoraSet> {
        let pickled = file.container == Container::PickleList;
        let file = if pickled {
            from_pickles(file)?
        } else {
            file.clone()
        };
        let is_embed = |k: &str| file.metadata.get(k).map(String::as_str) == Some("<embed>");
        let mut ordered = BTreeMap::new();
        for (c, pairs) in pairs_of(&file, &is_embed)? {
            let sets: Vec<Vec<String>> = match file.metadata.get(c.name()) {
                Some(json) => vec![serde_json::from_str(json).with_context(|| {
                    format!(
                        "metadata {} is not a JSON list of class names: {json}",
                        c.name()
                    )
                })?],
                None => PT_TARGETS
                    .iter()
                    .filter(|(comp, _)| *comp == c)
                    .map(|(_, t)| t.iter().map(|s| s.to_string()).collect())
                    .collect(),
            };
            let (order, _) = resolve(c, &pairs, &sets, ctx)
                .with_context(|| format!("cannot place the layers of {}", file.path.display()))?;
            ordered.insert(c, order);
        }
        let raw = gather(&file, &CLONEOFSIMO, &KeyIndex::ordered(ordered), is_embed)?;
        let mut set = finish(&file, raw, |_, r| Ok(r as f64))?;
        set.embeddings = super::embeddings::read_cloneofsimo(&file)?;
        Ok(set)
    }

    fn encode(&self, set: &LoraSet, arch: Option<&Architecture>) -> anyhow::Result<Encoded> {
        let arch = match arch.or_else(|| guess_arch(set)) {
            Some(a) => a,
            None => bail!(
                "cloneofsimo files index layers by module order, which needs the model architecture; \
                 this LoRA is for {}: pass the model folder with --model",
                guess_base(set)
            ),
        };
        check_against(set, arch)?;
        let not_plain: Vec<String> = set
            .layers
            .iter()
            .filter(|(_, w)| !w.is_plain())
            .map(|(k, w)| format!("{k} ({})", w.kind_label()))
            .collect();
        if !not_plain.is_empty() {
            anyhow::bail!(
                "cloneofsimo files hold plain LoRA factors only; {} layer(s) are not:{}",
                not_plain.len(),
                super::keymap::short_list(&not_plain, 12)
            );
        }
        let mut enc = Encoded::carrying(set);
        for c in Component::ALL {
            let mine: BTreeSet<&str> = set
                .layers
                .keys()
                .filter(|k| k.component() == Some(c))
                .map(|k| k.as_str())
                .collect();
            if mine.is_empty() {
                continue;
            }
            let conv = mine.iter().any(|k| set.layers[*k].is_conv());
            let (order, targets) = choose_targets(arch, c, &mine, conv)?;
            enc.metadata
                .insert(c.name().into(), serde_json::to_string(&targets)?);
            for (i, layer) in order.iter().enumerate() {
                let w = &set.layers[layer.as_str()];
                let up = (w.up().to_dtype(DType::F32)? * w.scale())?;
                let key = |p| {
                    format_key(&CLONEOFSIMO, &LayerKey::from(layer.as_str()), p, Some(i))
                        .with_context(|| format!("cannot name {layer}"))
                };
                enc.tensors.push((key(Part::Up)?, up, Cast::Weight));
                enc.tensors
                    .push((key(Part::Down)?, w.down().clone(), Cast::Weight));
                enc.metadata
                    .insert(format!("{}:{i}:rank", c.name()), w.rank().to_string());
            }
        }
        super::embeddings::push_cloneofsimo(&mut enc, set)?;
        Ok(enc)
    }
}

/// The target classes whose modules are exactly the LoRA's layers of component `c`.
fn choose_targets(
    arch: &Architecture,
    c: Component,
    mine: &BTreeSet<&str>,
    conv: bool,
) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let groups: &[&[&str]] = match c {
        Component::Unet => &[
            &["CrossAttention", "Attention"],
            &["GEGLU"],
            &["ResnetBlock2D"],
            &["Downsample2D"],
            &["Upsample2D"],
            &["Transformer2DModel"],
        ],
        Component::TextEncoder => &[&["CLIPAttention"], &["CLIPMLP"]],
    };
    let mut chosen: Vec<String> = vec![];
    let mut covered: BTreeSet<String> = BTreeSet::new();
    let mut lacking: Vec<String> = vec![];
    for g in groups {
        let targets: Vec<String> = g.iter().map(|s| s.to_string()).collect();
        let layers = module_order(arch, c, &targets, conv)?;
        let new: Vec<&String> = layers.iter().filter(|l| !covered.contains(*l)).collect();
        let absent: Vec<&String> = new
            .iter()
            .copied()
            .filter(|l| !mine.contains(l.as_str()))
            .collect();
        if !new.is_empty() && absent.is_empty() {
            covered.extend(layers.iter().cloned());
            chosen.extend(targets);
        } else if absent.len() < new.len() {
            let names: BTreeSet<String> =
                absent.iter().map(|l| super::ours::target_name(l)).collect();
            lacking.push(format!(
                "{} would also need {} layers ({})",
                g[0],
                absent.len(),
                names.into_iter().collect::<Vec<_>>().join(", ")
            ));
        }
    }
    if chosen.iter().any(|t| t == "Transformer2DModel") {
        // Its modules include the attention and GEGLU ones; listing both would repeat them.
        chosen.retain(|t| !matches!(t.as_str(), "CrossAttention" | "Attention" | "GEGLU"));
    }
    let bad: Vec<String> = mine
        .iter()
        .filter(|l| chosen.is_empty() || !covered.contains(**l))
        .map(|l| l.to_string())
        .collect();
    if !bad.is_empty() {
        let why = if lacking.is_empty() {
            String::new()
        } else {
            format!("\n  {}", lacking.join("\n  "))
        };
        bail!(
            "the cloneofsimo format adapts every Linear{} under whole module classes ({}); \
             these {} layers of the LoRA form no such set:{}{why}",
            if conv { "/Conv2d" } else { "" },
            class_names(c),
            bad.len(),
            short_list(&bad, 10)
        );
    }
    let order = module_order(arch, c, &chosen, conv)?;
    Ok((order, chosen))
}
