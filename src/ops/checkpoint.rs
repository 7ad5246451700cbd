//! Gradient checkpointing: a block's forward keeps only its inputs, and the backward runs the
//! block again to get its gradients (PyTorch's `torch.utils.checkpoint`).
//!
//! candle custom ops take at most three tensors, and a block reads more: its inputs and
//! every trainable parameter inside it. [`checkpoint`] therefore ties the tracked tensors
//! into a chain of scalar custom ops, `t₀ → tie₀, (tie₀, t₁) → tie₁, …`, and returns the
//! block's output from one more custom op on the last tie. candle's backward visits a node
//! before the nodes it was computed from, so the block op's backward runs first: it
//! recomputes the block on fresh variables holding the inputs' values, backpropagates the
//! output gradient through that graph, and leaves each tracked tensor's gradient in a cell
//! shared with the ties, whose backwards then hand them out (and zero scalars down the chain).
//!
//! Random draws inside the block (LoRA dropout) are replayed: a [`Replay`] captures their
//! state before the forward, and the recompute runs with that state and puts the current one
//! back afterwards, so the recompute sees the forward's masks and the generator ends where it
//! would without checkpointing.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, DType, Layout, MetalStorage, Result, Shape,
    Tensor, Var,
};

use super::bridge::Taken;

/// Random state a checkpointed function draws from, captured before the forward and set
/// again for the recompute (e.g. the dropout generators of the adapters in a block).
pub trait Replay: Send + Sync {
    /// The current state.
    fn capture(&self) -> Vec<[u64; 4]>;
    /// Sets the state to one returned by [`Replay::capture`].
    fn restore(&self, state: &[[u64; 4]]);
}

/// The function a checkpoint runs: block inputs → block output.
pub type BlockFn = Box<dyn Fn(&[Tensor]) -> Result<Tensor> + Send + Sync>;

/// Runs `f(inputs)` keeping no activation of `f` for the backward: the output is
/// differentiable w.r.t. the tracked `inputs` and the variables `params` (every trainable
/// tensor `f` reads besides its inputs), and the backward recomputes `f`. The gradients
/// equal those of `f(inputs)` itself. When nothing is tracked, `f(inputs)` plainly. An
/// error names a trainable tensor inside `f` that `params` does not list.
pub fn checkpoint(
    inputs: &[Tensor],
    params: &[Tensor],
    replay: Option<Arc<dyn Replay>>,
    f: BlockFn,
) -> Result<Tensor> {
    let mut seen = HashSet::new();
    let params: Vec<Tensor> = params
        .iter()
        .filter(|p| p.track_op() && seen.insert(p.id()))
        .cloned()
        .collect();
    if params.is_empty() && !inputs.iter().any(Tensor::track_op) {
        return f(inputs);
    }
    let saved_state = replay.as_ref().map(|r| r.capture());
    let detached: Vec<Tensor> = inputs.iter().map(Tensor::detach).collect();
    let value = f(&detached)?.detach();
    // Tracked tensors, in tie order: the tracked inputs, then the parameters.
    let tracked_inputs: Vec<usize> = (0..inputs.len())
        .filter(|&i| inputs[i].track_op())
        .collect();
    let tied: Vec<&Tensor> = tracked_inputs
        .iter()
        .map(|&i| &inputs[i])
        .chain(params.iter())
        .collect();
    let cell = Arc::new(Mutex::new(vec![None; tied.len()]));
    let mut tie = tied[0].apply_op1(Tie {
        index: 0,
        cell: cell.clone(),
    })?;
    for (index, t) in tied.iter().enumerate().skip(1) {
        tie = tie.apply_op2(
            t,
            Tie {
                index,
                cell: cell.clone(),
            },
        )?;
    }
    let recompute = Recompute {
        f,
        inputs: detached,
        tracked_inputs,
        params,
        replay: replay.zip(saved_state),
        cell,
    };
    tie.apply_op1(Block {
        value: Taken::new(value),
        recompute,
    })
}

/// The tracked tensors' gradients, filled by the block's backward, taken by the ties.
type Cell = Arc<Mutex<Vec<Option<Tensor>>>>;

/// One generator state of a [`Replay`].
type RandomState = [u64; 4];

/// What the block op's backward needs to run the block again.
struct Recompute {
    f: BlockFn,
    inputs: Vec<Tensor>,
    tracked_inputs: Vec<usize>,
    params: Vec<Tensor>,
    replay: Option<(Arc<dyn Replay>, Vec<RandomState>)>,
    cell: Cell,
}

