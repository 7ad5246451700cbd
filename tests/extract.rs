//! `lora extract`: from a model and the same model with a known low-rank change fused in, the
//! extracted LoRA recovers the change, reports the energy it keeps, and fuses back exactly.

mod common;

use common::{expect_failure, expect_success, fixtures, lora, lora_fixture, s};
use lora_diffusion::formats;
use lora_diffusion::hub::ModelSource;
use lora_diffusion::lora::combine::delta_mat;
use lora_diffusion::lora::svd::{svd, Mat};
use lora_diffusion::lora::upl::fuse_into_model;
use lora_diffusion::tensor_file::TensorFile;
use std::path::{Path, PathBuf};
use std::process::Output;

const SCALE: f64 = 0.8;

/// `lora extract --base BASE --tuned TUNED --rank RANK --out OUT` plus `extra`.
fn extract(base: &Path, tuned: &Path, rank: &str, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["extract", "--base", s(base), "--tuned", s(tuned)];
    args.extend_from_slice(&["--rank", rank, "--out", s(out)]);
    args.extend_from_slice(extra);
    lora(&args)
}

/// sd1-tiny with the fixture LoRA fused in at 0.8 (the "fine-tuned" model).
fn tuned(dir: &Path) -> PathBuf {
    let out = dir.join("tuned");
    let set = formats::read(&lora_fixture("diffusers.safetensors")).unwrap();
    fuse_into_model(
        &ModelSource::Local(fixtures().join("sd1-tiny")),
        &set,
        SCALE,
        &out,
        false,
        false,
        &|| {},
    )
    .unwrap();
    out
}

/// W_tuned − W_base of one layer as a matrix.
fn difference(base: &Path, tuned: &Path, layer: &str) -> Mat {
    let (comp, module) = layer.split_once('.').unwrap();
    let rel = if comp == "unet" {
        "unet/diffusion_pytorch_model.safetensors"
    } else {
        "text_encoder/model.safetensors"
    };
    let key = format!("{module}.weight");
    let (b, t) = (
        TensorFile::open(&base.join(rel)).unwrap(),
        TensorFile::open(&tuned.join(rel)).unwrap(),
    );
    let shape = &b.entries[&key].shape;
    let (rows, cols) = (shape[0], shape[1..].iter().product());
    let bm = Mat::from_vec(rows, cols, b.to_f64(&key).unwrap()).unwrap();
    Mat::from_vec(rows, cols, t.to_f64(&key).unwrap())
        .unwrap()
        .add_scaled(&bm, -1.0)
        .unwrap()
}

#[test]
fn extract_recovers_a_fused_low_rank_change() {
    let dir = tempfile::tempdir().unwrap();
    let base = fixtures().join("sd1-tiny");
    let tuned = tuned(dir.path());
    let truth = formats::read(&lora_fixture("diffusers.safetensors")).unwrap();

    // Rank 4 (the true rank): ΔW recovered up to the f32 rounding of the fused weights.
    let out = dir.path().join("x4.safetensors");
    let o = extract(
        &base,
        &tuned,
        "4",
        &out,
        &["--targets", "attn,text-attn,ff"],
    );
    expect_success(&o);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("22 targeted layers are identical"),
        "the untouched ff layers are reported: {stdout}"
    );
    assert!(stdout.contains("overall 100.0000%"), "{stdout}");
    let per_layer =
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v rank 4: energy kept 100.0000%";
    assert!(
        stdout.contains(per_layer),
        "no per-layer line {per_layer:?}"
    );
    let x = formats::read(&out).unwrap();
    assert_eq!(x.layers.len(), truth.layers.len());
    let mut worst: f64 = 0.0;
    for (name, l) in &truth.layers {
        let want = delta_mat(l).unwrap().scaled(SCALE);
        let got = delta_mat(&x.layers[name]).unwrap();
        assert_eq!(x.layers[name].rank(), 4);
        worst = worst
            .max(got.add_scaled(&want, -1.0).unwrap().frob_sq().sqrt() / want.frob_sq().sqrt());
    }
    eprintln!(
        "rank 4: {} layers, worst relative ‖ΔW_extracted − 0.8·ΔW_lora‖ = {worst:.2e}",
        x.layers.len()
    );
    assert!(worst < 1e-4);

    // Fusing the extracted LoRA back into the base gives the tuned weights.
    let refused = dir.path().join("refused");
    fuse_into_model(
        &ModelSource::Local(base.clone()),
        &x,
        1.0,
        &refused,
        false,
        false,
        &|| {},
    )
    .unwrap();
    let mut worst_w: f64 = 0.0;
    for rel in [
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ] {
        let (a, b) = (
            TensorFile::open(&refused.join(rel)).unwrap(),
            TensorFile::open(&tuned.join(rel)).unwrap(),
        );
        for k in a.entries.keys() {
            let (va, vb) = (a.to_f64(k).unwrap(), b.to_f64(k).unwrap());
            worst_w = va
                .iter()
                .zip(&vb)
                .map(|(x, y)| (x - y).abs())
                .fold(worst_w, f64::max);
        }
    }
    eprintln!("base + extracted LoRA vs tuned model: max |ΔW| = {worst_w:.2e}");
    assert!(worst_w < 1e-6);

    // Rank 2 (randomized SVD path): energy kept per layer equals the direct SVD's top-2 share.
    let out2 = dir.path().join("x2.safetensors");
    let o = extract(
        &base,
        &tuned,
        "2",
        &out2,
        &["--dtype", "f16", "--format", "kohya"],
    );
    expect_success(&o);
    let x2 = formats::read(&out2).unwrap();
    let (mut kept, mut total, mut err) = (0.0, 0.0, 0.0);
    for (name, l) in &x2.layers {
        let d = difference(&base, &tuned, name.as_str());
        let sv = svd(&d).s;
        kept += sv[..2].iter().map(|v| v * v).sum::<f64>();
        total += d.frob_sq();
        err += delta_mat(l)
            .unwrap()
            .add_scaled(&d, -1.0)
            .unwrap()
            .frob_sq();
    }
    let printed = format!("overall {:.4}%", 100.0 * kept / total);
    eprintln!(
        "rank 2: energy kept {printed}, ‖residual‖² {err:.4e} vs Eckart–Young {:.4e}",
        total - kept
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&printed),
        "expected {printed}"
    );
    assert!(
        (err - (total - kept)).abs() < 1e-3 * total,
        "f16 factors aside, the residual is optimal"
    );
}

#[test]
fn extract_bad_input_gives_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (sd1, sd2) = (fixtures().join("sd1-tiny"), fixtures().join("sd2-tiny"));
    let out = dir.path().join("x.safetensors");
    expect_failure(
        &extract(&sd1, &sd2, "2", &out, &[]),
        &["same architecture", "shape"],
    );
    expect_failure(
        &extract(&sd1, &sd1, "2", &out, &[]),
        &["no targeted layer differs"],
    );
    assert!(!out.exists());
    std::fs::write(&out, "mine").unwrap();
    expect_failure(&extract(&sd1, &sd1, "2", &out, &[]), &["already exists"]);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "mine");
}
