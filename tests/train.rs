//! `lora train` on the bundled tiny model (64×64 images, 8×8 latents): learning is real, the
//! saved LoRA reproduces the trained model, resume is exact, and bad input gets clear errors.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{err_text, expect_failure, fixtures, lora, max_abs_diff, repo, s};
use lora_diffusion::hub::ModelSource;
use lora_diffusion::lora::apply_lora_set;
use lora_diffusion::lora::Component;
use lora_diffusion::pipeline::StableDiffusion;
use lora_diffusion::rng::Rng;
use lora_diffusion::train::data::load_folder;
use lora_diffusion::train::{train, TrainConfig, TrainHooks, TrainOutcome, Trainer};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn demo_data() -> PathBuf {
    repo().join("tests/fixtures/train-data")
}

fn quiet() -> TrainHooks {
    TrainHooks {
        quiet: true,
        ..Default::default()
    }
}

/// A small, fast configuration on the bundled model.
fn cfg(data: &Path, out: &Path) -> TrainConfig {
    TrainConfig {
        instance_data_dir: Some(data.to_path_buf()),
        instance_prompt: Some("a photo of sks toy".into()),
        output_dir: Some(out.to_path_buf()),
        resolution: 64,
        max_train_steps: 4,
        learning_rate: 1e-3,
        ..Default::default()
    }
}

fn fixed_unet_input(sd: &StableDiffusion) -> (Tensor, Tensor, Tensor) {
    let mut rng = Rng::new(123);
    let x = rng.randn((2, 4, 8, 8), &Device::Cpu).unwrap();
    let t = Tensor::new(&[10f32, 700.0], &Device::Cpu).unwrap();
    let ctx = sd.encode_prompt("a photo of sks toy", 2, 0).unwrap();
    (x, t, ctx)
}

struct Trained {
    _dir: tempfile::TempDir,
    out: PathBuf,
    outcome: TrainOutcome,
    unet_out: Tensor,
    params: usize,
}

/// One 40-step run shared by the learning / reload / size tests: UNet LoRA on attention,
/// feed-forward and proj_in/out, lr 1e-2, batch 2, cached latents, seed 1.
fn trained() -> &'static Trained {
    static T: OnceLock<Trained> = OnceLock::new();
    T.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        let mut c = cfg(&demo_data(), &out);
        c.max_train_steps = 40;
        c.learning_rate = 1e-2;
        c.batch_size = 2;
        c.targets = "attn,ff,proj".into();
        c.center_crop = true;
        c.cache_latents = true;
        // The prompt of `fixed_unet_input` is encoded by the trained model afterwards.
        c.cache_text_embeddings = false;
        c.seed = 1;
        let mut trainer = Trainer::new(c, quiet()).unwrap();
        let outcome = trainer.run().unwrap();
        let (x, t, ctx) = fixed_unet_input(trainer.sd());
        let unet_out = trainer.sd().unet.forward(&x, &t, &ctx).unwrap().detach();
        let params = outcome.trained_params;
        Trained {
            _dir: dir,
            out,
            outcome,
            unet_out,
            params,
        }
    })
}

#[test]
fn loss_falls_by_a_quarter_over_40_steps() {
    let t = trained();
    let l: Vec<f64> = t.outcome.losses.iter().map(|p| p.loss).collect();
    assert_eq!(l.len(), 40);
    let first = l[..10].iter().sum::<f64>() / 10.0;
    let last = l[30..].iter().sum::<f64>() / 10.0;
    eprintln!(
        "mean loss of steps 1-10: {first:.4}, of steps 31-40: {last:.4} ({:.1}% lower)",
        100.0 * (1.0 - last / first)
    );
    // Margin: the last ten losses average at least 25% below the first ten.
    assert!(
        last < 0.75 * first,
        "loss did not fall enough: {first} -> {last}"
    );
    assert!(t.out.join("loss.csv").is_file() && t.out.join("loss.png").is_file());
    let csv = std::fs::read_to_string(t.out.join("loss.csv")).unwrap();
    assert_eq!(csv.lines().count(), 41);
}

