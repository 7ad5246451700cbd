//! Process-level settings: allocator tuning, and the compute device and weight dtype named on
//! the command line or in a training config.

use anyhow::{bail, Context};
use candle_core::{DType, Device};

/// Parses `cpu`, `cuda`, `cuda:N` or `metal`.
pub fn parse_device(s: &str) -> anyhow::Result<Device> {
    let dev = match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0),
        "metal" => Device::new_metal(0),
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Device::new_cuda(n),
            _ => bail!("--device {s}: expected cpu, cuda, cuda:N or metal"),
        },
    };
    dev.with_context(|| format!("--device {s}: cannot open the device"))
}

/// Parses `f32`, `f16` or `bf16` (also `fp32`, `float32`, `fp16`, `float16`, `bfloat16`).
pub fn parse_dtype(s: &str) -> anyhow::Result<DType> {
    Ok(match s {
        "f32" | "fp32" | "float32" => DType::F32,
        "f16" | "fp16" | "float16" => DType::F16,
        "bf16" | "bfloat16" => DType::BF16,
        _ => bail!("--dtype {s}: expected f32, f16 or bf16"),
    })
}

/// Keeps freed memory in the process instead of returning it to the OS after every large
/// tensor: glibc serves allocations of 32 MB and up with a fresh `mmap`, so each large tensor
/// pays its page faults again (measured: softmax fwd+bwd on [1,8,1024,1024] 120 → 31 ms,
/// GroupNorm fwd+bwd 113 → 10 ms on 2 cores). No effect on other platforms, or when the
/// environment variable `LORA_ALLOCATOR=system` asks for glibc's defaults.
pub fn tune_allocator() {
    if std::env::var("LORA_ALLOCATOR").is_ok_and(|v| v == "system") {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before any threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Gives the heap's free pages back to the OS (glibc `malloc_trim`; nothing elsewhere): after
/// a large part of the model is freed, so that the resident size shows what is still in use.
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory of the allocator to the OS.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Memory the system can still give this process, in bytes (Linux `MemAvailable`; `None`
/// where it cannot be read).
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// An error when a workload estimated at `need` bytes cannot fit in the available memory
/// (with headroom for the model itself); `what` names it in the message.
pub fn check_memory(need: u64, what: &str) -> anyhow::Result<()> {
    let Some(avail) = available_memory() else {
        return Ok(());
    };
    if need > avail {
        bail!(
            "{what} needs ~{:.1} GB of activations, {:.1} GB available; choose a smaller size \
             or fewer images",
            need as f64 / 1e9,
            avail as f64 / 1e9
        );
    }
    Ok(())
}

/// Peak resident memory of this process in MB (Linux; 0 elsewhere).
pub fn peak_rss_mb() -> f64 {
    proc_status_mb("VmHWM:")
}

/// Resident memory of this process now, in MB (Linux; 0 elsewhere).
pub fn rss_mb() -> f64 {
    proc_status_mb("VmRSS:")
}

/// A `kB` field of /proc/self/status in MB.
fn proc_status_mb(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Memory in use on `dev` in MB (the device's total minus its free memory, so it counts
/// every process and the allocator's cached pool); `None` on the CPU and on Metal.
pub fn device_memory_in_use_mb(dev: &Device) -> Option<f64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(c) = dev {
        c.cuda_stream().context().bind_to_thread().ok()?;
        let (free, total) =
            candle_core::cuda_backend::cudarc::driver::result::mem_get_info().ok()?;
        return Some(total.saturating_sub(free) as f64 / 1e6);
    }
    let _ = dev;
    None
}

/// Resets the kernel's peak-RSS counter of this process (Linux; ignored elsewhere).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The system allocator, counting the bytes it holds for the program (live now and the peak
/// since [`HeapCounter::reset_peak`]): the binaries install it as their global allocator, so
/// benchmarks can tell the bytes an autograd graph keeps apart from the process's RSS.
pub struct HeapCounter;

static HEAP_LIVE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static HEAP_PEAK: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl HeapCounter {
    /// Bytes allocated and not yet freed (0 when the counter is not the global allocator).
    pub fn live() -> usize {
        HEAP_LIVE.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The most bytes live at once since the last [`HeapCounter::reset_peak`].
    pub fn peak() -> usize {
        HEAP_PEAK.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Starts a new peak from the bytes live now.
    pub fn reset_peak() {
        HEAP_PEAK.store(Self::live(), std::sync::atomic::Ordering::Relaxed);
    }

    fn add(n: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        let now = HEAP_LIVE.fetch_add(n, Relaxed) + n;
        HEAP_PEAK.fetch_max(now, Relaxed);
    }

    fn sub(n: usize) {
        HEAP_LIVE.fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged; only counters are kept.
unsafe impl std::alloc::GlobalAlloc for HeapCounter {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let p = unsafe { std::alloc::System.alloc(layout) };
        if !p.is_null() {
            Self::add(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        let p = unsafe { std::alloc::System.alloc_zeroed(layout) };
        if !p.is_null() {
            Self::add(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        unsafe { std::alloc::System.dealloc(ptr, layout) };
        Self::sub(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        let p = unsafe { std::alloc::System.realloc(ptr, layout, new) };
        if !p.is_null() {
            Self::sub(layout.size());
            Self::add(new);
        }
        p
    }
}
