//! CPU vs accelerator parity on the tiny fixtures: the pipeline image from fixed latents (plain
//! and with a run-time LoRA adapter) within 2 levels of 255, every LoRA gradient of the tiny UNet
//! and text encoder within 1e-4 relative (f32), and the losses of a short `lora train` run within
//! 1e-3.
//!
//! The device is `LORA_TEST_DEVICE` (default `cuda:0`). When it cannot be opened (no GPU, or a
//! build without `--features cuda`), each test prints why and passes; with `LORA_REQUIRE_DEVICE=1`
//! it fails instead. The binary finds the repository and the `lora` binary at their build-time
//! paths unless `LORA_REPO` / `LORA_BIN` name them (a copy run on another machine).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use lora_diffusion::lora::Component;
use lora_diffusion::lora::{inject_trainable, LoraSet, LoraTargets, LoraWeights};
use lora_diffusion::models::clip::{ClipTextConfig, ClipTextModel};
use lora_diffusion::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use lora_diffusion::models::weights::ModelWeights;
use lora_diffusion::rng::Rng;

const IMAGE_LEVELS: u8 = 2;
const GRAD_REL_TOL: f32 = 1e-4;
const LOSS_TOL: f64 = 1e-3;

type Res<T> = anyhow::Result<T>;

// ---- where things are ----

fn repo() -> PathBuf {
    std::env::var_os("LORA_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

fn fixtures() -> PathBuf {
    repo().join("tests/fixtures")
}

fn lora_bin() -> PathBuf {
    std::env::var_os("LORA_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_lora")))
}

fn path_str(p: &Path) -> Res<&str> {
    p.to_str()
        .ok_or_else(|| anyhow::anyhow!("path is not UTF-8: {}", p.display()))
}

// ---- the device under test ----

/// The device name and the opened device, or `None` (printed) when the test is skipped.
fn device_under_test(test: &str) -> Option<(String, Device)> {
    let name = std::env::var("LORA_TEST_DEVICE").unwrap_or_else(|_| "cuda:0".into());
    let opened = match name.as_str() {
        "cpu" => Ok(Device::Cpu),
        "metal" => Device::new_metal(0),
        _ => match name.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Device::new_cuda(n),
            _ => panic!("LORA_TEST_DEVICE={name}: expected cpu, cuda:N or metal"),
        },
    };
    match opened {
        Ok(dev) => {
            eprintln!("{test}: comparing cpu with {name}");
            Some((name, dev))
        }
        Err(e) => {
            let reason = format!("{test}: skipped, cannot open {name}: {e}");
            if std::env::var("LORA_REQUIRE_DEVICE").as_deref() == Ok("1") {
                panic!("{test}: cannot open {name}: {e} (LORA_REQUIRE_DEVICE=1 requires it)");
            }
            eprintln!("{reason}");
            None
        }
    }
}

/// Runs `body`, turning its error into a test failure with the whole error chain.
fn check(test: &str, body: impl FnOnce(&str, &Device) -> Res<()>) {
    let Some((name, dev)) = device_under_test(test) else {
        return;
    };
    if let Err(e) = body(&name, &dev) {
        panic!("{test} on {name}: {e:#}");
    }
}

// ---- running the CLI ----

fn run_lora(args: &[&str]) -> Res<()> {
    let bin = lora_bin();
    let out = Command::new(&bin)
        .args(args)
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run {}: {e}", bin.display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        anyhow::bail!("lora {} failed ({}):\n{stderr}", args.join(" "), out.status);
    }
    Ok(())
}

// ---- images ----

