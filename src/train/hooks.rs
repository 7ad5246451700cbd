//! How a run talks to its caller: the interrupt flag, and notes and progress bars (silent with
//! `quiet`).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// What the caller of a run can set: an interrupt flag and quiet mode.
#[derive(Clone, Default)]
pub struct TrainHooks {
    /// Set (e.g. by a Ctrl-C handler) to stop after the current step with a checkpoint.
    pub interrupt: Arc<AtomicBool>,
    /// Print nothing (no progress bar, no notes).
    pub quiet: bool,
}

impl TrainHooks {
    /// Prints one note line on stderr (nothing when quiet).
    pub fn note(&self, msg: impl AsRef<str>) {
        if !self.quiet {
            eprintln!("{}", msg.as_ref());
        }
    }

    /// A progress bar of `len` steps labelled `what` (hidden when quiet): step, it/s, ETA.
    pub fn progress(&self, len: u64, what: &str) -> indicatif::ProgressBar {
        if self.quiet {
            return indicatif::ProgressBar::hidden();
        }
        let pb = indicatif::ProgressBar::new(len);
        let style = indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] step {pos}/{len} {per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> ");
        pb.set_style(style);
        pb.set_message(what.to_string());
        pb
    }
}
