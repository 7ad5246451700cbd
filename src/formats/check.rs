//! Checking a LoRA against a model architecture: every layer must exist and every factor
//! must fit the layer's weight. One error lists all problems, led by a diagnosis when the
//! LoRA was made for another model family ("cross-attention dim 1024 in the LoRA, 768 in the
//! model").

use super::arch::{base_model_name, Architecture};
use super::keymap::short_list;
use crate::lora::{Component, LoraSet};
use anyhow::bail;

/// The UNet cross-attention width a LoRA was made for (input width of its `attn2.to_k` /
/// `attn2.to_v` factors), if it adapts one.
pub fn lora_cross_attention_dim(set: &LoraSet) -> Option<usize> {
    set.layers
        .iter()
        .find(|(k, w)| {
            k.component() == Some(Component::Unet)
                && (k.path().ends_with(".attn2.to_k") || k.path().ends_with(".attn2.to_v"))
                && w.delta_shape().len() == 2
        })
        .map(|(_, w)| w.delta_shape()[1])
}

/// The text-encoder width a LoRA was made for (input width of its q/k/v projections or fc1).
pub fn lora_text_width(set: &LoraSet) -> Option<usize> {
    set.layers
        .iter()
        .find(|(k, _)| {
            k.component() == Some(Component::TextEncoder)
                && [".q_proj", ".k_proj", ".v_proj", ".fc1"]
                    .iter()
                    .any(|s| k.path().ends_with(s))
        })
        .map(|(_, w)| w.delta_shape()[1])
}

/// The model family a LoRA's shapes say it was made for (`SD 1.x (cross-attention dim 768)`, …).
pub fn guess_base(set: &LoraSet) -> String {
    base_model_name(lora_cross_attention_dim(set), lora_text_width(set))
}

/// The built-in architecture matching a LoRA's shapes (SD 1.x or SD 2.x), if any.
pub fn guess_arch(set: &LoraSet) -> Option<&'static Architecture> {
    match (lora_cross_attention_dim(set), lora_text_width(set)) {
        (Some(768), _) | (None, Some(768)) => Some(Architecture::sd15()),
        (Some(1024), _) | (None, Some(1024)) => Some(Architecture::sd21()),
        _ => None,
    }
}

/// Checks that every layer of `set` exists in `arch` and that its factors fit the layer's
/// weight; one error lists every problem.
pub fn check_against(set: &LoraSet, arch: &Architecture) -> anyhow::Result<()> {
    let mut absent = vec![];
    let mut mismatched = vec![];
    let mut cross = None;
    let mut text = None;
    for (layer, w) in &set.layers {
        let Some(want) = arch.get(layer.as_str()) else {
            absent.push(layer.clone());
            continue;
        };
        let got = w.delta_shape();
        if same_up_to_1x1(&got, want) {
            continue;
        }
        mismatched.push(format!("{layer}: LoRA ΔW {got:?}, model weight {want:?}"));
        let in_only = got.len() == want.len() && got[0] == want[0] && got[2..] == want[2..];
        if in_only
            && layer.component() == Some(Component::Unet)
            && (layer.path().ends_with(".attn2.to_k") || layer.path().ends_with(".attn2.to_v"))
        {
            cross.get_or_insert((got[1], want[1]));
        }
        if layer.component() == Some(Component::TextEncoder)
            && got.len() == 2
            && layer.path().ends_with("_proj")
        {
            text.get_or_insert((got[1], want[1]));
        }
    }
    if absent.is_empty() && mismatched.is_empty() {
        return Ok(());
    }
    let mut msg = format!("the LoRA does not fit {}", arch.name);
    let mut why = vec![];
    if let Some((l, m)) = cross {
        let (fl, fm) = (
            family(base_model_name(Some(l), None)),
            family(base_model_name(Some(m), None)),
        );
        let which = match (fl, fm) {
            (Some(fl), Some(fm)) => format!(" (a LoRA for {fl} on {fm})"),
            _ => String::new(),
        };
        why.push(format!(
            "cross-attention dim {l} in the LoRA, {m} in the model{which}"
        ));
    }
    if let Some((l, m)) = text {
        why.push(format!(
            "text encoder width {l} in the LoRA, {m} in the model"
        ));
    }
    if !why.is_empty() {
        msg.push_str(": ");
        msg.push_str(&why.join("; "));
    }
    if !mismatched.is_empty() {
        msg.push_str(&format!(
            "\n  {} layers with other shapes:{}",
            mismatched.len(),
            short_list(&mismatched, 20)
        ));
    }
    if !absent.is_empty() {
        msg.push_str(&format!(
            "\n  {} layers not in the model:{}",
            absent.len(),
            short_list(&absent, 20)
        ));
    }
    bail!(msg)
}

/// Equal shapes, counting a 1×1 kernel as a Linear (`[o, i, 1, 1]` fits `[o, i]`: SD 2 uses
/// Linear `proj_in` where SD 1 has a 1×1 Conv2d, and the adapters reshape between them).
fn same_up_to_1x1(a: &[usize], b: &[usize]) -> bool {
    let squeeze = |s: &[usize]| -> Vec<usize> {
        if s.len() == 4 && s[2] == 1 && s[3] == 1 {
            s[..2].to_vec()
        } else {
            s.to_vec()
        }
    };
    squeeze(a) == squeeze(b)
}

/// `SD 1.x` from `SD 1.x (cross-attention dim 768)`; `None` for an unknown family.
fn family(name: String) -> Option<String> {
    if name.starts_with("unknown") {
        None
    } else {
        name.split(" (").next().map(str::to_string)
    }
}
