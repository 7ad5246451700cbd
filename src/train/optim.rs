//! AdamW (PyTorch's `torch.optim.AdamW` update rule) with state that can be saved and restored
//! exactly, learning-rate schedules as diffusers' `get_scheduler` defines them, and global
//! gradient-norm clipping as `torch.nn.utils.clip_grad_norm_` does it.

use super::config::LrScheduler;
use candle_core::{DType, Result, Storage, Tensor, Var};
use std::collections::BTreeMap;

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    /// beta1 (first-moment decay).
    pub beta1: f64,
    /// beta2 (second-moment decay).
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

/// Adam moments: host vectors for f32 CPU parameters (updated by one fused parallel loop),
/// tensors on other devices (updated with tensor ops).
enum Moments {
    Host { m: Vec<f32>, v: Vec<f32> },
    Device { m: Tensor, v: Tensor },
}

/// One trained tensor with its name, the group learning rate and its Adam moments.
struct Param {
    name: String,
    var: Var,
    group: usize,
    moments: Moments,
}

fn host_eligible(var: &Var) -> bool {
    var.device().is_cpu() && var.dtype() == DType::F32
}

/// The contiguous f32 data of a CPU tensor (a copy when it is not contiguous).
fn with_host_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.to_dtype(DType::F32)?.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("AdamW: expected a CPU tensor");
    };
    let data = cpu.as_slice::<f32>()?;
    let (a, b) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("AdamW: non-contiguous tensor".into()))?;
    Ok(f(&data[a..b]))
}

/// Scalars of one AdamW update.
#[derive(Clone, Copy)]
struct Coeffs {
    decay: f32,
    beta1: f32,
    one_m_beta1: f32,
    beta2: f32,
    one_m_beta2: f32,
    inv_bc2_sqrt: f32,
    eps: f32,
    step_size: f32,
}

/// The fused update of `w` (written to `out`), `m` and `v` from `g`, in parallel chunks on
/// candle's worker pool (each element is independent, so the result does not depend on the
/// number of threads).
fn fused_update(w: &[f32], g: &[f32], m: &mut [f32], v: &mut [f32], out: &mut [f32], c: Coeffs) {
    let n = w.len();
    const CHUNK: usize = 1 << 14;
    let body = |lo: usize, hi: usize, m: &mut [f32], v: &mut [f32], out: &mut [f32]| {
        for i in 0..hi - lo {
            let gi = g[lo + i];
            let mi = c.beta1 * m[i] + c.one_m_beta1 * gi;
            let vi = c.beta2 * v[i] + c.one_m_beta2 * gi * gi;
            m[i] = mi;
            v[i] = vi;
            let denom = vi.sqrt() * c.inv_bc2_sqrt + c.eps;
            out[i] = w[lo + i] * c.decay - c.step_size * mi / denom;
        }
    };
    if n < 4 * CHUNK {
        body(0, n, m, v, out);
        return;
    }
    let (pm, pv, po) = (
        Ptr(m.as_mut_ptr()),
        Ptr(v.as_mut_ptr()),
        Ptr(out.as_mut_ptr()),
    );
    let chunks = n.div_ceil(CHUNK);
    candle_core::utils::barrier_pool().execute_chunked(chunks, |range| {
        for ci in range {
            let lo = ci * CHUNK;
            let hi = (lo + CHUNK).min(n);
            // SAFETY: chunk ci covers [lo, hi), disjoint between chunks and inside the slices.
            let (m, v, out) = unsafe {
                (
                    pm.slice(lo, hi - lo),
                    pv.slice(lo, hi - lo),
                    po.slice(lo, hi - lo),
                )
            };
            body(lo, hi, m, v, out);
        }
    });
}

/// A pointer shared by the workers of [`fused_update`], each using a disjoint range.
#[derive(Clone, Copy)]
struct Ptr(*mut f32);
// SAFETY: only used for disjoint ranges, see `fused_update`.
unsafe impl Send for Ptr {}
unsafe impl Sync for Ptr {}

impl Ptr {
    /// # Safety
    /// `[start, start + len)` must be inside the buffer and used by no one else.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, start: usize, len: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

/// AdamW over named `Var`s in groups with their own base learning rate.
pub struct AdamW {
    params: Vec<Param>,
    group_lr: Vec<f64>,
    hp: AdamWParams,
    step: u64,
}

impl AdamW {
    /// An optimizer with no parameters.
    pub fn new(hp: AdamWParams) -> Self {
        Self {
            params: vec![],
            group_lr: vec![],
            hp,
            step: 0,
        }
    }

    /// Adds a group of named parameters trained at base learning rate `lr`; moments start at 0
    /// (f32).
    pub fn add_group(&mut self, vars: &[(String, Var)], lr: f64) -> Result<()> {
        let group = self.group_lr.len();
        self.group_lr.push(lr);
        for (name, var) in vars {
            let moments = if host_eligible(var) {
                let n = var.elem_count();
                Moments::Host {
                    m: vec![0.0; n],
                    v: vec![0.0; n],
                }
            } else {
                let z = Tensor::zeros(var.shape(), DType::F32, var.device())?;
                Moments::Device { m: z.clone(), v: z }
            };
            self.params.push(Param {
                name: name.clone(),
                var: var.clone(),
                group,
                moments,
            });
        }
        Ok(())
    }

