//! Gradient checks for the training ops in `lora_diffusion::ops`:
//! (a) central finite differences in f64, (b) parity with PyTorch autograd fixtures
//! (`scripts/fixture_ops.py` → `tests/fixtures/ops/`), (c) frozen Linear / Conv2d against
//! candle's stock backward, plus kernel-vs-generic agreement on large (multi-threaded) inputs.

mod common;

use candle_core::{DType, Result, Tensor, Var};
use common::{max_abs_diff_f64, max_abs_f64};
use lora_diffusion::ops::{self, Kernel};
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;

const FILES: [&str; 8] = [
    "attention",
    "softmax",
    "layer_norm",
    "group_norm",
    "linear",
    "conv2d",
    "upsample",
    "activation",
];

fn fixture_dir() -> PathBuf {
    common::fixtures().join("ops")
}

/// One fixture case: op name, params and its tensors (`x`, `w`, `grad_out`, `y`, `grad_x`...).
struct Case {
    name: String,
    op: String,
    params: Value,
    t: HashMap<String, Tensor>,
}

fn load_cases() -> Vec<Case> {
    let dir = fixture_dir();
    let json = std::fs::read_to_string(dir.join("cases.json")).expect("cases.json");
    let meta: HashMap<String, Value> = serde_json::from_str(&json).expect("cases.json parses");
    let mut all = HashMap::new();
    for f in FILES {
        let path = dir.join(format!("{f}.safetensors"));
        all.extend(common::load_tensors(&path));
    }
    let mut cases: Vec<Case> = meta
        .into_iter()
        .map(|(name, params)| {
            let prefix = format!("{name}.");
            let t = all
                .iter()
                .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|s| (s.to_string(), v.clone())))
                .collect::<HashMap<_, _>>();
            assert!(
                t.contains_key("grad_out"),
                "{name}: no grad_out in the fixtures"
            );
            let op = params["op"].as_str().expect("op").to_string();
            Case {
                name,
                op,
                params,
                t,
            }
        })
        .collect();
    cases.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(
        cases.len(),
        27,
        "expected every case of scripts/fixture_ops.py"
    );
    cases
}

fn p_usize(p: &Value, k: &str) -> usize {
    p[k].as_u64().unwrap_or_else(|| panic!("param {k}")) as usize
}

/// Runs the case's op on `ins` (which may be Vars) with the given kernel.
fn apply(c: &Case, ins: &HashMap<String, Tensor>, kernel: Kernel) -> Result<Tensor> {
    let p = &c.params;
    if c.op == "attention" {
        let (q, k, v) = (&ins["q"], &ins["k"], &ins["v"]);
        let scale = p["scale"].as_f64().unwrap();
        // Cases with a tile budget run the tiled (memory-efficient) form with that budget.
        return match p["tile_bytes"].as_u64() {
            Some(b) => ops::attention_tiled(q, k, v, scale, ins.get("mask"), b as usize, kernel),
            None => ops::attention_with(q, k, v, scale, ins.get("mask"), kernel),
        };
    }
    let x = &ins["x"];
    match c.op.as_str() {
        "softmax" => ops::softmax_last_dim_with(x, kernel),
        "layer_norm" => {
            ops::layer_norm_with(x, &ins["w"], &ins["b"], p["eps"].as_f64().unwrap(), kernel)
        }
        "group_norm" => {
            let (g, eps) = (p_usize(p, "groups"), p["eps"].as_f64().unwrap());
            ops::group_norm_with(x, g, &ins["w"], &ins["b"], eps, kernel)
        }
        "linear" => ops::frozen_linear(x, &ins["w"], ins.get("b")),
        "conv2d" => ops::frozen_conv2d(
            x,
            &ins["w"],
            ins.get("b"),
            p_usize(p, "stride"),
            p_usize(p, "padding"),
            p_usize(p, "dilation"),
            p_usize(p, "groups"),
        ),
        "upsample_nearest2d" => {
            let s = p["size"].as_array().unwrap();
            ops::upsample_nearest2d(
                x,
                s[0].as_u64().unwrap() as usize,
                s[1].as_u64().unwrap() as usize,
            )
        }
        "silu" => ops::silu_with(x, kernel),
        "gelu_erf" => ops::gelu_erf_with(x, kernel),
        other => panic!("unknown op {other}"),
    }
}