#[test]
fn saved_lora_reloads_and_reproduces_the_trained_unet() {
    let t = trained();
    let path = t.out.join("lora.safetensors");
    assert_eq!(
        lora_diffusion::formats::detect(&path).unwrap(),
        lora_diffusion::formats::Format::Kohya
    );
    let set = lora_diffusion::formats::read(&path).unwrap();
    assert_eq!(
        set.metadata.get("ss_network_dim").map(String::as_str),
        Some("4")
    );
    assert_eq!(
        lora_diffusion::formats::ours::targets(&set),
        [
            "ff.net.0.proj",
            "ff.net.2",
            "proj_in",
            "proj_out",
            "to_k",
            "to_out.0",
            "to_q",
            "to_v"
        ]
    );
    assert!(set.metadata["training_args"].contains("\"learning_rate\":0.01"));
    let source = ModelSource::Local(lora_diffusion::hub::bundled_model_dir());
    let sd = StableDiffusion::load(&source, DType::F32, &Device::Cpu).unwrap();
    let (x, ts, ctx) = fixed_unet_input(&sd);
    let base = sd.unet.forward(&x, &ts, &ctx).unwrap();
    apply_lora_set(&sd.unet, Component::Unet, &set, 1.0).unwrap();
    let reloaded = sd.unet.forward(&x, &ts, &ctx).unwrap();
    let diff = max_abs_diff(&reloaded, &t.unet_out);
    let moved = max_abs_diff(&base, &t.unet_out);
    eprintln!("reloaded vs trained UNet output: max abs diff {diff:e}; trained vs base: {moved:e}");
    assert!(diff <= 1e-5, "{diff}");
    assert!(
        moved > 1e-2,
        "training changed the UNet output by only {moved}"
    );
}

#[test]
fn lora_file_size_is_header_plus_four_bytes_per_parameter() {
    let t = trained();
    let bytes = std::fs::read(t.out.join("lora.safetensors")).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let set = lora_diffusion::formats::read(&t.out.join("lora.safetensors")).unwrap();
    // Every adapted layer: down + up factors (f32) and a 0-d f32 alpha.
    let layers = set.layers.len();
    let expected = 8 + header + 4 * (t.params + layers);
    eprintln!(
        "lora.safetensors: {} bytes = 8 + {header} header + 4 x ({} factor params + {layers} alphas)",
        bytes.len(),
        t.params
    );
    assert_eq!(bytes.len(), expected);
    // tiny-sd: 7 transformer blocks with q,k,v,out x2 (dims 32/64, context 32), GEGLU, ff out, proj_in/out.
    assert_eq!(layers, 7 * 12);
}

/// A data folder with the demo images plus one wider image, so random crops move.
fn resume_data(dir: &Path) -> PathBuf {
    let d = dir.join("data");
    std::fs::create_dir_all(&d).unwrap();
    for e in std::fs::read_dir(demo_data()).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, d.join(p.file_name().unwrap())).unwrap();
    }
    let wide = image::RgbImage::from_fn(96, 64, |x, y| {
        image::Rgb([(x * 2) as u8, (y * 3) as u8, 128])
    });
    wide.save(d.join("wide.png")).unwrap();
    d
}

fn resume_cfg(data: &Path, out: &Path) -> TrainConfig {
    let mut c = cfg(data, out);
    c.max_train_steps = 6;
    c.random_flip = true;
    c.dropout = 0.1;
    c.min_snr_gamma = Some(5.0);
    c.noise_offset = 0.05;
    c.gradient_accumulation_steps = 2;
    c.train_text_encoder = true;
    c.learning_rate_text = 1e-3;
    c.lr_scheduler = lora_diffusion::train::LrScheduler::Cosine;
    c.lr_warmup_steps = 2;
    c.seed = 7;
    c
}

