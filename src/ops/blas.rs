//! An optional BLAS, loaded at run time when `LORA_BLAS` names one, for the large f32 / f64
//! products on the CPU: the convolutions' patch products and the linear layers. Nothing links
//! against it; without it (the default) every product stays on the `gemm` crate (candle's
//! kernels and the worker-pool products of `pool_matmul`), with the same results to f32
//! rounding. `LORA_BLAS=openblas` loads the system OpenBLAS, `LORA_BLAS=/path/to/lib.so` any
//! CBLAS (`LORA_BLAS=libmkl_rt.so.2` runs Intel's MKL, `MKL_NUM_THREADS` sets its threads).
//! Calls are serialised by a lock (OpenBLAS runs each on its own threads).
//!
//! No library is loaded by default because none made the whole step faster on the CPUs
//! measured, 2 cores each, SD 1.5 UNet LoRA step at 512 px (Debian's OpenBLAS 0.3.21,
//! pthreads): on a Zen 3 EPYC (AVX2 only, its Zen kernels) 13.9-18.2 s with it against
//! 13.2-15.7 s without over five interleaved runs, and the SD block's step 218-232 ms against
//! 166-184 ms; on a Zen 5 EPYC (its AVX2 Haswell kernels) 15.3 s against 7.8 s; on a Zen 4
//! 6-8 % slower; on an Intel Xeon with AMX (its SkylakeX kernels) 20.0 s against 16.7 s.
//! Single products run faster on it on some of them (137-157 GFLOP/s on the Zen 3 against
//! the gemm crate's 100-105), but its idle threads yield in a loop between calls (system time
//! 22.7-28.6 s against 8.7-10.2 s per Zen 3 run) and starve the threads of every other op.

use candle_core::{DType, Device, Layout, Result, Storage, Tensor};
use std::sync::{Mutex, OnceLock};

/// `cblas_sgemm` / `cblas_dgemm`: order, transpositions, m, n, k, alpha, a, lda, b, ldb,
/// beta, c, ldc.
#[rustfmt::skip]
type GemmFn<T> = unsafe extern "C" fn(
    i32, i32, i32, i32, i32, i32, T, *const T, i32, *const T, i32, T, *mut T, i32,
);

/// The loaded library's entry points.
pub(crate) struct Lib {
    sgemm: GemmFn<f32>,
    dgemm: GemmFn<f64>,
    name: String,
    _lib: libloading::Library,
}

const ROW_MAJOR: i32 = 101;
const NO_TRANS: i32 = 111;
const TRANS: i32 = 112;

/// Smallest product (multiply-adds, `m·n·k` per batch item) sent to the BLAS: smaller ones
/// stay on candle's kernels, where the library's thread hand-off costs more than it saves,
/// and so the tiny models (the demo, the fixtures) compute bit for bit the same with or
/// without a BLAS installed.
pub(crate) const MIN_PRODUCT: usize = 1 << 24;

/// Library names tried in turn for `LORA_BLAS=openblas`.
const CANDIDATES: [&str; 3] = ["libopenblas.so.0", "libopenblas.so", "libopenblas.dylib"];

fn lib() -> Option<&'static Lib> {
    static LIB: OnceLock<Option<Lib>> = OnceLock::new();
    LIB.get_or_init(|| {
        let choice = std::env::var("LORA_BLAS").unwrap_or_default();
        if matches!(choice.as_str(), "" | "0" | "off" | "no" | "none") {
            return None;
        }
        if choice == "openblas" {
            let found = CANDIDATES.into_iter().find_map(|n| open(n).ok());
            if found.is_none() {
                eprintln!("warning: LORA_BLAS=openblas: no {CANDIDATES:?} found; products stay on the gemm crate");
            }
            return found;
        }
        // A library the user named that does not load is said, not silently skipped.
        open(&choice)
            .map_err(|e| {
                let why = std::error::Error::source(&e).map_or(e.to_string(), |s| s.to_string());
                eprintln!("warning: LORA_BLAS={choice}: {why}; products stay on the gemm crate")
            })
            .ok()
    })
    .as_ref()
}

