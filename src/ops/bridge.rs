//! Device-agnostic plumbing for the custom ops, on candle's public storage API only.
//!
//! * [`Backend`] unifies `CpuStorage`, `CudaStorage` and `MetalStorage`, so one generic
//!   function serves `cpu_fwd`, `cuda_fwd` and `metal_fwd`.
//! * [`bridge1`] / [`bridge2`] / [`bridge3`] run a forward written with ordinary tensor ops
//!   inside a custom op: the input storages are copied into graph-free tensors, the function
//!   runs (candle's own kernels on that device), and the result is copied back out.
//! * [`attach`] is the straight-through pattern: a value computed with fast kernels on
//!   detached inputs is returned through a custom op whose forward copies it and whose
//!   backward is a hand-written closure.

use super::profile::Pass::Backward;
use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::op::BackpropOp;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, MetalStorage, Result,
    Shape, Storage, Tensor,
};
use std::sync::Mutex;

/// A storage type of one candle backend.
pub(crate) trait Backend: BackendStorage {
    /// Wraps the storage into candle's `Storage` enum.
    fn into_storage(self) -> Storage;
    /// This backend's storage inside a `Storage`, if it is that backend.
    fn view(s: &Storage) -> Option<&Self>;
    /// Fresh, uninitialised storage on the same device.
    fn alloc_like(&self, shape: &Shape, dtype: DType) -> Result<Self>;
}

/// Implements [`Backend`] for the storage type of the `Storage` variant `$variant`.
macro_rules! impl_backend {
    ($storage:ty, $variant:ident) => {
        impl Backend for $storage {
            fn into_storage(self) -> Storage {
                Storage::$variant(self)
            }
            fn view(s: &Storage) -> Option<&Self> {
                match s {
                    Storage::$variant(s) => Some(s),
                    _ => None,
                }
            }
            fn alloc_like(&self, shape: &Shape, dtype: DType) -> Result<Self> {
                // SAFETY: every caller overwrites the whole buffer with copy_strided_src.
                unsafe { self.device().alloc_uninit(shape, dtype) }
            }
        }
    };
}

impl_backend!(CpuStorage, Cpu);
impl_backend!(CudaStorage, Cuda);
impl_backend!(MetalStorage, Metal);

/// Copies the view `(s, l)` into a new contiguous, graph-free tensor.
pub(crate) fn to_tensor<S: Backend>(s: &S, l: &Layout) -> Result<Tensor> {
    let mut dst = s.alloc_like(l.shape(), s.dtype())?;
    s.copy_strided_src(&mut dst, 0, l)?;
    Ok(Tensor::from_storage(
        dst.into_storage(),
        l.shape().clone(),
        BackpropOp::none(),
        false,
    ))
}

/// Copies a tensor's values into fresh contiguous storage of backend `S`.
pub(crate) fn to_storage<S: Backend>(t: &Tensor) -> Result<(S, Shape)> {
    let (guard, l) = t.storage_and_layout();
    let s = match S::view(&guard) {
        Some(s) => s,
        None => candle_core::bail!(
            "custom op: result on {:?}, expected the input's device",
            t.device().location()
        ),
    };
    let mut dst = s.alloc_like(l.shape(), s.dtype())?;
    s.copy_strided_src(&mut dst, 0, l)?;
    Ok((dst, l.shape().clone()))
}