impl Recompute {
    /// Runs the block on fresh variables, backpropagates `grad` and fills the cell.
    fn run(&self, grad: &Tensor) -> Result<()> {
        let mut fresh = self.inputs.clone();
        let mut vars = Vec::with_capacity(self.tracked_inputs.len() + self.params.len());
        for &i in &self.tracked_inputs {
            let v = Var::from_tensor(&self.inputs[i])?.into_inner();
            fresh[i] = v.clone();
            vars.push(v);
        }
        vars.extend(self.params.iter().cloned());
        let current = self.replay.as_ref().map(|(r, saved)| {
            let now = r.capture();
            r.restore(saved);
            now
        });
        let out = (self.f)(&fresh);
        if let (Some((r, _)), Some(now)) = (&self.replay, current) {
            r.restore(&now);
        }
        let out = out?;
        if out.shape() != grad.shape() {
            candle_core::bail!(
                "checkpoint: the recomputed block gives {:?}, the forward gave {:?}",
                out.shape(),
                grad.shape()
            );
        }
        let loss = (out * grad.detach())?.sum_all()?;
        let known: HashSet<_> = vars.iter().map(Tensor::id).collect();
        let unlisted = loss
            .sorted_nodes()
            .into_iter()
            .find(|n| n.is_variable() && !known.contains(&n.id()));
        if let Some(v) = unlisted {
            candle_core::bail!(
                "checkpoint: the block reads a trainable tensor {:?} that is not listed as its \
                 parameter; its gradient would be lost",
                v.shape()
            );
        }
        let grads = loss.backward()?;
        let mut cell = self.cell.lock().unwrap_or_else(|e| e.into_inner());
        for (slot, v) in cell.iter_mut().zip(&vars) {
            *slot = grads.get(v).cloned();
        }
        Ok(())
    }
}

/// A zero scalar (f32) on the device of `t`.
fn zero_like(t: &Tensor) -> Result<Tensor> {
    Tensor::zeros((), DType::F32, t.device())
}

/// One link of the tie chain: a zero scalar whose backward hands out the gradient of the
/// tied tensor (its last argument) from the cell.
struct Tie {
    index: usize,
    cell: Cell,
}

impl Tie {
    fn take(&self) -> Option<Tensor> {
        let mut cell = self.cell.lock().unwrap_or_else(|e| e.into_inner());
        cell.get_mut(self.index).and_then(Option::take)
    }
}

/// The forward of a tie on the device of `s`: a zero f32 scalar.
fn device_zero<S>(s: &S) -> Result<(S, Shape)>
where
    S: BackendStorage,
    S::Device: BackendDevice<Storage = S>,
{
    let shape = Shape::from(());
    Ok((s.device().zeros_impl(&shape, DType::F32)?, shape))
}

/// The forward of a tie on the CPU: a zero f32 scalar.
fn cpu_zero() -> Result<(CpuStorage, Shape)> {
    Ok((CpuStorage::F32(vec![0.0]), Shape::from(())))
}

impl CustomOp1 for Tie {
    fn name(&self) -> &'static str {
        "checkpoint-tie"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_zero()
    }
    fn cuda_fwd(&self, s: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        device_zero(s)
    }
    fn metal_fwd(&self, s: &MetalStorage, _: &Layout) -> Result<(MetalStorage, Shape)> {
        device_zero(s)
    }
    fn bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor) -> Result<Option<Tensor>> {
        Ok(self.take())
    }
}

impl CustomOp2 for Tie {
    fn name(&self) -> &'static str {
        "checkpoint-tie"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_zero()
    }
    fn cuda_fwd(
        &self,
        s: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        device_zero(s)
    }
    fn metal_fwd(
        &self,
        s: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        device_zero(s)
    }
    fn bwd(
        &self,
        prev: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(zero_like(prev)?), self.take()))
    }
}

/// The block's output on the last tie: the forward copies the value computed without a
/// graph; the backward recomputes the block (see the module docs).
struct Block {
    value: Taken,
    recompute: Recompute,
}

