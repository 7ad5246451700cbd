//! `lora_add` (second binary, the seed's flags) and `lora add`: fuse a LoRA into a model
//! (`upl`) or join two LoRAs (`lpl`, `ljl`, `svd`). One implementation serves both.

use super::common::{parse_dtype, progress_bar};
use crate::formats::{self, Architecture, Format};
use crate::hub::ModelSource;
use crate::lora::combine::{self, EnergyReport, LplReport};
use crate::lora::upl::fuse_into_model;
use crate::lora::LoraSet;
use anyhow::{bail, Context};
use clap::{Args, Parser, ValueEnum};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// How the two inputs are combined.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// LoRA into model: W' = W + A·ΔW on every targeted layer; writes a complete diffusers folder.
    Upl,
    /// LoRA into model, written as one `.safetensors` file in the original (LDM) layout
    /// (the original tool's name; same as `--mode upl --output-format single-file`).
    UplCkptV2,
    /// The original code's rule up = A·up₁ + (1−A)·up₂, down = A·down₁ + (1−A)·down₂ (approximate).
    Lpl,
    /// Exact join A·ΔW₁ + (1−A)·ΔW₂ by concatenation (rank r₁ + r₂).
    Ljl,
    /// The exact join re-compressed to --rank by SVD.
    Svd,
}

/// Arguments of `lora_add` / `lora add` (flag names as in the original `lora_add`).
#[derive(Args, Debug, Clone)]
pub struct AddArgs {
    /// upl: a diffusers folder or Hugging Face id; lpl/ljl/svd: the first LoRA file.
    #[arg(long = "path_1", value_name = "P1")]
    pub path_1: String,
    /// A LoRA file in any format (ours, kohya, diffusers, peft, cloneofsimo).
    #[arg(long = "path_2", value_name = "P2")]
    pub path_2: PathBuf,
    /// upl, lpl, ljl or svd.
    #[arg(long, value_enum, default_value = "lpl")]
    pub mode: Mode,
    /// upl: the LoRA multiplier A; lpl/ljl/svd: the weight A of the first LoRA (1−A for the second).
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true)]
    pub alpha: f64,
    /// upl: the new diffusers folder (or single file); lpl/ljl/svd: the LoRA file (.safetensors).
    #[arg(long = "output_path", value_name = "OUT")]
    pub output_path: PathBuf,
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
    /// Accepted for compatibility with the original tool; text-encoder layers of the LoRA are
    /// always applied when present.
    #[arg(long = "with_text_lora", hide = true)]
    pub with_text_lora: bool,
}

/// The standalone `lora_add` program.
#[derive(Parser, Debug)]
#[command(
    name = "lora_add",
    version,
    about = "Fuse a LoRA into a Stable Diffusion model (upl) or join two LoRAs (lpl, ljl, svd)"
)]
struct LoraAddCli {
    #[command(flatten)]
    args: AddArgs,
}