/// Ops whose inputs other than x are frozen (no gradient may reach them).
fn frozen(c: &Case) -> bool {
    matches!(c.op.as_str(), "linear" | "conv2d")
}

/// Whether the op must produce a gradient for input `name`.
fn differentiable(c: &Case, name: &str) -> bool {
    if frozen(c) {
        name == "x"
    } else {
        name != "mask"
    }
}

/// Kernels worth running for the case (frozen ops and upsampling have a single path).
fn kernels(c: &Case) -> Vec<Kernel> {
    if frozen(c) || c.op == "upsample_nearest2d" {
        vec![Kernel::Auto]
    } else {
        vec![Kernel::Auto, Kernel::Generic]
    }
}

/// The case's input tensors (everything except the outputs and gradients), in `dtype`.
fn inputs(c: &Case, dtype: DType) -> HashMap<String, Tensor> {
    c.t.iter()
        .filter(|(k, _)| matches!(k.as_str(), "x" | "w" | "b" | "q" | "k" | "v" | "mask"))
        .map(|(k, v)| (k.clone(), v.to_dtype(dtype).unwrap()))
        .collect()
}

/// Makes Vars of the inputs, runs the op and backprops `sum(y * grad_out)`.
fn run_with_grads(
    c: &Case,
    dtype: DType,
    kernel: Kernel,
) -> (Tensor, HashMap<String, Option<Tensor>>) {
    let vars: HashMap<String, Var> = inputs(c, dtype)
        .into_iter()
        .map(|(k, v)| (k, Var::from_tensor(&v).unwrap()))
        .collect();
    let ins = vars
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let y = apply(c, &ins, kernel).unwrap();
    let g = c.t["grad_out"].to_dtype(dtype).unwrap();
    let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let out = vars
        .iter()
        .map(|(k, v)| (k.clone(), grads.get(v.as_tensor()).cloned()))
        .collect();
    (y, out)
}

#[test]
fn parity_with_pytorch_autograd() {
    let mut worst = 0f64;
    for c in load_cases() {
        for kernel in kernels(&c) {
            let (y, grads) = run_with_grads(&c, DType::F32, kernel);
            let mut checks = vec![("y".to_string(), y)];
            for (k, g) in &grads {
                let key = format!("grad_{k}");
                match (g, c.t.get(&key)) {
                    (Some(g), Some(_)) => checks.push((key, g.clone())),
                    (None, Some(_)) => panic!("{}: no gradient for {k}", c.name),
                    (Some(_), None) => panic!("{}: frozen input {k} got a gradient", c.name),
                    (None, None) => {}
                }
            }
            for (key, ours) in checks {
                let reference = &c.t[&key];
                let diff = max_abs_diff_f64(&ours, reference);
                let tol = 1e-5 * max_abs_f64(reference).max(1.0);
                eprintln!(
                    "parity {:12} {kernel:?} {key:7} max abs diff {diff:.2e}",
                    c.name
                );
                assert!(
                    diff <= tol,
                    "{} {kernel:?} {key}: max abs diff {diff:e} > {tol:e}",
                    c.name
                );
                worst = worst.max(diff);
            }
        }
    }
    eprintln!("parity: worst max abs diff over all cases {worst:.2e}");
}

