//! The weight loader: safetensors and PyTorch pickles give the same tensors, and every key
//! problem is reported together by name and shape.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixtures, max_abs_diff};
use lora_diffusion::models::weights::ModelWeights;
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    fixtures().join("weights").join(name)
}

/// Requests the tiny model's tensors the way a model constructor would.
fn build(w: &ModelWeights, dtype: DType, bias_len: usize) -> candle_core::Result<Vec<Tensor>> {
    let vb = w.var_builder(dtype, &Device::Cpu);
    Ok(vec![
        vb.pp("layer").get((3, 2), "weight")?,
        vb.pp("layer").get(bias_len, "bias")?,
        vb.pp("norm").get(3, "weight")?,
    ])
}

#[test]
fn pickle_and_safetensors_load_the_same_tensors() {
    let st = ModelWeights::from_files("tiny", &[fixture("tiny.safetensors")]).unwrap();
    let pt = ModelWeights::from_files("tiny", &[fixture("tiny.bin")]).unwrap();
    let a = build(&st, DType::F32, 3).unwrap();
    let b = build(&pt, DType::F32, 3).unwrap();
    st.finish().unwrap();
    pt.finish().unwrap();
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(max_abs_diff(x, y), 0.0);
        assert_eq!(x.dtype(), DType::F32);
    }
    // The stored f16 norm weight is converted on load; values are not all zero.
    let s = a[2]
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(s > 0.1, "norm weight sum {s}");
    // And to bf16 on request.
    let c = build(&st, DType::BF16, 3).unwrap();
    assert_eq!(c[0].dtype(), DType::BF16);
}

#[test]
fn missing_unexpected_and_mismatched_keys_are_reported_together() {
    let w = ModelWeights::from_files("tiny", &[fixture("tiny.safetensors")]).unwrap();
    let vb = w.var_builder(DType::F32, &Device::Cpu);
    vb.pp("layer").get((3, 2), "weight").unwrap();
    vb.pp("layer").get(4, "bias").unwrap(); // wrong shape: file has [3]
    vb.pp("extra").get((5, 5), "weight").unwrap(); // missing
                                                   // norm.weight never requested: unexpected
    let err = w.finish().unwrap_err().to_string();
    eprintln!("{err}");
    assert!(err.contains("tiny.safetensors"), "{err}");
    assert!(
        err.contains("layer.bias: model expects [4], file has [3]"),
        "{err}"
    );
    assert!(err.contains("extra.weight [5, 5]"), "{err}");
    assert!(
        err.contains("unexpected keys") && err.contains("norm.weight [3]"),
        "{err}"
    );
}

#[test]
fn corrupt_and_truncated_files_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read(fixture("tiny.safetensors")).unwrap();
    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &good[..good.len() - 7]).unwrap();
    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"this is not a safetensors file at all").unwrap();
    let empty = dir.path().join("empty.safetensors");
    std::fs::write(&empty, b"").unwrap();
    let bad_bin = dir.path().join("bad.bin");
    std::fs::write(&bad_bin, b"PK\x03\x04 nonsense").unwrap();
    for f in [&truncated, &garbage, &empty, &bad_bin] {
        let err = match ModelWeights::from_files("unet", &[f]) {
            Ok(_) => panic!("{} loaded", f.display()),
            Err(e) => format!("{e:#}"),
        };
        eprintln!("{err}");
        assert!(err.contains(&f.display().to_string()), "{err}");
    }
    let missing = dir.path().join("missing.safetensors");
    let err = ModelWeights::from_files("unet", &[&missing])
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("missing.safetensors"), "{err}");
}

#[test]
fn structure_only_records_requests_without_allocating() {
    let w = ModelWeights::structure_only("unet");
    let vb = w.var_builder(DType::F32, &Device::Cpu);
    // 4 GB if it were allocated.
    let t = vb.pp("big").get((32768, 32768), "weight").unwrap();
    assert_eq!(t.dims(), &[32768, 32768]);
    let req = w.requested();
    assert_eq!(req.get("big.weight"), Some(&vec![32768, 32768]));
    w.finish().unwrap();
}

#[test]
fn legacy_vae_attention_names_are_accepted() {
    let t = Tensor::arange(0f32, 4., &Device::Cpu)
        .unwrap()
        .reshape((2, 2))
        .unwrap();
    let tensors = [
        ("mid_block.attentions.0.query.weight".to_string(), t.clone()),
        (
            "mid_block.attentions.0.proj_attn.weight".to_string(),
            (&t * 2.).unwrap(),
        ),
    ]
    .into_iter()
    .collect();
    let w = ModelWeights::from_tensors("vae", tensors);
    let vb = w
        .var_builder(DType::F32, &Device::Cpu)
        .pp("mid_block.attentions.0");
    let q = vb.get((2, 2), "to_q.weight").unwrap();
    let o = vb.get((2, 2), "to_out.0.weight").unwrap();
    assert_eq!(
        q.to_vec2::<f32>().unwrap(),
        vec![vec![0., 1.], vec![2., 3.]]
    );
    assert_eq!(
        o.to_vec2::<f32>().unwrap(),
        vec![vec![0., 2.], vec![4., 6.]]
    );
    w.finish().unwrap();
}
