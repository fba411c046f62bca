//! Fitting the linear policy-value model to self-play targets: mini-batch
//! gradient descent on the policy's cross-entropy against the search's
//! visit distribution and the value's squared error against the result.

use rand::SeedableRng;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::game::{COLUMNS, FEATURES};
use crate::model::{INPUTS, LinearModel, softmax};
use crate::records::Samples;

/// Training settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Passes over the data.
    pub epochs: u32,
    /// Positions per gradient step (the job's batch size).
    pub batch_size: usize,
    /// Step size.
    pub learning_rate: f32,
    /// L2 penalty on the weights (not the biases).
    pub weight_decay: f32,
    /// Seed of the shuffle.
    pub seed: u64,
}

/// Losses over the whole data, before and after training.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Losses {
    /// Mean cross-entropy of the policy against the visit distribution.
    pub policy: f32,
    /// Mean squared error of the value against the result.
    pub value: f32,
}

/// What a training run did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainReport {
    /// Positions trained on.
    pub samples: usize,
    /// Gradient steps taken.
    pub steps: u64,
    /// Losses of the starting model.
    pub before: Losses,
    /// Losses of the trained model.
    pub after: Losses,
}

fn position(samples: &Samples, i: usize) -> (&[f32; FEATURES], &[f32], f32) {
    let x = samples.x[i * FEATURES..(i + 1) * FEATURES]
        .try_into()
        .expect("a slice of FEATURES values is an array of FEATURES");
    (x, &samples.pi[i * COLUMNS..(i + 1) * COLUMNS], samples.z[i])
}

/// Mean losses of `model` on `samples`.
pub fn losses(model: &LinearModel, samples: &Samples) -> Losses {
    let n = samples.len().max(1) as f32;
    let (mut policy, mut value) = (0.0, 0.0);
    for i in 0..samples.len() {
        let (x, pi, z) = position(samples, i);
        let p = softmax(&model.logits(x));
        policy -= pi
            .iter()
            .zip(p)
            .map(|(t, p)| t * p.max(1e-7).ln())
            .sum::<f32>();
        let v = dot_value(model, x).tanh();
        value += (v - z) * (v - z);
    }
    Losses {
        policy: policy / n,
        value: value / n,
    }
}

fn dot_value(model: &LinearModel, x: &[f32; FEATURES]) -> f32 {
    model.value.iter().zip(x).map(|(w, x)| w * x).sum::<f32>() + model.value[FEATURES]
}

/// Trains `model` in place on `samples`.
pub fn train(model: &mut LinearModel, samples: &Samples, config: &TrainConfig) -> TrainReport {
    let before = losses(model, samples);
    let mut order: Vec<usize> = (0..samples.len()).collect();
    let mut rng = SmallRng::seed_from_u64(config.seed);
    let batch = config.batch_size.max(1);
    let mut steps = 0;
    for _ in 0..config.epochs {
        order.shuffle(&mut rng);
        for chunk in order.chunks(batch) {
            step(model, samples, chunk, config);
            steps += 1;
        }
    }
    TrainReport {
        samples: samples.len(),
        steps,
        before,
        after: losses(model, samples),
    }
}

/// One gradient step on the positions `chunk`.
fn step(model: &mut LinearModel, samples: &Samples, chunk: &[usize], config: &TrainConfig) {
    let mut grad_policy = vec![[0.0f32; INPUTS]; COLUMNS];
    let mut grad_value = [0.0f32; INPUTS];
    for &i in chunk {
        let (x, pi, z) = position(samples, i);
        let p = softmax(&model.logits(x));
        let v = dot_value(model, x).tanh();
        // d(cross-entropy)/d(logit c) = p_c - pi_c; d((tanh - z)^2)/d(pre) = 2 (v - z)(1 - v^2).
        let dv = 2.0 * (v - z) * (1.0 - v * v);
        for (k, &xk) in x.iter().enumerate().filter(|(_, x)| **x != 0.0) {
            for c in 0..COLUMNS {
                grad_policy[c][k] += (p[c] - pi[c]) * xk;
            }
            grad_value[k] += dv * xk;
        }
        for (c, grad) in grad_policy.iter_mut().enumerate() {
            grad[FEATURES] += p[c] - pi[c];
        }
        grad_value[FEATURES] += dv;
    }
    let scale = config.learning_rate / chunk.len().max(1) as f32;
    let decay = 1.0 - config.learning_rate * config.weight_decay;
    // Weight decay applies to the weights, not the bias (the last input).
    let update = |weights: &mut [f32], grad: &[f32; INPUTS]| {
        for (k, (w, g)) in weights.iter_mut().zip(grad).enumerate() {
            let keep = if k < FEATURES { decay } else { 1.0 };
            *w = *w * keep - scale * g;
        }
    };
    for (weights, grad) in model.policy.iter_mut().zip(&grad_policy) {
        update(weights, grad);
    }
    update(&mut model.value, &grad_value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::game::Board;
    use crate::records::{GameRecord, samples};

    #[test]
    fn training_fits_the_targets() {
        // Games in which the search always liked the middle column and the
        // first player won: the policy learns the middle, the value learns
        // that the first player (moving on an even count of stones) wins.
        let game = GameRecord {
            moves: vec![3, 2, 3, 2, 3, 2, 3],
            visits: vec![[0, 0, 1, 9, 0, 0, 0]; 7],
            outcome: crate::game::Outcome::FirstWins,
            round: 1,
            simulations: 10,
            batch_size: 4,
        };
        let data = samples(&game).expect("samples");
        let mut model = LinearModel::untrained();
        let config = TrainConfig {
            epochs: 200,
            batch_size: 4,
            learning_rate: 0.5,
            weight_decay: 1e-4,
            seed: 7,
        };
        let report = train(&mut model, &data, &config);
        assert!(
            report.after.policy < report.before.policy * 0.8,
            "{report:?}"
        );
        assert!(report.after.value < report.before.value * 0.5, "{report:?}");
        assert_eq!(report.steps, 200 * 4, "14 positions in batches of 4");
        assert_eq!(model.greedy_move(&Board::new()), Some(3));
        assert!(model.predict(&Board::new()).value > 0.5);
        model.check_shape().expect("finite weights");
    }
}
