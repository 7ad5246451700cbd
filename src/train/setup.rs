//! Preparing a run: options, output folder, model, images (and class images), latent cache,
//! trainable parameters, optimizer, and the state of a checkpoint with `--resume`.

use super::batch::{Augment, EmbeddingCache, ImageSet};
use super::checkpoint::{self, Checkpoint};
use super::config::TrainConfig;
use super::data::load_folder;
use super::hooks::TrainHooks;
use super::model::{LoraSpec, Trainable};
use super::optim::{AdamW, AdamWParams};
use super::prior::{ensure_class_images, ClassGen};
use super::source::BatchSource;
use super::state::{RunState, CACHE_STREAM};
use super::trainer::{TrainedModel, Trainer};
use crate::hub::{bundled_model_dir, ModelSource};
use crate::lora::LoraTargets;
use crate::pipeline::StableDiffusion;
use crate::rng::Rng;
use crate::schedulers::DdpmScheduler;
use crate::sys::parse_device;
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::time::Instant;

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
        folder.warnings.iter().for_each(|w| hooks.note(w));
        let mut instance = ImageSet::new(folder.images);
        let source = match &cfg.model {
            Some(m) => ModelSource::parse(m)?,
            None => ModelSource::Local(bundled_model_dir()),
        };
        let t0 = Instant::now();
        let mut sd = StableDiffusion::load(&source, dtype, &device)
            .with_context(|| format!("cannot load model {}", source.describe()))?;
        hooks.note(format!(
            "loaded {} in {:.1}s",
            source.describe(),
            t0.elapsed().as_secs_f64()
        ));
        sd.latent_size(cfg.resolution, cfg.resolution)
            .context("--resolution")?;
        let rows = cfg.batch_size * if cfg.with_prior_preservation { 2 } else { 1 };
        let r = cfg.resolution;
        sd.check_activation_memory(r, r, rows, "training at")?;

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
            let pb = hooks.progress(cfg.num_class_images as u64, "class images");
            let made = ensure_class_images(&sd, &dir, &g, &mut |i, n| {
                pb.set_length(n as u64);
                pb.set_position(i as u64);
            })?;
            pb.finish_and_clear();
            if !made.is_empty() {
                hooks.note(format!(
                    "generated {} class images in {}",
                    made.len(),
                    dir.display()
                ));
            }
            let f = load_folder(
                &dir,
                &g.prompt,
                cfg.resolution,
                cfg.skip_bad_images,
                "class",
            )?;
            f.warnings.iter().for_each(|w| hooks.note(w));
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
        if cfg.gradient_checkpointing {
            sd.unet.set_gradient_checkpointing(true);
            sd.text_encoder
                .set_gradient_checkpointing(cfg.train_text_encoder);
        }
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
            state: RunState::new(cfg.seed),
            out_dir,
            last_checkpoint: None,
            cfg,
            hooks,
            model: TrainedModel {
                sd,
                params: model,
                opt,
                sched,
                prediction,
            },
            data: BatchSource {
                instance,
                class,
                aug,
                emb: EmbeddingCache::default(),
            },
        };
        if let Some(c) = ckpt {
            if c.state.step > t.cfg.max_train_steps {
                bail!(
                    "--resume {}: the checkpoint is at step {}, beyond --max-train-steps {}; \
                     raise --max-train-steps to continue training",
                    resume_dir.unwrap_or_default().display(),
                    c.state.step,
                    t.cfg.max_train_steps
                );
            }
            t.restore(c)?;
            t.hooks.note(format!(
                "resumed from {} at step {}",
                resume_dir.unwrap_or_default().display(),
                t.state.step
            ));
        }
        Ok(t)
    }

    fn restore(&mut self, c: Checkpoint) -> anyhow::Result<()> {
        self.model.params.restore(&c.params)?;
        self.model
            .opt
            .load_state(&c.optimizer, c.state.step as u64)?;
        self.model.params.set_dropout_states(&c.state.dropout_rng);
        self.state = RunState::from_checkpoint(&c.state);
        Ok(())
    }
}
