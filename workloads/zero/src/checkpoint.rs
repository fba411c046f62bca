//! Model checkpoints: which model a file holds (the linear model, or with
//! the `tch` feature the residual network), the round that trained it and
//! on what. The stages go through [`Checkpoint`] and [`Model`] only, so
//! the same subcommands and flags drive either model.
//!
//! Two encodings, told apart by their first bytes:
//! - the linear model: the JSON [`ModelFile`] (`{"format": "gantry-zero-linear-v1", ...}`);
//! - the network: the line `gantry-zero-resnet-v1`, one line of JSON
//!   ([`NetHeader`]: round, trained_on, samples, the network's size), then
//!   the variables as libtorch saves a `VarStore`.
//!
//! A file is written whole or not at all by the caller ([`crate::atomic`]).

use rand::rngs::SmallRng;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::game::Board;
use crate::model::{EvalError, Evaluator, LinearModel, ModelFile, RolloutEvaluator};
#[cfg(feature = "tch")]
use crate::net::{NetConfig, NetEvaluator, ResNet};
use crate::records::Samples;
use crate::train::{TrainConfig, TrainReport};

/// The first line of a network checkpoint.
pub const NET_MAGIC: &[u8] = b"gantry-zero-resnet-v1\n";
/// The longest header line of a network checkpoint.
const MAX_HEADER: usize = 64 << 10;

/// A checkpoint that cannot be read, written or used.
#[derive(Debug, Clone, PartialEq, Error)]
#[error("{0}")]
pub struct CheckpointError(pub String);

#[cfg(feature = "tch")]
impl From<tch::TchError> for CheckpointError {
    fn from(err: tch::TchError) -> Self {
        CheckpointError(format!("libtorch: {err}"))
    }
}

/// Which policy-value model a loop uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// The linear softmax/tanh model (plain Rust).
    Linear,
    /// The residual network (feature `tch`).
    Resnet,
}

impl ModelKind {
    /// The model a new loop starts with: the network when built with the
    /// `tch` feature, else the linear model.
    pub fn built_default() -> ModelKind {
        if cfg!(feature = "tch") {
            ModelKind::Resnet
        } else {
            ModelKind::Linear
        }
    }

    /// Its name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Linear => "linear",
            ModelKind::Resnet => "resnet",
        }
    }

    /// The weight of a random rollout in a leaf's value when not given:
    /// the linear value head is too weak to search with, so rollouts alone;
    /// the network half and half (AlphaGo's mixing), so that an untrained
    /// network's first rounds still make useful games.
    pub fn default_rollout_weight(self) -> f32 {
        match self {
            ModelKind::Linear => 1.0,
            ModelKind::Resnet => 0.5,
        }
    }

    /// The training step size when not given (plain gradient descent for
    /// the linear model, Adam for the network).
    pub fn default_learning_rate(self) -> f32 {
        match self {
            ModelKind::Linear => 0.1,
            ModelKind::Resnet => 0.002,
        }
    }
}

impl std::str::FromStr for ModelKind {
    type Err = String;

    fn from_str(s: &str) -> Result<ModelKind, String> {
        match s {
            "linear" => Ok(ModelKind::Linear),
            "resnet" => Ok(ModelKind::Resnet),
            other => Err(format!("{other:?} is not linear or resnet")),
        }
    }
}

/// A policy-value model.
#[derive(Debug)]
pub enum Model {
    /// The linear model.
    Linear(LinearModel),
    /// The residual network (boxed: its layers' handles dwarf the linear model).
    #[cfg(feature = "tch")]
    Net(Box<ResNet>),
}

impl Model {
    /// Which model this is.
    pub fn kind(&self) -> ModelKind {
        match self {
            Model::Linear(_) => ModelKind::Linear,
            #[cfg(feature = "tch")]
            Model::Net(_) => ModelKind::Resnet,
        }
    }

