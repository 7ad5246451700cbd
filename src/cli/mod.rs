//! The `lora` command line: thin wrappers over the library.

pub mod add;
mod add_args;
mod common;
mod convert;
mod demo;
mod extract;
mod generate;
mod inspect;
mod sweep;
mod train;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::process::ExitCode;

/// Fast LoRA fine-tuning and inference for Stable Diffusion.
#[derive(Parser, Debug)]
#[command(name = "lora", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)] // parsed once; boxing would only obscure clap's derive
enum Command {
    /// Generate images from a text prompt.
    Generate(generate::GenerateArgs),
    /// Run the main job on the bundled model (no download needed).
    Demo(demo::DemoArgs),
    /// Benchmarks (speed, memory).
    Bench(crate::bench::BenchArgs),
    /// Fine-tune a LoRA (DreamBooth, optional prior preservation) or the full UNet.
    Train(train::TrainArgs),
    /// Fuse a LoRA into a model (upl) or join two LoRAs (lpl, ljl, svd); same as `lora_add`.
    Add(add::AddArgs),
    /// Extract a LoRA from the difference of two full models (SVD per layer).
    Extract(extract::ExtractArgs),
    /// Convert a LoRA file to another format (ours, kohya, diffusers, peft, cloneofsimo).
    Convert(convert::ConvertArgs),
    /// Generate the same seed at a series of LoRA scales: labelled grid PNG + animated GIF.
    Sweep(sweep::SweepArgs),
    /// Describe a LoRA file: format, base model, targets, rank, alpha, dtype, size, metadata.
    Inspect(inspect::InspectArgs),
}

/// Runs the command line; errors are printed with their causes and give exit code 1.
pub fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let result = match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Demo(a) => demo::run(a),
        Command::Bench(a) => crate::bench::run(a),
        Command::Train(a) => {
            let sub = matches.subcommand_matches("train");
            train::run(a, sub.unwrap_or(&matches))
        }
        Command::Add(a) => add::run(a),
        Command::Extract(a) => extract::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Sweep(a) => sweep::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
