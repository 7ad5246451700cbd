//! Helpers shared by the integration tests (`mod common;`): fixture paths and files, the tiny
//! fixture models, tensor comparisons, LoRA-set comparisons, and running the binaries.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use lora_diffusion::formats::Architecture;
use lora_diffusion::hub::ModelSource;
use lora_diffusion::lora::LoraSet;
use lora_diffusion::models::clip::{ClipTextConfig, ClipTextModel};
use lora_diffusion::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use lora_diffusion::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use lora_diffusion::models::weights::ModelWeights;
use lora_diffusion::pipeline::GenerateParams;
use lora_diffusion::rng::Rng;

// ---- paths and fixture files ----

/// The crate root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `tests/fixtures`.
pub fn fixtures() -> PathBuf {
    repo().join("tests/fixtures")
}

/// `tests/fixtures/lora_formats/<name>`.
pub fn lora_fixture(name: &str) -> PathBuf {
    fixtures().join("lora_formats").join(name)
}

/// A path as `&str` (test paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every tensor of a safetensors file; panics naming the file when it cannot be read.
pub fn load_tensors(path: impl AsRef<Path>) -> HashMap<String, Tensor> {
    let path = path.as_ref();
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// A JSON file; panics naming the file when it cannot be read or parsed.
pub fn read_json(path: impl AsRef<Path>) -> serde_json::Value {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// `<model>.outputs.safetensors` (the reference outputs of `<model>-tiny`).
pub fn outputs(model: &str) -> HashMap<String, Tensor> {
    load_tensors(fixtures().join(format!("{model}.outputs.safetensors")))
}

/// Copies the folder `from` to `to`, recursively.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

/// Puts a copy of the model folder `from` into the Hugging Face cache under `hf_home` as repo
/// `id` (`owner/name`) at revision `rev`, with `refs/main` pointing at it; returns the snapshot.
pub fn hf_cache_model(hf_home: &Path, id: &str, rev: &str, from: &Path) -> PathBuf {
    let repo = hf_home
        .join("hub")
        .join(format!("models--{}", id.replace('/', "--")));
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), rev).unwrap();
    let snapshot = repo.join("snapshots").join(rev);
    copy_dir(from, &snapshot);
    snapshot
}

/// Every file under `dir` (relative paths), sorted.
pub fn files(dir: &Path) -> Vec<String> {
    fn walk(d: &Path, prefix: &str, out: &mut Vec<String>) {
        for e in std::fs::read_dir(d).unwrap() {
            let e = e.unwrap();
            let rel = format!("{prefix}{}", e.file_name().to_string_lossy());
            if e.path().is_dir() {
                walk(&e.path(), &format!("{rel}/"), out);
            } else {
                out.push(rel);
            }
        }
    }
    let mut v = vec![];
    walk(dir, "", &mut v);
    v.sort();
    v
}

/// The names directly in `dir`, sorted.
pub fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

// ---- tensors ----

/// max |a − b| computed in `dtype` (shapes must agree).
fn max_abs_diff_in(a: &Tensor, b: &Tensor, dtype: DType) -> Tensor {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(dtype).unwrap();
    let b = b.to_dtype(dtype).unwrap();
    (a - b).unwrap().abs().unwrap().max_all().unwrap()
}

/// max |a − b| in f32 (shapes must agree).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs_diff_in(a, b, DType::F32).to_scalar().unwrap()
}

/// max |a − b| in f64 (shapes must agree).
pub fn max_abs_diff_f64(a: &Tensor, b: &Tensor) -> f64 {
    max_abs_diff_in(a, b, DType::F64).to_scalar().unwrap()
}

/// max |a| in f32.
pub fn max_abs(a: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap();
    a.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}

/// max |a| in f64.
pub fn max_abs_f64(a: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    a.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}

