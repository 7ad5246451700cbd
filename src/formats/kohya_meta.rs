//! The metadata sd-scripts writes into a kohya LoRA file, beside the `ss_network_*` keys of
//! [`super::kohya`]:
//!
//! - `ss_v2` (`True`/`False`) and `ss_base_model_version`: `sd_v1`, `sd_v2`, or `sd_v2_v` for a
//!   v-prediction SD 2 model (sd-scripts' `get_model_version_str_for_sd1_sd2`);
//! - `sshs_model_hash`: SHA-256 of the tensor data (the file after its header), and
//!   `sshs_legacy_hash`: the first 8 hex digits of the SHA-256 of bytes 0x100000..0x110000 of
//!   the file, both of the file as it would be written with only its `ss_*` metadata
//!   (sd-scripts' `precalculate_safetensors_hashes`, what A1111's additional-networks shows);
//! - `modelspec.*` (Stability AI's model spec 1.0.1, as sd-scripts' `sai_model_spec` fills it):
//!   `sai_model_spec`, `architecture` (`stable-diffusion-v1/lora`,
//!   `stable-diffusion-v2-512/lora`, `stable-diffusion-v2-768-v/lora`), `implementation`
//!   (`diffusers`), `title`, `resolution` (`512x512`, `768x768` for v-prediction SD 2),
//!   `prediction_type` (`epsilon` / `v`), `date` (ISO-8601, when known) and
//!   `implementation_version`.

use crate::tensor_file::OutTensor;
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::collections::BTreeMap;

/// The SD family a LoRA is for, as sd-scripts records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Family {
    /// SD 2.x (OpenCLIP text encoder, 1024-wide context).
    pub v2: bool,
    /// The model predicts v (v-prediction) rather than the noise.
    pub v_prediction: bool,
}

impl Family {
    /// `ss_base_model_version`: `sd_v1`, `sd_v2` or `sd_v2_v` (also `sd_v1_v`).
    pub fn base_model_version(self) -> String {
        let mut s = if self.v2 { "sd_v2" } else { "sd_v1" }.to_string();
        if self.v_prediction {
            s.push_str("_v");
        }
        s
    }

    /// `modelspec.architecture` of a LoRA for this family.
    pub fn architecture(self) -> &'static str {
        match (self.v2, self.v_prediction) {
            (false, _) => "stable-diffusion-v1/lora",
            (true, false) => "stable-diffusion-v2-512/lora",
            (true, true) => "stable-diffusion-v2-768-v/lora",
        }
    }

    /// sd-scripts' default `modelspec.resolution` for this family.
    pub fn default_resolution(self) -> &'static str {
        if self.v2 && self.v_prediction {
            "768x768"
        } else {
            "512x512"
        }
    }
}

/// The family from the LoRA's shapes (`v2_from_shapes`) and, where they do not tell, from
/// metadata a trainer or an earlier file recorded (`ss_v2`, `ss_base_model_version`,
/// `modelspec.architecture`, `modelspec.prediction_type`, `ss_v_parameterization`).
pub fn family(v2_from_shapes: Option<bool>, meta: &BTreeMap<String, String>) -> Option<Family> {
    let get = |k: &str| meta.get(k).map(String::as_str);
    let version = get("ss_base_model_version");
    let arch = get("modelspec.architecture").unwrap_or_default();
    let v2 = v2_from_shapes
        .or_else(|| get("ss_v2").map(|v| v.eq_ignore_ascii_case("true")))
        .or_else(|| version.map(|v| v.starts_with("sd_v2")))
        .or_else(|| {
            arch.starts_with("stable-diffusion-v2")
                .then_some(true)
                .or(arch.starts_with("stable-diffusion-v1").then_some(false))
        })?;
    let v_prediction = version.is_some_and(|v| v.ends_with("_v"))
        || get("modelspec.prediction_type") == Some("v")
        || get("ss_v_parameterization").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || arch.contains("-v/");
    Some(Family { v2, v_prediction })
}

