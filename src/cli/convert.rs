//! `lora convert IN --to FORMAT --out OUT`: rewrite a LoRA file in another format.

use super::common::parse_dtype;
use crate::formats::{self, Architecture, Format};
use crate::hub::ModelSource;
use clap::Args;
use std::path::PathBuf;

/// Arguments of `lora convert`.
#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// The LoRA file to read (any format: ours, kohya, diffusers, peft, cloneofsimo .safetensors/.pt).
    input: PathBuf,
    /// Output format: ours, kohya, diffusers, peft or cloneofsimo.
    #[arg(long)]
    to: String,
    /// Output file (.safetensors).
    #[arg(long)]
    out: PathBuf,
    /// Output dtype of the factors: f32, f16 or bf16 (default: as read).
    #[arg(long)]
    dtype: Option<String>,
    #[command(flatten)]
    write: super::common::WriteFlags,
    /// The model the LoRA is for (diffusers folder or Hugging Face id): resolves kohya and
    /// cloneofsimo layer names and checks shapes (default: SD 1.x / SD 2.x by shape).
    #[arg(long)]
    model: Option<String>,
}

/// Runs `lora convert`.
pub fn run(a: ConvertArgs) -> anyhow::Result<()> {
    let to = Format::parse(&a.to)?;
    let dtype = a.dtype.as_deref().map(parse_dtype).transpose()?;
    if a.out.exists() && !a.write.force {
        anyhow::bail!(
            "{} already exists; pass --force to overwrite it",
            a.out.display()
        );
    }
    let arch = match &a.model {
        Some(m) => Some(Architecture::from_model(&ModelSource::parse(m)?)?),
        None => None,
    };
    let from = formats::detect(&a.input)?;
    let set = formats::read_as(&a.input, from, arch.as_ref())?;
    if let Some(arch) = &arch {
        formats::check_against(&set, arch)?;
    }
    super::common::write_lora(&set, &a.out, to, dtype, arch.as_ref(), a.write)?;
    let tokens = match set.embeddings.len() {
        0 => String::new(),
        n => format!(", {n} learned tokens"),
    };
    println!(
        "{} ({from}, {} layers{tokens}) -> {} ({to})",
        a.input.display(),
        set.layers.len(),
        a.out.display()
    );
    Ok(())
}