/// `sum(op(inputs) * grad_out)` in f64.
fn loss(c: &Case, ins: &HashMap<String, Tensor>, g: &Tensor, kernel: Kernel) -> f64 {
    let y = apply(c, ins, kernel).unwrap();
    (y * g)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn finite_difference_gradients_f64() {
    let h = 1e-5;
    let mut worst = 0f64;
    for c in load_cases() {
        for kernel in kernels(&c) {
            let (_, grads) = run_with_grads(&c, DType::F64, kernel);
            let base = inputs(&c, DType::F64);
            let g = c.t["grad_out"].to_dtype(DType::F64).unwrap();
            let mut names: Vec<_> = base.keys().cloned().collect();
            names.sort();
            for name in names {
                let analytic = match &grads[&name] {
                    Some(a) => a.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
                    None => {
                        assert!(
                            !differentiable(&c, &name),
                            "{}: no gradient for {name}",
                            c.name
                        );
                        continue;
                    }
                };
                assert!(
                    differentiable(&c, &name),
                    "{}: {name} got a gradient",
                    c.name
                );
                let t = &base[&name];
                let vals = t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
                let mut err = 0f64;
                for i in 0..vals.len() {
                    let eval = |delta: f64| {
                        let mut v = vals.clone();
                        v[i] += delta;
                        let mut ins = base.clone();
                        ins.insert(
                            name.clone(),
                            Tensor::from_vec(v, t.shape(), t.device()).unwrap(),
                        );
                        loss(&c, &ins, &g, kernel)
                    };
                    let numeric = (eval(h) - eval(-h)) / (2.0 * h);
                    err = err.max((numeric - analytic[i]).abs());
                }
                let scale = analytic.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-3);
                let rel = err / scale;
                eprintln!(
                    "finite-diff {:12} {kernel:?} d/d{name}: max abs err {err:.2e}, relative {rel:.2e}",
                    c.name
                );
                assert!(
                    rel < 1e-6,
                    "{} {kernel:?} d/d{name}: relative error {rel:e}",
                    c.name
                );
                worst = worst.max(rel);
            }
        }
    }
    eprintln!("finite-diff: worst relative error {worst:.2e}");
}

#[test]
fn frozen_ops_match_candle_stock_backward() {
    for c in load_cases().iter().filter(|c| frozen(c)) {
        if ["c_nonsq_s2", "c3s2_odd", "c_s3", "c_grp_s2_nonsq"].contains(&c.name.as_str()) {
            // candle's stock Conv2D backward derives output_padding from the height only
            // and fails on these geometries (PyTorch parity above covers them).
            continue;
        }
        let ins = inputs(c, DType::F32);
        let g = &c.t["grad_out"];
        // Stock: every input a Var, candle's own matmul / conv2d and backward.
        let (xv, wv) = (
            Var::from_tensor(&ins["x"]).unwrap(),
            Var::from_tensor(&ins["w"]).unwrap(),
        );
        let stock = if c.op == "linear" {
            let b = ins.get("b").cloned();
            candle_nn::Module::forward(
                &candle_nn::Linear::new(wv.as_tensor().clone(), b),
                xv.as_tensor(),
            )
        } else {
            let p = &c.params;
            let b = ins["b"].reshape((1, (), 1, 1)).unwrap();
            xv.as_tensor()
                .conv2d(
                    wv.as_tensor(),
                    p_usize(p, "padding"),
                    p_usize(p, "stride"),
                    p_usize(p, "dilation"),
                    p_usize(p, "groups"),
                )
                .and_then(|y| y.broadcast_add(&b))
        }
        .unwrap();
        let sg = (&stock * g).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(
            sg.get(wv.as_tensor()).is_some(),
            "stock computes a weight gradient"
        );
        // Frozen: the same Vars go in; only x may get a gradient.
        let vins: HashMap<String, Tensor> = [("x", xv.as_tensor()), ("w", wv.as_tensor())]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .chain(ins.get("b").map(|b| ("b".to_string(), b.clone())))
            .collect();
        let y = apply(c, &vins, Kernel::Auto).unwrap();
        let fg = (&y * g).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(
            fg.get(wv.as_tensor()).is_none(),
            "{}: frozen weight got a gradient",
            c.name
        );
        let dy = max_abs_diff_f64(&y, &stock);
        let dx = max_abs_diff_f64(
            fg.get(xv.as_tensor()).unwrap(),
            sg.get(xv.as_tensor()).unwrap(),
        );
        eprintln!(
            "frozen vs stock {:12} y diff {dy:.2e}, grad_x diff {dx:.2e}",
            c.name
        );
        assert!(
            dy <= 1e-5 && dx <= 1e-5,
            "{}: y {dy:e}, grad_x {dx:e}",
            c.name
        );
    }
}