/// Runs a tensor-level forward on one storage (see the module docs).
pub(crate) fn bridge1<S: Backend>(
    s: &S,
    l: &Layout,
    f: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<(S, Shape)> {
    to_storage(&f(&to_tensor(s, l)?)?)
}

/// Runs a tensor-level forward on two storages.
pub(crate) fn bridge2<S: Backend>(
    (s1, l1): (&S, &Layout),
    (s2, l2): (&S, &Layout),
    f: impl FnOnce(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<(S, Shape)> {
    to_storage(&f(&to_tensor(s1, l1)?, &to_tensor(s2, l2)?)?)
}

/// Runs a tensor-level forward on three storages.
pub(crate) fn bridge3<S: Backend>(
    (s1, l1): (&S, &Layout),
    (s2, l2): (&S, &Layout),
    (s3, l3): (&S, &Layout),
    f: impl FnOnce(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
) -> Result<(S, Shape)> {
    let (t1, t2, t3) = (to_tensor(s1, l1)?, to_tensor(s2, l2)?, to_tensor(s3, l3)?);
    to_storage(&f(&t1, &t2, &t3)?)
}

/// The gradient closure of [`attach`]: `(arg, grad_of_output) -> grad_of_arg`.
pub(crate) type AttachBwd = Box<dyn Fn(&Tensor, &Tensor) -> Result<Option<Tensor>> + Send + Sync>;

/// Custom op whose forward copies a precomputed value and whose backward is a closure.
/// The value is released once copied, so the graph does not hold it twice.
struct Attach {
    name: &'static str,
    value: Taken,
    bwd: AttachBwd,
}

impl Attach {
    fn fwd<S: Backend>(&self) -> Result<(S, Shape)> {
        self.value.copy_out()
    }
}

/// A value that the forward of [`Attach`] / [`Attach3`] copies out exactly once.
pub(crate) struct Taken(Mutex<Option<Tensor>>);

impl Taken {
    pub(crate) fn new(t: Tensor) -> Self {
        Self(Mutex::new(Some(t)))
    }

    pub(crate) fn copy_out<S: Backend>(&self) -> Result<(S, Shape)> {
        let value = match self.0.lock() {
            Ok(mut guard) => guard.take(),
            Err(_) => None,
        };
        match value {
            Some(v) => to_storage(&v),
            None => candle_core::bail!("attach: the forward of this op ran twice"),
        }
    }
}

impl CustomOp1 for Attach {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.fwd()
    }
    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.fwd()
    }
    fn metal_fwd(&self, _: &MetalStorage, _: &Layout) -> Result<(MetalStorage, Shape)> {
        self.fwd()
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        super::profile::scope(self.name, Backward, || (self.bwd)(arg, grad))
    }
}

/// Returns `value` (computed from `arg.detach()`), made differentiable w.r.t. `arg` with
/// the gradient `bwd(arg, grad)`. When `arg` is outside any graph, `value` itself.
pub(crate) fn attach(
    arg: &Tensor,
    value: Tensor,
    name: &'static str,
    bwd: AttachBwd,
) -> Result<Tensor> {
    if !arg.track_op() {
        return Ok(value);
    }
    let value = Taken::new(value);
    arg.apply_op1(Attach { name, value, bwd })
}

/// The gradient closure of [`attach2`]: `(args, grad_of_output) -> grads of the args`.
pub(crate) type Attach2Bwd =
    Box<dyn Fn([&Tensor; 2], &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> + Send + Sync>;

/// [`Attach`] with two arguments.
struct Attach2 {
    name: &'static str,
    value: Taken,
    bwd: Attach2Bwd,
}

impl CustomOp2 for Attach2 {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.value.copy_out()
    }
    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.value.copy_out()
    }
    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        self.value.copy_out()
    }
    fn bwd(
        &self,
        a1: &Tensor,
        a2: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        super::profile::scope(self.name, Backward, || (self.bwd)([a1, a2], grad))
    }
}

/// [`attach`] for a value computed from two (detached) arguments.
pub(crate) fn attach2(
    args: [&Tensor; 2],
    value: Tensor,
    name: &'static str,
    bwd: Attach2Bwd,
) -> Result<Tensor> {
    if !args.iter().any(|a| a.track_op()) {
        return Ok(value);
    }
    let value = Taken::new(value);
    args[0].apply_op2(args[1], Attach2 { name, value, bwd })
}

/// The gradient closure of [`attach_n`]: `(args, grad_of_output) -> one gradient per arg`.
pub(crate) type AttachNBwd =
    Box<dyn Fn(&[&Tensor], &Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync>;

/// [`attach`] for a value computed from one to three (detached) arguments; `bwd` returns
/// one gradient (or `None`) per argument, in order.
pub(crate) fn attach_n(
    args: &[&Tensor],
    value: Tensor,
    name: &'static str,
    bwd: AttachNBwd,
) -> Result<Tensor> {
    let take = move |mut v: Vec<Option<Tensor>>, n: usize| -> Result<Vec<Option<Tensor>>> {
        if v.len() != n {
            candle_core::bail!("{name}: {} gradients for {n} arguments", v.len());
        }
        v.reverse();
        Ok(v)
    };
    match *args {
        [a] => attach(
            a,
            value,
            name,
            Box::new(move |a, g| Ok(take(bwd(&[a], g)?, 1)?.pop().flatten())),
        ),
        [a, b] => attach2(
            [a, b],
            value,
            name,
            Box::new(move |[a, b], g| {
                let mut v = take(bwd(&[a, b], g)?, 2)?;
                Ok((v.pop().flatten(), v.pop().flatten()))
            }),
        ),
        [a, b, c] => attach3(
            [a, b, c],
            value,
            name,
            Box::new(move |[a, b, c], g| {
                let mut v = take(bwd(&[a, b, c], g)?, 3)?;
                Ok((v.pop().flatten(), v.pop().flatten(), v.pop().flatten()))
            }),
        ),
        _ => candle_core::bail!("{name}: 1 to 3 arguments, got {}", args.len()),
    }
}

/// The gradient closure of [`attach3`]: `(args, grad_of_output) -> grads of the args`.
pub(crate) type Attach3Bwd = Box<dyn Fn([&Tensor; 3], &Tensor) -> Result<Grads3> + Send + Sync>;

/// The gradient closure of [`attach3_out`]: `(args, output, grad_of_output) -> grads`.
pub(crate) type Attach3OutBwd =
    Box<dyn Fn([&Tensor; 3], &Tensor, &Tensor) -> Result<Grads3> + Send + Sync>;

/// [`Attach`] with three arguments.
struct Attach3 {
    name: &'static str,
    value: Taken,
    bwd: Attach3OutBwd,
}

impl CustomOp3 for Attach3 {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.value.copy_out()
    }
    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.value.copy_out()
    }
    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        self.value.copy_out()
    }
    #[allow(clippy::type_complexity)]
    fn bwd(
        &self,
        a1: &Tensor,
        a2: &Tensor,
        a3: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        super::profile::scope(self.name, Backward, || (self.bwd)([a1, a2, a3], res, grad))
    }
}

