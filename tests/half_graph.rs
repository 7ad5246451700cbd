//! What a half-precision (bf16) training graph keeps: the norms compute in f32 but keep only
//! their half inputs, so the heap a tracked forward leaves behind is the half tensors alone.
//! (Its own test binary: the counting allocator sees this one test only.)

use candle_core::{DType, Device, Result, Tensor, Var};
use lora_diffusion::ops;
use lora_diffusion::sys::HeapCounter;

#[global_allocator]
static HEAP: HeapCounter = HeapCounter;

/// Live heap bytes that `f`'s result keeps (allocated during `f` and still live after it).
fn kept_by(f: impl FnOnce() -> Result<Tensor>) -> Result<(Tensor, usize)> {
    let before = HeapCounter::live();
    let y = f()?;
    Ok((y, HeapCounter::live().saturating_sub(before)))
}

#[test]
fn half_norm_graphs_keep_half_inputs() -> Result<()> {
    let dev = Device::Cpu;
    // One SD 1.5 level-0 activation: 320 channels at 64×64 (2.6 MB in bf16).
    let elems = 320 * 64 * 64;
    let x =
        Var::from_tensor(&Tensor::randn(0f32, 1., (1, 320, 64, 64), &dev)?.to_dtype(DType::BF16)?)?;
    let w = Tensor::ones(320, DType::BF16, &dev)?;
    let b = Tensor::zeros(320, DType::BF16, &dev)?;
    let xt = x
        .as_tensor()
        .flatten_from(2)?
        .transpose(1, 2)?
        .contiguous()?; // [1, 4096, 320]
    let xt = Var::from_tensor(&xt)?;
    for (name, run) in [
        (
            "group",
            Box::new(|| ops::group_norm(x.as_tensor(), 32, &w, &b, 1e-6))
                as Box<dyn Fn() -> Result<Tensor>>,
        ),
        (
            "layer",
            Box::new(|| ops::layer_norm(xt.as_tensor(), &w, &b, 1e-5)),
        ),
    ] {
        let (y, kept) = kept_by(&run)?;
        // The output (bf16, 2 bytes per element) plus small per-call state; an f32 copy of
        // the input kept for the backward would add 4 bytes per element.
        let out_bytes = 2 * elems;
        assert!(
            kept < out_bytes + elems,
            "{name} norm: the graph keeps {kept} bytes beyond the input, expected about {out_bytes} (the bf16 output)"
        );
        assert!(
            kept >= out_bytes,
            "{name} norm: {kept} bytes kept, less than its own output"
        );
        drop(y);
    }
    Ok(())
}