/// The values of `t`, flattened, as f64.
pub fn to_f64s(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Mean squared error, differentiable.
pub fn mse(a: &Tensor, b: &Tensor) -> Tensor {
    (a - b).unwrap().sqr().unwrap().mean_all().unwrap()
}

/// Normal values with standard deviation `std` from our seedable RNG, on the CPU.
pub fn randn(rng: &mut Rng, shape: &[usize], std: f64) -> Tensor {
    (rng.randn(shape, &Device::Cpu).unwrap() * std).unwrap()
}

// ---- the tiny fixture models ----

/// The tensors of `<model>-tiny/unet` (e.g. to rebuild a UNet with changed weights).
pub fn unet_tensors(model: &str) -> HashMap<String, Tensor> {
    load_tensors(fixtures().join(format!(
        "{model}-tiny/unet/diffusion_pytorch_model.safetensors"
    )))
}

/// The config of `<model>-tiny/unet`.
pub fn unet_config(model: &str) -> UNet2DConditionConfig {
    let path = fixtures().join(format!("{model}-tiny/unet/config.json"));
    UNet2DConditionConfig::from_file(path).unwrap()
}

/// Builds the tiny UNet of `model` from `tensors` in `dtype`, checking the key set.
pub fn unet_from(
    model: &str,
    tensors: HashMap<String, Tensor>,
    dtype: DType,
) -> UNet2DConditionModel {
    let weights = ModelWeights::from_tensors("unet", tensors);
    let unet = UNet2DConditionModel::new(
        weights.var_builder(dtype, &Device::Cpu),
        &unet_config(model),
    )
    .unwrap();
    weights.finish().unwrap();
    unet
}

/// The tiny UNet of `model` (`sd1` / `sd2`).
pub fn load_unet(model: &str, dtype: DType) -> UNet2DConditionModel {
    unet_from(model, unet_tensors(model), dtype)
}

/// The tiny text encoder of `model` in `dtype`, loaded from its file, checking the key set.
pub fn load_clip(model: &str, dtype: DType) -> ClipTextModel {
    let dir = fixtures().join(format!("{model}-tiny/text_encoder"));
    let cfg = ClipTextConfig::from_file(dir.join("config.json")).unwrap();
    let weights =
        ModelWeights::from_files("text_encoder", &[dir.join("model.safetensors")]).unwrap();
    let clip = ClipTextModel::new(weights.var_builder(dtype, &Device::Cpu), &cfg).unwrap();
    weights.finish().unwrap();
    clip
}

/// The tiny VAE of `model` in `dtype`, loaded from its file, checking the key set.
pub fn load_vae(model: &str, dtype: DType) -> AutoencoderKL {
    let dir = fixtures().join(format!("{model}-tiny/vae"));
    let cfg = AutoencoderKLConfig::from_file(dir.join("config.json")).unwrap();
    let file = dir.join("diffusion_pytorch_model.safetensors");
    let weights = ModelWeights::from_files("vae", &[file]).unwrap();
    let vae = AutoencoderKL::new(weights.var_builder(dtype, &Device::Cpu), &cfg).unwrap();
    weights.finish().unwrap();
    vae
}

/// The LoRA architecture of the fixture model folder `name` (e.g. `sd1-tiny`).
pub fn tiny_arch(name: &str) -> Architecture {
    Architecture::from_model(&ModelSource::Local(fixtures().join(name))).unwrap()
}

// ---- the pipeline ----

/// The settings of `<name>.pipeline.json`, starting from the latents of `<name>.outputs`.
pub fn fixture_params(name: &str) -> GenerateParams {
    let json = read_json(fixtures().join(format!("{name}.pipeline.json")));
    let out = outputs(name);
    GenerateParams {
        prompt: json["prompt"].as_str().unwrap().into(),
        negative_prompt: json["negative_prompt"].as_str().unwrap().into(),
        steps: json["steps"].as_u64().unwrap() as usize,
        guidance: json["guidance"].as_f64().unwrap(),
        scheduler: json["scheduler"].as_str().unwrap().parse().unwrap(),
        height: Some(json["height"].as_u64().unwrap() as usize),
        width: Some(json["width"].as_u64().unwrap() as usize),
        init_latents: Some(out["pipeline.latents"].clone()),
        eta: json["eta"].as_f64().unwrap(),
        ..Default::default()
    }
}

/// The largest difference, in levels of 255, between the 8-bit image of `img` and `want_u8`.
pub fn png_levels(img: &Tensor, want_u8: &Tensor) -> f32 {
    let ours = lora_diffusion::pipeline::image_io::to_rgb8(img).unwrap();
    let theirs = to_f64s(want_u8);
    assert_eq!(ours[0].as_raw().len(), theirs.len(), "image sizes differ");
    ours[0]
        .as_raw()
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (*a as f64 - b).abs() as f32)
        .fold(0., f32::max)
}