/// [`attach`] for a value computed from three (detached) arguments.
pub(crate) fn attach3(
    args: [&Tensor; 3],
    value: Tensor,
    name: &'static str,
    bwd: Attach3Bwd,
) -> Result<Tensor> {
    attach3_out(args, value, name, Box::new(move |a, _, g| bwd(a, g)))
}

/// [`attach3`] whose backward also reads the op's output (the graph's own result tensor,
/// so reading it keeps nothing extra alive).
pub(crate) fn attach3_out(
    args: [&Tensor; 3],
    value: Tensor,
    name: &'static str,
    bwd: Attach3OutBwd,
) -> Result<Tensor> {
    if !args.iter().any(|a| a.track_op()) {
        return Ok(value);
    }
    let value = Taken::new(value);
    args[0].apply_op3(args[1], args[2], Attach3 { name, value, bwd })
}

/// Runs a tensor-level norm backward `f(x, w, g) -> (dx, dw, db)` on three storages,
/// returning the flat `[dx.., dw.., db..]` that [`split_grads`] takes apart.
pub(crate) fn bridge3_grads<S: Backend>(
    x: (&S, &Layout),
    w: (&S, &Layout),
    g: (&S, &Layout),
    f: impl FnOnce(&Tensor, &Tensor, &Tensor) -> Result<(Tensor, Tensor, Tensor)>,
) -> Result<(S, Shape)> {
    bridge3(x, w, g, |x, w, g| {
        let (dx, dw, db) = f(x, w, g)?;
        Tensor::cat(&[dx.flatten_all()?, dw, db], 0)
    })
}

/// Splits the flat `[dx.., dw.., db..]` output of a fused norm backward into `dx` (shaped
/// like `x`) and the `c`-element `dw` and `db`.
pub(crate) fn split_grads(flat: &Tensor, x: &Tensor, c: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let len = x.elem_count();
    Ok((
        flat.narrow(0, 0, len)?.reshape(x.shape())?,
        flat.narrow(0, len, c)?,
        flat.narrow(0, len + c, c)?,
    ))
}

