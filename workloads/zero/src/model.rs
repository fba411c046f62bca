//! Policy-value functions the search asks about its leaves.
//!
//! Without libtorch the model is linear: a softmax policy over the columns
//! and a tanh value, each a weight vector over [`Board::features`] plus a
//! bias. It is small enough to fit on two CPU cores in seconds and real
//! enough to learn "play in the middle" and simple threats from search
//! targets. The search values leaves by random rollouts
//! ([`RolloutEvaluator`]); the linear value head is trained and reported but
//! the rollout is the stronger estimate at this size.

use rand::Rng;
use rand::rngs::SmallRng;
use serde::{Deserialize, Serialize};

use crate::game::{Board, COLUMNS, FEATURES};

/// What the network says about one position.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    /// Prior over the columns (any non-negative weights; the search masks
    /// illegal moves and normalises).
    pub policy: [f32; COLUMNS],
    /// Expected result for the player to move, in [-1, 1].
    pub value: f32,
}

/// An evaluator that could not answer (a network's libtorch failure, such
/// as running out of GPU memory): the search stops with it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("evaluating positions: {0}")]
pub struct EvalError(pub String);

/// Evaluates many positions at once: one call per batch of leaves.
pub trait Evaluator {
    /// One evaluation per board, in order.
    fn evaluate(&mut self, boards: &[Board]) -> Result<Vec<Evaluation>, EvalError>;
}

/// Inputs per head: the features and a bias.
pub const INPUTS: usize = FEATURES + 1;

/// A linear policy-value model (see the module documentation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinearModel {
    /// `policy[c]`: weights of column `c`'s logit (the last one is the bias).
    pub policy: Vec<Vec<f32>>,
    /// Weights of the value (the last one is the bias).
    pub value: Vec<f32>,
}

impl Default for LinearModel {
    fn default() -> Self {
        LinearModel::untrained()
    }
}

impl LinearModel {
    /// All weights zero: a uniform policy and a value of 0.
    pub fn untrained() -> LinearModel {
        LinearModel {
            policy: vec![vec![0.0; INPUTS]; COLUMNS],
            value: vec![0.0; INPUTS],
        }
    }

    /// Whether the shapes are those of this game (a model file from another
    /// game or a truncated one is refused, not padded).
    pub fn check_shape(&self) -> Result<(), String> {
        if self.policy.len() != COLUMNS || self.policy.iter().any(|w| w.len() != INPUTS) {
            return Err(format!("policy weights are not {COLUMNS}x{INPUTS}"));
        }
        if self.value.len() != INPUTS {
            return Err(format!("value weights are not {INPUTS} long"));
        }
        if self
            .policy
            .iter()
            .flatten()
            .chain(&self.value)
            .any(|w| !w.is_finite())
        {
            return Err("a weight is not finite".into());
        }
        Ok(())
    }

    /// Policy logits for a feature vector.
    pub fn logits(&self, features: &[f32; FEATURES]) -> [f32; COLUMNS] {
        std::array::from_fn(|c| dot(&self.policy[c], features))
    }

    /// Softmax policy and tanh value.
    pub fn predict(&self, board: &Board) -> Evaluation {
        let features = board.features();
        Evaluation {
            policy: softmax(&self.logits(&features)),
            value: dot(&self.value, &features).tanh(),
        }
    }

    /// The legal column the policy likes best (no search): how well the
    /// model plays by itself.
    pub fn greedy_move(&self, board: &Board) -> Option<usize> {
        let logits = self.logits(&board.features());
        (0..COLUMNS)
            .filter(|&c| board.is_legal(c))
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
    }
}

/// `weights . features + bias` (the bias is the last weight).
fn dot(weights: &[f32], features: &[f32; FEATURES]) -> f32 {
    let bias = weights.get(FEATURES).copied().unwrap_or(0.0);
    weights
        .iter()
        .zip(features)
        .map(|(w, x)| w * x)
        .sum::<f32>()
        + bias
}

/// A model file: the weights and what they were trained on. Written
/// atomically as JSON (`models/candidate.bin`, `models/best.bin`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelFile {
    /// Always [`ModelFile::FORMAT`]; another value is refused.
    pub format: String,
    /// The round whose training produced it (0: untrained).
    pub round: u32,
    /// Rounds whose games it was trained on (this one included).
    pub trained_on: Vec<u32>,
    /// Positions it was trained on in its last training.
    pub samples: usize,
    /// The weights.
    pub model: LinearModel,
}

impl ModelFile {
    /// The format tag of this version.
    pub const FORMAT: &'static str = "gantry-zero-linear-v1";

    /// The untrained model (round 0).
    pub fn untrained() -> ModelFile {
        ModelFile {
            format: Self::FORMAT.into(),
            round: 0,
            trained_on: Vec::new(),
            samples: 0,
            model: LinearModel::untrained(),
        }
    }

    /// Parses and checks a model file.
    pub fn parse(bytes: &[u8]) -> Result<ModelFile, String> {
        let file: ModelFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if file.format != Self::FORMAT {
            return Err(format!(
                "format: {:?} is not {:?}",
                file.format,
                Self::FORMAT
            ));
        }
        file.model
            .check_shape()
            .map_err(|e| format!("model: {e}"))?;
        Ok(file)
    }
}

/// Softmax, stable for large logits.
pub fn softmax(logits: &[f32; COLUMNS]) -> [f32; COLUMNS] {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: [f32; COLUMNS] = std::array::from_fn(|c| (logits[c] - max).exp());
    let sum: f32 = exp.iter().sum();
    std::array::from_fn(|c| exp[c] / sum)
}

