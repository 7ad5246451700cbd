//! Stable Diffusion models (UNet, CLIP text encoder, VAE) and the blocks they share.

pub mod blocks;
pub mod clip;
pub mod layers;
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