#[test]
fn resume_gives_the_same_bytes_as_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = resume_data(dir.path());
    let straight = dir.path().join("straight");
    let out = train(resume_cfg(&data, &straight), quiet()).unwrap();
    assert_eq!(out.steps, 6);

    // Interrupted after 3 steps (as Ctrl-C would), then resumed from the latest checkpoint.
    let split = dir.path().join("split");
    let mut c = resume_cfg(&data, &split);
    c.stop_after = Some(3);
    let out = train(c, quiet()).unwrap();
    assert!(out.interrupted && out.output.is_none() && out.steps == 3);
    assert!(split.join("checkpoint-3/trainer_state.json").is_file());
    let mut c = resume_cfg(&data, &split);
    c.resume = Some("latest".into());
    let out = train(c, quiet()).unwrap();
    assert_eq!(out.steps, 6);

    let a = std::fs::read(straight.join("lora.safetensors")).unwrap();
    let b = std::fs::read(split.join("lora.safetensors")).unwrap();
    eprintln!(
        "straight and resumed lora.safetensors: {} and {} bytes",
        a.len(),
        b.len()
    );
    assert!(a == b, "resumed LoRA differs from the uninterrupted one");
    let la = std::fs::read_to_string(straight.join("loss.csv")).unwrap();
    let lb = std::fs::read_to_string(split.join("loss.csv")).unwrap();
    assert_eq!(la, lb);
    // The text encoder was trained too.
    let set = lora_diffusion::formats::read(&straight.join("lora.safetensors")).unwrap();
    assert!(set.layers.keys().any(|k| k
        .as_str()
        .starts_with("text_encoder.text_model.encoder.layers.0.self_attn.q_proj")));

    // Changing a training option on resume is refused with the option named.
    let mut c = resume_cfg(&data, &split);
    c.resume = Some(split.join("checkpoint-3").display().to_string());
    c.rank = 2;
    let e = err_text(train(c, quiet()));
    assert!(e.contains("rank: checkpoint 4, now 2"), "{e}");
}

#[test]
fn empty_image_folder_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("empty");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("notes.txt"), "not an image").unwrap();
    let e = err_text(train(cfg(&data, &dir.path().join("out")), quiet()));
    assert!(e.contains("has no images") && e.contains("empty"), "{e}");
    let e = err_text(train(
        cfg(&dir.path().join("missing"), &dir.path().join("out")),
        quiet(),
    ));
    assert!(e.contains("does not exist"), "{e}");
}

/// A folder with the demo images plus `name` holding `bytes`.
fn data_with(dir: &Path, name: &str, write: impl FnOnce(&Path)) -> PathBuf {
    let d = resume_data(dir);
    std::fs::remove_file(d.join("wide.png")).unwrap();
    write(&d.join(name));
    d
}

#[test]
fn corrupt_image_is_named_or_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_with(dir.path(), "broken.png", |p| {
        std::fs::write(p, b"\x89PNG\r\n\x1a\nthis is not really a png").unwrap()
    });
    let e = err_text(train(cfg(&data, &dir.path().join("a")), quiet()));
    assert!(
        e.contains("broken.png") && e.contains("--skip-bad-images"),
        "{e}"
    );
    let mut c = cfg(&data, &dir.path().join("b"));
    c.skip_bad_images = true;
    c.max_train_steps = 1;
    assert_eq!(train(c, quiet()).unwrap().steps, 1);
    let f = load_folder(&data, "p", 64, true, "instance").unwrap();
    assert_eq!(f.images.len(), 5);
    assert!(
        f.warnings
            .iter()
            .any(|w| w.contains("skipped") && w.contains("broken.png")),
        "{:?}",
        f.warnings
    );
}

#[test]
fn tiny_image_is_named_or_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_with(dir.path(), "tiny.png", |p| {
        image::RgbImage::new(20, 20).save(p).unwrap()
    });
    let e = err_text(train(cfg(&data, &dir.path().join("a")), quiet()));
    assert!(
        e.contains("tiny.png is too small: 20x20") && e.contains("at least 32 px"),
        "{e}"
    );
    let f = load_folder(&data, "p", 64, true, "instance").unwrap();
    assert_eq!(f.images.len(), 5);
    assert!(f
        .warnings
        .iter()
        .any(|w| w.contains("skipped") && w.contains("tiny.png")));
}

/// Loads a one-image folder holding `img` and returns (pixel at 0,0, warnings).
fn convert(img: image::DynamicImage) -> ([u8; 3], Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    img.save(dir.path().join("x.png")).unwrap();
    let f = load_folder(dir.path(), "p", 32, false, "instance").unwrap();
    (f.images[0].image.get_pixel(0, 0).0, f.warnings)
}

#[test]
fn grayscale_image_is_converted_with_a_warning() {
    let (px, w) = convert(image::DynamicImage::ImageLuma8(
        image::GrayImage::from_pixel(32, 32, image::Luma([77])),
    ));
    assert_eq!(px, [77, 77, 77]);
    assert!(
        w.len() == 1 && w[0].contains("x.png: grayscale, converted to RGB"),
        "{w:?}"
    );
}