fn open(name: &str) -> std::result::Result<Lib, libloading::Error> {
    // SAFETY: loading a BLAS runs its initialisers only; the symbols are looked up with
    // the signatures they are defined with (CBLAS, and OpenBLAS's `openblas_set_num_threads`
    // and `openblas_get_corename`, which returns a static NUL-terminated string or null).
    unsafe {
        let lib = libloading::Library::new(name)?;
        let sgemm = *lib.get::<GemmFn<f32>>(b"cblas_sgemm\0")?;
        let dgemm = *lib.get::<GemmFn<f64>>(b"cblas_dgemm\0")?;
        type SetThreads = unsafe extern "C" fn(i32);
        if let Ok(set) = lib.get::<SetThreads>(b"openblas_set_num_threads\0") {
            set(candle_core::utils::get_num_threads().max(1) as i32);
        }
        let mut base = std::path::Path::new(name)
            .file_name()
            .map_or(name.to_string(), |f| f.to_string_lossy().into_owned());
        type CoreName = unsafe extern "C" fn() -> *const std::ffi::c_char;
        let core = lib
            .get::<CoreName>(b"openblas_get_corename\0")
            .ok()
            .map(|f| f())
            .filter(|p| !p.is_null())
            .map(|p| {
                std::ffi::CStr::from_ptr(p)
                    .to_string_lossy()
                    .trim()
                    .to_string()
            });
        if let Some(c) = &core {
            base = format!("{base} ({c})");
        }
        Ok(Lib {
            sgemm,
            dgemm,
            name: base,
            _lib: lib,
        })
    }
}

/// The instruction set of the `gemm` crate's f32 kernels on this CPU, as it picks them at run
/// time: `AVX-512` (feature `x86-v4`), `AVX2+FMA`, `NEON`, or `portable`.
pub fn gemm_kernels() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            "AVX-512"
        } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            "AVX2+FMA"
        } else {
            "portable"
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        "NEON"
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        "portable"
    }
}

/// The BLAS in use (its file name, and the kernel family OpenBLAS runs), if one was found.
pub fn blas_name() -> Option<&'static str> {
    lib().map(|l| l.name.as_str())
}

/// One operand as CBLAS sees it: transposed or not, its leading dimension, and the
/// element offset between batch items.
#[derive(Clone, Copy)]
pub(crate) struct Operand {
    trans: i32,
    ld: usize,
    /// Elements between consecutive batch items (0: one matrix for every item).
    pub(crate) batch_stride: usize,
    /// Element offset of the first item in its storage.
    pub(crate) start: usize,
}

impl Operand {
    /// Row and column strides of the matrix, in elements.
    pub(crate) fn strides(&self) -> (usize, usize) {
        match self.trans {
            NO_TRANS => (self.ld, 1),
            _ => (1, self.ld),
        }
    }
}

/// `[.., r, c]` in `l` as a CBLAS operand: one unit stride in the last two dims, and every
/// leading dim folding into one batch stride (0 for a broadcast operand).
pub(crate) fn operand(l: &Layout) -> Option<(Operand, usize)> {
    let (dims, strides) = (l.dims(), l.stride());
    let rank = dims.len();
    if rank < 2 {
        return None;
    }
    let (r, c) = (dims[rank - 2], dims[rank - 1]);
    let (rs, cs) = (strides[rank - 2], strides[rank - 1]);
    let (trans, ld) = match (rs, cs) {
        (_, 1) if rs >= c.max(1) || r <= 1 => (NO_TRANS, rs.max(c).max(1)),
        (1, _) if cs >= r.max(1) || c <= 1 => (TRANS, cs.max(r).max(1)),
        _ => return None,
    };
    let mut batch = 1;
    let mut batch_stride = None;
    for i in (0..rank - 2).rev() {
        if dims[i] == 1 {
            continue;
        }
        // Outer dims must step over whole inner batches (a broadcast operand: all 0).
        match batch_stride {
            None => batch_stride = Some(strides[i]),
            Some(s) if strides[i] == s * batch => {}
            _ => return None,
        }
        batch *= dims[i];
    }
    let op = Operand {
        trans,
        ld,
        batch_stride: batch_stride.unwrap_or(0),
        start: l.start_offset(),
    };
    Some((op, batch))
}