impl CustomOp1 for Block {
    fn name(&self) -> &'static str {
        "checkpoint"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.value.copy_out()
    }
    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.value.copy_out()
    }
    fn metal_fwd(&self, _: &MetalStorage, _: &Layout) -> Result<(MetalStorage, Shape)> {
        self.value.copy_out()
    }
    fn bwd(&self, tie: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        self.recompute.run(grad)?;
        Ok(Some(zero_like(tie)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use candle_core::Device;

    fn bits(t: &Tensor) -> Vec<u32> {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v.into_iter().map(f32::to_bits).collect()
    }

    /// A generator shared by the block and its [`Replay`].
    struct Shared(Arc<Mutex<Rng>>);

    impl Replay for Shared {
        fn capture(&self) -> Vec<[u64; 4]> {
            vec![self.0.lock().unwrap().state()]
        }
        fn restore(&self, state: &[[u64; 4]]) {
            *self.0.lock().unwrap() = Rng::from_state(state[0]);
        }
    }

    /// `silu(x w) ⊙ c ⊙ mask`, the mask drawn from `rng` (keep probability 1/2).
    fn block(w: Tensor, rng: Arc<Mutex<Rng>>) -> BlockFn {
        Box::new(move |t| {
            let h = crate::ops::silu(&t[0].matmul(&w)?)?.broadcast_mul(&t[1])?;
            let n = h.elem_count();
            let mask: Vec<f32> = {
                let mut r = rng.lock().unwrap();
                (0..n).map(|_| f32::from(r.uniform() < 0.5) * 2.0).collect()
            };
            let mask = Tensor::from_vec(mask, h.shape(), h.device())?;
            h * mask
        })
    }

    /// Loss and the gradients of `(x0, w, c)` for `x = 2·x0`, with the block checkpointed
    /// (`Some(replay?)`) or not (`None`).
    fn run(checkpointed: Option<bool>) -> (Vec<u32>, [Vec<u32>; 3], [u64; 4]) {
        let dev = Device::Cpu;
        let mut init = Rng::new(3);
        let x0 = Var::from_tensor(&init.randn((4, 6), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&init.randn((6, 3), &dev).unwrap()).unwrap();
        let c = Var::from_tensor(&init.randn((1, 3), &dev).unwrap()).unwrap();
        let rng = Arc::new(Mutex::new(Rng::new(11)));
        let x = x0.as_tensor().affine(2.0, 0.0).unwrap();
        let inputs = [x, c.as_tensor().clone()];
        let f = block(w.as_tensor().clone(), rng.clone());
        let y = match checkpointed {
            None => f(&inputs).unwrap(),
            Some(replay) => {
                let r = replay.then(|| Arc::new(Shared(rng.clone())) as Arc<dyn Replay>);
                checkpoint(&inputs, &[w.as_tensor().clone()], r, f).unwrap()
            }
        };
        let loss = y.sqr().unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        let grad = |v: &Var| bits(g.get(v.as_tensor()).unwrap());
        let state = rng.lock().unwrap().state();
        (bits(&loss), [grad(&x0), grad(&w), grad(&c)], state)
    }

    #[test]
    fn checkpointed_block_gives_bit_equal_gradients_and_replays_its_draws() {
        let plain = run(None);
        let ckpt = run(Some(true));
        assert_eq!(plain, ckpt);
        // Without replay the recompute draws other masks: same loss, other gradients, and
        // the generator has moved on twice.
        let (loss, grads, state) = run(Some(false));
        assert_eq!(loss, plain.0);
        assert_ne!(grads, plain.1);
        assert_ne!(state, plain.2);
    }

    #[test]
    fn untracked_block_runs_plainly_and_unlisted_parameters_are_an_error() {
        let dev = Device::Cpu;
        let x = Tensor::ones((2, 6), DType::F32, &dev).unwrap();
        let c = Tensor::ones((1, 3), DType::F32, &dev).unwrap();
        let w = Var::ones((6, 3), DType::F32, &dev).unwrap();
        let rng = Arc::new(Mutex::new(Rng::new(1)));
        let f = block(w.as_tensor().detach(), rng.clone());
        let y = checkpoint(&[x.clone(), c.clone()], &[], None, f).unwrap();
        assert!(!y.track_op());
        // `w` is trainable but not listed: the backward names the problem.
        let f = block(w.as_tensor().clone(), rng);
        let x = Var::from_tensor(&x).unwrap();
        let y = checkpoint(&[x.as_tensor().clone(), c], &[], None, f).unwrap();
        let e = y.sum_all().unwrap().backward().unwrap_err().to_string();
        assert!(e.contains("not listed") && e.contains("[6, 3]"), "{e}");
    }
}
