//! Options shared by several subcommands: device, dtype, progress bars.

pub use crate::sys::{parse_device, parse_dtype};
use indicatif::{ProgressBar, ProgressStyle};

/// A progress bar over `len` steps showing position, rate and ETA.
pub fn progress_bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    let style =
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec} ETA {eta} {prefix}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
    pb.set_style(style);
    pb.set_message(what.to_string());
    pb
}

/// The flags every command that writes a LoRA file shares.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct WriteFlags {
    /// Replace an existing output.
    #[arg(long)]
    pub force: bool,
    /// Write NaN / infinite values instead of refusing (values that overflow the output
    /// dtype included).
    #[arg(long)]
    pub allow_nonfinite: bool,
    /// kohya output: each layer's own `.alpha` instead of one alpha per file (diffusers'
    /// kohya converter applies one alpha to every attention layer).
    #[arg(long)]
    pub per_layer_alpha: bool,
}

/// Writes `set` to `out` in `format` (factors in `dtype`, or as they are).
pub fn write_lora(
    set: &crate::lora::LoraSet,
    out: &std::path::Path,
    format: crate::formats::Format,
    dtype: Option<candle_core::DType>,
    arch: Option<&crate::formats::Architecture>,
    flags: WriteFlags,
) -> anyhow::Result<()> {
    let opts = crate::formats::WriteOptions {
        dtype,
        force: flags.force,
        arch,
        allow_nonfinite: flags.allow_nonfinite,
        per_layer_alpha: flags.per_layer_alpha,
    };
    crate::formats::write(set, out, format, &opts)?;
    if let Some(side) = crate::formats::sidecar_for(set, out, format) {
        eprintln!(
            "note: {format} LoRA files cannot hold learned tokens; wrote {} token(s) ({}) to {} \
             (load it with --embedding)",
            set.embeddings.len(),
            set.embeddings
                .iter()
                .map(|e| e.token.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            side.display()
        );
    }
    Ok(())
}
