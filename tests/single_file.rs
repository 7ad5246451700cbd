//! Single-file checkpoints in the original (LDM) layout: our writer against diffusers' own
//! conversion (every key, shape, dtype and value), our reader against diffusers'
//! `from_single_file` image, `.ckpt` and EMA files, shape-based config inference, clear errors.

mod common;
mod pickle_bytes;

use candle_core::{DType, Device, Tensor};
use common::{
    expect_failure, expect_success, fixture_params, fixtures, lora_fixture, max_abs_diff,
    max_abs_diff_f64, png_levels, run_lora_add, s,
};
use lora_diffusion::hub::ModelSource;
use lora_diffusion::lora::single_file::write_single_file;
use lora_diffusion::models::ldm::{self, keys::TextLayout, Configs, Family, Layout, Shapes};
use lora_diffusion::pipeline::StableDiffusion;
use lora_diffusion::tensor_file::TensorFile;
use std::path::{Path, PathBuf};

fn folder(name: &str) -> PathBuf {
    fixtures().join(format!("{name}-tiny"))
}

/// Our single file of the tiny model `name`, written into `dir`.
fn write_ours(name: &str, dir: &Path) -> PathBuf {
    let out = dir.join(format!("{name}.safetensors"));
    let src = ModelSource::Local(folder(name));
    write_single_file(&src, None, 1.0, &out, false, false).unwrap();
    out
}

fn sums(v: &[f64]) -> (f64, f64) {
    let s = v.iter().sum();
    let w = v
        .iter()
        .enumerate()
        .map(|(i, x)| x * ((i % 7) + 1) as f64)
        .sum();
    (s, w)
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * (1.0 + a.abs().max(b.abs()))
}

/// Every key of our file equals the file diffusers' conversion script makes (fixture listing).
fn check_written(name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = write_ours(name, dir.path());
    // For scripts/fixture_single_file.py --ours: keep the written file.
    if let Ok(keep) = std::env::var("LORA_SINGLE_FILE_OUT") {
        std::fs::copy(&file, Path::new(&keep).join(format!("{name}.safetensors"))).unwrap();
    }
    let ours = TensorFile::open(&file).unwrap();
    let want = common::read_json(fixtures().join(format!("single_file/{name}.keys.json")));
    let want = want.as_object().unwrap();
    let our_keys: Vec<&String> = ours.entries.keys().collect();
    let want_keys: Vec<&String> = want.keys().collect();
    assert_eq!(
        our_keys, want_keys,
        "{name}: key set differs from diffusers' conversion"
    );
    for (k, meta) in want {
        let e = &ours.entries[k];
        let shape: Vec<usize> = serde_json::from_value(meta["shape"].clone()).unwrap();
        assert_eq!(e.shape, shape, "{name}: {k} shape");
        assert_eq!(
            format!("{:?}", e.dtype).to_lowercase(),
            meta["dtype"].as_str().unwrap().replace("float", "f"),
            "{name}: {k} dtype"
        );
        let (sum, weighted) = sums(&ours.to_f64(k).unwrap());
        assert!(
            close(sum, meta["sum"].as_f64().unwrap()),
            "{name}: {k} sum {sum} vs {}",
            meta["sum"]
        );
        assert!(
            close(weighted, meta["weighted"].as_f64().unwrap()),
            "{name}: {k} values differ"
        );
    }
    eprintln!("{name}: {} keys equal to diffusers' conversion", want.len());
}

#[test]
fn sd1_single_file_equals_diffusers_conversion() {
    check_written("sd1");
}

#[test]
fn sd2_single_file_equals_diffusers_conversion() {
    check_written("sd2");
}

/// Loads `file` with the tiny folder's configs and returns the fixture run's image.
fn image_of(source: &ModelSource, name: &str) -> Tensor {
    let sd = StableDiffusion::load(source, DType::F32, &Device::Cpu).unwrap();
    sd.generate(&fixture_params(name), &mut |_, _| {}).unwrap()
}

