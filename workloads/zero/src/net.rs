//! The residual policy-value network (feature `tch`, libtorch 1.13).
//!
//! AlphaZero's shape at Connect Four's size: a 3x3 convolution stem over
//! the two stone planes and a plane of ones (so that the zero padding of
//! the convolutions is told apart from an empty cell), `blocks` residual
//! blocks of two 3x3 convolutions with batch normalisation, then a policy
//! head (1x1 convolution, one logit per column) and a value head (1x1
//! convolution, a hidden layer, tanh). The last layer of each head starts
//! at zero, so an untrained network is exactly uniform and neutral, like
//! the untrained linear model: "untrained" is one well-defined player.
//!
//! Every operation goes through tch's fallible (`f_`) calls: a libtorch
//! failure (out of GPU memory, a damaged checkpoint) is an error naming the
//! step, not a panic.

pub mod train;

use std::io::Cursor;

use rand::rngs::SmallRng;
use serde::{Deserialize, Serialize};
use tch::nn::{self, Init, VarStore};
use tch::{Device, Kind, TchError, Tensor};

use crate::game::{Board, COLUMNS, FEATURES, ROWS};
use crate::model::{EvalError, Evaluation, Evaluator, random_rollout};

/// The network's size (stored in its checkpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// Channels of every convolution of the trunk.
    pub channels: i64,
    /// Residual blocks.
    pub blocks: i64,
}

impl Default for NetConfig {
    /// Small enough to train on two CPU cores in minutes.
    fn default() -> Self {
        NetConfig {
            channels: 32,
            blocks: 3,
        }
    }
}

impl NetConfig {
    /// The largest trunk a checkpoint may ask for (a bound, not a tuning).
    pub const MAX_CHANNELS: i64 = 128;
    /// The most residual blocks a checkpoint may ask for.
    pub const MAX_BLOCKS: i64 = 20;

    /// Whether the sizes are in bounds (one error naming the field).
    pub fn check(&self) -> Result<(), String> {
        if !(1..=Self::MAX_CHANNELS).contains(&self.channels) {
            return Err(format!(
                "channels: {} is not in 1..={}",
                self.channels,
                Self::MAX_CHANNELS
            ));
        }
        if !(1..=Self::MAX_BLOCKS).contains(&self.blocks) {
            return Err(format!(
                "blocks: {} is not in 1..={}",
                self.blocks,
                Self::MAX_BLOCKS
            ));
        }
        Ok(())
    }
}

/// Input planes: the mover's stones, the opponent's, ones.
const PLANES: i64 = 3;
/// Hidden units of the value head.
const VALUE_HIDDEN: i64 = 32;
const CELLS: i64 = (ROWS * COLUMNS) as i64;

/// A convolution without bias followed by batch normalisation.
#[derive(Debug)]
struct ConvBn {
    weight: Tensor,
    scale: Tensor,
    shift: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    padding: i64,
}