/// Expands, inside an `impl CustomOp2`/`CustomOp3` block (`$this` names the `self` of the
/// generated methods), to a `cpu_fwd` that binds the `(storage, layout)` inputs to the
/// given names and, for f32 / f64 inputs (when the optional guard holds), runs `$kernel`
/// with `$T` set to that float type; otherwise, and in `cuda_fwd` / `metal_fwd`, it calls
/// the op's generic `self.any(..)` (its tensor-op fallback).
macro_rules! fwd_via_kernel {
    ($this:ident, ($a:ident, $b:ident) $(if $guard:expr)?, $T:ident => $kernel:expr) => {
        $crate::ops::bridge::fwd_via_kernel!(@cpu $this, [(s1, l1, $a) (s2, l2, $b)]
            $(if $guard)?, $T => $kernel);
    };
    ($this:ident, ($a:ident, $b:ident, $c:ident) $(if $guard:expr)?, $T:ident => $kernel:expr) => {
        $crate::ops::bridge::fwd_via_kernel!(@cpu $this, [(s1, l1, $a) (s2, l2, $b) (s3, l3, $c)]
            $(if $guard)?, $T => $kernel);
    };
    (@cpu $this:ident, [($s0:ident, $l0:ident, $a0:ident) $(($s:ident, $l:ident, $a:ident))+]
        $(if $guard:expr)?, $T:ident => $kernel:expr) => {
        fn cpu_fwd(
            &$this,
            $s0: &candle_core::CpuStorage,
            $l0: &candle_core::Layout,
            $($s: &candle_core::CpuStorage, $l: &candle_core::Layout,)+
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            let ($a0, $($a),+) = (($s0, $l0), $(($s, $l)),+);
            match $s0.dtype() {
                candle_core::DType::F32 $(if $guard)? => {
                    type $T = f32;
                    $kernel
                }
                candle_core::DType::F64 $(if $guard)? => {
                    type $T = f64;
                    $kernel
                }
                _ => $this.any($a0, $($a),+),
            }
        }
        $crate::ops::bridge::fwd_via_kernel!(@gpu cuda_fwd, candle_core::CudaStorage,
            [($s0, $l0) $(($s, $l))+]);
        $crate::ops::bridge::fwd_via_kernel!(@gpu metal_fwd, candle_core::MetalStorage,
            [($s0, $l0) $(($s, $l))+]);
    };
    (@gpu $name:ident, $St:ty, [$(($s:ident, $l:ident))+]) => {
        fn $name(
            &self,
            $($s: &$St, $l: &candle_core::Layout,)+
        ) -> candle_core::Result<($St, candle_core::Shape)> {
            self.any($(($s, $l)),+)
        }
    };
}
pub(crate) use fwd_via_kernel;

/// Gradients of three arguments, each only where asked for.
pub(crate) type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

/// A backward on three graph-free arguments (in the op's compute dtype): which of them need
/// a gradient, and the output gradient.
pub(crate) type TrackedBwd3 =
    Box<dyn Fn([&Tensor; 3], [bool; 3], &Tensor) -> Result<Grads3> + Send + Sync>;

/// The backward of a norm op on `(x, weight, bias)` for the output gradient `g`: the
/// graph-free fused op `fused_bwd` on `(x, weight, grad)` when given, else `generic`
/// `(x, weight, grad) -> (dx, dw, db)`; each gradient is kept only where `track` says.
pub(crate) fn norm_grads(
    [x, w, _]: [&Tensor; 3],
    track: [bool; 3],
    g: &Tensor,
    fused_bwd: Option<&impl CustomOp3>,
    generic: impl FnOnce(&Tensor, &Tensor, &Tensor) -> Result<(Tensor, Tensor, Tensor)>,
) -> Result<Grads3> {
    let g = g.to_dtype(x.dtype())?.contiguous()?;
    let (dx, dw, db) = match fused_bwd {
        Some(op) => split_grads(&x.apply_op3_no_bwd(w, &g, op)?, x, w.elem_count())?,
        None => generic(x, w, &g)?,
    };
    Ok((
        track[0].then_some(dx),
        track[1].then_some(dw),
        track[2].then_some(db),
    ))
}

/// An op (the norms' `(x, weight, bias)`) computed in `cd` on half-precision arguments, so
/// that the graph keeps the half arguments rather than their `cd` copies: `fwd` runs on
/// graph-free `cd` copies and its output is cast back; the backward casts the arguments
/// again, calls `bwd` and casts each gradient to its argument's dtype.
pub(crate) fn keep_half(
    args: [&Tensor; 3],
    cd: DType,
    name: &'static str,
    fwd: impl FnOnce([&Tensor; 3]) -> Result<Tensor>,
    bwd: TrackedBwd3,
) -> Result<Tensor> {
    let up = move |t: &Tensor| t.detach().to_dtype(cd)?.contiguous();
    let y = {
        let (x, w, b) = (up(args[0])?, up(args[1])?, up(args[2])?);
        fwd([&x, &w, &b])?.to_dtype(args[0].dtype())?
    };
    let f = move |[x, w, b]: [&Tensor; 3], g: &Tensor| {
        let (xc, wc, bc) = (up(x)?, up(w)?, up(b)?);
        let track = [x.track_op(), w.track_op(), b.track_op()];
        let (dx, dw, db) = bwd([&xc, &wc, &bc], track, g)?;
        let back =
            |t: Option<Tensor>, like: &Tensor| t.map(|t| t.to_dtype(like.dtype())).transpose();
        Ok((back(dx, x)?, back(dw, w)?, back(db, b)?))
    };
    attach3(args, y, name, Box::new(f))
}
