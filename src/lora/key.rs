//! Typed LoRA layer keys: the model [`Component`] a layer belongs to and its module path
//! ([`LayerKey`], written `<component>.<path>`, e.g. `unet.down_blocks.0…attn1.to_q`).

use std::borrow::Borrow;
use std::fmt;

/// A model part that LoRA layers adapt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    /// The UNet (keys `unet.…`).
    Unet,
    /// The CLIP text encoder (keys `text_encoder.…`).
    TextEncoder,
}

impl Component {
    /// Every component, UNet first.
    pub const ALL: [Component; 2] = [Component::Unet, Component::TextEncoder];

    /// The key prefix without the dot (`unet`, `text_encoder`), also the diffusers folder name.
    pub fn name(self) -> &'static str {
        match self {
            Component::TextEncoder => "text_encoder",
            Component::Unet => "unet",
        }
    }

    /// The component named `name` (`unet`, `text_encoder`).
    pub fn from_name(name: &str) -> Option<Component> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }

    /// A name for messages (`UNet`, `text encoder`).
    pub fn describe(self) -> &'static str {
        match self {
            Component::TextEncoder => "text encoder",
            Component::Unet => "UNet",
        }
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The key of one adapted layer: `<component>.<module path>`.
///
/// It is stored as that string (so a [`crate::lora::LoraSet`] can be looked up by `&str` and
/// iterates in string order); [`LayerKey::component`] is `None` for a key whose prefix names
/// no known component (read from a file, reported by whoever applies it).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LayerKey {
    key: String,
}

impl LayerKey {
    /// The key of `path` in `component`.
    pub fn new(component: Component, path: &str) -> Self {
        Self {
            key: format!("{}.{path}", component.name()),
        }
    }

    /// The component, when the prefix names a known one.
    pub fn component(&self) -> Option<Component> {
        Component::from_name(self.prefix())
    }

    /// The text before the first dot (the component name as written).
    pub fn prefix(&self) -> &str {
        self.key.split_once('.').map_or("", |(c, _)| c)
    }

    /// The module path inside the component (after the first dot).
    pub fn path(&self) -> &str {
        self.key.split_once('.').map_or(&self.key, |(_, p)| p)
    }

    /// The module path when the key belongs to `component`.
    pub fn path_in(&self, component: Component) -> Option<&str> {
        (self.component() == Some(component)).then(|| self.path())
    }

    /// The whole key, `<component>.<path>`.
    pub fn as_str(&self) -> &str {
        &self.key
    }
}

impl fmt::Display for LayerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key)
    }
}

impl Borrow<str> for LayerKey {
    fn borrow(&self) -> &str {
        &self.key
    }
}

impl From<&str> for LayerKey {
    /// A key as written, `<component>.<path>` (the component is checked where it is used).
    fn from(key: &str) -> Self {
        Self {
            key: key.to_string(),
        }
    }
}

impl From<String> for LayerKey {
    /// A key as written, `<component>.<path>` (the component is checked where it is used).
    fn from(key: String) -> Self {
        Self { key }
    }
}
