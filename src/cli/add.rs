//! `lora_add` (second binary, the original tool's flags and python-fire positions) and
//! `lora add`: fuse a LoRA into a model (`upl`) or join two LoRAs (`lpl`, `ljl`, `svd`). One
//! implementation serves both; the arguments are in `add_args.rs`.

use super::add_args::{read_input, text_lora_beside, Resolved};
pub use super::add_args::{AddArgs, Mode};
use super::common::{parse_dtype, progress_bar};
use crate::formats::{self, Architecture, Format};
use crate::hub::ModelSource;
use crate::lora::combine::{self, EnergyReport, LplReport};
use crate::lora::upl::fuse_into_model;
use crate::lora::LoraSet;
use anyhow::{bail, Context};
use clap::Parser;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const EXAMPLES: &str = "Examples (both spellings of the original lora_add work):
  lora_add --path_1 a.safetensors --path_2 b.safetensors --mode lpl --alpha 0.3 --output_path c.safetensors
      seed README: up = 0.3·up₁ + 0.7·up₂, down = 0.3·down₁ + 0.7·down₂
  lora_add a.safetensors b.safetensors c.safetensors --alpha_1 0.8 --alpha_2 0.4
      later code, python-fire positional: up = 0.8·up₁ + 0.4·up₂, down likewise (default 0.5 and 0.5)
  lora_add a.safetensors b.safetensors joined.safetensors --mode ljl
      exact ΔW₁ + ΔW₂, rank r₁ + r₂ (--alpha_1/--alpha_2 weight the two sides)
  lora_add --path_1 a.pt --path_2 b.pt --output_path c.safetensors --with_text_lora --model MODEL
      cloneofsimo .pt files: also merges a.text_encoder.pt with b.text_encoder.pt
  lora_add MODEL lora.safetensors merged_model --mode upl --alpha 1.0
      W' = W + 1.0·ΔW into a complete diffusers folder (--alpha_1 is the same multiplier)";

/// The standalone `lora_add` program.
#[derive(Parser, Debug)]
#[command(
    name = "lora_add",
    version,
    about = "Fuse a LoRA into a Stable Diffusion model (upl) or join two LoRAs (lpl, ljl, svd)",
    override_usage = "lora_add PATH_1 PATH_2 OUTPUT_PATH [OPTIONS]\n       \
                      lora_add --path_1 P1 --path_2 P2 --output_path OUT [OPTIONS]",
    after_help = EXAMPLES
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
    let r = a.resolve()?;
    match (a.mode, a.rank) {
        (Mode::Svd, None) => bail!("--mode svd needs --rank R (the rank to re-compress to)"),
        (Mode::Svd, Some(0)) => bail!("--rank must be at least 1"),
        (Mode::Svd, _) | (_, None) => {}
        (m, Some(_)) => bail!(
            "--rank applies to --mode svd only (got --mode {})",
            m.name()
        ),
    }
    if r.output_path.exists() && !a.write.force {
        bail!(
            "{} already exists; pass --force to replace it",
            r.output_path.display()
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
        (m, Some(_)) => bail!("--output-format applies to upl (got --mode {})", m.name()),
        (_, None) => false,
    };
    if single {
        return run_upl_single(&a, &r);
    }
    if a.mode == Mode::Upl {
        return run_upl(&a, &r);
    }
    run_join(&a, &r)
}