/// `lora generate` of the sd1 fixture prompt from the fixture's latents on `device`, plus
/// `extra` flags; returns the PNG's RGB bytes.
fn generate(dir: &Path, device: &str, extra: &[&str]) -> Res<Vec<u8>> {
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        fixtures().join("sd1.pipeline.json"),
    )?)?;
    let field = |k: &str| -> Res<String> {
        match &json[k] {
            serde_json::Value::String(s) => Ok(s.clone()),
            serde_json::Value::Number(n) => Ok(n.to_string()),
            v => anyhow::bail!("sd1.pipeline.json: {k} is {v}"),
        }
    };
    let latents = dir.join("latents.safetensors");
    if !latents.exists() {
        let outs = candle_core::safetensors::load(
            fixtures().join("sd1.outputs.safetensors"),
            &Device::Cpu,
        )?;
        let l = outs
            .get("pipeline.latents")
            .ok_or_else(|| anyhow::anyhow!("sd1.outputs.safetensors has no pipeline.latents"))?;
        candle_core::safetensors::save(&HashMap::from([("latents", l.clone())]), &latents)?;
    }
    let out = dir.join(format!("{}.png", device.replace(':', "")));
    let model = fixtures().join("sd1-tiny");
    let (prompt, negative) = (field("prompt")?, field("negative_prompt")?);
    let (steps, guidance) = (field("steps")?, field("guidance")?);
    let (scheduler, eta) = (field("scheduler")?, field("eta")?);
    let (height, width) = (field("height")?, field("width")?);
    let mut args = vec![
        "generate",
        "--model",
        path_str(&model)?,
        "--prompt",
        &prompt,
        "--negative-prompt",
        &negative,
        "--steps",
        &steps,
        "--guidance",
        &guidance,
        "--scheduler",
        &scheduler,
        "--eta",
        &eta,
        "--height",
        &height,
        "--width",
        &width,
        "--init-latents",
        path_str(&latents)?,
        "--device",
        device,
        "--force",
        "--out",
        path_str(&out)?,
    ];
    args.extend_from_slice(extra);
    run_lora(&args)?;
    Ok(image::open(&out)?.to_rgb8().into_raw())
}

/// The largest difference between the two images, in levels of 255.
fn max_level_diff(a: &[u8], b: &[u8]) -> Res<u8> {
    anyhow::ensure!(a.len() == b.len(), "image sizes differ");
    Ok(a.iter()
        .zip(b)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0))
}

fn image_parity(name: &str, extra: &[&str]) -> Res<()> {
    let dir = tempfile::tempdir()?;
    let cpu = generate(dir.path(), "cpu", extra)?;
    let other = generate(dir.path(), name, extra)?;
    let d = max_level_diff(&cpu, &other)?;
    eprintln!("image {extra:?}: cpu vs {name}: {d} levels");
    anyhow::ensure!(d <= IMAGE_LEVELS, "images differ by {d} levels of 255");
    Ok(())
}

#[test]
fn pipeline_image_matches_cpu() {
    check("pipeline_image_matches_cpu", |name, _| {
        image_parity(name, &[])
    });
}

#[test]
fn pipeline_image_with_lora_adapter_matches_cpu() {
    check("pipeline_image_with_lora_adapter_matches_cpu", |name, _| {
        let lora = fixtures().join("lora_formats/kohya.safetensors");
        let spec = format!("{}:0.7", path_str(&lora)?);
        image_parity(name, &["--lora", &spec])
    });
}

// ---- LoRA gradients ----

/// One gradient fixture of tests/fixtures/lora_grads: the LoRA factors and the batch.
struct GradCase {
    tensors: HashMap<String, Tensor>,
    model: String,
    rank: usize,
    alpha: f64,
}

fn grad_case(name: &str) -> Res<GradCase> {
    let dir = fixtures().join("lora_grads");
    let tensors =
        candle_core::safetensors::load(dir.join(format!("{name}.safetensors")), &Device::Cpu)?;
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{name}.json")))?)?;
    let model = meta["model"].as_str().unwrap_or_default().to_string();
    let rank = meta["rank"].as_u64().unwrap_or_default() as usize;
    let alpha = meta["alpha"].as_f64().unwrap_or_default();
    anyhow::ensure!(
        !model.is_empty() && rank > 0,
        "{name}.json lacks model / rank"
    );
    Ok(GradCase {
        tensors,
        model,
        rank,
        alpha,
    })
}