#[test]
fn rgba_image_is_composited_onto_white_with_a_warning() {
    let img = image::RgbaImage::from_pixel(32, 32, image::Rgba([0, 0, 200, 51]));
    let (px, w) = convert(image::DynamicImage::ImageRgba8(img));
    // 0.2 · colour + 0.8 · white
    assert_eq!(px, [204, 204, 244]);
    assert!(
        w.iter().any(|s| s.contains("composited onto white")),
        "{w:?}"
    );
}

#[test]
fn sixteen_bit_image_is_converted_with_a_warning() {
    let img = image::ImageBuffer::<image::Rgb<u16>, Vec<u16>>::from_pixel(
        32,
        32,
        image::Rgb([65535, 32896, 0]),
    );
    let (px, w) = convert(image::DynamicImage::ImageRgb16(img));
    assert_eq!(px, [255, 128, 0]);
    assert!(
        w.iter().any(|s| s.contains("16-bit, converted to 8-bit")),
        "{w:?}"
    );
}

#[test]
fn rank_too_large_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(&demo_data(), &dir.path().join("out"));
    c.rank = 40;
    let e = err_text(train(c, quiet()));
    assert!(
        e.contains("LoRA rank 40 is too large") && e.contains("to_q"),
        "{e}"
    );
}

#[test]
fn nan_loss_stops_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut c = cfg(&demo_data(), &out);
    c.learning_rate = 1e30;
    c.max_train_steps = 10;
    c.save_steps = 1;
    c.max_grad_norm = 0.0;
    let e = err_text(train(c, quiet()));
    eprintln!("{e}");
    assert!(
        e.contains("training stopped at step") && e.contains("last good checkpoint"),
        "{e}"
    );
    assert!(e.contains("NaN") || e.contains("inf"), "{e}");
    let step: usize = e["training stopped at step ".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(step >= 2);
    assert!(out
        .join(format!("checkpoint-{}", step - 1))
        .join("params.safetensors")
        .is_file());
    assert!(!out.join(format!("checkpoint-{step}")).exists());
    assert!(!out.join("lora.safetensors").exists());
}

#[test]
fn existing_output_dir_needs_force() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "user file").unwrap();
    let e = err_text(train(cfg(&demo_data(), &out), quiet()));
    assert!(e.contains("is not empty") && e.contains("--force"), "{e}");
    // Through the CLI: exit code 1 and the message, nothing written.
    let o = lora(&[
        "train",
        "--instance-data-dir",
        s(&demo_data()),
        "--instance-prompt",
        "a toy",
        "--resolution",
        "64",
        "--output-dir",
        s(&out),
    ]);
    expect_failure(&o, &["--force"]);
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
    let mut c = cfg(&demo_data(), &out);
    c.force = true;
    c.max_train_steps = 1;
    train(c, quiet()).unwrap();
    assert!(out.join("lora.safetensors").is_file() && out.join("keep.txt").is_file());
}

#[test]
fn prior_preservation_generates_class_images_and_samples() {
    let dir = tempfile::tempdir().unwrap();
    let class = dir.path().join("class");
    let out = dir.path().join("out");
    let mut c = cfg(&demo_data(), &out);
    c.with_prior_preservation = true;
    c.class_data_dir = Some(class.clone());
    c.class_prompt = Some("a photo of a toy".into());
    c.num_class_images = 2;
    c.sample_steps = 2;
    c.max_train_steps = 2;
    c.sample_prompt = Some("a photo of sks toy".into());
    c.sample_every = 1;
    let o = train(c, quiet()).unwrap();
    assert!(class.join("class-00000.png").is_file() && class.join("class-00001.png").is_file());
    assert!(
        out.join("samples/step-000001.png").is_file()
            && out.join("samples/step-000002.png").is_file()
    );
    assert!(o.losses.iter().all(|p| p.loss.is_finite()));
}

fn full_cfg(out: &Path) -> TrainConfig {
    // sd2-tiny: v_prediction, linear projections, VAE factor 2 (16×16 images → 8×8 latents).
    let mut c = cfg(&demo_data(), out);
    c.model = Some(fixtures().join("sd2-tiny").display().to_string());
    c.resolution = 16;
    c.full = true;
    c.max_train_steps = 2;
    c.learning_rate = 1e-4;
    c.random_flip = true;
    c
}

