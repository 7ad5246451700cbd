//! Gradient checkpointing of whole blocks (diffusers' `gradient_checkpointing`): a block's
//! trainable tensors and random generators are found through its layer walk, and the block
//! runs through [`crate::ops::checkpoint`].

use std::sync::Arc;

use candle_core::{Result, Tensor};

use crate::models::residual::LayerResidual;
use crate::models::walk::LayerWalk;
use crate::ops::{checkpoint, Replay};

/// The dropout generators of a block's residuals, captured and restored in walk order.
struct ResidualRandomState(Vec<Arc<dyn LayerResidual>>);

impl Replay for ResidualRandomState {
    fn capture(&self) -> Vec<[u64; 4]> {
        self.0.iter().filter_map(|r| r.random_state()).collect()
    }

    fn restore(&self, state: &[[u64; 4]]) {
        // Residuals sharing one generator all captured the same state, so setting each in
        // turn leaves every generator at its own captured state.
        let with_state = self.0.iter().filter(|r| r.random_state().is_some());
        for (r, s) in with_state.zip(state) {
            r.set_random_state(*s);
        }
    }
}

/// The trainable tensors of `block` (its layers' variable weights and biases and its
/// residuals' trainable tensors) and the residuals that draw random numbers.
fn block_state(block: &impl LayerWalk) -> (Vec<Tensor>, Vec<Arc<dyn LayerResidual>>) {
    let mut params = Vec::new();
    let mut random = Vec::new();
    block.walk(&mut |layer| {
        params.extend(layer.weight().is_variable().then(|| layer.weight().clone()));
        params.extend(layer.bias().filter(|b| b.is_variable()).cloned());
        for r in layer.residuals().attached() {
            params.extend(r.trainable());
            if r.random_state().is_some() {
                random.push(r);
            }
        }
    });
    (params, random)
}

/// `forward(block, inputs)`, checkpointed when `on` (see the module docs); `block` is
/// cloned (its tensors and residual slots are shared) so the backward can run it again.
pub(crate) fn run_block<B>(
    on: bool,
    block: &B,
    inputs: &[Tensor],
    forward: fn(&B, &[Tensor]) -> Result<Tensor>,
) -> Result<Tensor>
where
    B: LayerWalk + Clone + Send + Sync + 'static,
{
    if !on {
        return forward(block, inputs);
    }
    let (params, random) = block_state(block);
    let replay =
        (!random.is_empty()).then(|| Arc::new(ResidualRandomState(random)) as Arc<dyn Replay>);
    let block = block.clone();
    checkpoint(
        inputs,
        &params,
        replay,
        Box::new(move |t| forward(&block, t)),
    )
}
