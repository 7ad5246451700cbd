//! `--mixed-precision`: the dtype of the frozen model during training.

use serde::{Deserialize, Serialize};

/// `--mixed-precision` (accelerate's and kohya's names; `f32`, `f16`, `bf16` also read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum MixedPrecision {
    /// Everything in f32.
    #[default]
    No,
    /// Frozen model in f16, with dynamic loss scaling.
    Fp16,
    /// Frozen model in bf16.
    Bf16,
}

impl MixedPrecision {
    /// The dtype of the frozen weights and activations.
    pub fn dtype(self) -> candle_core::DType {
        match self {
            Self::No => candle_core::DType::F32,
            Self::Fp16 => candle_core::DType::F16,
            Self::Bf16 => candle_core::DType::BF16,
        }
    }
}

impl std::str::FromStr for MixedPrecision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "no" | "fp32" | "f32" | "float" | "float32" => Ok(Self::No),
            "fp16" | "f16" | "float16" | "half" => Ok(Self::Fp16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            _ => Err(format!(
                "--mixed-precision {s}: expected no, fp16 or bf16 (or f32, f16, bf16)"
            )),
        }
    }
}

impl std::fmt::Display for MixedPrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::No => "no",
            Self::Fp16 => "fp16",
            Self::Bf16 => "bf16",
        })
    }
}

impl TryFrom<String> for MixedPrecision {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<MixedPrecision> for String {
    fn from(m: MixedPrecision) -> String {
        m.to_string()
    }
}
