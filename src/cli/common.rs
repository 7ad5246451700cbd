//! Options shared by several subcommands: device, dtype, progress bars.

pub use crate::sys::{parse_device, parse_dtype};
use indicatif::{ProgressBar, ProgressStyle};

/// A progress bar over `len` steps showing position, rate and ETA.
pub fn progress_bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    let style =
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec} ETA {eta} {prefix}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
    pb.set_style(style);
    pb.set_message(what.to_string());
    pb
}
