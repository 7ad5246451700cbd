//! `lora train`: DreamBooth LoRA (or full) fine-tuning from flags and/or a TOML file.

use crate::train::{TrainConfig, TrainHooks, Trainer};
use anyhow::bail;
use clap::parser::ValueSource;
use clap::{ArgMatches, Args};
use std::path::PathBuf;
use std::sync::atomic::Ordering;

/// Arguments of `lora train`: every [`TrainConfig`] option as a flag, plus `--config`. Every
/// option can also be given in the `--config` TOML file under its name with `_` (e.g.
/// `learning_rate = 1e-4`); flags given on the command line override the file.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// A TOML file with training options (keys = option names with `_`).
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    options: TrainConfig,
}

/// The configuration from `--config` plus the flags given on the command line (`matches`
/// tells which were given; the others keep the file's value, else the default).
pub fn config_from(a: &TrainArgs, matches: &ArgMatches) -> anyhow::Result<TrainConfig> {
    let all = serde_json::to_value(&a.options)?;
    let given: serde_json::Map<String, serde_json::Value> = all
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| {
            matches!(
                matches
                    .try_get_raw(k)
                    .ok()
                    .flatten()
                    .and(matches.value_source(k)),
                Some(ValueSource::CommandLine)
            )
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    // A given number that JSON cannot hold (NaN, inf) would otherwise fall back to the default.
    if let Some((k, _)) = given.iter().find(|(_, v)| v.is_null()) {
        let raw: Vec<String> = matches
            .get_raw(k)
            .into_iter()
            .flatten()
            .map(|v| v.to_string_lossy().to_string())
            .collect();
        bail!(
            "--{} {}: must be a finite number",
            k.replace('_', "-"),
            raw.join(" ")
        );
    }
    TrainConfig::from_sources(a.config.as_deref(), serde_json::Value::Object(given))
}

/// Runs `lora train`.
pub fn run(a: TrainArgs, matches: &ArgMatches) -> anyhow::Result<()> {
    let cfg = config_from(&a, matches)?;
    let hooks = TrainHooks::default();
    let flag = hooks.interrupt.clone();
    // First Ctrl-C: finish the step, save a checkpoint, exit. Second: exit at once.
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond Ctrl-C: exiting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!(
            "\nCtrl-C: saving a checkpoint after the current step (Ctrl-C again to quit now)"
        );
    });
    let out_dir = cfg.output_dir.clone().unwrap_or_default();
    let mut trainer = Trainer::new(cfg, hooks)?;
    let mut vars = trainer.trainable().named_vars();
    if let Some(t) = trainer.pivotal_tokens() {
        vars.push(t.named_var());
    }
    let n = vars.len();
    let params: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    eprintln!(
        "training {params} parameters in {n} tensors ({:.2} MB in f32); memory before the first \
         step: {:.2} GB resident, {:.2} GB peak",
        params as f64 * 4.0 / 1e6,
        crate::sys::rss_mb() / 1024.0,
        crate::sys::peak_rss_mb() / 1024.0
    );
    let outcome = trainer.run()?;
    if outcome.interrupted {
        let ck = outcome
            .checkpoint
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        bail!(
            "interrupted at step {}; checkpoint saved to {ck}; continue with the same options \
             plus --resume {ck}",
            outcome.steps
        );
    }
    let last = outcome.losses.last().map_or(f64::NAN, |p| p.loss);
    eprintln!(
        "trained to step {} ({} steps in {:.1}s, {:.2} it/s), last loss {last:.4}",
        outcome.steps,
        outcome.steps_this_run,
        outcome.train_seconds,
        outcome.steps_this_run as f64 / outcome.train_seconds.max(1e-9)
    );
    eprintln!(
        "peak memory: {:.2} GB resident (whole process)",
        crate::sys::peak_rss_mb() / 1024.0
    );
    if let Some(p) = outcome.output {
        let size = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        eprintln!("wrote {} ({:.2} MB)", p.display(), size as f64 / 1e6);
    }
    eprintln!(
        "loss log: {} and {}",
        out_dir.join("loss.csv").display(),
        out_dir.join("loss.png").display()
    );
    Ok(())
}