#[test]
fn full_fine_tuning_with_v_prediction_trains_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = train(full_cfg(&out), quiet()).unwrap();
    let path = out.join("unet/diffusion_pytorch_model.safetensors");
    assert_eq!(o.output.as_deref(), Some(path.as_path()));
    assert!(out.join("unet/config.json").is_file());
    let trained = common::load_tensors(&path);
    let base = common::unet_tensors("sd2");
    assert_eq!(trained.len(), base.len());
    let k = "conv_in.weight";
    let d = max_abs_diff(&trained[k], &base[k]);
    eprintln!("full fine-tuning moved conv_in.weight by up to {d:e} in 2 steps");
    assert!(d > 0.0 && d < 1e-3);

    // Interrupted after 1 step and resumed: the same UNet bytes.
    let split = dir.path().join("split");
    let mut c = full_cfg(&split);
    c.stop_after = Some(1);
    assert!(train(c, quiet()).unwrap().interrupted);
    let mut c = full_cfg(&split);
    c.resume = Some("latest".into());
    train(c, quiet()).unwrap();
    let a = std::fs::read(&path).unwrap();
    let b = std::fs::read(split.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    assert!(a == b, "resumed full fine-tuning differs");
}

#[test]
fn toml_config_and_flags_combine() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("train.toml");
    std::fs::write(&p, "rank = 8\nlearning_rate = 2e-4\nlr_scheduler = \"cosine\"\ninstance_prompt = \"from file\"\n").unwrap();
    let flags = serde_json::json!({"learning_rate": 3e-4, "seed": 5});
    let c = TrainConfig::from_sources(Some(&p), flags).unwrap();
    assert_eq!((c.rank, c.learning_rate, c.seed), (8, 3e-4, 5));
    assert_eq!(c.lr_scheduler, lora_diffusion::train::LrScheduler::Cosine);
    assert_eq!(c.instance_prompt.as_deref(), Some("from file"));
    assert_eq!(c.alpha(), 8.0);
    std::fs::write(&p, "rnak = 8\n").unwrap();
    let e = err_text(TrainConfig::from_sources(Some(&p), serde_json::json!({})));
    assert!(e.contains("rnak") && e.contains("train.toml"), "{e}");
}

#[test]
fn use_ema_saves_the_warmup_average_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, steps: usize, ema: bool, stop: Option<usize>, resume: bool| {
        let out = dir.path().join(name);
        let mut c = full_cfg(&out);
        c.max_train_steps = steps;
        c.use_ema = ema;
        c.ema_decay = 0.9;
        c.save_steps = if ema { 1 } else { 0 };
        c.stop_after = stop;
        c.resume = resume.then(|| "latest".to_string());
        train(c, quiet()).unwrap();
        out.join("unet/diffusion_pytorch_model.safetensors")
    };
    let w1 = common::load_tensors(run("one", 1, false, None, false));
    let w2 = common::load_tensors(run("two", 2, false, None, false));
    let ema_path = run("ema", 2, true, None, false);
    let ema = common::load_tensors(&ema_path);
    // diffusers' EMAModel: the first update copies, the second uses d = min(0.9, 2/11).
    let d = 2.0 / 11.0;
    let k = "conv_in.weight";
    let want = (w1[k].affine(d, 0.0).unwrap() + w2[k].affine(1.0 - d, 0.0).unwrap()).unwrap();
    let err = max_abs_diff(&ema[k], &want);
    let moved = max_abs_diff(&w2[k], &w1[k]);
    eprintln!("EMA vs 2/11 w1 + 9/11 w2: {err:e} (the step moved it by {moved:e})");
    assert!(moved > 1e-6 && err < 1e-7 * (1.0 + moved));
    assert!(max_abs_diff(&ema[k], &w2[k]) > moved * 0.1);
    assert!(dir
        .path()
        .join("ema/checkpoint-1/ema.safetensors")
        .is_file());
    // Interrupted after 1 step and resumed: the same bytes as the uninterrupted EMA run.
    run("split", 2, true, Some(1), false);
    let b = std::fs::read(run("split", 2, true, None, true)).unwrap();
    assert!(
        std::fs::read(&ema_path).unwrap() == b,
        "resumed EMA run differs"
    );
    // --use-ema is a full fine-tuning option.
    let mut c = cfg(&demo_data(), &dir.path().join("lora"));
    c.use_ema = true;
    let e = err_text(train(c, quiet()));
    assert!(e.contains("--use-ema") && e.contains("--full"), "{e}");
}