fn check_image(name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = write_ours(name, dir.path());
    let src = ModelSource::single_file(&file, Some(folder(name)), None);
    let img = image_of(&src, name);
    let want =
        common::load_tensors(fixtures().join(format!("single_file/{name}.image.safetensors")));
    let d = max_abs_diff(&img, &want["pipeline.image"]);
    let levels = png_levels(&img, &want["pipeline.image_u8"]);
    eprintln!("{name}: single-file image vs diffusers from_single_file: max abs {d:.2e}, {levels} PNG levels");
    assert!(d < 1e-4, "{name}: image differs by {d}");
    assert!(levels <= 1.0, "{name}: PNG differs by {levels} levels");
}

#[test]
fn sd1_single_file_gives_diffusers_image() {
    check_image("sd1");
}

#[test]
fn sd2_single_file_gives_diffusers_image() {
    check_image("sd2");
}

/// A `torch.save`d `{"state_dict": {...}, "global_step": 1}` of every f32 tensor of `file`.
fn write_ckpt(file: &Path, out: &Path, extra: &[(String, Tensor)], step: i32) {
    use pickle_bytes::{strides, torch_zip, P};
    let st = TensorFile::open(file).unwrap();
    let mut tensors: Vec<(String, Tensor)> =
        st.load_all(&Device::Cpu).unwrap().into_iter().collect();
    tensors.extend(extra.iter().cloned());
    let mut p = P::new().op(b'}').s("state_dict").op(b'}').op(b'(');
    let mut storages = vec![];
    for (i, (k, t)) in tensors.iter().enumerate() {
        let key = i.to_string();
        let v: Vec<f32> = t
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let shape = t.dims().to_vec();
        let n = v.len();
        let kk = key.clone();
        p = p.s(k).tensor(
            move |p| p.storage("FloatStorage", &kk, n),
            0,
            &shape,
            &strides(&shape),
        );
        storages.push((key, pickle_bytes::f32_bytes(&v)));
    }
    let pkl = p
        .op(b'u')
        .op(b's')
        .s("global_step")
        .int(step)
        .op(b's')
        .stop();
    let refs: Vec<(&str, Vec<u8>)> = storages
        .iter()
        .map(|(k, b)| (k.as_str(), b.clone()))
        .collect();
    torch_zip(out, &pkl, &refs);
}

#[test]
fn ckpt_and_ema_files_load_like_the_safetensors_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_ours("sd1", dir.path());
    let ckpt = dir.path().join("sd1.ckpt");
    // EMA copies (diffusers reads the non-EMA weights by default): 200 decoys of other values.
    let ema: Vec<(String, Tensor)> = TensorFile::open(&file)
        .unwrap()
        .entries
        .keys()
        .filter(|k| k.starts_with("model.diffusion_model."))
        .take(200)
        .map(|k| {
            let flat = format!("model_ema.{}", k["model.".len()..].replace('.', ""));
            (flat, Tensor::full(7f32, 3, &Device::Cpu).unwrap())
        })
        .collect();
    assert_eq!(ema.len(), 200);
    write_ckpt(&file, &ckpt, &ema, 1);
    let a = ModelSource::single_file(&file, Some(folder("sd1")), None);
    let b = ModelSource::single_file(&ckpt, Some(folder("sd1")), None);
    for comp in ["unet", "vae", "text_encoder"] {
        let wa = a.weights(comp).unwrap().load_all().unwrap();
        let wb = b.weights(comp).unwrap().load_all().unwrap();
        assert_eq!(wa.len(), wb.len(), "{comp}: tensor count");
        for (k, t) in &wa {
            assert_eq!(
                max_abs_diff(t, &wb[k]),
                0.0,
                "{comp}.{k} differs between .ckpt and .safetensors"
            );
        }
    }
    let img = image_of(&b, "sd1");
    let want = common::load_tensors(fixtures().join("single_file/sd1.image.safetensors"));
    assert!(
        max_abs_diff(&img, &want["pipeline.image"]) < 1e-4,
        ".ckpt image differs"
    );
}

