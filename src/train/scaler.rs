//! Dynamic loss scaling for fp16 training (the scheme of PyTorch's `GradScaler`): the loss is
//! multiplied by a large scale before the backward pass so that small fp16 gradients do not
//! flush to zero; the gradients are divided by it again before the optimizer step. A step whose
//! gradients overflow (inf or NaN) is skipped and the scale halved; after `GROWTH_INTERVAL`
//! good steps in a row the scale doubles.

use serde::{Deserialize, Serialize};

/// The first scale (2¹⁶, as PyTorch).
pub const INIT_SCALE: f64 = 65536.0;
/// Good steps in a row before the scale doubles.
pub const GROWTH_INTERVAL: u32 = 2000;
/// Below this scale, overflowing steps are no longer fp16 range problems: training stops.
pub const MIN_SCALE: f64 = 1.0 / 65536.0;

/// The loss scale and its growth counter (saved in checkpoints).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    /// The current scale.
    pub scale: f64,
    /// Good steps since the last change.
    pub good_steps: u32,
}

impl Default for LossScaler {
    fn default() -> Self {
        Self {
            scale: INIT_SCALE,
            good_steps: 0,
        }
    }
}

/// What [`LossScaler::update`] decided.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScaleUpdate {
    /// The step is applied; the scale is unchanged.
    Kept,
    /// The step is applied and the scale doubled.
    Grew,
    /// The gradients overflowed: the step is skipped and the scale halved.
    Skipped,
}

impl LossScaler {
    /// Records one step whose gradients were finite (`overflow == false`) or not.
    pub fn update(&mut self, overflow: bool) -> ScaleUpdate {
        if overflow {
            self.scale *= 0.5;
            self.good_steps = 0;
            return ScaleUpdate::Skipped;
        }
        self.good_steps += 1;
        if self.good_steps >= GROWTH_INTERVAL {
            self.scale *= 2.0;
            self.good_steps = 0;
            return ScaleUpdate::Grew;
        }
        ScaleUpdate::Kept
    }

    /// Whether the scale has fallen so low that overflow cannot be a range problem.
    pub fn exhausted(&self) -> bool {
        self.scale < MIN_SCALE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_on_overflow_and_doubles_after_the_interval() {
        let mut s = LossScaler::default();
        assert_eq!(s.update(true), ScaleUpdate::Skipped);
        assert_eq!(s.scale, 32768.0);
        for _ in 0..GROWTH_INTERVAL - 1 {
            assert_eq!(s.update(false), ScaleUpdate::Kept);
        }
        assert_eq!(s.update(false), ScaleUpdate::Grew);
        assert_eq!((s.scale, s.good_steps), (65536.0, 0));
        s.update(false);
        s.update(true);
        assert_eq!((s.scale, s.good_steps), (32768.0, 0));
    }

    #[test]
    fn exhausted_after_enough_overflows() {
        let mut s = LossScaler::default();
        let mut n = 0;
        while !s.exhausted() {
            s.update(true);
            n += 1;
        }
        assert_eq!(n, 33);
    }
}