/// `a @ b` through the BLAS for graph-free f32 / f64 CPU tensors of equal rank ≥ 2 whose
/// leading dims agree and fold to one batch stride, of at least [`MIN_PRODUCT`]
/// multiply-adds per item; `None` where it does not serve (no BLAS, another dtype or device,
/// an operand that tracks gradients, other layouts, smaller products).
pub(crate) fn matmul(a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    let Some(lib) = lib() else { return Ok(None) };
    if !graph_free_pair(a, b) {
        return Ok(None);
    }
    let rank = a.rank();
    let (m, k) = (a.dim(rank - 2)?, a.dim(rank - 1)?);
    let (kb, n) = (b.dim(rank - 2)?, b.dim(rank - 1)?);
    if k != kb || a.dims()[..rank - 2] != b.dims()[..rank - 2] {
        return Ok(None);
    }
    let limit = i32::MAX as usize;
    if m.max(n).max(k) >= limit || m * n * k < MIN_PRODUCT {
        return Ok(None);
    }
    let (ga, gb) = (a.storage_and_layout(), b.storage_and_layout());
    let (Some((oa, batch)), Some((ob, _))) = (operand(ga.1), operand(gb.1)) else {
        return Ok(None);
    };
    if [oa.ld, ob.ld, n].iter().any(|&x| x >= limit) {
        return Ok(None);
    }
    let mut shape = a.dims()[..rank - 2].to_vec();
    shape.extend([m, n]);
    let dims = (m, n, k, batch);
    let out = match (&*ga.0, &*gb.0) {
        (Storage::Cpu(sa), Storage::Cpu(sb)) => match a.dtype() {
            DType::F32 => {
                let (xa, xb) = (sa.as_slice::<f32>()?, sb.as_slice::<f32>()?);
                let c = run(dims, (xa, oa), (xb, ob), |p| {
                    // SAFETY: `run` checked every element each call reads and writes.
                    unsafe { f32::call(lib, p, 0.0) }
                })?;
                Tensor::from_vec(c, shape, &Device::Cpu)?
            }
            _ => {
                let (xa, xb) = (sa.as_slice::<f64>()?, sb.as_slice::<f64>()?);
                let c = run(dims, (xa, oa), (xb, ob), |p| {
                    // SAFETY: as above.
                    unsafe { f64::call(lib, p, 0.0) }
                })?;
                Tensor::from_vec(c, shape, &Device::Cpu)?
            }
        },
        _ => return Ok(None),
    };
    Ok(Some(out))
}

/// Whether `a`, `b` are graph-free f32 / f64 CPU tensors of one dtype and equal rank ≥ 2:
/// the operands a product outside candle's matmul may take.
pub(crate) fn graph_free_pair(a: &Tensor, b: &Tensor) -> bool {
    a.device().is_cpu()
        && a.dtype() == b.dtype()
        && matches!(a.dtype(), DType::F32 | DType::F64)
        && a.rank() == b.rank()
        && a.rank() >= 2
        && !a.track_op()
        && !b.track_op()
}

/// One CBLAS call: sizes, operands (pointer, transposition, leading dim), destination.
pub(crate) struct Call<T> {
    m: usize,
    n: usize,
    k: usize,
    a: (*const T, i32, usize),
    b: (*const T, i32, usize),
    c: *mut T,
}