#[test]
fn sd2_prediction_type_follows_diffusers_rule_unless_given() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_ours("sd2", dir.path());
    let base = dir.path().join("base.ckpt");
    write_ckpt(&file, &base, &[], 875_000);
    let other = dir.path().join("other.ckpt");
    write_ckpt(&file, &other, &[], 1);
    let pt = |f: &Path, given: Option<&str>| {
        let src = ModelSource::single_file(f, Some(folder("sd2")), given.map(String::from));
        let ModelSource::SingleFile(s) = src else {
            unreachable!()
        };
        let info = s.info().unwrap();
        (
            info.family,
            info.prediction_type.clone(),
            info.notes.join(" "),
        )
    };
    let (family, p, note) = pt(&file, None);
    assert_eq!((family, p.as_str()), (Family::Sd2, "v_prediction"));
    assert!(note.contains("--prediction-type epsilon"), "{note}");
    assert_eq!(pt(&other, None).1, "v_prediction");
    assert_eq!(pt(&base, None).1, "epsilon");
    assert_eq!(pt(&file, Some("epsilon")).1, "epsilon");
    let sd1 = write_ours("sd1", dir.path());
    assert_eq!(pt(&sd1, None).1, "epsilon");
}

/// The single-file shapes of a model of `configs` (as our key map names them).
fn shapes_of(configs: &Configs, layout: &Layout) -> Shapes {
    let mut shapes = Shapes::new();
    for comp in ["unet", "vae", "text_encoder"] {
        for m in ldm::component_map(comp, configs, layout).unwrap() {
            shapes.insert(m.ldm.clone(), ldm::keys::stored_shape(&m.shape, m.part));
        }
    }
    shapes
}

fn real_vae() -> lora_diffusion::models::vae::AutoencoderKLConfig {
    let text = r#"{"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D","DownEncoderBlock2D","DownEncoderBlock2D","DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D","UpDecoderBlock2D","UpDecoderBlock2D","UpDecoderBlock2D"],
        "norm_num_groups": 32, "sample_size": 512}"#;
    lora_diffusion::models::vae::AutoencoderKLConfig::from_json_str(text, "test").unwrap()
}

#[test]
fn configs_are_inferred_from_real_sd1_and_sd2_shapes() {
    use lora_diffusion::models::clip::ClipTextConfig;
    use lora_diffusion::models::unet::UNet2DConditionConfig;
    let sd15: UNet2DConditionConfig =
        serde_json::from_str(lora_diffusion::models::presets::SD15_UNET_CONFIG).unwrap();
    let sd21: UNet2DConditionConfig = serde_json::from_str(
        r#"{"attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
            "cross_attention_dim": 1024, "use_linear_projection": true, "upcast_attention": true,
            "sample_size": 96}"#,
    )
    .unwrap();
    let clip = |hidden: usize, layers: usize, ffn: usize, act: &str| -> ClipTextConfig {
        let text = format!(
            r#"{{"hidden_size": {hidden}, "num_hidden_layers": {layers}, "num_attention_heads": {},
                "intermediate_size": {ffn}, "hidden_act": "{act}", "projection_dim": {hidden}}}"#,
            hidden / 64
        );
        ClipTextConfig::from_json_str(&text, "test").unwrap()
    };
    for (family, unet, text, tl) in [
        (
            Family::Sd1,
            sd15,
            clip(768, 12, 3072, "quick_gelu"),
            TextLayout::Clip,
        ),
        (
            Family::Sd2,
            sd21,
            clip(1024, 23, 4096, "gelu"),
            TextLayout::OpenClip,
        ),
    ] {
        let configs = Configs {
            unet,
            vae: real_vae(),
            text,
        };
        let layout = Layout::new(&configs.unet, &configs.vae, tl).unwrap();
        let mut shapes = shapes_of(&configs, &layout);
        if family == Family::Sd2 {
            // Real SD 2 files hold 24 OpenCLIP blocks; diffusers uses 23.
            shapes.insert(
                "cond_stage_model.model.transformer.resblocks.23.ln_1.weight".into(),
                vec![1024],
            );
        }
        assert_eq!(ldm::detect(&shapes, "f").unwrap(), family);
        let u = ldm::infer_unet_config(&shapes, family, "f").unwrap();
        assert_eq!(
            u.resolve().unwrap(),
            configs.unet.resolve().unwrap(),
            "{family:?} UNet"
        );
        assert_eq!(u.cross_attention_dim, configs.unet.cross_attention_dim);
        assert_eq!(u.use_linear_projection, configs.unet.use_linear_projection);
        assert_eq!(u.upcast_attention, configs.unet.upcast_attention);
        let v = ldm::infer_vae_config(&shapes, family, "f").unwrap();
        assert_eq!(v.block_out_channels, configs.vae.block_out_channels);
        assert_eq!(v.layers_per_block, configs.vae.layers_per_block);
        let t = ldm::infer_text_config(&shapes, tl, "f").unwrap();
        assert_eq!(
            (
                t.hidden_size,
                t.num_hidden_layers,
                t.num_attention_heads,
                t.intermediate_size
            ),
            (
                configs.text.hidden_size,
                configs.text.num_hidden_layers,
                configs.text.num_attention_heads,
                configs.text.intermediate_size
            ),
            "{family:?} text encoder"
        );
        assert_eq!(
            format!("{:?}", t.hidden_act),
            format!("{:?}", configs.text.hidden_act)
        );
    }
}

