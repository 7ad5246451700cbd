//! NumPy-exact timestep spacings and sigma helpers shared by the schedulers.

use super::config::{SchedulerConfig, TimestepSpacing};

/// `np.linspace(start, stop, n)` (float64): `i·step + start`, last value exactly `stop`.
pub fn np_linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    if n == 0 {
        return Vec::new();
    }
    if n == 1 {
        return vec![start];
    }
    let step = (stop - start) / (n - 1) as f64;
    let mut y: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
    y[n - 1] = stop;
    y
}

/// `np.arange(start, stop, step)` for float arguments: length `ceil((stop − start)/step)`,
/// values `start + i·((start + step) − start)`.
pub fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let delta = (start + step) - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => start + step,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// Descending inference timesteps of DDPM / DDIM / Euler / Euler-a (`set_timesteps`), as
/// floats before any integer cast; `round_linspace` is false for Euler, whose linspace
/// timesteps stay fractional. Negative values that NumPy's `arange` length rounding can
/// produce for "trailing" (e.g. 61 steps gives a 62nd timestep −1) are dropped.
pub fn spaced_timesteps(
    spacing: TimestepSpacing,
    num_train: usize,
    steps: usize,
    steps_offset: usize,
    round_linspace: bool,
) -> Vec<f64> {
    let t = num_train as f64;
    let out: Vec<f64> = match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, t - 1.0, steps)
            .into_iter()
            .rev()
            .map(|v| {
                if round_linspace {
                    v.round_ties_even()
                } else {
                    v
                }
            })
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = num_train / steps;
            (0..steps)
                .rev()
                .map(|i| (i * ratio + steps_offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => np_arange(t, 0.0, -(t / steps as f64))
            .into_iter()
            .map(|v| v.round_ties_even() - 1.0)
            .collect(),
    };
    out.into_iter().filter(|&v| v >= 0.0).collect()
}

/// Training sigmas `((1 − ᾱ)/ᾱ)^½` computed in float32 as diffusers does.
pub fn train_sigmas(alphas_cumprod: &[f64]) -> Vec<f64> {
    alphas_cumprod
        .iter()
        .map(|&a| {
            let a = a as f32;
            f64::from(((1.0f32 - a) / a).sqrt())
        })
        .collect()
}

/// `np.interp(x, arange(len(fp)), fp)`.
pub fn interp(x: f64, fp: &[f64]) -> f64 {
    let n = fp.len();
    if n == 0 || x.is_nan() {
        return f64::NAN;
    }
    if x <= 0.0 {
        return fp[0];
    }
    if x >= (n - 1) as f64 {
        return fp[n - 1];
    }
    let j = x.floor() as usize;
    if x == j as f64 {
        return fp[j];
    }
    let slope = (fp[j + 1] - fp[j]) / 1.0;
    slope * (x - j as f64) + fp[j]
}

/// `_sigma_to_t`: the fractional training timestep whose log-sigma matches `sigma`
/// (`log_sigmas` holds float32 logs of the training sigmas, ascending).
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let n = log_sigmas.len();
    let log_sigma = sigma.max(1e-10).ln();
    // argmax of cumsum(dists >= 0): the first index where the running count peaks.
    let (mut count, mut best, mut low_idx) = (0usize, 0usize, 0usize);
    for (i, &ls) in log_sigmas.iter().enumerate() {
        if log_sigma - ls >= 0.0 {
            count += 1;
        }
        if count > best {
            best = count;
            low_idx = i;
        }
    }
    let low_idx = low_idx.min(n - 2);
    let high_idx = low_idx + 1;
    let (low, high) = (log_sigmas[low_idx], log_sigmas[high_idx]);
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// Float32 natural logs of the training sigmas (`np.log` of a float32 array).
pub fn log_sigmas(train_sigmas: &[f64]) -> Vec<f64> {
    train_sigmas
        .iter()
        .map(|&s| f64::from((s.ln()) as f32))
        .collect()
}

/// Karras et al. (2022) sigmas, ρ = 7, from `sigma_max` down to `sigma_min`.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let min_inv = sigma_min.powf(1.0 / rho);
    let max_inv = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// Exponentially spaced sigmas from `sigma_max` down to `sigma_min`.