impl ConvBn {
    fn new(path: &nn::Path, inputs: i64, outputs: i64, kernel: i64) -> Result<ConvBn, TchError> {
        let kaiming = nn::init::DEFAULT_KAIMING_UNIFORM;
        Ok(ConvBn {
            weight: path.f_var("weight", &[outputs, inputs, kernel, kernel], kaiming)?,
            scale: path.f_var("bn_scale", &[outputs], Init::Const(1.0))?,
            shift: path.f_var("bn_shift", &[outputs], Init::Const(0.0))?,
            running_mean: path.f_zeros_no_train("bn_mean", &[outputs])?,
            running_var: path.f_ones_no_train("bn_var", &[outputs])?,
            padding: kernel / 2,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor, TchError> {
        let y = x.f_conv2d::<&Tensor>(
            &self.weight,
            None,
            &[1, 1],
            &[self.padding, self.padding],
            &[1, 1],
            1,
        )?;
        y.f_batch_norm(
            Some(&self.scale),
            Some(&self.shift),
            Some(&self.running_mean),
            Some(&self.running_var),
            train,
            0.1,
            1e-5,
            false,
        )
    }
}

/// A fully connected layer.
#[derive(Debug)]
struct Dense {
    weight: Tensor,
    bias: Tensor,
}

impl Dense {
    fn new(path: &nn::Path, inputs: i64, outputs: i64, zero: bool) -> Result<Dense, TchError> {
        let init = if zero {
            Init::Const(0.0)
        } else {
            nn::init::DEFAULT_KAIMING_UNIFORM
        };
        Ok(Dense {
            weight: path.f_var("weight", &[outputs, inputs], init)?,
            bias: path.f_var("bias", &[outputs], Init::Const(0.0))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        x.f_matmul(&self.weight.f_tr()?)?.f_add(&self.bias)
    }
}

/// The network and the variables it owns.
#[derive(Debug)]
pub struct ResNet {
    vs: VarStore,
    config: NetConfig,
    stem: ConvBn,
    blocks: Vec<(ConvBn, ConvBn)>,
    policy_conv: ConvBn,
    policy_out: Dense,
    value_conv: ConvBn,
    value_hidden: Dense,
    value_out: Dense,
}

impl ResNet {
    /// A freshly initialised network on `device` (the output layers at zero).
    pub fn new(config: NetConfig, device: Device) -> Result<ResNet, TchError> {
        config.check().map_err(TchError::Shape)?;
        let vs = VarStore::new(device);
        let root = vs.root();
        let c = config.channels;
        let stem = ConvBn::new(&(&root / "stem"), PLANES, c, 3)?;
        let blocks = (0..config.blocks)
            .map(|i| {
                let block = &root / format!("block{i}");
                Ok((
                    ConvBn::new(&(&block / "a"), c, c, 3)?,
                    ConvBn::new(&(&block / "b"), c, c, 3)?,
                ))
            })
            .collect::<Result<Vec<_>, TchError>>()?;
        Ok(ResNet {
            policy_conv: ConvBn::new(&(&root / "policy_conv"), c, 2, 1)?,
            policy_out: Dense::new(&(&root / "policy_out"), 2 * CELLS, COLUMNS as i64, true)?,
            value_conv: ConvBn::new(&(&root / "value_conv"), c, 1, 1)?,
            value_hidden: Dense::new(&(&root / "value_hidden"), CELLS, VALUE_HIDDEN, false)?,
            value_out: Dense::new(&(&root / "value_out"), VALUE_HIDDEN, 1, true)?,
            stem,
            blocks,
            vs,
            config,
        })
    }

    /// Its size.
    pub fn config(&self) -> NetConfig {
        self.config
    }

    /// The device its variables live on.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// The variables (for the optimiser).
    pub fn var_store(&self) -> &VarStore {
        &self.vs
    }

    /// Policy logits `[N, 7]` and values `[N, 1]` (in [-1, 1]) for the
    /// stone planes `x` (`[N, 2, 6, 7]`, on the network's device).
    /// `train`: batch statistics (and running averages updated), else the
    /// running averages.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<(Tensor, Tensor), TchError> {
        let n = x.size().first().copied().unwrap_or(0);
        let ones = Tensor::f_ones(
            &[n, 1, ROWS as i64, COLUMNS as i64],
            (Kind::Float, x.device()),
        )?;
        let input = Tensor::f_cat(&[x, &ones], 1)?;
        let mut h = self.stem.forward(&input, train)?.f_relu()?;
        for (a, b) in &self.blocks {
            let inner = a.forward(&h, train)?.f_relu()?;
            h = b.forward(&inner, train)?.f_add(&h)?.f_relu()?;
        }
        let p = self.policy_conv.forward(&h, train)?.f_relu()?;
        let logits = self.policy_out.forward(&p.f_view([n, 2 * CELLS])?)?;
        let v = self.value_conv.forward(&h, train)?.f_relu()?;
        let v = self
            .value_hidden
            .forward(&v.f_view([n, CELLS])?)?
            .f_relu()?;
        let value = self.value_out.forward(&v)?.f_tanh()?;
        Ok((logits, value))
    }

    /// The stone planes of `boards` as one tensor on the network's device.
    pub fn input(&self, boards: &[Board]) -> Result<Tensor, TchError> {
        let mut planes = Vec::with_capacity(boards.len() * FEATURES);
        for board in boards {
            planes.extend_from_slice(&board.features());
        }
        planes_tensor(&planes, boards.len(), self.device())
    }

    /// Softmax policies and values for `boards`, in one forward pass.
    pub fn predict(&self, boards: &[Board]) -> Result<Vec<Evaluation>, TchError> {
        if boards.is_empty() {
            return Ok(Vec::new());
        }
        let _guard = tch::no_grad_guard();
        let (logits, values) = self.forward(&self.input(boards)?, false)?;
        let policy = to_vec(&logits.f_softmax(1, Kind::Float)?)?;
        let values = to_vec(&values)?;
        Ok(boards
            .iter()
            .enumerate()
            .map(|(i, _)| Evaluation {
                policy: std::array::from_fn(|c| policy[i * COLUMNS + c]),
                value: values[i],
            })
            .collect())
    }

    /// The legal column the policy likes best (no search).
    pub fn greedy_move(&self, board: &Board) -> Result<Option<usize>, TchError> {
        let Some(eval) = self.predict(std::slice::from_ref(board))?.pop() else {
            return Ok(None);
        };
        Ok((0..COLUMNS)
            .filter(|&c| board.is_legal(c))
            .max_by(|&a, &b| eval.policy[a].total_cmp(&eval.policy[b])))
    }

    /// The variables in libtorch's format (`VarStore::save_to_stream`).
    pub fn weights(&self) -> Result<Vec<u8>, TchError> {
        let mut bytes = Vec::new();
        self.vs.save_to_stream(&mut bytes)?;
        Ok(bytes)
    }

    /// A network of `config` with the variables of [`ResNet::weights`];
    /// a missing variable or a shape that differs is an error.
    pub fn from_weights(
        config: NetConfig,
        bytes: &[u8],
        device: Device,
    ) -> Result<ResNet, TchError> {
        let mut net = ResNet::new(config, device)?;
        net.vs.load_from_stream(Cursor::new(bytes))?;
        Ok(net)
    }

    /// A copy (training starts from the best network without changing it).
    pub fn try_clone(&self) -> Result<ResNet, TchError> {
        let mut copy = ResNet::new(self.config, self.device())?;
        copy.vs.copy(&self.vs)?;
        Ok(copy)
    }
}

/// `n` positions of [`Board::features`] as `[n, 2, 6, 7]` on `device`.
pub fn planes_tensor(planes: &[f32], n: usize, device: Device) -> Result<Tensor, TchError> {
    Tensor::f_of_slice(planes)?
        .f_view([n as i64, 2, ROWS as i64, COLUMNS as i64])?
        .f_to_device(device)
}

/// The values of a float tensor, on the CPU.
pub fn to_vec(tensor: &Tensor) -> Result<Vec<f32>, TchError> {
    let cpu = tensor
        .f_to_device(Device::Cpu)?
        .f_to_kind(Kind::Float)?
        .f_contiguous()?;
    let numel = cpu.numel();
    let mut out = vec![0.0f32; numel];
    cpu.f_copy_data(&mut out, numel)?;
    Ok(out)
}

/// The network's priors, and values mixed with random rollouts:
/// `rollout_weight * rollout + (1 - rollout_weight) * network` (AlphaGo's
/// mixing; 0 is AlphaZero's network alone, and no rollout is played).
pub struct NetEvaluator<'a> {
    net: &'a ResNet,
    rollout_weight: f32,
    rng: SmallRng,
}

impl<'a> NetEvaluator<'a> {
    /// An evaluator over `net`; `rollout_weight` in [0, 1].
    pub fn new(net: &'a ResNet, rollout_weight: f32, rng: SmallRng) -> NetEvaluator<'a> {
        NetEvaluator {
            net,
            rollout_weight: rollout_weight.clamp(0.0, 1.0),
            rng,
        }
    }
}

impl Evaluator for NetEvaluator<'_> {
    fn evaluate(&mut self, boards: &[Board]) -> Result<Vec<Evaluation>, EvalError> {
        let mut out = self
            .net
            .predict(boards)
            .map_err(|e| EvalError(e.to_string()))?;
        if self.rollout_weight > 0.0 {
            let w = self.rollout_weight;
            for (eval, board) in out.iter_mut().zip(boards) {
                eval.value = w * random_rollout(board, &mut self.rng) + (1.0 - w) * eval.value;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn shapes_and_an_untrained_network_is_uniform_and_neutral() {
        let net = ResNet::new(
            NetConfig {
                channels: 8,
                blocks: 2,
            },
            Device::Cpu,
        )
        .expect("net");
        let boards = [
            Board::new(),
            Board::from_moves(&[3, 3, 2]).expect("legal"),
            Board::from_moves(&[0; 6]).expect("legal"),
        ];
        let (logits, values) = net
            .forward(&net.input(&boards).expect("input"), false)
            .expect("forward");
        assert_eq!(logits.size(), [3, COLUMNS as i64]);
        assert_eq!(values.size(), [3, 1]);
        let evals = net.predict(&boards).expect("predict");
        assert_eq!(evals.len(), 3);
        for eval in &evals {
            assert_eq!(eval.policy, [1.0 / COLUMNS as f32; COLUMNS]);
            assert_eq!(eval.value, 0.0);
        }
        // Column 0 is full: the greedy move is another (the last of the ties).
        assert_eq!(net.greedy_move(&boards[2]).expect("greedy"), Some(6));
        assert!(net.predict(&[]).expect("empty").is_empty());
    }

    #[test]
    fn weights_round_trip_and_foreign_shapes_are_refused() {
        let config = NetConfig {
            channels: 8,
            blocks: 1,
        };
        let mut net = ResNet::new(config, Device::Cpu).expect("net");
        // Give the zero-initialised heads some weights so the round trip shows.
        tch::no_grad(|| {
            let _ = net.policy_out.weight.f_fill_(0.25);
            let _ = net.value_out.weight.f_fill_(-0.5);
        });
        let board = Board::from_moves(&[3, 2, 3]).expect("legal");
        let before = net.predict(&[board]).expect("predict");
        let bytes = net.weights().expect("save");
        let back = ResNet::from_weights(config, &bytes, Device::Cpu).expect("load");
        assert_eq!(back.predict(&[board]).expect("predict"), before);
        let copy = net.try_clone().expect("clone");
        assert_eq!(copy.predict(&[board]).expect("predict"), before);

        let wider = NetConfig {
            channels: 16,
            blocks: 1,
        };
        assert!(
            ResNet::from_weights(wider, &bytes, Device::Cpu).is_err(),
            "shape differs"
        );
        let deeper = NetConfig {
            channels: 8,
            blocks: 2,
        };
        assert!(
            ResNet::from_weights(deeper, &bytes, Device::Cpu).is_err(),
            "block missing"
        );
        assert!(ResNet::from_weights(config, &bytes[..bytes.len() / 2], Device::Cpu).is_err());
        assert!(
            NetConfig {
                channels: 0,
                blocks: 1
            }
            .check()
            .is_err()
        );
        assert!(
            NetConfig {
                channels: 8,
                blocks: 21
            }
            .check()
            .is_err()
        );
    }

    #[test]
    fn the_evaluator_mixes_rollouts_into_the_value() {
        let net = ResNet::new(
            NetConfig {
                channels: 4,
                blocks: 1,
            },
            Device::Cpu,
        )
        .expect("net");
        // The second player is to move and has lost: a rollout says -1, the
        // untrained network 0.
        let lost = Board::from_moves(&[0, 1, 0, 1, 0, 1, 0]).expect("legal");
        let rng = SmallRng::seed_from_u64(1);
        let cases = [(0.0, 0.0), (0.5, -0.5), (1.0, -1.0)];
        for (weight, expected) in cases {
            let mut evaluator = NetEvaluator::new(&net, weight, rng.clone());
            let out = evaluator.evaluate(&[lost, Board::new()]).expect("evaluate");
            assert_eq!(out.len(), 2);
            assert_eq!(out[0].value, expected, "rollout weight {weight}");
        }
    }
}