/// Entry point of the `lora_add` binary: errors are printed with their causes, exit code 1.
pub fn main() -> ExitCode {
    let cli = LoraAddCli::parse();
    match run(cli.args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `lora_add` / `lora add`.
pub fn run(a: AddArgs) -> anyhow::Result<()> {
    if !a.alpha.is_finite() {
        bail!("--alpha {}: expected a finite number", a.alpha);
    }
    match (a.mode, a.rank) {
        (Mode::Svd, None) => bail!("--mode svd needs --rank R (the rank to re-compress to)"),
        (Mode::Svd, Some(0)) => bail!("--rank must be at least 1"),
        (Mode::Svd, _) | (_, None) => {}
        (m, Some(_)) => bail!(
            "--rank applies to --mode svd only (got --mode {})",
            mode_name(m)
        ),
    }
    if a.output_path.exists() && !a.write.force {
        bail!(
            "{} already exists; pass --force to replace it",
            a.output_path.display()
        );
    }
    let single = match (a.mode, a.output_format.as_deref()) {
        (Mode::UplCkptV2, None | Some("single-file")) => true,
        (Mode::Upl, None | Some("diffusers")) => false,
        (Mode::Upl, Some("single-file")) => true,
        (Mode::Upl | Mode::UplCkptV2, Some(other)) => bail!(
            "--output-format {other}: expected diffusers or single-file{}",
            if a.mode == Mode::UplCkptV2 {
                " (upl-ckpt-v2 writes single-file)"
            } else {
                ""
            }
        ),
        (m, Some(_)) => bail!(
            "--output-format applies to upl (got --mode {})",
            mode_name(m)
        ),
        (_, None) => false,
    };
    if single {
        return run_upl_single(&a);
    }
    if a.mode == Mode::Upl {
        return run_upl(&a);
    }
    let p1 = PathBuf::from(&a.path_1);
    if p1.is_dir() {
        bail!(
            "--path_1 {}: is a folder; --mode {} joins two LoRA files (use --mode upl to fuse a LoRA into a model)",
            p1.display(),
            mode_name(a.mode)
        );
    }
    let format = Format::parse(&a.format)?;
    let dtype = a.dtype.as_deref().map(parse_dtype).transpose()?;
    let arch = match &a.model {
        Some(m) => {
            let source = ModelSource::parse(m).map_err(|e| anyhow::anyhow!("--model: {e:#}"))?;
            Some(Architecture::from_model(&source).with_context(|| format!("--model {m}"))?)
        }
        None => None,
    };
    let l1 = formats::read_with(&p1, arch.as_ref())
        .with_context(|| format!("--path_1 {}", p1.display()))?;
    let l2 = formats::read_with(&a.path_2, arch.as_ref())
        .with_context(|| format!("--path_2 {}", a.path_2.display()))?;
    println!(
        "LoRA 1: {} layers, rank {}; LoRA 2: {} layers, rank {}",
        l1.layers.len(),
        ranks(&l1),
        l2.layers.len(),
        ranks(&l2)
    );
    let merged = match a.mode {
        Mode::Lpl => {
            let (set, report) = combine::lpl(&l1, &l2, a.alpha)?;
            print_lpl(&report, a.alpha);
            set
        }
        Mode::Ljl => {
            let set = combine::ljl(&l1, &l2, a.alpha)?;
            println!(
                "ljl: exact ΔW = {a}·ΔW₁ + {b}·ΔW₂ on {} layers, rank {}",
                set.layers.len(),
                ranks(&set),
                a = a.alpha,
                b = 1.0 - a.alpha
            );
            set
        }
        Mode::Svd => {
            let rank = a.rank.unwrap_or(1);
            let (set, report) = combine::svd_join(&l1, &l2, a.alpha, rank)?;
            println!(
                "svd: ΔW = {a}·ΔW₁ + {b}·ΔW₂ re-compressed to rank ≤ {rank} on {} layers",
                set.layers.len(),
                a = a.alpha,
                b = 1.0 - a.alpha
            );
            print_energy(&report);
            set
        }
        Mode::Upl | Mode::UplCkptV2 => unreachable!("handled above"),
    };
    super::common::write_lora(
        &merged,
        &a.output_path,
        format,
        dtype,
        arch.as_ref(),
        a.write,
    )?;
    println!("wrote {} ({format})", a.output_path.display());
    Ok(())
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Upl => "upl",
        Mode::UplCkptV2 => "upl-ckpt-v2",
        Mode::Lpl => "lpl",
        Mode::Ljl => "ljl",
        Mode::Svd => "svd",
    }
}

/// "4" or "4–8" over the layers.
fn ranks(set: &LoraSet) -> String {
    let min = set.layers.values().map(|l| l.rank()).min().unwrap_or(0);
    let max = set.layers.values().map(|l| l.rank()).max().unwrap_or(0);
    if min == max {
        min.to_string()
    } else {
        format!("{min}–{max}")
    }
}

fn run_upl(a: &AddArgs) -> anyhow::Result<()> {
    if a.model.is_some() {
        bail!("--model is for lpl, ljl and svd; upl reads the model from --path_1");
    }
    if a.dtype.is_some() {
        bail!(
            "--dtype applies to LoRA outputs (lpl, ljl, svd); upl keeps every tensor's own dtype"
        );
    }
    let p1 = Path::new(&a.path_1);
    if p1.is_file() {
        bail!(
            "--path_1 {}: is a file; --mode upl takes a diffusers model folder (or Hugging Face id) as \
             --path_1 and the LoRA as --path_2 (a single-file model: --mode upl-ckpt-v2)",
            p1.display()
        );
    }
    if p1.is_dir() && !p1.join("model_index.json").is_file() {
        bail!(
            "--path_1 {}: not a diffusers model folder (no model_index.json); expected a folder with \
             model_index.json, unet/, text_encoder/, vae/, tokenizer/, scheduler/",
            p1.display()
        );
    }
    let source = ModelSource::parse(&a.path_1).map_err(|e| anyhow::anyhow!("--path_1: {e:#}"))?;
    let arch = Architecture::from_model(&source)
        .with_context(|| format!("--path_1 {}", source.describe()))?;
    let lora = formats::read_with(&a.path_2, Some(&arch))
        .with_context(|| format!("--path_2 {}", a.path_2.display()))?;
    formats::check_against(&lora, &arch)
        .with_context(|| format!("--path_2 {}", a.path_2.display()))?;
    println!(
        "fusing {} LoRA layers (rank {}) into {} at multiplier {}",
        lora.layers.len(),
        ranks(&lora),
        source.describe(),
        a.alpha
    );
    let pb = progress_bar(lora.layers.len() as u64, "fusing");
    let report = fuse_into_model(
        &source,
        &lora,
        a.alpha,
        &a.output_path,
        a.write.force,
        a.write.allow_nonfinite,
        &|| pb.inc(1),
    );
    pb.finish_and_clear();
    let report = report?;
    let fused: Vec<String> = report
        .fused
        .iter()
        .map(|(c, n)| format!("{c} {n}"))
        .collect();
    println!(
        "wrote {}: fused layers ({}), rewrote {}, copied {} other files",
        a.output_path.display(),
        fused.join(", "),
        report.rewritten.join(", "),
        report.copied
    );
    for (rel, why) in &report.skipped {
        println!("  not copied: {rel} ({why})");
    }
    Ok(())
}

/// upl into one LDM-layout `.safetensors` file; `--path_1` is a diffusers model or a single file.
fn run_upl_single(a: &AddArgs) -> anyhow::Result<()> {
    if a.model.is_some() || a.dtype.is_some() {
        bail!("--model and --dtype are for lpl, ljl and svd; upl-ckpt-v2 reads the model from --path_1 and keeps every tensor's dtype");
    }
    let source = ModelSource::parse(&a.path_1).map_err(|e| anyhow::anyhow!("--path_1: {e:#}"))?;
    let arch = Architecture::from_model(&source)
        .with_context(|| format!("--path_1 {}", source.describe()))?;
    let lora = formats::read_with(&a.path_2, Some(&arch))
        .with_context(|| format!("--path_2 {}", a.path_2.display()))?;
    formats::check_against(&lora, &arch)
        .with_context(|| format!("--path_2 {}", a.path_2.display()))?;
    if let ModelSource::SingleFile(s) = &source {
        for n in &s.info()?.notes {
            println!("note: {n}");
        }
    }
    println!(
        "fusing {} LoRA layers (rank {}) into {} at multiplier {}",
        lora.layers.len(),
        ranks(&lora),
        source.describe(),
        a.alpha
    );
    let report = crate::lora::single_file::write_single_file(
        &source,
        Some(&lora),
        a.alpha,
        &a.output_path,
        a.write.force,
        a.write.allow_nonfinite,
    )?;
    let parts: Vec<String> = report
        .tensors
        .iter()
        .zip(&report.fused)
        .map(|((c, n), (_, f))| format!("{c} {n} tensors, {f} fused"))
        .collect();
    println!(
        "wrote {} (single file, original layout): {}",
        a.output_path.display(),
        parts.join("; ")
    );
    Ok(())
}

fn pct(x: f64) -> String {
    format!("{:.4}%", 100.0 * x)
}

fn print_lpl(r: &LplReport, alpha: f64) {
    println!(
        "lpl: up = {alpha}·up₁ + {b}·up₂, down = {alpha}·down₁ + {b}·down₂ on {} layers (the original rule; \
         it is not {alpha}·ΔW₁ + {b}·ΔW₂: the product has cross terms)",
        r.layers.len(),
        b = 1.0 - alpha
    );
    if r.folded > 0 {
        println!(
            "  {} layers had different scales (alpha/rank): scales were folded into up first",
            r.folded
        );
    }
    println!(
        "  relative Frobenius error vs the exact weighted sum: overall {}",
        pct(r.overall())
    );
    if let Some(w) = r.worst() {
        println!("  worst layer: {} {}", w.name, pct(w.relative()));
    }
    println!("  for an exact merge use --mode ljl (rank r₁+r₂) or --mode svd --rank R");
}

/// Prints the energy kept: overall, spread over layers, and the least-kept layers.
pub(crate) fn print_energy(r: &EnergyReport) {
    let mut f: Vec<f64> = r.layers.iter().map(|l| l.fraction()).collect();
    f.sort_by(|a, b| a.total_cmp(b));
    if f.is_empty() {
        return;
    }
    let q = |p: f64| f[((f.len() - 1) as f64 * p).round() as usize];
    println!(
        "energy kept Σσ²_kept/Σσ²: overall {}; per layer min {}, median {}, max {} ({} layers)",
        pct(r.overall()),
        pct(q(0.0)),
        pct(q(0.5)),
        pct(q(1.0)),
        f.len()
    );
    let mut worst: Vec<_> = r.layers.iter().collect();
    worst.sort_by(|a, b| a.fraction().total_cmp(&b.fraction()));
    for l in worst.iter().take(5) {
        println!(
            "  {} rank {} → {}: {} kept (relative error {})",
            l.name,
            l.rank_in,
            l.rank_out,
            pct(l.fraction()),
            pct((1.0 - l.fraction()).max(0.0).sqrt())
        );
    }
}
