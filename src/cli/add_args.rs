//! Arguments of `lora_add` / `lora add` as the original cloneofsimo tool takes them: python-fire
//! positional `PATH_1 PATH_2 OUTPUT_PATH` (each may be given by its flag instead, in any order),
//! the seed's `--alpha A` or the later `--alpha_1`, `--alpha_2`, and `--with_text_lora`.

use crate::formats::{self, Architecture};
use crate::lora::key::Component;
use crate::lora::LoraSet;
use anyhow::{anyhow, bail, Context};
use clap::{ArgAction, Args, ValueEnum};
use std::path::{Path, PathBuf};

/// How the two inputs are combined.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// LoRA into model: W' = W + A·ΔW on every targeted layer; writes a complete diffusers folder.
    Upl,
    /// LoRA into model, written as one `.safetensors` file in the original (LDM) layout
    /// (the original tool's name; same as `--mode upl --output-format single-file`).
    UplCkptV2,
    /// The original rule up = w₁·up₁ + w₂·up₂, down = w₁·down₁ + w₂·down₂ (approximate).
    Lpl,
    /// Exact join w₁·ΔW₁ + w₂·ΔW₂ by concatenation (rank r₁ + r₂).
    Ljl,
    /// The exact join re-compressed to --rank by SVD.
    Svd,
}

impl Mode {
    /// The name `--mode` takes.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Upl => "upl",
            Mode::UplCkptV2 => "upl-ckpt-v2",
            Mode::Lpl => "lpl",
            Mode::Ljl => "ljl",
            Mode::Svd => "svd",
        }
    }
}

/// Arguments of `lora_add` / `lora add` (flag names as in the original `lora_add`).
#[derive(Args, Debug, Clone)]
pub struct AddArgs {
    /// PATH_1 PATH_2 OUTPUT_PATH in python-fire's positional form; a path given by its flag
    /// (--path_1, --path_2, --output_path) is skipped and the next one takes the position.
    #[arg(value_name = "PATH")]
    pub paths: Vec<String>,
    /// upl: a diffusers folder or Hugging Face id; lpl/ljl/svd: the first LoRA file.
    #[arg(long = "path_1", visible_alias = "path-1", value_name = "P1")]
    pub path_1: Option<String>,
    /// A LoRA file in any format (ours, kohya, diffusers, peft, cloneofsimo).
    #[arg(long = "path_2", visible_alias = "path-2", value_name = "P2")]
    pub path_2: Option<String>,
    /// upl: the new diffusers folder (or single file); lpl/ljl/svd: the LoRA file (.safetensors).
    #[arg(
        long = "output_path",
        visible_alias = "output-path",
        value_name = "OUT"
    )]
    pub output_path: Option<String>,
    /// upl, upl-ckpt-v2, lpl, ljl or svd.
    #[arg(long, value_enum, default_value = "lpl")]
    pub mode: Mode,
    /// The seed's spelling. upl: the LoRA multiplier A; lpl/ljl/svd: weight A for the first
    /// LoRA and 1−A for the second. Default 0.5 (ljl: weights 1 and 1).
    #[arg(long, allow_negative_numbers = true, value_name = "A")]
    pub alpha: Option<f64>,
    /// The later spelling. upl: the LoRA multiplier; lpl/ljl/svd: the first LoRA's weight.
    /// Default 0.5 (ljl: 1, the original's join ignores weights).
    #[arg(
        long = "alpha_1",
        visible_alias = "alpha-1",
        allow_negative_numbers = true
    )]
    pub alpha_1: Option<f64>,
    /// The later spelling: the second LoRA's weight (lpl/ljl/svd). Default 0.5 (ljl: 1).
    #[arg(
        long = "alpha_2",
        visible_alias = "alpha-2",
        allow_negative_numbers = true
    )]
    pub alpha_2: Option<f64>,
    /// svd: the rank R to re-compress to (required there, refused elsewhere).
    #[arg(long)]
    pub rank: Option<usize>,
    /// upl: `diffusers` (a folder, default) or `single-file` (one LDM-layout .safetensors).
    #[arg(long = "output-format", value_name = "KIND")]
    pub output_format: Option<String>,
    #[command(flatten)]
    pub write: super::common::WriteFlags,
    /// lpl/ljl/svd: dtype of the written factors, f32, f16 or bf16 (default: the first LoRA's).
    #[arg(long)]
    pub dtype: Option<String>,
    /// lpl/ljl/svd: output format: ours, kohya, diffusers, peft or cloneofsimo.
    #[arg(long, default_value = "ours")]
    pub format: String,
    /// lpl/ljl/svd: a diffusers model (folder or Hugging Face id) whose architecture places
    /// the layers of formats that do not spell module paths (kohya on non-SD models, cloneofsimo).
    #[arg(long)]
    pub model: Option<String>,
    /// Also read the text-encoder LoRA a cloneofsimo `X.pt` keeps beside it in
    /// `X.text_encoder.pt` (left out without this flag, as in the original). Files that hold
    /// both components (.safetensors) always give their text-encoder layers.
    #[arg(
        long = "with_text_lora",
        visible_alias = "with-text-lora",
        action = ArgAction::Set,
        num_args = 0..=1,
        require_equals = true,
        default_value = "false",
        default_missing_value = "true",
        value_parser = fire_bool,
        value_name = "BOOL"
    )]
    pub with_text_lora: bool,
}

/// python-fire's spellings of a boolean flag value.
fn fire_bool(s: &str) -> Result<bool, String> {
    match s {
        "true" | "True" | "1" => Ok(true),
        "false" | "False" | "0" => Ok(false),
        _ => Err(format!("expected True or False, got {s:?}")),
    }
}

