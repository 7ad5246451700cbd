//! Preparing a run: options, output folder, model, images (and class images), latent cache,
//! trainable parameters, optimizer, and the state of a checkpoint with `--resume`.

use super::batch::{Augment, EmbeddingCache, ImageSet};
use super::bucket::{Bucketer, Reso};
use super::checkpoint::{self, Checkpoint};
use super::config::{MixedPrecision, TrainConfig};
use super::data::{load_folder_fit, Fit};
use super::ema::Ema;
use super::hooks::TrainHooks;
use super::model::{LoraSpec, Trainable};
use super::optim::{AdamW, AdamWParams};
use super::pivotal::{Phase, PivotalTokens, ROWS_NAME};
use super::prior::{ensure_class_images, ClassGen};
use super::scaler::{LossScaler, INIT_SCALE};
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
        let bucketer = match cfg.bucket_spec()? {
            Some((spec, notes)) => {
                notes.iter().for_each(|n| hooks.note(format!("note: {n}")));
                if spec.no_upscale {
                    hooks.note(
                        "note: --bucket-no-upscale: buckets come from the image sizes; \
                         --min-bucket-reso and --max-bucket-reso are not used",
                    );
                }
                Some(Bucketer::new(spec))
            }
            None => None,
        };
        let fit = match &bucketer {
            Some(b) => Fit::Bucket(b),
            None => Fit::Square(cfg.resolution),
        };
        let folder = load_folder_fit(&inst_dir, &prompt, fit, cfg.skip_bad_images, "instance")?;
        folder.warnings.iter().for_each(|w| hooks.note(w));
        let mut instance = ImageSet::new(folder.images);
        let buckets = instance.bucket_table();
        if let Some(t) = &buckets {
            let errs: Vec<f64> = instance
                .images()
                .iter()
                .filter_map(|im| im.bucket.map(|b| b.ar_error.abs()))
                .collect();
            let mean = errs.iter().sum::<f64>() / errs.len().max(1) as f64;
            t.describe(mean).iter().for_each(|l| hooks.note(l));
        }
        let source = match &cfg.model {
            Some(m) => ModelSource::parse(m)?,
            None => ModelSource::Local(bundled_model_dir()),
        }
        .with_single_file_options(None, cfg.prediction_type.clone())?;
        if let ModelSource::SingleFile(s) = &source {
            for n in &s.info()?.notes {
                hooks.note(n);
            }
        }
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
        let tokens = match cfg.pivotal {
            true => {
                let t = PivotalTokens::attach(&mut sd, &cfg)?;
                let without = t.fill_captions(instance.images_mut())?;
                if without > 0 {
                    hooks.note(format!(
                        "warning: {without} of {} caption(s) name no placeholder ({}); those \
                         images do not train the new tokens",
                        instance.len(),
                        t.names().join(", ")
                    ));
                }
                hooks.note(format!(
                    "pivotal tuning: tokens {} (ids {:?}); {} textual-inversion step(s), then {} \
                     LoRA step(s)",
                    t.names().join(", "),
                    t.ids(),
                    cfg.ti_steps,
                    cfg.max_train_steps
                ));
                Some(t)
            }
            false => None,
        };
        let rows = cfg.batch_size * if cfg.with_prior_preservation { 2 } else { 1 };
        let r = cfg.resolution;
        let (mut w, mut h) = (r, r);
        if let Some(t) = &buckets {
            for &(bw, bh) in t.buckets.keys() {
                sd.latent_size(bh, bw)
                    .with_context(|| format!("aspect-ratio bucket {bw}x{bh}"))?;
            }
            (w, h) = t.largest().unwrap_or((r, r));
        }
        sd.check_activation_memory(h, w, rows, "training at")?;

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
            let in_use: Vec<Reso> = buckets
                .as_ref()
                .map(|t| t.buckets.keys().copied().collect())
                .unwrap_or_default();
            let fit = match &buckets {
                Some(_) => Fit::Cover(&in_use),
                None => Fit::Square(cfg.resolution),
            };
            let f = load_folder_fit(&dir, &g.prompt, fit, cfg.skip_bad_images, "class")?;
            f.warnings.iter().for_each(|w| hooks.note(w));
            let mut images = f.images;
            images.truncate(cfg.num_class_images);
            class = Some(match &buckets {
                Some(_) => ImageSet::fitted(images),
                None => ImageSet::new(images),
            });
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
        let emb = release_unused(&mut sd, &cfg, &instance, class.as_ref(), &hooks)?;

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
            if let Some(te) = sd.text_encoder_mut() {
                te.set_gradient_checkpointing(cfg.train_text_encoder);
            }
        }
        let phase = Phase::at(&cfg, 0);
        model.set_enabled(phase == Phase::Lora);
        let opt = optimizer_for(&cfg, &model, tokens.as_ref(), phase)?;
        let ema = match cfg.use_ema {
            true => Some(Ema::new(&model.named_vars(), cfg.ema_decay)?),
            false => None,
        };
        let sched = DdpmScheduler::new(&sd.scheduler_config)?;
        let prediction = sd.scheduler_config.prediction_type;
        let mut t = Self {
            state: RunState {
                loss_scaler: (cfg.mixed_precision == MixedPrecision::Fp16).then(|| LossScaler {
                    scale: cfg.initial_loss_scale.unwrap_or(INIT_SCALE),
                    good_steps: 0,
                }),
                ..RunState::new(cfg.seed)
            },
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
                ema,
                tokens,
                phase,
            },
            data: BatchSource {
                instance,
                class,
                aug,
                emb,
                buckets,
            },
        };
        if let Some(c) = ckpt {
            if c.state.step > t.cfg.total_steps() {
                let limit = match t.cfg.pivotal {
                    true => format!(
                        "the run's {} steps (--ti-steps {} + --max-train-steps {})",
                        t.cfg.total_steps(),
                        t.cfg.ti_steps,
                        t.cfg.max_train_steps
                    ),
                    false => format!("--max-train-steps {}", t.cfg.max_train_steps),
                };
                bail!(
                    "--resume {}: the checkpoint is at step {}, beyond {limit}; raise \
                     --max-train-steps to continue training",
                    resume_dir.unwrap_or_default().display(),
                    c.state.step,
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

    fn restore(&mut self, mut c: Checkpoint) -> anyhow::Result<()> {
        let m = &mut self.model;
        if let Some(t) = &m.tokens {
            t.restore(&c.params)?;
            c.params.remove(ROWS_NAME);
        }
        m.params.restore(&c.params)?;
        let phase = Phase::at(&self.cfg, c.state.step);
        if let Some(p) = c
            .state
            .phase
            .filter(|&p| m.tokens.is_some() && p != phase.number())
        {
            bail!(
                "checkpoint at step {} is in phase {p}, but with --ti-steps {} that step is in \
                 phase {}",
                c.state.step,
                self.cfg.ti_steps,
                phase.number()
            );
        }
        if phase != m.phase {
            m.params.set_enabled(phase == Phase::Lora);
            m.opt = optimizer_for(&self.cfg, &m.params, m.tokens.as_ref(), phase)?;
            m.phase = phase;
        }
        // Each phase has its own optimizer, counting its own steps.
        let first = match phase {
            Phase::Inversion => 0,
            Phase::Lora => self.cfg.ti_phase_steps(),
        };
        m.opt
            .load_state(&c.optimizer, (c.state.step - first) as u64)?;
        self.model.params.set_dropout_states(&c.state.dropout_rng);
        if let Some(ema) = self.model.ema.as_mut() {
            if c.ema.is_empty() {
                bail!("--resume: the checkpoint has no EMA state (ema.safetensors) but --use-ema is on");
            }
            ema.load_state(&c.ema)?;
        }
        self.state = RunState::from_checkpoint(&c.state);
        Ok(())
    }
}

/// Frees the parts of the model that training will not run again: the VAE encoder once
/// every latent is cached, the VAE decoder when no samples are drawn, and a frozen text encoder
/// once every caption's embedding is cached (`--cache-text-embeddings`, unless samples are
/// drawn). Returns the embedding cache, filled when the text encoder was freed.
fn release_unused(
    sd: &mut StableDiffusion,
    cfg: &TrainConfig,
    instance: &ImageSet,
    class: Option<&ImageSet>,
    hooks: &TrainHooks,
) -> anyhow::Result<EmbeddingCache> {
    let sampling = cfg.sample_prompt.is_some();
    let mut freed = vec![];
    // With buckets, class latents are cached per (image, bucket) on first use: the encoder stays.
    if cfg.cache_latents && !(cfg.enable_bucket && cfg.with_prior_preservation) {
        sd.vae.release_encoder();
        freed.push("VAE encoder");
    }
    if !sampling {
        sd.vae.release_decoder();
        freed.push("VAE decoder");
    }
    let mut emb = EmbeddingCache::default();
    // Pivotal tuning changes the token embeddings: captions are encoded as they train.
    if cfg.cache_text_embeddings && !cfg.train_text_encoder && !sampling && !cfg.pivotal {
        let captions = std::iter::once(instance)
            .chain(class)
            .flat_map(|s| s.images().iter().map(|i| i.caption.as_str()));
        emb.fill(captions, sd)?;
        sd.release_text_encoder();
        freed.push("text encoder");
        hooks.note(format!("cached the embeddings of {} caption(s)", emb.len()));
    }
    if !freed.is_empty() {
        crate::sys::trim_heap();
        hooks.note(format!("freed: {}", freed.join(", ")));
    }
    Ok(emb)
}

/// The optimizer of `phase`: the new token rows alone at `--learning-rate-ti` with
/// `--weight-decay-ti` (textual inversion), or the LoRA groups (plus the rows with
/// `--continue-inversion`, at `--continue-inversion-lr`) with `--adam-weight-decay`, as the
/// original puts them in one optimizer. A new phase starts with zero moments, as the original's
/// new optimizer does.
pub(super) fn optimizer_for(
    cfg: &TrainConfig,
    params: &Trainable,
    tokens: Option<&PivotalTokens>,
    phase: Phase,
) -> anyhow::Result<AdamW> {
    let hp = |weight_decay| AdamWParams {
        beta1: cfg.adam_beta1,
        beta2: cfg.adam_beta2,
        eps: cfg.adam_epsilon,
        weight_decay,
    };
    let rows = || -> anyhow::Result<Vec<(String, candle_core::Var)>> {
        Ok(vec![tokens
            .context("internal: pivotal phase without tokens")?
            .named_var()])
    };
    if phase == Phase::Inversion {
        let mut opt = AdamW::new(hp(cfg.weight_decay_ti));
        opt.add_group(&rows()?, cfg.learning_rate_ti)?;
        return Ok(opt);
    }
    let mut opt = AdamW::new(hp(cfg.adam_weight_decay));
    for (vars, text) in params.groups() {
        let lr = if text {
            cfg.learning_rate_text
        } else {
            cfg.learning_rate
        };
        opt.add_group(&vars, lr)?;
    }
    if cfg.pivotal && cfg.continue_inversion {
        let lr = cfg.continue_inversion_lr.unwrap_or(cfg.learning_rate_ti);
        opt.add_group(&rows()?, lr)?;
    }
    Ok(opt)
}
