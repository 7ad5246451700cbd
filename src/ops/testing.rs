//! Helpers of the op unit tests: relative differences, gradients of `Σ y · g`, and central
//! finite differences in f64.

use crate::rng::Rng;
use candle_core::{DType, Device, Result, Tensor, Var};

/// `max |a - b| / max(max |b|, 1e-12)`, computed in f64.
pub(crate) fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let f = |t: &Tensor| {
        t.to_dtype(DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f64>())
            .expect("tensor values")
    };
    let (a, b) = (f(a), f(b));
    assert_eq!(a.len(), b.len(), "compared tensors differ in size");
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-12);
    let err = a
        .iter()
        .zip(&b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
    err / scale
}

/// A standard-normal tensor of `dtype` from a seeded generator.
pub(crate) fn randn(seed: u64, shape: &[usize], dtype: DType) -> Tensor {
    Rng::new(seed)
        .randn(shape, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .expect("random tensor")
}

/// `f(inputs)` and the gradients of `Σ f(inputs) · g` w.r.t. each input (None where none
/// reached it), the inputs made variables.
pub(crate) fn value_and_grads(
    inputs: &[Tensor],
    g: &Tensor,
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) -> (Tensor, Vec<Option<Tensor>>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).expect("var"))
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts).expect("forward");
    let loss = (y.to_dtype(DType::F64).expect("cast") * g.to_dtype(DType::F64).expect("cast"))
        .and_then(|t| t.sum_all())
        .expect("loss");
    let grads = loss.backward().expect("backward");
    let out = ts.iter().map(|t| grads.get(t).cloned()).collect();
    (y, out)
}

/// The largest relative error (over each input's largest gradient) between the analytic
/// gradients of `Σ f · g` and central finite differences, for f64 inputs.
pub(crate) fn finite_difference_error(
    inputs: &[Tensor],
    g: &Tensor,
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) -> f64 {
    let (_, grads) = value_and_grads(inputs, g, f);
    let loss = |ins: &[Tensor]| -> f64 {
        (f(ins).expect("forward") * g)
            .and_then(|t| t.sum_all())
            .and_then(|t| t.to_scalar::<f64>())
            .expect("loss")
    };
    let h = 1e-5;
    let mut worst = 0f64;
    for (k, t) in inputs.iter().enumerate() {
        let analytic = grads[k]
            .as_ref()
            .expect("a gradient for every input")
            .flatten_all()
            .and_then(|t| t.to_vec1::<f64>())
            .expect("gradient values");
        let vals = t
            .flatten_all()
            .and_then(|t| t.to_vec1::<f64>())
            .expect("values");
        let mut err = 0f64;
        for i in 0..vals.len() {
            let eval = |d: f64| {
                let mut v = vals.clone();
                v[i] += d;
                let mut ins = inputs.to_vec();
                ins[k] = Tensor::from_vec(v, t.shape(), t.device()).expect("tensor");
                loss(&ins)
            };
            let numeric = (eval(h) - eval(-h)) / (2.0 * h);
            err = err.max((numeric - analytic[i]).abs());
        }
        let scale = analytic.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-3);
        worst = worst.max(err / scale);
    }
    worst
}