#[test]
fn upl_ckpt_v2_fuses_like_diffusers_fuse_lora() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fused.safetensors");
    let o = run_lora_add(
        &folder("sd1"),
        &lora_fixture("kohya.safetensors"),
        "upl-ckpt-v2",
        &out,
        &["--alpha", "0.8"],
    );
    expect_success(&o);
    let expected = common::read_json(fixtures().join("lora_add/expected.json"));
    let fused = common::load_tensors(fixtures().join("lora_add/fused.safetensors"));
    let src = ModelSource::single_file(&out, Some(folder("sd1")), None);
    let mut worst: f64 = 0.0;
    for comp in ["unet", "text_encoder"] {
        let w = src.weights(comp).unwrap();
        let changed = expected["components"][comp]["changed"].as_array().unwrap();
        assert!(!changed.is_empty());
        for k in changed {
            let k = k.as_str().unwrap();
            let got = w.load_one(k).unwrap().to_dtype(DType::F64).unwrap();
            worst = worst.max(max_abs_diff_f64(&got, &fused[&format!("{comp}.{k}")]));
        }
    }
    eprintln!("upl-ckpt-v2 vs diffusers fuse_lora(0.8): max abs {worst:.2e}");
    assert!(worst <= 1e-5, "fused weights differ by {worst}");
    // Same through `lora add --mode upl --output-format single-file`; no overwrite without --force.
    let o = run_lora_add(
        &folder("sd1"),
        &lora_fixture("kohya.safetensors"),
        "upl",
        &out,
        &["--alpha", "0.8", "--output-format", "single-file"],
    );
    expect_failure(&o, &["already exists", "--force"]);
    let o = run_lora_add(
        &folder("sd1"),
        &lora_fixture("kohya.safetensors"),
        "upl",
        &out,
        &[
            "--alpha",
            "0.8",
            "--output-format",
            "single-file",
            "--force",
        ],
    );
    expect_success(&o);
    let bytes = std::fs::read(&out).unwrap();
    let root = s(&fixtures()).to_string();
    assert!(
        !String::from_utf8_lossy(&bytes).contains(&root),
        "written file holds a local path"
    );
}

