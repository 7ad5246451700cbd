//! Wall-clock totals per op and direction, for diagnosis: on when `LORA_OP_TIMES` is set in
//! the environment (then every fused op's forward and backward is timed, both inclusive of
//! the ops it calls and on its own, without the timed ops nested in it), a single relaxed
//! load otherwise. `lora bench train` prints the table.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Forward or backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Pass {
    /// The op's forward.
    Forward,
    /// The op's backward.
    Backward,
}

/// Per op and pass: inclusive time, own time (without nested scopes), calls.
type Totals = BTreeMap<(&'static str, Pass), (Duration, Duration, u64)>;

thread_local! {
    /// Time spent in scopes nested in the running one, on this thread.
    static NESTED: Cell<Duration> = const { Cell::new(Duration::ZERO) };
}

fn totals() -> &'static Mutex<Totals> {
    static T: OnceLock<Mutex<Totals>> = OnceLock::new();
    T.get_or_init(|| Mutex::new(BTreeMap::new()))
}

/// Whether op timing is on (`LORA_OP_TIMES` set).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("LORA_OP_TIMES").is_some())
}

/// Runs `f`, adding its wall time to `(name, pass)` when timing is on.
pub(crate) fn scope<R>(name: &'static str, pass: Pass, f: impl FnOnce() -> R) -> R {
    if !enabled() {
        return f();
    }
    let outer = NESTED.replace(Duration::ZERO);
    let t = Instant::now();
    let r = f();
    let dt = t.elapsed();
    let nested = NESTED.replace(outer + dt);
    let mut m = totals().lock().unwrap_or_else(|e| e.into_inner());
    let e = m.entry((name, pass)).or_default();
    e.0 += dt;
    e.1 += dt.saturating_sub(nested);
    e.2 += 1;
    r
}

/// One row of [`take`]: op name, pass, inclusive seconds, own seconds, calls.
pub type Row = (&'static str, Pass, f64, f64, u64);

/// The totals since the last call, largest own time first; clears them.
pub fn take() -> Vec<Row> {
    let mut m = totals().lock().unwrap_or_else(|e| e.into_inner());
    let mut rows: Vec<Row> = std::mem::take(&mut *m)
        .into_iter()
        .map(|((n, p), (d, own, c))| (n, p, d.as_secs_f64(), own.as_secs_f64(), c))
        .collect();
    rows.sort_by(|a, b| b.3.total_cmp(&a.3));
    rows
}
