//! `lora inspect FILE`: format, base model, targets, ranks, alpha/scale, dtype, size, metadata.

use crate::formats::{self, Architecture};
use crate::hub::ModelSource;
use clap::Args;
use std::io::Write;
use std::path::PathBuf;

/// Arguments of `lora inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The LoRA file (any format).
    file: PathBuf,
    /// The model the LoRA is for (needed for cloneofsimo files of models other than SD 1.x / 2.x);
    /// also checks that every layer fits it.
    #[arg(long)]
    model: Option<String>,
}

/// Prints `text`; a closed pipe (`lora inspect F | head`) is not an error.
fn emit(text: &str) -> anyhow::Result<()> {
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// Runs `lora inspect`.
pub fn run(a: InspectArgs) -> anyhow::Result<()> {
    let arch = match &a.model {
        Some(m) => Some(Architecture::from_model(&ModelSource::parse(m)?)?),
        None => None,
    };
    let summary = formats::summary::summarize(&a.file, arch.as_ref())?;
    emit(&summary.to_string())?;
    if let Some(arch) = &arch {
        let set = formats::read_as(&a.file, summary.format, Some(arch))?;
        formats::check_against(&set, arch)?;
        emit(&format!(
            "fits model:  {} (every layer and shape)\n",
            arch.name
        ))?;
    }
    Ok(())
}