/// The fixture's factors of `component` (`unet` / `text_encoder`) as a LoRA set.
fn factors(case: &GradCase, component: &str) -> Res<LoraSet> {
    let prefix = format!("lora.{component}.");
    let mut layers = BTreeMap::new();
    for (key, down) in &case.tensors {
        let Some(path) = key
            .strip_prefix(&prefix)
            .and_then(|p| p.strip_suffix(".lora_down.weight"))
        else {
            continue;
        };
        let up_key = format!("{prefix}{path}.lora_up.weight");
        let up = case
            .tensors
            .get(&up_key)
            .ok_or_else(|| anyhow::anyhow!("fixture lacks {up_key}"))?;
        let w = LoraWeights::new(down.clone(), up.clone(), case.alpha).unwrap();
        layers.insert(format!("{component}.{path}").into(), w);
    }
    Ok(LoraSet {
        layers,
        embeddings: vec![],
        metadata: BTreeMap::new(),
    })
}

fn input(case: &GradCase, key: &str, dtype: DType, dev: &Device) -> Res<Tensor> {
    let t = case
        .tensors
        .get(key)
        .ok_or_else(|| anyhow::anyhow!("fixture lacks {key}"))?;
    Ok(t.to_dtype(dtype)?.to_device(dev)?)
}

/// Every LoRA factor's gradient (on the CPU) for the fixture batch, computed on `dev`.
fn lora_grads(case: &GradCase, targets: (&str, &str), dev: &Device) -> Res<Vec<(String, Tensor)>> {
    let dir = fixtures().join(format!("{}-tiny", case.model));
    let unet_cfg = UNet2DConditionConfig::from_file(dir.join("unet/config.json"))?;
    let unet_w = ModelWeights::from_files(
        "unet",
        &[dir.join("unet/diffusion_pytorch_model.safetensors")],
    )?;
    let unet = UNet2DConditionModel::new(unet_w.var_builder(DType::F32, dev), &unet_cfg)?;
    unet_w.finish()?;
    let clip_cfg = ClipTextConfig::from_file(dir.join("text_encoder/config.json"))?;
    let clip_w = ModelWeights::from_files(
        "text_encoder",
        &[dir.join("text_encoder/model.safetensors")],
    )?;
    let clip = ClipTextModel::new(clip_w.var_builder(DType::F32, dev), &clip_cfg)?;
    clip_w.finish()?;

    let mut rng = Rng::new(0);
    let (ut, tt) = (
        LoraTargets::parse(targets.0)?,
        LoraTargets::parse(targets.1)?,
    );
    let (rank, alpha) = (case.rank, case.alpha);
    let lu = inject_trainable(&unet, Component::Unet, &ut, rank, alpha, 0.0, &mut rng, dev)?;
    let lt = inject_trainable(
        &clip,
        Component::TextEncoder,
        &tt,
        rank,
        alpha,
        0.0,
        &mut rng,
        dev,
    )?;
    lu.load_weights(&factors(case, "unet")?)?;
    lt.load_weights(&factors(case, "text_encoder")?)?;

    let ids = input(case, "input.input_ids", DType::U32, dev)?;
    let timesteps = input(case, "input.timesteps", DType::F32, dev)?;
    let noisy = input(case, "input.noisy", DType::F32, dev)?;
    let noise = input(case, "input.noise", DType::F32, dev)?;
    let ehs = clip.forward(&ids)?;
    let pred = unet.forward(&noisy, &timesteps, &ehs)?;
    let loss = (pred - noise)?.sqr()?.mean_all()?;
    let grads = loss.backward()?;
    let mut out = Vec::new();
    for inj in [&lu, &lt] {
        for (name, var) in inj.named_vars() {
            let g = grads
                .get(var.as_tensor())
                .ok_or_else(|| anyhow::anyhow!("{name}: no gradient"))?;
            out.push((name.clone(), g.to_device(&Device::Cpu)?));
        }
    }
    Ok(out)
}

fn max_abs(t: &Tensor) -> Res<f32> {
    Ok(t.abs()?.max_all()?.to_scalar::<f32>()?)
}