/// Runs one product per batch item into a fresh `[batch, m, n]` buffer, after checking that
/// every operand element the calls reach lies inside its slice.
fn run<T: Copy + Default>(
    (m, n, k, batch): (usize, usize, usize, usize),
    (xa, oa): (&[T], Operand),
    (xb, ob): (&[T], Operand),
    call: impl Fn(Call<T>),
) -> Result<Vec<T>> {
    // The last element a call reads: (rows − 1)·ld + cols − 1 of the stored orientation.
    let span = |o: Operand, r: usize, c: usize| match o.trans {
        NO_TRANS => (r - 1) * o.ld + c,
        _ => (c - 1) * o.ld + r,
    };
    let reach =
        |o: Operand, r: usize, c: usize| o.start + (batch - 1) * o.batch_stride + span(o, r, c);
    if batch == 0 || reach(oa, m, k) > xa.len() || reach(ob, k, n) > xb.len() {
        candle_core::bail!("blas matmul: an operand's layout reaches past its storage");
    }
    let mut c = vec![T::default(); batch * m * n];
    let _guard = lock();
    for i in 0..batch {
        call(Call {
            m,
            n,
            k,
            a: (
                xa[oa.start + i * oa.batch_stride..].as_ptr(),
                oa.trans,
                oa.ld,
            ),
            b: (
                xb[ob.start + i * ob.batch_stride..].as_ptr(),
                ob.trans,
                ob.ld,
            ),
            c: c[i * m * n..].as_mut_ptr(),
        });
    }
    Ok(c)
}

/// Serialises calls into the library (its thread pool serves one call at a time).
fn lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The float types the library multiplies.
pub(crate) trait BlasFloat: Copy + Default + 'static {
    /// One.
    fn from_one() -> Self;
    /// `c = a @ b + beta · c` for one call.
    ///
    /// # Safety
    /// The pointers of `p` cover every element its sizes and leading dims reach.
    unsafe fn call(lib: &Lib, p: Call<Self>, beta: Self);
}

/// The `BlasFloat` impl of one float type through its CBLAS routine (`sgemm` / `dgemm`).
macro_rules! blas_float {
    ($t:ty, $f:ident) => {
        impl BlasFloat for $t {
            fn from_one() -> Self {
                1.0
            }
            unsafe fn call(lib: &Lib, p: Call<$t>, beta: $t) {
                let i = |x: usize| x as i32;
                let (m, n, k) = (i(p.m), i(p.n), i(p.k));
                let (a, b) = ((p.a.0, i(p.a.2)), (p.b.0, i(p.b.2)));
                (lib.$f)(
                    ROW_MAJOR, p.a.1, p.b.1, m, n, k, 1.0, a.0, a.1, b.0, b.1, beta, p.c, n,
                )
            }
        }
    };
}
blas_float!(f32, sgemm);
blas_float!(f64, dgemm);

/// Whether a BLAS is loaded.
pub(crate) fn available() -> bool {
    lib().is_some()
}

/// `c[m×n] (+)= a[m×k] @ b[k×n]` through the BLAS: `a` and `b` row-major with leading dims
/// `lda`, `ldb`, `c` contiguous; `acc` adds to `c`. `false` (nothing done) without a BLAS,
/// below [`MIN_PRODUCT`] or where a size exceeds CBLAS's 32-bit integers.
pub(crate) fn gemm_rows<T: BlasFloat>(
    (m, n, k): (usize, usize, usize),
    (a, lda): (&[T], usize),
    (b, ldb): (&[T], usize),
    c: &mut [T],
    acc: bool,
) -> bool {
    let Some(lib) = lib() else { return false };
    let limit = i32::MAX as usize;
    if [m, n, k, lda, ldb].iter().any(|&x| x >= limit) || m * n * k < MIN_PRODUCT {
        return false;
    }
    let fits = lda >= k
        && ldb >= n
        && a.len() >= (m - 1) * lda + k
        && b.len() >= (k - 1) * ldb + n
        && c.len() >= m * n;
    assert!(fits, "blas gemm_rows: operands shorter than their sizes");
    let p = Call {
        m,
        n,
        k,
        a: (a.as_ptr(), NO_TRANS, lda),
        b: (b.as_ptr(), NO_TRANS, ldb),
        c: c.as_mut_ptr(),
    };
    let beta = if acc { T::from_one() } else { T::default() };
    let _guard = lock();
    // SAFETY: checked above that the slices cover every element the call reaches.
    unsafe { T::call(lib, p, beta) };
    true
}