    /// An evaluator for the search: this model's priors, values mixed with
    /// random rollouts (`rollout_weight` of them, in [0, 1]).
    pub fn evaluator<'a>(&'a self, rollout_weight: f32, rng: SmallRng) -> Box<dyn Evaluator + 'a> {
        match self {
            Model::Linear(model) => Box::new(
                RolloutEvaluator::new(model.clone(), rng).with_rollout_weight(rollout_weight),
            ),
            #[cfg(feature = "tch")]
            Model::Net(net) => Box::new(NetEvaluator::new(net, rollout_weight, rng)),
        }
    }

    /// The legal column the policy likes best (no search).
    pub fn greedy_move(&self, board: &Board) -> Result<Option<usize>, EvalError> {
        match self {
            Model::Linear(model) => Ok(model.greedy_move(board)),
            #[cfg(feature = "tch")]
            Model::Net(net) => net.greedy_move(board).map_err(|e| EvalError(e.to_string())),
        }
    }

    /// Trains the model in place; a model whose weights stop being finite
    /// is an error, never a candidate.
    pub fn train(
        &mut self,
        samples: &Samples,
        config: &TrainConfig,
    ) -> Result<TrainReport, CheckpointError> {
        match self {
            Model::Linear(model) => {
                let report = crate::train::train(model, samples, config);
                model
                    .check_shape()
                    .map_err(|e| CheckpointError(format!("training diverged: {e}")))?;
                Ok(report)
            }
            #[cfg(feature = "tch")]
            Model::Net(net) => {
                tch::manual_seed(config.seed as i64);
                Ok(crate::net::train::train(net, samples, config)?)
            }
        }
    }
}

/// The header line of a network checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetHeader {
    /// The round whose training produced it (0: untrained).
    pub round: u32,
    /// Rounds whose games it was trained on.
    pub trained_on: Vec<u32>,
    /// Positions of its last training.
    pub samples: usize,
    /// Channels of the trunk.
    pub channels: i64,
    /// Residual blocks.
    pub blocks: i64,
}

/// A model and where it came from.
#[derive(Debug)]
pub struct Checkpoint {
    /// The round whose training produced it (0: untrained).
    pub round: u32,
    /// Rounds whose games it was trained on (this one included).
    pub trained_on: Vec<u32>,
    /// Positions it was trained on in its last training.
    pub samples: usize,
    /// The model.
    pub model: Model,
}

impl Checkpoint {
    /// An untrained model of `kind` (round 0); `seed` fixes the network's
    /// initial weights.
    pub fn untrained(kind: ModelKind, seed: u64) -> Result<Checkpoint, CheckpointError> {
        let model = match kind {
            ModelKind::Linear => Model::Linear(LinearModel::untrained()),
            #[cfg(feature = "tch")]
            ModelKind::Resnet => {
                tch::manual_seed(seed as i64);
                Model::Net(Box::new(ResNet::new(
                    NetConfig::default(),
                    tch::Device::cuda_if_available(),
                )?))
            }
            #[cfg(not(feature = "tch"))]
            ModelKind::Resnet => {
                let _ = seed;
                return Err(no_tch());
            }
        };
        Ok(Checkpoint {
            round: 0,
            trained_on: Vec::new(),
            samples: 0,
            model,
        })
    }

    /// Reads a checkpoint in either encoding, checking it whole (a network
    /// is loaded onto the GPU when there is one).
    pub fn parse(bytes: &[u8]) -> Result<Checkpoint, CheckpointError> {
        if let Some(rest) = bytes.strip_prefix(NET_MAGIC) {
            return parse_net(rest);
        }
        let file = ModelFile::parse(bytes).map_err(CheckpointError)?;
        Ok(Checkpoint {
            round: file.round,
            trained_on: file.trained_on,
            samples: file.samples,
            model: Model::Linear(file.model),
        })
    }

    /// The file's bytes.
    pub fn encode(&self) -> Result<Vec<u8>, CheckpointError> {
        match &self.model {
            Model::Linear(model) => {
                let file = ModelFile {
                    format: ModelFile::FORMAT.into(),
                    round: self.round,
                    trained_on: self.trained_on.clone(),
                    samples: self.samples,
                    model: model.clone(),
                };
                let mut bytes =
                    serde_json::to_vec_pretty(&file).map_err(|e| CheckpointError(e.to_string()))?;
                bytes.push(b'\n');
                Ok(bytes)
            }
            #[cfg(feature = "tch")]
            Model::Net(net) => {
                let config = net.config();
                let header = NetHeader {
                    round: self.round,
                    trained_on: self.trained_on.clone(),
                    samples: self.samples,
                    channels: config.channels,
                    blocks: config.blocks,
                };
                let mut bytes = NET_MAGIC.to_vec();
                serde_json::to_writer(&mut bytes, &header)
                    .map_err(|e| CheckpointError(e.to_string()))?;
                bytes.push(b'\n');
                bytes.extend(net.weights()?);
                Ok(bytes)
            }
        }
    }
}

/// The header line and the weights after it.
fn split_header(rest: &[u8]) -> Result<(NetHeader, &[u8]), CheckpointError> {
    let end = rest
        .iter()
        .take(MAX_HEADER)
        .position(|&b| b == b'\n')
        .ok_or_else(|| {
            CheckpointError(format!("no header line in the first {MAX_HEADER} bytes"))
        })?;
    let header: NetHeader = serde_json::from_slice(&rest[..end])
        .map_err(|e| CheckpointError(format!("header: {e}")))?;
    Ok((header, &rest[end + 1..]))
}