fn grad_parity(case_name: &str, targets: (&str, &str), name: &str, dev: &Device) -> Res<()> {
    let case = grad_case(case_name)?;
    let cpu = lora_grads(&case, targets, &Device::Cpu)?;
    let other = lora_grads(&case, targets, dev)?;
    anyhow::ensure!(
        cpu.len() == other.len(),
        "different numbers of LoRA variables"
    );
    anyhow::ensure!(!cpu.is_empty(), "no LoRA variables");
    let mut worst = (0f32, String::new());
    for ((n, a), (m, b)) in cpu.iter().zip(&other) {
        anyhow::ensure!(n == m, "variable order differs: {n} vs {m}");
        let scale = max_abs(a)?;
        anyhow::ensure!(scale > 0.0, "{n}: the CPU gradient is zero");
        let rel = max_abs(&(a - b)?)? / scale;
        anyhow::ensure!(rel.is_finite(), "{n}: the {name} gradient is not finite");
        if rel >= worst.0 {
            worst = (rel, n.clone());
        }
    }
    eprintln!(
        "{case_name}: {} LoRA gradients, cpu vs {name}: worst relative diff {:e} at {}",
        cpu.len(),
        worst.0,
        worst.1
    );
    anyhow::ensure!(
        worst.0 <= GRAD_REL_TOL,
        "{} gradient off by {:e} (relative)",
        worst.1,
        worst.0
    );
    Ok(())
}

#[test]
fn lora_gradients_match_cpu_sd1_every_layer() {
    check("lora_gradients_match_cpu_sd1_every_layer", |name, dev| {
        grad_parity("sd1_all", ("all", "text-attn,text-mlp"), name, dev)
    });
}

#[test]
fn lora_gradients_match_cpu_sd2_attention() {
    check("lora_gradients_match_cpu_sd2_attention", |name, dev| {
        grad_parity("sd2_attn", ("attn", "text-attn"), name, dev)
    });
}

// ---- training ----

/// The losses of `loss.csv` in `dir`.
fn losses(dir: &Path) -> Res<Vec<f64>> {
    let path = dir.join("loss.csv");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    text.lines()
        .skip(1)
        .map(|l| {
            let v = l.split(',').nth(1).unwrap_or_default();
            v.parse::<f64>()
                .map_err(|e| anyhow::anyhow!("{}: bad line {l:?}: {e}", path.display()))
        })
        .collect()
}

fn train(out: &Path, device: &str) -> Res<Vec<f64>> {
    let model = repo().join("assets/tiny-sd");
    let data = repo().join("tests/fixtures/train-data");
    run_lora(&[
        "train",
        "--model",
        path_str(&model)?,
        "--instance-data-dir",
        path_str(&data)?,
        "--instance-prompt",
        "a photo of sks toy",
        "--resolution",
        "64",
        "--targets",
        "attn,ff,proj,resnet",
        "--train-text-encoder",
        "--learning-rate",
        "1e-3",
        "--batch-size",
        "2",
        "--max-train-steps",
        "5",
        "--seed",
        "1",
        "--device",
        device,
        "--output-dir",
        path_str(out)?,
    ])?;
    losses(out)
}

#[test]
fn training_losses_match_cpu() {
    check("training_losses_match_cpu", |name, _| {
        let dir = tempfile::tempdir()?;
        let cpu = train(&dir.path().join("cpu"), "cpu")?;
        let other = train(&dir.path().join("other"), name)?;
        anyhow::ensure!(cpu.len() == 5 && other.len() == 5, "expected 5 losses each");
        let worst = cpu
            .iter()
            .zip(&other)
            .map(|(a, b)| (a - b).abs())
            .fold(0f64, |m, d| {
                if m.is_nan() || d.is_nan() {
                    f64::NAN
                } else {
                    m.max(d)
                }
            });
        eprintln!("training: cpu losses {cpu:?}, {name} losses {other:?}, worst diff {worst:e}");
        anyhow::ensure!(worst <= LOSS_TOL, "losses differ by {worst:e}");
        Ok(())
    });
}
