//! The `lora` command line: thin wrappers over the library.

mod bench;
mod common;
mod generate;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Fast LoRA fine-tuning and inference for Stable Diffusion.
#[derive(Parser, Debug)]
#[command(name = "lora", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate images from a text prompt.
    Generate(generate::GenerateArgs),
    /// Run the main job on the bundled model (no download needed).
    Demo(generate::DemoArgs),
    /// Benchmarks (speed, memory).
    Bench(bench::BenchArgs),
}

/// Runs the command line; errors are printed with their causes and give exit code 1.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Demo(a) => generate::demo(a),
        Command::Bench(a) => bench::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
