//! Stable Diffusion models (UNet, CLIP text encoder, VAE) and the blocks they share.

pub mod blocks;
pub(crate) mod checkpointing;
pub mod clip;
pub mod layers;
pub mod ldm;
pub mod presets;
pub mod residual;
pub mod unet;
pub mod vae;
pub mod walk;
pub mod weights;

/// Parses a config from JSON text, explicit `null` fields taking their defaults; `origin`
/// names the source and `what` the kind of config in errors.
pub(crate) fn parse_config_json<T: serde::de::DeserializeOwned>(
    text: &str,
    origin: &str,
    what: &str,
) -> anyhow::Result<T> {
    use anyhow::Context;
    let mut value: serde_json::Value =
        serde_json::from_str(text).with_context(|| format!("{origin} is not valid JSON"))?;
    if let Some(obj) = value.as_object_mut() {
        obj.retain(|_, v| !v.is_null());
    }
    serde_json::from_value(value).with_context(|| format!("{origin} is not a valid {what}"))
}

/// Reads the config file `path` (`what` names it in errors) and parses it with `parse`,
/// which gets the text and the path as the origin.
pub(crate) fn read_config<T>(
    path: &std::path::Path,
    what: &str,
    parse: impl FnOnce(&str, &str) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    use anyhow::Context;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {what} {}", path.display()))?;
    parse(&text, &path.display().to_string())
}

/// Upper bounds on config sizes: far above every Stable Diffusion model (SDXL included), low
/// enough that a model built from such a config cannot exhaust memory by its layer count alone.
pub mod limits {
    /// Blocks per resolution level, transformer layers per block, text-encoder layers.
    pub const LAYERS: usize = 64;
    /// Resolution levels of a UNet or VAE.
    pub const LEVELS: usize = 8;
    /// Channels / features of any layer.
    pub const WIDTH: usize = 16384;
    /// Tokens of a vocabulary or positions of a text encoder.
    pub const TOKENS: usize = 1 << 20;

    /// An error naming `field` when `value` exceeds `max`.
    pub fn check(field: &str, value: usize, max: usize) -> Result<(), String> {
        if value > max {
            return Err(format!(
                "`{field}` = {value} is beyond the supported maximum {max} (corrupt config?)"
            ));
        }
        Ok(())
    }
}