/// lpl / ljl / svd: two LoRA files into one.
fn run_join(a: &AddArgs, r: &Resolved) -> anyhow::Result<()> {
    let p1 = PathBuf::from(&r.path_1);
    if p1.is_dir() {
        bail!(
            "--path_1 {}: is a folder; --mode {} joins two LoRA files (use --mode upl to fuse a LoRA into a model)",
            p1.display(),
            a.mode.name()
        );
    }
    if r.output_path.extension().is_some_and(|e| e == "pt") {
        bail!(
            "--output_path {}: .pt (the original's pickled lists) is not written; give a \
             .safetensors path (--format cloneofsimo writes the original's safetensors layout)",
            r.output_path.display()
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
    let text = a.with_text_lora;
    let mut l1 = read_input(&p1, "--path_1", arch.as_ref(), text)?;
    let mut l2 = read_input(&r.path_2, "--path_2", arch.as_ref(), text)?;
    let pts = [&p1, &r.path_2].map(|p| p.extension().is_some_and(|e| e == "pt"));
    let beside = [&p1, &r.path_2].map(|p| text_lora_beside(p).is_some());
    if text && pts == [true, true] && beside[0] != beside[1] {
        let lacking = if beside[0] { &r.path_2 } else { &p1 };
        let n = super::add_args::drop_text_encoder(&mut l1)
            + super::add_args::drop_text_encoder(&mut l2);
        println!(
            "note: no text-encoder LoRA beside {}: the text encoder is skipped ({n} layers left out)",
            lacking.display()
        );
    } else if text && pts == [false, false] {
        println!(
            "note: --with_text_lora reads the X.text_encoder.pt beside a cloneofsimo .pt; \
             these files hold both components and give their text-encoder layers anyway"
        );
    }
    println!(
        "LoRA 1: {} layers, rank {}; LoRA 2: {} layers, rank {}",
        l1.layers.len(),
        ranks(&l1),
        l2.layers.len(),
        ranks(&l2)
    );
    let (w1, w2) = (r.w1, r.w2);
    let merged = match a.mode {
        Mode::Lpl => {
            let (set, report) = combine::lpl(&l1, &l2, w1, w2)?;
            print_lpl(&report, w1, w2);
            set
        }
        Mode::Ljl => {
            let set = combine::ljl(&l1, &l2, w1, w2)?;
            println!(
                "ljl: exact ΔW = {w1}·ΔW₁ + {w2}·ΔW₂ on {} layers, rank {}",
                set.layers.len(),
                ranks(&set),
            );
            set
        }
        Mode::Svd => {
            let rank = a.rank.unwrap_or(1);
            let (set, report) = combine::svd_join(&l1, &l2, w1, w2, rank)?;
            println!(
                "svd: ΔW = {w1}·ΔW₁ + {w2}·ΔW₂ re-compressed to rank ≤ {rank} on {} layers",
                set.layers.len(),
            );
            print_energy(&report);
            set
        }
        Mode::Upl | Mode::UplCkptV2 => unreachable!("handled in run"),
    };
    super::common::write_lora(
        &merged,
        &r.output_path,
        format,
        dtype,
        arch.as_ref(),
        a.write,
    )?;
    println!("wrote {} ({format})", r.output_path.display());
    Ok(())
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

fn run_upl(a: &AddArgs, r: &Resolved) -> anyhow::Result<()> {
    if a.model.is_some() {
        bail!("--model is for lpl, ljl and svd; upl reads the model from --path_1");
    }
    if a.dtype.is_some() {
        bail!(
            "--dtype applies to LoRA outputs (lpl, ljl, svd); upl keeps every tensor's own dtype"
        );
    }
    let p1 = Path::new(&r.path_1);
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
    let source = ModelSource::parse(&r.path_1).map_err(|e| anyhow::anyhow!("--path_1: {e:#}"))?;
    let arch = Architecture::from_model(&source)
        .with_context(|| format!("--path_1 {}", source.describe()))?;
    let lora = read_input(&r.path_2, "--path_2", Some(&arch), a.with_text_lora)?;
    formats::check_against(&lora, &arch)
        .with_context(|| format!("--path_2 {}", r.path_2.display()))?;
    println!(
        "fusing {} LoRA layers (rank {}) into {} at multiplier {}",
        lora.layers.len(),
        ranks(&lora),
        source.describe(),
        r.w1
    );
    let pb = progress_bar(lora.layers.len() as u64, "fusing");
    let report = fuse_into_model(
        &source,
        &lora,
        r.w1,
        &r.output_path,
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
        r.output_path.display(),
        fused.join(", "),
        report.rewritten.join(", "),
        report.copied
    );
    for (rel, why) in &report.skipped {
        println!("  not copied: {rel} ({why})");
    }
    if !report.tokens.ids.is_empty() {
        let t: Vec<String> = report
            .tokens
            .ids
            .iter()
            .map(|(n, id)| format!("{n} (id {id})"))
            .collect();
        println!(
            "added the learned tokens to the tokenizer and the text encoder: {}",
            t.join(", ")
        );
    }
    Ok(())
}

/// upl into one LDM-layout `.safetensors` file; `--path_1` is a diffusers model or a single file.
fn run_upl_single(a: &AddArgs, r: &Resolved) -> anyhow::Result<()> {
    if a.model.is_some() || a.dtype.is_some() {
        bail!("--model and --dtype are for lpl, ljl and svd; upl-ckpt-v2 reads the model from --path_1 and keeps every tensor's dtype");
    }
    let source = ModelSource::parse(&r.path_1).map_err(|e| anyhow::anyhow!("--path_1: {e:#}"))?;
    let arch = Architecture::from_model(&source)
        .with_context(|| format!("--path_1 {}", source.describe()))?;
    let lora = read_input(&r.path_2, "--path_2", Some(&arch), a.with_text_lora)?;
    formats::check_against(&lora, &arch)
        .with_context(|| format!("--path_2 {}", r.path_2.display()))?;
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
        r.w1
    );
    let report = crate::lora::single_file::write_single_file(
        &source,
        Some(&lora),
        r.w1,
        &r.output_path,
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
        r.output_path.display(),
        parts.join("; ")
    );
    if !lora.embeddings.is_empty() {
        // As the original's upl-ckpt-v2, the tokens go to an embedding file beside the model.
        let side = crate::formats::embeddings::sidecar_path(&r.output_path);
        crate::formats::embeddings::write_standalone(&lora, &side, a.write.force)
            .with_context(|| format!("cannot write the learned tokens to {}", side.display()))?;
        let names: Vec<&str> = lora.embeddings.iter().map(|e| e.token.as_str()).collect();
        println!(
            "the learned tokens ({}) are not part of a single-file model: wrote them to {} \
             (use it with --embedding, or as a textual-inversion file)",
            names.join(", "),
            side.display()
        );
    }
    Ok(())
}

fn pct(x: f64) -> String {
    format!("{:.4}%", 100.0 * x)
}

fn print_lpl(r: &LplReport, w1: f64, w2: f64) {
    println!(
        "lpl: up = {w1}·up₁ + {w2}·up₂, down = {w1}·down₁ + {w2}·down₂ on {} layers (the original rule; \
         it is not {w1}·ΔW₁ + {w2}·ΔW₂: the product has cross terms)",
        r.layers.len(),
    );
    if r.broadcast > 0 {
        println!(
            "  {} layers had rank 1 on one side: that side's factors were repeated to the other's rank (broadcast, as the original)",
            r.broadcast
        );
    }
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