/// Adds `ss_v2`, `ss_base_model_version` and the `modelspec.*` keys for `family` to `m`
/// (a title, resolution or date already in `m` is kept).
pub fn add_family_keys(m: &mut BTreeMap<String, String>, family: Family) {
    m.insert(
        "ss_v2".into(),
        if family.v2 { "True" } else { "False" }.into(),
    );
    m.insert("ss_base_model_version".into(), family.base_model_version());
    m.insert("modelspec.sai_model_spec".into(), "1.0.1".into());
    m.insert(
        "modelspec.architecture".into(),
        family.architecture().into(),
    );
    m.insert("modelspec.implementation".into(), "diffusers".into());
    m.insert(
        "modelspec.prediction_type".into(),
        if family.v_prediction { "v" } else { "epsilon" }.into(),
    );
    let title = m
        .get("ss_output_name")
        .cloned()
        .unwrap_or_else(|| "LoRA".into());
    m.entry("modelspec.title".into()).or_insert(title);
    m.entry("modelspec.resolution".into())
        .or_insert_with(|| family.default_resolution().into());
    m.entry("modelspec.implementation_version".into())
        .or_insert_with(|| format!("lora-diffusion/{}", env!("CARGO_PKG_VERSION")));
}

/// `(sshs_model_hash, sshs_legacy_hash)` of a file holding `tensors` and the `ss_*` entries
/// of `metadata`, as sd-scripts' `precalculate_safetensors_hashes` computes them.
pub fn hashes(
    tensors: &[(String, OutTensor<'_>)],
    metadata: &BTreeMap<String, String>,
) -> anyhow::Result<(String, String)> {
    let ss: BTreeMap<String, String> = metadata
        .iter()
        .filter(|(k, _)| k.starts_with("ss_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let borrowed = tensors
        .iter()
        .map(|(k, t)| {
            let t = OutTensor {
                dtype: t.dtype,
                shape: t.shape.clone(),
                data: Cow::Borrowed(t.data.as_ref()),
            };
            (k.clone(), t)
        })
        .collect();
    let bytes = crate::tensor_file::to_bytes(borrowed, &ss)?;
    let n = u64::from_le_bytes(bytes[..8].try_into()?) as usize;
    let model = hex(&Sha256::digest(&bytes[8 + n..]));
    let window = bytes
        .get(0x100000..bytes.len().min(0x110000))
        .unwrap_or(&[]);
    let legacy = hex(&Sha256::digest(window))[..8].to_string();
    Ok((model, legacy))
}

/// Adds `sshs_model_hash` and `sshs_legacy_hash` of the file about to be written.
pub fn add_hashes(
    tensors: &[(String, OutTensor<'_>)],
    metadata: &mut BTreeMap<String, String>,
) -> anyhow::Result<()> {
    let (model, legacy) = hashes(tensors, metadata)?;
    metadata.insert("sshs_model_hash".into(), model);
    metadata.insert("sshs_legacy_hash".into(), legacy);
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The UTC date-time `secs` seconds after the Unix epoch, ISO-8601 (`2024-05-01T12:00:00`).
pub fn iso_datetime(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian calendar).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Seconds since the Unix epoch now, or `SOURCE_DATE_EPOCH` when set (reproducible files).
pub fn now_secs() -> u64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_datetime_of_known_instants() {
        assert_eq!(iso_datetime(0), "1970-01-01T00:00:00");
        assert_eq!(iso_datetime(951_782_400), "2000-02-29T00:00:00");
        assert_eq!(iso_datetime(1_700_000_000), "2023-11-14T22:13:20");
    }

    #[test]
    fn base_model_version_names() {
        let f = |v2, v_prediction| Family { v2, v_prediction }.base_model_version();
        assert_eq!(f(false, false), "sd_v1");
        assert_eq!(f(true, false), "sd_v2");
        assert_eq!(f(true, true), "sd_v2_v");
    }
}