pub fn exponential_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    np_linspace(sigma_max.ln(), sigma_min.ln(), n)
        .into_iter()
        .map(f64::exp)
        .collect()
}

/// Index of `timestep` in `schedule` the way diffusers' `index_for_timestep` picks it: the
/// second match when there are several (so a restarted img2img schedule does not skip a
/// sigma), the only match otherwise.
pub fn index_for_timestep(schedule: &[f64], timestep: f64) -> Option<usize> {
    let mut hits = schedule
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == timestep)
        .map(|(i, _)| i);
    let first = hits.next()?;
    Some(hits.next().unwrap_or(first))
}

/// The integer timesteps DDIM / DDPM run: `spacing` over the training range, offset by
/// `steps_offset` (diffusers' `set_timesteps` of the discrete schedulers).
pub fn discrete_timesteps(config: &SchedulerConfig, num_inference_steps: usize) -> Vec<f64> {
    spaced_timesteps(
        config.spacing_or(TimestepSpacing::Leading),
        config.num_train_timesteps,
        num_inference_steps,
        config.steps_offset,
        true,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spacings_match_diffusers_examples() {
        let lead = spaced_timesteps(TimestepSpacing::Leading, 1000, 10, 1, true);
        assert_eq!(
            lead,
            vec![901., 801., 701., 601., 501., 401., 301., 201., 101., 1.]
        );
        let trail = spaced_timesteps(TimestepSpacing::Trailing, 1000, 4, 0, true);
        assert_eq!(trail, vec![999., 749., 499., 249.]);
        // 1000/16 = 62.5: round half to even like np.round.
        let trail16 = spaced_timesteps(TimestepSpacing::Trailing, 1000, 16, 0, true);
        assert_eq!(trail16[1], 937.0); // round(937.5) = 938, minus 1
        assert_eq!(trail16[3], 811.0); // round(812.5) = 812 (half to even), minus 1
        let lin = spaced_timesteps(TimestepSpacing::Linspace, 1000, 4, 0, true);
        assert_eq!(lin, vec![999., 666., 333., 0.]);
        let lin = spaced_timesteps(TimestepSpacing::Linspace, 1000, 3, 0, false);
        assert_eq!(lin, vec![999., 499.5, 0.]);
        // NumPy's arange gives 62 values for 61 steps; the trailing -1 is dropped.
        assert_eq!(
            spaced_timesteps(TimestepSpacing::Trailing, 1000, 61, 0, true).len(),
            61
        );
    }

    #[test]
    fn interp_and_sigma_to_t_invert() {
        let fp: Vec<f64> = (0..10).map(|i| 0.1 * (i as f64 + 1.0)).collect();
        assert_eq!(interp(2.0, &fp), fp[2]);
        assert!((interp(2.5, &fp) - 0.35).abs() < 1e-12);
        assert_eq!(interp(-1.0, &fp), fp[0]);
        assert_eq!(interp(20.0, &fp), fp[9]);
        let logs: Vec<f64> = fp.iter().map(|v: &f64| v.ln()).collect();
        assert!((sigma_to_t(fp[4], &logs) - 4.0).abs() < 1e-12);
        assert_eq!(sigma_to_t(1e-3, &logs), 0.0);
        assert_eq!(sigma_to_t(100.0, &logs), 9.0);
    }

    #[test]
    fn karras_endpoints() {
        let s = karras_sigmas(0.03, 14.6, 5);
        assert!((s[0] - 14.6).abs() < 1e-12 && (s[4] - 0.03).abs() < 1e-12);
        assert!(s.windows(2).all(|w| w[0] > w[1]));
    }

    #[test]
    fn index_prefers_second_duplicate() {
        assert_eq!(index_for_timestep(&[5.0, 3.0, 3.0, 1.0], 3.0), Some(2));
        assert_eq!(index_for_timestep(&[5.0, 3.0, 1.0], 1.0), Some(2));
        assert_eq!(index_for_timestep(&[5.0], 2.0), None);
    }
}