#[test]
fn conv_input_grad_both_algorithms_match_pytorch() {
    // conv2d_input_grad picks conv_transpose2d for stride > 1 (one group) and the flipped
    // conv2d otherwise; the flipped path must hold for every geometry too.
    for c in load_cases().iter().filter(|c| c.op == "conv2d") {
        let p = &c.params;
        let params = ops::Conv2dParams {
            stride: p_usize(p, "stride"),
            padding: p_usize(p, "padding"),
            dilation: p_usize(p, "dilation"),
            groups: p_usize(p, "groups"),
        };
        let (_, _, h, w) = c.t["x"].dims4().unwrap();
        let (g, k, reference) = (&c.t["grad_out"], &c.t["w"], &c.t["grad_x"]);
        let auto = ops::conv2d_input_grad(g, k, (h, w), &params).unwrap();
        let flipped = ops::conv2d_input_grad_flipped(g, k, (h, w), &params).unwrap();
        let (da, df) = (
            max_abs_diff_f64(&auto, reference),
            max_abs_diff_f64(&flipped, reference),
        );
        eprintln!(
            "conv input grad {:16} auto {da:.2e}, flipped {df:.2e}",
            c.name
        );
        assert!(da < 1e-5 && df < 1e-5, "{}: {da:e} {df:e}", c.name);
    }
}

/// The half-precision norms are computed in f32 but keep only their half arguments for the
/// backward: value and gradients must equal the f32 op on cast copies, cast back (the graph
/// a plain `to_dtype` would build), bit for bit, for every argument.
#[test]
fn half_norms_equal_the_f32_op_on_cast_copies() -> Result<()> {
    let dev = candle_core::Device::Cpu;
    for dt in [DType::BF16, DType::F16] {
        for norm in ["layer", "group"] {
            let shape: &[usize] = if norm == "layer" {
                &[2, 7, 24]
            } else {
                &[2, 24, 3, 5]
            };
            let c = if norm == "layer" { 24 } else { shape[1] };
            let x = Var::from_tensor(&Tensor::randn(0f32, 1., shape, &dev)?.to_dtype(dt)?)?;
            let w = Var::from_tensor(&(Tensor::randn(0f32, 1., c, &dev)? + 1.)?.to_dtype(dt)?)?;
            let b = Var::from_tensor(&Tensor::randn(0f32, 1., c, &dev)?.to_dtype(dt)?)?;
            let g = Tensor::randn(0f32, 1., shape, &dev)?.to_dtype(dt)?;
            let run = |x: &Tensor, w: &Tensor, b: &Tensor| match norm {
                "layer" => ops::layer_norm(x, w, b, 1e-5),
                _ => ops::group_norm(x, 4, w, b, 1e-5),
            };
            let half = run(x.as_tensor(), w.as_tensor(), b.as_tensor())?;
            let f32 = |t: &Var| t.as_tensor().to_dtype(DType::F32);
            let reference = run(&f32(&x)?, &f32(&w)?, &f32(&b)?)?.to_dtype(dt)?;
            assert_eq!(half.dtype(), dt);
            let diff = |a: &Tensor, b: &Tensor| -> Result<f64> {
                let d = (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?;
                d.abs()?.max_all()?.to_scalar::<f64>()
            };
            assert_eq!(diff(&half, &reference)?, 0.0, "{norm} norm {dt:?}: value");
            let gh = (half.to_dtype(DType::F32)? * g.to_dtype(DType::F32)?)?
                .sum_all()?
                .backward()?;
            let gr = (reference.to_dtype(DType::F32)? * g.to_dtype(DType::F32)?)?
                .sum_all()?
                .backward()?;
            for (name, v) in [("x", &x), ("weight", &w), ("bias", &b)] {
                let (a, r) = (gh.get(v).expect("grad"), gr.get(v).expect("grad"));
                assert_eq!(a.dtype(), dt, "{norm} norm {dt:?}: {name} grad dtype");
                assert!(
                    max_abs_f64(r) > 0.0,
                    "{norm} norm {dt:?}: {name} grad is zero"
                );
                assert_eq!(diff(a, r)?, 0.0, "{norm} norm {dt:?}: {name} grad");
            }
        }
    }
    Ok(())
}