// ---- LoRA sets ----

/// Same layers, and per layer the same alpha, dtype and bit-identical factors.
pub fn identical(a: &LoraSet, b: &LoraSet) {
    assert_eq!(
        a.layers.keys().collect::<Vec<_>>(),
        b.layers.keys().collect::<Vec<_>>()
    );
    for (k, w) in &a.layers {
        let v = &b.layers[k];
        assert_eq!(w.alpha(), v.alpha(), "{k}: alpha");
        assert_eq!(w.down().dtype(), v.down().dtype(), "{k}: dtype");
        assert_eq!(max_abs_diff(w.down(), v.down()), 0.0, "{k}: down");
        assert_eq!(max_abs_diff(w.up(), v.up()), 0.0, "{k}: up");
    }
}

// ---- errors and the binaries ----

/// The `{:#}` text of an error that `r` must be; printed, and never a panic message.
pub fn err_text<T: std::fmt::Debug, E: std::fmt::Display>(r: Result<T, E>) -> String {
    let e = match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => format!("{e:#}"),
    };
    eprintln!("error: {e}");
    assert!(!e.contains("panicked"), "panic: {e}");
    e
}

/// Runs the program `exe` with `args`, printing its stdout and stderr.
pub fn run_bin(exe: &str, args: &[&str]) -> Output {
    let o = Command::new(exe).args(args).output().unwrap();
    eprintln!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// Runs `lora` with `args`.
pub fn lora(args: &[&str]) -> Output {
    run_bin(env!("CARGO_BIN_EXE_lora"), args)
}

/// Runs `lora_add` with `args`.
pub fn lora_add(args: &[&str]) -> Output {
    run_bin(env!("CARGO_BIN_EXE_lora_add"), args)
}

/// `lora_add --path_1 P1 --path_2 P2 --mode MODE --output_path OUT` plus `extra`.
pub fn run_lora_add(p1: &Path, p2: &Path, mode: &str, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["--path_1", s(p1), "--path_2", s(p2), "--mode", mode];
    args.extend_from_slice(&["--output_path", s(out)]);
    args.extend_from_slice(extra);
    lora_add(&args)
}

/// Asserts that a run succeeded (showing its stderr otherwise).
pub fn expect_success(o: &Output) {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Asserts exit code 1, no panic, and every needle in stderr; returns stderr.
pub fn expect_failure(o: &Output, needles: &[&str]) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "expected exit 1: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    for n in needles {
        assert!(err.contains(n), "error lacks {n:?}: {err}");
    }
    err
}

// ---- structure (key-set) checks ----

/// Asserts that a model requested exactly the `(key, shape)` pairs of a structure fixture,
/// printing the count and both differences under `label` (e.g. `sd15 vae`).
pub fn assert_requested_keys(
    label: &str,
    want: &BTreeMap<String, Vec<usize>>,
    got: &BTreeMap<String, Vec<usize>>,
) {
    let missing: Vec<_> = want
        .iter()
        .filter(|(k, s)| got.get(*k) != Some(s))
        .collect();
    let extra: Vec<_> = got
        .iter()
        .filter(|(k, s)| want.get(*k) != Some(s))
        .collect();
    eprintln!(
        "{label}: {} keys expected, {} requested; not requested as expected: {missing:?}; \
         requested but not expected: {extra:?}",
        want.len(),
        got.len()
    );
    assert!(missing.is_empty() && extra.is_empty());
}
