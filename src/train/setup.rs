//! Preparing a run: options, output folder, model, images (and class images), latent cache,
//! trainable parameters, optimizer, and the state of a checkpoint with `--resume`.

use super::batch::{Augment, EmbeddingCache, ImageSet};
use super::checkpoint::{self, Checkpoint, DataOrder};
use super::config::TrainConfig;
use super::data::load_folder;
use super::model::{LoraSpec, Trainable};
use super::optim::{AdamW, AdamWParams};
use super::prior::{ensure_class_images, ClassGen};
use super::trainer::{note, TrainHooks, Trainer};
use crate::hub::{bundled_model_dir, ModelSource};
use crate::lora::LoraTargets;
use crate::pipeline::StableDiffusion;
use crate::rng::Rng;
use crate::schedulers::DdpmScheduler;
use crate::sys::parse_device;
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Seeds of the independent random streams, derived from `--seed`.
pub(super) const DATA_STREAM: u64 = 0xD47A_5EED;
pub(super) const NOISE_STREAM: u64 = 0x0015_E5EE;
pub(super) const CACHE_STREAM: u64 = 0xCAC4_E5EE;

/// Checks the output folder: a new or empty folder is fine, a non-empty one needs `--force`
/// (or `--resume`).
fn check_output_dir(dir: &Path, force: bool, resuming: bool) -> anyhow::Result<()> {
    if dir.exists() && !dir.is_dir() {
        bail!("--output-dir {} is a file, not a folder", dir.display());
    }
    if dir.is_dir() && !force && !resuming {
        let n = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read --output-dir {}", dir.display()))?
            .count();
        if n > 0 {
            bail!(
                "--output-dir {} is not empty ({n} entries); pass --force to write into it \
                 (files of the same name are replaced) or --resume latest to continue the run there",
                dir.display()
            );
        }
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create --output-dir {}", dir.display()))
}

impl Trainer {
    /// Validates `cfg`, loads the model and data, attaches the trainable parameters and, with
    /// `--resume`, restores the checkpoint.
    pub fn new(cfg: TrainConfig, hooks: TrainHooks) -> anyhow::Result<Self> {
        cfg.validate()?;
        let out_dir = cfg.output_dir.clone().context("--output-dir is required")?;
        check_output_dir(&out_dir, cfg.force, cfg.resume.is_some())?;
        let resume_dir = match cfg.resume.as_deref() {
            None => None,
            Some("latest") => Some(checkpoint::latest(&out_dir).with_context(|| {
                format!(
                    "--resume latest: no checkpoint-<step> folder in {}",
                    out_dir.display()
                )
            })?),
            Some(p) => Some(PathBuf::from(p)),
        };
        let device = parse_device(&cfg.device)?;
        let dtype = cfg.weight_dtype()?;
        let ckpt = match &resume_dir {
            Some(d) => Some(checkpoint::load(d, &device)?),
            None => None,
        };
        if let Some(c) = &ckpt {
            let conflicts = cfg.resume_conflicts(&c.state.training_args);
            if !conflicts.is_empty() {
                let lines: Vec<String> = conflicts
                    .iter()
                    .map(|(k, a, b)| format!("{k}: checkpoint {a}, now {b}"))
                    .collect();
                bail!(
                    "--resume {}: the options differ from the checkpointed run, so it could not \
                     continue exactly:\n  {}",
                    resume_dir
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                    lines.join("\n  ")
                );
            }
        }

        // Data.
        let prompt = cfg.instance_prompt.clone().unwrap_or_default();
        let inst_dir = cfg.instance_data_dir.clone().unwrap_or_default();
        let folder = load_folder(
            &inst_dir,
            &prompt,
            cfg.resolution,
            cfg.skip_bad_images,
            "instance",
        )?;
        folder.warnings.iter().for_each(|w| note(&hooks, w));
        let mut instance = ImageSet::new(folder.images);
        let source = match &cfg.model {
            Some(m) => ModelSource::parse(m)?,
            None => ModelSource::Local(bundled_model_dir()),
        };
        let t0 = Instant::now();
        let mut sd = StableDiffusion::load(&source, dtype, &device)
            .with_context(|| format!("cannot load model {}", source.describe()))?;
        note(
            &hooks,
            format!(
                "loaded {} in {:.1}s",
                source.describe(),
                t0.elapsed().as_secs_f64()
            ),
        );
        sd.latent_size(cfg.resolution, cfg.resolution)
            .context("--resolution")?;

        let mut class = None;
        if cfg.with_prior_preservation {
            let dir = cfg.class_data_dir.clone().unwrap_or_default();
            let g = ClassGen {
                prompt: cfg.class_prompt.clone().unwrap_or_default(),
                count: cfg.num_class_images,
                resolution: cfg.resolution,
                steps: cfg.sample_steps,
                guidance: cfg.sample_guidance,
                seed: cfg.seed,
            };
            let pb = progress(&hooks, cfg.num_class_images as u64, "class images");
            let made = ensure_class_images(&sd, &dir, &g, &mut |i, n| {
                pb.set_length(n as u64);
                pb.set_position(i as u64);
            })?;
            pb.finish_and_clear();
            if !made.is_empty() {
                note(
                    &hooks,
                    format!("generated {} class images in {}", made.len(), dir.display()),
                );
            }
            let f = load_folder(
                &dir,
                &g.prompt,
                cfg.resolution,
                cfg.skip_bad_images,
                "class",
            )?;
            f.warnings.iter().for_each(|w| note(&hooks, w));
            let mut images = f.images;
            images.truncate(cfg.num_class_images);
            class = Some(ImageSet::new(images));
        }
        let aug = Augment {
            resolution: cfg.resolution,
            center_crop: cfg.center_crop,
            random_flip: cfg.random_flip,
        };
        if cfg.cache_latents {
            let mut rng = Rng::new(cfg.seed ^ CACHE_STREAM);
            instance.build_cache(&sd.vae, dtype, aug, &mut rng, &device)?;
            if let Some(c) = class.as_mut() {
                c.build_cache(&sd.vae, dtype, aug, &mut rng, &device)?;
            }
        }

        // Trainable parameters.
        let mut init_rng = Rng::new(cfg.seed);
        let model = if cfg.full {
            Trainable::full(&mut sd)?
        } else {
            let targets = LoraTargets::parse(&cfg.targets).context("--targets")?;
            let text_targets = if cfg.train_text_encoder {
                Some(LoraTargets::parse(&cfg.text_targets).context("--text-targets")?)
            } else {
                None
            };
            let spec = LoraSpec {
                targets: &targets,
                text_targets: text_targets.as_ref(),
                rank: cfg.rank,
                alpha: cfg.alpha(),
                dropout: cfg.dropout,
            };
            Trainable::inject(&sd, &spec, &mut init_rng)?
        };
        let mut opt = AdamW::new(AdamWParams {
            beta1: cfg.adam_beta1,
            beta2: cfg.adam_beta2,
            eps: cfg.adam_epsilon,
            weight_decay: cfg.adam_weight_decay,
        });
        for (vars, text) in model.groups() {
            let lr = if text {
                cfg.learning_rate_text
            } else {
                cfg.learning_rate
            };
            opt.add_group(&vars, lr)?;
        }
        let sched = DdpmScheduler::new(&sd.scheduler_config)?;
        let prediction = sd.scheduler_config.prediction_type;
        let mut t = Self {
            data_rng: Rng::new(cfg.seed ^ DATA_STREAM),
            noise_rng: Rng::new(cfg.seed ^ NOISE_STREAM),
            order: DataOrder {
                perm: vec![],
                cursor: 0,
                epoch: 0,
            },
            step: 0,
            losses: vec![],
            out_dir,
            last_checkpoint: None,
            cfg,
            hooks,
            sd,
            model,
            opt,
            sched,
            prediction,
            instance,
            class,
            aug,
            emb: EmbeddingCache::default(),
        };
        if let Some(c) = ckpt {
            t.restore(c)?;
            note(
                &t.hooks,
                format!(
                    "resumed from {} at step {}",
                    resume_dir.unwrap_or_default().display(),
                    t.step
                ),
            );
        }
        Ok(t)
    }

    fn restore(&mut self, c: Checkpoint) -> anyhow::Result<()> {
        self.model.restore(&c.params)?;
        self.opt.load_state(&c.optimizer, c.state.step as u64)?;
        self.model.set_dropout_states(&c.state.dropout_rng);
        self.data_rng = Rng::from_state(c.state.data_rng);
        self.noise_rng = Rng::from_state(c.state.noise_rng);
        self.order = c.state.order;
        self.step = c.state.step;
        self.losses = c.state.losses;
        Ok(())
    }
}

/// A progress bar (hidden when quiet) with step, loss, rate and ETA.
pub(super) fn progress(hooks: &TrainHooks, len: u64, what: &str) -> indicatif::ProgressBar {
    if hooks.quiet {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(len);
    let style = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:30}] step {pos}/{len} {per_sec} ETA {eta}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    .progress_chars("=> ");
    pb.set_style(style);
    pb.set_message(what.to_string());
    pb
}