/// Plays uniformly random moves to the end; the result for the player to
/// move at `board`.
pub fn random_rollout(board: &Board, rng: &mut SmallRng) -> f32 {
    let mover = board.to_move();
    let mut board = *board;
    loop {
        if let Some(outcome) = board.outcome() {
            return outcome.value_for(mover);
        }
        let legal: Vec<usize> = (0..COLUMNS).filter(|&c| board.is_legal(c)).collect();
        let column = legal[rng.random_range(0..legal.len())];
        // `column` is legal and the game is not over: play cannot fail.
        if board.play(column).is_err() {
            return 0.0;
        }
    }
}

/// Priors from a linear model (uniform when untrained), values from one
/// random rollout per leaf (or a mix of the rollout and the model's value).
pub struct RolloutEvaluator {
    model: LinearModel,
    rng: SmallRng,
    rollout_weight: f32,
}

impl RolloutEvaluator {
    /// An evaluator over `model`, with its own random stream; values from
    /// rollouts alone.
    pub fn new(model: LinearModel, rng: SmallRng) -> RolloutEvaluator {
        RolloutEvaluator {
            model,
            rng,
            rollout_weight: 1.0,
        }
    }

    /// Values `weight * rollout + (1 - weight) * model value` (`weight`
    /// clamped to [0, 1]; at 0 no rollout is played).
    pub fn with_rollout_weight(mut self, weight: f32) -> RolloutEvaluator {
        self.rollout_weight = weight.clamp(0.0, 1.0);
        self
    }
}

impl Evaluator for RolloutEvaluator {
    fn evaluate(&mut self, boards: &[Board]) -> Result<Vec<Evaluation>, EvalError> {
        let w = self.rollout_weight;
        Ok(boards
            .iter()
            .map(|board| {
                let eval = self.model.predict(board);
                // Rollouts alone keep the random stream and the values of
                // the loop before the weight existed.
                let value = if w >= 1.0 {
                    random_rollout(board, &mut self.rng)
                } else if w <= 0.0 {
                    eval.value
                } else {
                    w * random_rollout(board, &mut self.rng) + (1.0 - w) * eval.value
                };
                Evaluation {
                    policy: eval.policy,
                    value,
                }
            })
            .collect())
    }
}

/// An evaluator that counts the batches it passes on, for the job's report.
pub struct Counted<'a> {
    inner: Box<dyn Evaluator + 'a>,
    /// Sizes of the batches evaluated.
    pub batches: BatchLog,
}

impl<'a> Counted<'a> {
    /// Counts the batches `inner` evaluates.
    pub fn new(inner: Box<dyn Evaluator + 'a>) -> Counted<'a> {
        Counted {
            inner,
            batches: BatchLog::default(),
        }
    }
}

impl Evaluator for Counted<'_> {
    fn evaluate(&mut self, boards: &[Board]) -> Result<Vec<Evaluation>, EvalError> {
        self.batches.record(boards.len());
        self.inner.evaluate(boards)
    }
}

/// How many batches of which sizes an evaluator saw.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchLog {
    /// Batches evaluated.
    pub batches: u64,
    /// Positions evaluated.
    pub positions: u64,
    /// The largest batch.
    pub largest: usize,
}

impl BatchLog {
    /// Counts one batch.
    pub fn record(&mut self, size: usize) {
        self.batches += 1;
        self.positions += size as u64;
        self.largest = self.largest.max(size);
    }

    /// Adds another log's counts (two sides of a match).
    pub fn add(&mut self, other: &BatchLog) {
        self.batches += other.batches;
        self.positions += other.positions;
        self.largest = self.largest.max(other.largest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn an_untrained_model_is_uniform_and_neutral() {
        let model = LinearModel::untrained();
        model.check_shape().expect("shape");
        let eval = model.predict(&Board::new());
        assert_eq!(eval.policy, [1.0 / COLUMNS as f32; COLUMNS]);
        assert_eq!(eval.value, 0.0);
    }

    #[test]
    fn model_files_round_trip_and_foreign_ones_are_refused() {
        let file = ModelFile::untrained();
        let bytes = serde_json::to_vec(&file).expect("json");
        assert_eq!(ModelFile::parse(&bytes), Ok(file.clone()));
        let mut other = file;
        other.format = "pytorch".into();
        let bytes = serde_json::to_vec(&other).expect("json");
        assert!(
            ModelFile::parse(&bytes)
                .expect_err("refused")
                .starts_with("format")
        );
        assert!(ModelFile::parse(b"{").is_err());
    }

    #[test]
    fn bad_shapes_are_refused() {
        let mut model = LinearModel::untrained();
        model.policy.pop();
        assert!(model.check_shape().is_err());
        let mut model = LinearModel::untrained();
        model.value[3] = f32::NAN;
        assert!(model.check_shape().is_err());
    }

    #[test]
    fn a_rollout_from_a_won_position_is_exact() {
        let mut rng = SmallRng::seed_from_u64(1);
        // The first player has won; the second is to move and has lost.
        let board = Board::from_moves(&[0, 1, 0, 1, 0, 1, 0]).expect("legal");
        assert_eq!(random_rollout(&board, &mut rng), -1.0);
        let evaluator = RolloutEvaluator::new(LinearModel::untrained(), rng);
        let mut counted = Counted::new(Box::new(evaluator));
        let out = counted
            .evaluate(&[Board::new(), Board::new()])
            .expect("evaluate");
        assert_eq!(out.len(), 2);
        assert_eq!(counted.batches.largest, 2);
    }
}