#[cfg(feature = "tch")]
fn parse_net(rest: &[u8]) -> Result<Checkpoint, CheckpointError> {
    let (header, weights) = split_header(rest)?;
    let config = NetConfig {
        channels: header.channels,
        blocks: header.blocks,
    };
    config
        .check()
        .map_err(|e| CheckpointError(format!("header: {e}")))?;
    let net = ResNet::from_weights(config, weights, tch::Device::cuda_if_available())
        .map_err(|e| CheckpointError(format!("weights: {e}")))?;
    Ok(Checkpoint {
        round: header.round,
        trained_on: header.trained_on,
        samples: header.samples,
        model: Model::Net(Box::new(net)),
    })
}

#[cfg(not(feature = "tch"))]
fn parse_net(rest: &[u8]) -> Result<Checkpoint, CheckpointError> {
    // The header is checked so that a damaged file says so first.
    split_header(rest)?;
    Err(no_tch())
}

#[cfg(not(feature = "tch"))]
fn no_tch() -> CheckpointError {
    CheckpointError(
        "a residual network (gantry-zero-resnet-v1) needs gantry-zero built with --features tch"
            .into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_checkpoints_are_the_json_model_file() {
        let mut checkpoint = Checkpoint::untrained(ModelKind::Linear, 0).expect("untrained");
        checkpoint.round = 3;
        checkpoint.trained_on = vec![2, 3];
        let bytes = checkpoint.encode().expect("encode");
        let file = ModelFile::parse(&bytes).expect("a model file");
        assert_eq!((file.round, file.trained_on), (3, vec![2, 3]));
        let back = Checkpoint::parse(&bytes).expect("parse");
        assert_eq!(back.round, 3);
        assert_eq!(back.model.kind(), ModelKind::Linear);
        assert!(Checkpoint::parse(b"{}").is_err());
    }

    #[test]
    fn damaged_network_headers_are_refused() {
        let cases: &[(&[u8], &str)] = &[
            (b"gantry-zero-resnet-v1\nnot json\n", "header"),
            (b"gantry-zero-resnet-v1\n{\"round\": 1", "no header line"),
        ];
        for (bytes, expected) in cases {
            let err = Checkpoint::parse(bytes).expect_err("refused");
            assert!(err.0.contains(expected), "{err}");
        }
        assert_eq!("resnet".parse(), Ok(ModelKind::Resnet));
        assert!("cnn".parse::<ModelKind>().is_err());
    }

    #[cfg(not(feature = "tch"))]
    #[test]
    fn without_tch_a_network_is_refused_by_name() {
        let header = br#"{"round":1,"trained_on":[1],"samples":4,"channels":8,"blocks":1}"#;
        let mut bytes = NET_MAGIC.to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(b"\nweights");
        let err = Checkpoint::parse(&bytes).expect_err("refused");
        assert!(err.0.contains("--features tch"), "{err}");
        assert!(Checkpoint::untrained(ModelKind::Resnet, 0).is_err());
        assert_eq!(ModelKind::built_default(), ModelKind::Linear);
    }

    #[cfg(feature = "tch")]
    #[test]
    fn network_checkpoints_round_trip() {
        let mut checkpoint = Checkpoint::untrained(ModelKind::Resnet, 1).expect("untrained");
        checkpoint.round = 2;
        checkpoint.trained_on = vec![1, 2];
        checkpoint.samples = 10;
        let bytes = checkpoint.encode().expect("encode");
        assert!(bytes.starts_with(NET_MAGIC));
        let back = Checkpoint::parse(&bytes).expect("parse");
        assert_eq!(
            (back.round, back.trained_on.clone(), back.samples),
            (2, vec![1, 2], 10)
        );
        assert_eq!(back.model.kind(), ModelKind::Resnet);
        // Truncated weights, or a header whose size does not match them.
        assert!(Checkpoint::parse(&bytes[..bytes.len() - 100]).is_err());
        let end = bytes.iter().position(|&b| b == b'}').expect("header");
        let header = String::from_utf8(bytes[..=end].to_vec()).expect("utf-8");
        let mut wrong = header.replace("\"blocks\":3", "\"blocks\":4").into_bytes();
        assert_ne!(wrong.len(), 0);
        wrong.extend_from_slice(&bytes[end + 1..]);
        let err = Checkpoint::parse(&wrong).expect_err("refused");
        assert!(err.0.starts_with("weights"), "{err}");
        assert_eq!(ModelKind::built_default(), ModelKind::Resnet);
    }
}