/// The arguments after python-fire's rules: three paths and the two weights.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// upl: the model; lpl/ljl/svd: the first LoRA.
    pub path_1: String,
    /// The (second) LoRA.
    pub path_2: PathBuf,
    /// The output.
    pub output_path: PathBuf,
    /// upl: the multiplier; otherwise the first LoRA's weight.
    pub w1: f64,
    /// The second LoRA's weight (0 for upl).
    pub w2: f64,
}

impl AddArgs {
    /// Fills the paths from flags and positions and the weights from either spelling.
    pub fn resolve(&self) -> anyhow::Result<Resolved> {
        let mut pos = self.paths.iter();
        let mut slot = |flag: &Option<String>, name: &str, n: &str| -> anyhow::Result<String> {
            match flag {
                Some(v) => Ok(v.clone()),
                None => pos.next().cloned().ok_or_else(|| {
                    anyhow!(
                        "missing {}: give it as --{name} or as the {n} positional argument \
                         (lora_add PATH_1 PATH_2 OUTPUT_PATH [--mode M] [--alpha A | --alpha_1 A1 --alpha_2 A2])",
                        name.to_uppercase()
                    )
                }),
            }
        };
        let path_1 = slot(&self.path_1, "path_1", "first")?;
        let path_2 = slot(&self.path_2, "path_2", "second")?;
        let output_path = slot(&self.output_path, "output_path", "third")?;
        let extra: Vec<&String> = pos.collect();
        if !extra.is_empty() {
            bail!(
                "unexpected positional argument{} {}: lora_add takes PATH_1 PATH_2 OUTPUT_PATH \
                 (here: {path_1} {path_2} {output_path}); give the weights as --alpha A or \
                 --alpha_1 A1 --alpha_2 A2 and the mode as --mode M",
                if extra.len() > 1 { "s" } else { "" },
                extra
                    .iter()
                    .map(|s| format!("{s:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let (w1, w2) = weights(self.mode, self.alpha, self.alpha_1, self.alpha_2)?;
        Ok(Resolved {
            path_1,
            path_2: PathBuf::from(path_2),
            output_path: PathBuf::from(output_path),
            w1,
            w2,
        })
    }
}

/// The two weights of a mode from `--alpha` (seed: A and 1−A) or `--alpha_1` / `--alpha_2`
/// (later: independent, each 0.5 when not given; ljl: 1 and 1, the original join's). upl takes
/// one multiplier (`--alpha` or `--alpha_1`, default 0.5) and returns it with 0.
pub fn weights(
    mode: Mode,
    alpha: Option<f64>,
    alpha_1: Option<f64>,
    alpha_2: Option<f64>,
) -> anyhow::Result<(f64, f64)> {
    for (flag, v) in [("alpha", alpha), ("alpha_1", alpha_1), ("alpha_2", alpha_2)] {
        if let Some(v) = v.filter(|v| !v.is_finite()) {
            bail!("--{flag} {v}: expected a finite number");
        }
    }
    if let (Some(a), true) = (alpha, alpha_1.is_some() || alpha_2.is_some()) {
        let given: Vec<String> = [("alpha_1", alpha_1), ("alpha_2", alpha_2)]
            .iter()
            .filter_map(|(f, v)| v.map(|v| format!("--{f} {v}")))
            .collect();
        bail!(
            "--alpha {a} and {} both give the weights: use --alpha A (the seed's spelling: A for \
             the first LoRA, 1−A for the second) or --alpha_1 A1 --alpha_2 A2 (the later \
             spelling: two independent weights), not both",
            given.join(" ")
        );
    }
    Ok(match mode {
        Mode::Upl | Mode::UplCkptV2 => {
            if let Some(w) = alpha_2 {
                bail!(
                    "--alpha_2 {w}: --mode {} fuses one LoRA; its multiplier is --alpha or --alpha_1",
                    mode.name()
                );
            }
            (alpha.or(alpha_1).unwrap_or(0.5), 0.0)
        }
        Mode::Lpl | Mode::Ljl | Mode::Svd => match alpha {
            Some(a) => (a, 1.0 - a),
            None => {
                let d = if mode == Mode::Ljl { 1.0 } else { 0.5 };
                (alpha_1.unwrap_or(d), alpha_2.unwrap_or(d))
            }
        },
    })
}

/// `X.text_encoder.pt` beside a cloneofsimo `X.pt`, when that file exists.
pub fn text_lora_beside(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?.to_str()?;
    if !name.ends_with(".pt") || name.ends_with(".text_encoder.pt") {
        return None;
    }
    let te = path.with_file_name(format!("{}.text_encoder.pt", name.trim_end_matches(".pt")));
    te.is_file().then_some(te)
}

/// Drops the text-encoder layers of `set`; returns how many there were.
pub fn drop_text_encoder(set: &mut LoraSet) -> usize {
    let before = set.layers.len();
    set.layers
        .retain(|k, _| k.component() != Some(Component::TextEncoder));
    before - set.layers.len()
}

/// Reads a LoRA input (`flag` names it in errors). The text-encoder LoRA beside a cloneofsimo
/// `.pt` is kept only with `with_text_lora`; otherwise its layers are dropped and a note says so.
pub fn read_input(
    path: &Path,
    flag: &str,
    arch: Option<&Architecture>,
    with_text_lora: bool,
) -> anyhow::Result<LoraSet> {
    let mut set =
        formats::read_with(path, arch).with_context(|| format!("{flag} {}", path.display()))?;
    if let (Some(te), false) = (text_lora_beside(path), with_text_lora) {
        let n = drop_text_encoder(&mut set);
        if n > 0 {
            println!(
                "note: {flag}: the text-encoder LoRA {} ({n} layers) is left out; pass \
                 --with_text_lora to include it",
                te.display()
            );
        }
    }
    Ok(set)
}
