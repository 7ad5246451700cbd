//! Exponential moving average of the trained weights (`--use-ema`, as diffusers' `EMAModel`
//! in its text-to-image trainer): after every optimizer step each shadow tensor moves towards
//! its weight, `shadow -= (1 - d) · (shadow - weight)`, with the warm-up decay
//! `d = min(decay, (1 + n) / (10 + n))` where `n` counts the updates before this one (so the
//! first update copies the weights). The shadow is what a full fine-tune saves.

use candle_core::{DType, Tensor, Var};
use std::collections::BTreeMap;

/// The moving averages of a set of named variables.
#[derive(Debug, Clone)]
pub struct Ema {
    decay: f64,
    updates: u64,
    shadow: BTreeMap<String, Tensor>,
}

/// Key of the update count in [`Ema::state`].
const UPDATES_KEY: &str = "ema.updates";

impl Ema {
    /// Shadows equal to the current values of `vars`, with the maximum decay `decay`.
    pub fn new(vars: &[(String, Var)], decay: f64) -> candle_core::Result<Self> {
        let shadow = vars
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().detach().copy()?)))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            decay,
            updates: 0,
            shadow,
        })
    }

    /// The decay of the next update.
    pub fn next_decay(&self) -> f64 {
        let n = self.updates as f64;
        ((1.0 + n) / (10.0 + n)).min(self.decay)
    }

    /// Number of updates so far.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// Moves every shadow towards its variable's current value.
    pub fn update(&mut self, vars: &[(String, Var)]) -> candle_core::Result<()> {
        let d = if self.updates == 0 {
            0.0
        } else {
            self.next_decay()
        };
        for (name, var) in vars {
            let Some(s) = self.shadow.get_mut(name) else {
                candle_core::bail!("EMA has no shadow for {name}");
            };
            let w = var.as_tensor().detach();
            *s = (s.affine(d, 0.0)? + w.affine(1.0 - d, 0.0)?)?;
        }
        self.updates += 1;
        Ok(())
    }

    /// The averaged tensors by variable name.
    pub fn weights(&self) -> &BTreeMap<String, Tensor> {
        &self.shadow
    }

    /// The state a checkpoint saves: the shadows under `ema.<name>` and the update count.
    pub fn state(&self) -> candle_core::Result<BTreeMap<String, Tensor>> {
        let mut m: BTreeMap<String, Tensor> = self
            .shadow
            .iter()
            .map(|(n, t)| (format!("ema.{n}"), t.clone()))
            .collect();
        let dev = self.shadow.values().next().map(|t| t.device().clone());
        let dev = dev.unwrap_or(candle_core::Device::Cpu);
        m.insert(
            UPDATES_KEY.into(),
            Tensor::new(&[self.updates as f64], &dev)?,
        );
        Ok(m)
    }

    /// Restores a [`Ema::state`]; every shadow must be present with its shape.
    pub fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> anyhow::Result<()> {
        for (name, s) in self.shadow.iter_mut() {
            let key = format!("ema.{name}");
            let t = state
                .get(&key)
                .ok_or_else(|| anyhow::anyhow!("the checkpoint's EMA state has no {key}"))?;
            if t.dims() != s.dims() {
                anyhow::bail!(
                    "the checkpoint's EMA tensor {key} has shape {:?}, the run has {:?}",
                    t.dims(),
                    s.dims()
                );
            }
            *s = t.to_dtype(s.dtype())?.to_device(s.device())?;
        }
        let n = state
            .get(UPDATES_KEY)
            .ok_or_else(|| anyhow::anyhow!("the checkpoint's EMA state has no {UPDATES_KEY}"))?;
        self.updates = n.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0] as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn follows_diffusers_warmup_decay() -> anyhow::Result<()> {
        let v = Var::new(&[1.0f32, 2.0], &Device::Cpu)?;
        let vars = vec![("w".to_string(), v.clone())];
        let mut ema = Ema::new(&vars, 0.5)?;
        v.set(&Tensor::new(&[3.0f32, 4.0], &Device::Cpu)?)?;
        ema.update(&vars)?; // first update copies
        assert_eq!(ema.weights()["w"].to_vec1::<f32>()?, vec![3.0, 4.0]);
        v.set(&Tensor::new(&[14.0f32, 15.0], &Device::Cpu)?)?;
        // n = 1: d = min(0.5, 2/11) = 2/11.
        ema.update(&vars)?;
        let d = 2.0f32 / 11.0;
        let got = ema.weights()["w"].to_vec1::<f32>()?;
        assert!(
            (got[0] - (3.0 * d + 14.0 * (1.0 - d))).abs() < 1e-5,
            "{got:?}"
        );
        // n = 10: (11/20) capped at 0.5.
        for _ in 2..10 {
            ema.update(&vars)?;
        }
        assert_eq!(ema.next_decay(), 0.5);
        let saved = ema.state()?;
        let mut other = Ema::new(&vars, 0.5)?;
        other.load_state(&saved)?;
        assert_eq!(other.updates(), 10);
        assert_eq!(
            other.weights()["w"].to_vec1::<f32>()?,
            ema.weights()["w"].to_vec1::<f32>()?
        );
        Ok(())
    }
}
