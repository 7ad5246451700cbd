//! Options shared by several subcommands: device, dtype, progress bars.

use anyhow::bail;
use candle_core::{DType, Device};
use indicatif::{ProgressBar, ProgressStyle};

/// Parses `cpu`, `cuda`, `cuda:N` or `metal`.
pub fn parse_device(s: &str) -> anyhow::Result<Device> {
    let dev = match s {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        "metal" => Device::new_metal(0)?,
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Device::new_cuda(n)?,
            _ => bail!("--device {s}: expected cpu, cuda, cuda:N or metal"),
        },
    };
    Ok(dev)
}

/// Parses `f32`, `f16` or `bf16`.
pub fn parse_dtype(s: &str) -> anyhow::Result<DType> {
    Ok(match s {
        "f32" | "fp32" | "float32" => DType::F32,
        "f16" | "fp16" | "float16" => DType::F16,
        "bf16" | "bfloat16" => DType::BF16,
        _ => bail!("--dtype {s}: expected f32, f16 or bf16"),
    })
}

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