    /// Optimizer steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The named parameters, in the order they were added.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.params.iter().map(|p| (p.name.as_str(), &p.var))
    }

    /// Number of trained scalars.
    pub fn num_params(&self) -> usize {
        self.params.iter().map(|p| p.var.elem_count()).sum()
    }

    /// One AdamW step with `grads` (by parameter name; parameters without a gradient are left
    /// untouched, as PyTorch skips a `None` grad) and `lr_factor` times each group's base rate.
    ///
    /// Per parameter: `p ← p·(1 − lr·wd)`, `m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²`,
    /// `p ← p − lr/(1−β1ᵗ) · m / (√v/√(1−β2ᵗ) + ε)`; all in f32.
    pub fn step(&mut self, grads: &BTreeMap<String, Tensor>, lr_factor: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let AdamWParams {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.hp;
        let bc1 = 1.0 - beta1.powi(t);
        let bc2_sqrt = (1.0 - beta2.powi(t)).sqrt();
        for p in &mut self.params {
            let Some(g) = grads.get(&p.name) else {
                continue;
            };
            let lr = self.group_lr[p.group] * lr_factor;
            match &mut p.moments {
                Moments::Host { m, v } => {
                    let c = Coeffs {
                        decay: (1.0 - lr * weight_decay) as f32,
                        beta1: beta1 as f32,
                        one_m_beta1: (1.0 - beta1) as f32,
                        beta2: beta2 as f32,
                        one_m_beta2: (1.0 - beta2) as f32,
                        inv_bc2_sqrt: (1.0 / bc2_sqrt) as f32,
                        eps: eps as f32,
                        step_size: (lr / bc1) as f32,
                    };
                    let mut out = vec![0f32; m.len()];
                    with_host_slice(p.var.as_tensor(), |w| {
                        with_host_slice(g, |g| {
                            if g.len() != w.len() {
                                candle_core::bail!(
                                    "AdamW {}: gradient has {} elements, the parameter {}",
                                    p.name,
                                    g.len(),
                                    w.len()
                                );
                            }
                            fused_update(w, g, m, v, &mut out, c);
                            Ok(())
                        })?
                    })??;
                    let t = Tensor::from_vec(out, p.var.shape(), p.var.device())?;
                    p.var.set(&t)?;
                }
                Moments::Device { m, v } => {
                    let g = g.to_dtype(DType::F32)?;
                    let w = p.var.as_tensor().detach().to_dtype(DType::F32)?;
                    let w = if weight_decay != 0.0 {
                        w.affine(1.0 - lr * weight_decay, 0.0)?
                    } else {
                        w
                    };
                    *m = (m.affine(beta1, 0.0)? + g.affine(1.0 - beta1, 0.0)?)?;
                    *v = (v.affine(beta2, 0.0)? + g.sqr()?.affine(1.0 - beta2, 0.0)?)?;
                    let denom = v.sqrt()?.affine(1.0 / bc2_sqrt, eps)?;
                    let upd = (&*m / denom)?.affine(lr / bc1, 0.0)?;
                    let w = (w - upd)?;
                    p.var.set(&w.to_dtype(p.var.dtype())?)?;
                }
            }
        }
        Ok(())
    }

    /// The state to checkpoint: `m.<name>` and `v.<name>` tensors, plus the step count.
    pub fn state(&self) -> Result<(Vec<(String, Tensor)>, u64)> {
        let mut out = Vec::with_capacity(self.params.len() * 2);
        for p in &self.params {
            let (m, v) = match &p.moments {
                Moments::Host { m, v } => (
                    Tensor::from_slice(m, p.var.shape(), &candle_core::Device::Cpu)?,
                    Tensor::from_slice(v, p.var.shape(), &candle_core::Device::Cpu)?,
                ),
                Moments::Device { m, v } => (m.clone(), v.clone()),
            };
            out.push((format!("m.{}", p.name), m));
            out.push((format!("v.{}", p.name), v));
        }
        Ok((out, self.step))
    }

    /// Restores [`AdamW::state`]; every parameter's moments must be present with its shape.
    pub fn load_state(
        &mut self,
        tensors: &BTreeMap<String, Tensor>,
        step: u64,
    ) -> anyhow::Result<()> {
        for p in &mut self.params {
            let get = |key: &str| -> anyhow::Result<Tensor> {
                let k = format!("{key}.{}", p.name);
                let t = tensors
                    .get(&k)
                    .ok_or_else(|| anyhow::anyhow!("optimizer state has no tensor {k}"))?;
                if t.dims() != p.var.dims() {
                    anyhow::bail!(
                        "optimizer state {k} has shape {:?}, expected {:?}",
                        t.dims(),
                        p.var.dims()
                    );
                }
                Ok(t.to_dtype(DType::F32)?)
            };
            let (m, v) = (get("m")?, get("v")?);
            p.moments = match &p.moments {
                Moments::Host { .. } => Moments::Host {
                    m: m.flatten_all()?.to_vec1()?,
                    v: v.flatten_all()?.to_vec1()?,
                },
                Moments::Device { .. } => Moments::Device {
                    m: m.to_device(p.var.device())?,
                    v: v.to_device(p.var.device())?,
                },
            };
        }
        self.step = step;
        Ok(())
    }
}

/// The learning-rate multiplier for optimizer step `step` (0-based: the first update uses
/// step 0), as diffusers' `get_scheduler` + `LambdaLR` give it. `constant` with warm-up steps
/// is diffusers' `constant_with_warmup`.
pub fn lr_factor(kind: LrScheduler, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    match kind {
        LrScheduler::Constant => 1.0,
        LrScheduler::Linear => {
            let rest = total.saturating_sub(warmup).max(1) as f64;
            (total.saturating_sub(step) as f64 / rest).max(0.0)
        }
        LrScheduler::Cosine => {
            let rest = total.saturating_sub(warmup).max(1) as f64;
            let progress = (step - warmup) as f64 / rest;
            (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
        }
    }
}

/// The global L2 norm of `grads` (f64 sum of per-tensor f32 sums of squares).
pub fn grad_norm(grads: &BTreeMap<String, Tensor>) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.values() {
        let s = g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()?;
        total += s as f64;
    }
    Ok(total.sqrt())
}

/// Scales every gradient by `max_norm / (norm + 1e-6)` when that is below 1 (PyTorch's
/// `clip_grad_norm_`); returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut BTreeMap<String, Tensor>, max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads)?;
    if max_norm > 0.0 && norm.is_finite() {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.values_mut() {
                *g = g.affine(coef, 0.0)?;
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adamw_matches_closed_form_first_steps() -> anyhow::Result<()> {
        // With g constant, m̂ = g and v̂ = g², so each step moves by lr·g/(|g|+ε) after weight
        // decay. f32 takes the fused host path, f64 the tensor path.
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F64] {
            let w0 = Tensor::new(&[1.0f32, -2.0], &dev)?.to_dtype(dtype)?;
            let var = Var::from_tensor(&w0)?;
            let hp = AdamWParams {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.1,
            };
            let mut opt = AdamW::new(hp);
            opt.add_group(&[("w".into(), var.clone())], 0.01)?;
            let g = Tensor::new(&[0.5f32, -3.0], &dev)?;
            let grads: BTreeMap<String, Tensor> = [("w".to_string(), g)].into();
            let mut expect = [1.0f64, -2.0];
            for _ in 0..3 {
                opt.step(&grads, 1.0)?;
                for (e, gi) in expect.iter_mut().zip([0.5f64, -3.0]) {
                    *e *= 1.0 - 0.01 * 0.1;
                    *e -= 0.01 * gi / (gi.abs() + 1e-8);
                }
            }
            let got = var.as_tensor().to_dtype(DType::F64)?.to_vec1::<f64>()?;
            for (g, e) in got.iter().zip(expect) {
                assert!((g - e).abs() < 1e-6, "{dtype:?}: {g} vs {e}");
            }
            let (state, step) = opt.state()?;
            assert_eq!((state.len(), step), (2, 3));
        }
        Ok(())
    }

    #[test]
    fn fused_update_is_chunked_consistently() {
        // Large enough for the parallel path; compare with the serial formula element-wise.
        let n = 300_000;
        let w: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let g: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
        let (mut m, mut v, mut out) = (vec![0.1f32; n], vec![0.2f32; n], vec![0f32; n]);
        let c = Coeffs {
            decay: 0.999,
            beta1: 0.9,
            one_m_beta1: 0.1,
            beta2: 0.99,
            one_m_beta2: 0.01,
            inv_bc2_sqrt: 2.0,
            eps: 1e-8,
            step_size: 1e-3,
        };
        fused_update(&w, &g, &mut m, &mut v, &mut out, c);
        for i in [0, 1, 16383, 16384, 123_457, n - 1] {
            let mi = 0.9 * 0.1 + 0.1 * g[i];
            let vi = 0.99 * 0.2 + 0.01 * g[i] * g[i];
            let o = w[i] * 0.999 - 1e-3 * mi / (vi.sqrt() * 2.0 + 1e-8);
            assert_eq!((m[i], v[i], out[i]), (mi, vi, o), "element {i}");
        }
    }

    #[test]
    fn schedules() {
        use LrScheduler::*;
        assert_eq!(lr_factor(Constant, 0, 0, 10), 1.0);
        assert_eq!(lr_factor(Constant, 0, 4, 10), 0.0);
        assert_eq!(lr_factor(Constant, 2, 4, 10), 0.5);
        assert_eq!(lr_factor(Linear, 4, 4, 10), 1.0);
        assert!((lr_factor(Linear, 7, 4, 10) - 0.5).abs() < 1e-12);
        assert!((lr_factor(Cosine, 7, 4, 10) - 0.5).abs() < 1e-12);
        assert!(lr_factor(Cosine, 10, 4, 10).abs() < 1e-12);
    }
}