#[test]
fn bad_single_files_name_the_keys_they_lack() {
    let dir = tempfile::tempdir().unwrap();
    // A LoRA file is not a model: the error names the keys a single file has.
    let src = ModelSource::parse(s(&lora_fixture("kohya.safetensors"))).unwrap();
    let err = format!(
        "{:#}",
        StableDiffusion::load(&src, DType::F32, &Device::Cpu)
            .err()
            .unwrap()
    );
    assert!(
        err.contains("not a Stable Diffusion single-file checkpoint"),
        "{err}"
    );
    assert!(
        err.contains(ldm::UNET_PROBE) && err.contains(ldm::OPEN_CLIP_PROBE),
        "{err}"
    );
    // One UNet key dropped: named with its single-file key and shape.
    let file = write_ours("sd1", dir.path());
    let mut t = TensorFile::open(&file)
        .unwrap()
        .load_all(&Device::Cpu)
        .unwrap();
    let gone = "model.diffusion_model.output_blocks.4.1.proj_out.weight";
    assert!(t.remove(gone).is_some());
    let cut = dir.path().join("cut.safetensors");
    lora_diffusion::tensor_file::write(
        &cut,
        lora_diffusion::tensor_file::out_tensors(t.iter()).unwrap(),
        &Default::default(),
        false,
    )
    .unwrap();
    let src = ModelSource::single_file(&cut, Some(folder("sd1")), None);
    let err = format!(
        "{:#}",
        StableDiffusion::load(&src, DType::F32, &Device::Cpu)
            .err()
            .unwrap()
    );
    assert!(err.contains(&format!("missing {gone}")), "{err}");
    // SDXL is refused by name.
    t.insert(
        "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias".into(),
        Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
    );
    let xl = dir.path().join("xl.safetensors");
    lora_diffusion::tensor_file::write(
        &xl,
        lora_diffusion::tensor_file::out_tensors(t.iter()).unwrap(),
        &Default::default(),
        false,
    )
    .unwrap();
    let err = format!(
        "{:#}",
        ModelSource::single_file(&xl, None, None)
            .weights("unet")
            .err()
            .unwrap()
    );
    assert!(err.contains("SDXL"), "{err}");
    // The CLI: exit 1, no panic, the file named.
    let o = common::lora(&[
        "generate",
        "--model",
        s(&cut),
        "--model-config",
        s(&folder("sd1")),
        "--prompt",
        "x",
        "--steps",
        "1",
        "--out",
        s(&dir.path().join("x.png")),
    ]);
    expect_failure(&o, &[gone, "cut.safetensors"]);
}

#[test]
fn kohya_loras_with_single_file_unet_names_read_like_diffusers_names() {
    use lora_diffusion::formats::{self, Architecture};
    let arch = Architecture::from_model(&ModelSource::Local(folder("sd1"))).unwrap();
    let plain = formats::read_with(&lora_fixture("kohya.safetensors"), Some(&arch)).unwrap();
    let ldm_named = fixtures().join("single_file/kohya_ldm.safetensors");
    let ldm = formats::read_with(&ldm_named, Some(&arch)).unwrap();
    let names: Vec<String> = TensorFile::open(&ldm_named)
        .unwrap()
        .entries
        .into_keys()
        .collect();
    assert!(names
        .iter()
        .any(|k| k.starts_with("lora_unet_input_blocks_")));
    assert!(names
        .iter()
        .any(|k| k.starts_with("lora_unet_output_blocks_")));
    assert!(names
        .iter()
        .any(|k| k.starts_with("lora_unet_middle_block_1_")));
    let a: Vec<_> = plain.layers.keys().collect();
    let b: Vec<_> = ldm.layers.keys().collect();
    assert_eq!(a, b, "layers differ");
    for (k, l) in &plain.layers {
        let m = &ldm.layers[k];
        assert_eq!(max_abs_diff(l.down(), m.down()), 0.0, "{k} down");
        assert_eq!(max_abs_diff(l.up(), m.up()), 0.0, "{k} up");
        assert_eq!(l.alpha(), m.alpha(), "{k} alpha");
    }
    // The architecture of a single file places them too.
    let dir = tempfile::tempdir().unwrap();
    let file = write_ours("sd1", dir.path());
    let arch =
        Architecture::from_model(&ModelSource::single_file(&file, Some(folder("sd1")), None))
            .unwrap();
    assert_eq!(
        formats::read_with(&ldm_named, Some(&arch))
            .unwrap()
            .layers
            .len(),
        plain.layers.len()
    );
}
