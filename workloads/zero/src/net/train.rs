//! Training the residual network: Adam on the policy's cross-entropy
//! against the search's visit distribution plus the value's squared error
//! against the result, `batch_size` positions per step.

use rand::SeedableRng;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use tch::nn::{self, OptimizerConfig};
use tch::{Kind, Reduction, TchError, Tensor};

use super::{ResNet, planes_tensor};
use crate::game::COLUMNS;
use crate::records::Samples;
use crate::train::{Losses, TrainConfig, TrainReport};

/// Positions per forward pass when measuring the losses.
const LOSS_CHUNK: usize = 1024;

/// The training tensors, on the network's device.
struct Data {
    x: Tensor,
    pi: Tensor,
    z: Tensor,
    n: usize,
}

impl Data {
    fn new(samples: &Samples, net: &ResNet) -> Result<Data, TchError> {
        let n = samples.len();
        let device = net.device();
        Ok(Data {
            x: planes_tensor(&samples.x, n, device)?,
            pi: Tensor::f_of_slice(&samples.pi)?
                .f_view([n as i64, COLUMNS as i64])?
                .f_to_device(device)?,
            z: Tensor::f_of_slice(&samples.z)?
                .f_view([n as i64, 1])?
                .f_to_device(device)?,
            n,
        })
    }

    /// The positions `index` (a 1-D int64 tensor on the device).
    fn select(&self, index: &Tensor) -> Result<(Tensor, Tensor, Tensor), TchError> {
        Ok((
            self.x.f_index_select(0, index)?,
            self.pi.f_index_select(0, index)?,
            self.z.f_index_select(0, index)?,
        ))
    }
}

/// Mean policy cross-entropy and value squared error of a batch.
fn batch_losses(
    net: &ResNet,
    x: &Tensor,
    pi: &Tensor,
    z: &Tensor,
    train: bool,
) -> Result<(Tensor, Tensor), TchError> {
    let (logits, value) = net.forward(x, train)?;
    let policy = pi
        .f_mul(&logits.f_log_softmax(1, Kind::Float)?)?
        .f_sum_dim_intlist(Some(&[1i64][..]), false, Kind::Float)?
        .f_mean(Kind::Float)?
        .f_neg()?;
    let value = value.f_mse_loss(z, Reduction::Mean)?;
    Ok((policy, value))
}

/// Mean losses of `net` on all of `data` (running averages, no gradient).
fn losses(net: &ResNet, data: &Data) -> Result<Losses, TchError> {
    let _guard = tch::no_grad_guard();
    let (mut policy, mut value) = (0.0f64, 0.0f64);
    let mut start = 0;
    while start < data.n {
        let len = LOSS_CHUNK.min(data.n - start);
        let x = data.x.f_narrow(0, start as i64, len as i64)?;
        let pi = data.pi.f_narrow(0, start as i64, len as i64)?;
        let z = data.z.f_narrow(0, start as i64, len as i64)?;
        let (p, v) = batch_losses(net, &x, &pi, &z, false)?;
        policy += p.f_double_value(&[])? * len as f64;
        value += v.f_double_value(&[])? * len as f64;
        start += len;
    }
    let n = data.n.max(1) as f64;
    Ok(Losses {
        policy: (policy / n) as f32,
        value: (value / n) as f32,
    })
}

/// Trains `net` in place on `samples`.
pub fn train(
    net: &mut ResNet,
    samples: &Samples,
    config: &TrainConfig,
) -> Result<TrainReport, TchError> {
    let data = Data::new(samples, net)?;
    let before = losses(net, &data)?;
    let mut optimizer = nn::Adam::default()
        .wd(f64::from(config.weight_decay))
        .build(net.var_store(), f64::from(config.learning_rate))?;
    let mut order: Vec<i64> = (0..data.n as i64).collect();
    let mut rng = SmallRng::seed_from_u64(config.seed);
    let batch = config.batch_size.max(1);
    let mut steps = 0;
    for _ in 0..config.epochs {
        order.shuffle(&mut rng);
        for chunk in order.chunks(batch) {
            let index = Tensor::f_of_slice(chunk)?.f_to_device(net.device())?;
            let (x, pi, z) = data.select(&index)?;
            let (policy, value) = batch_losses(net, &x, &pi, &z, true)?;
            let loss = policy.f_add(&value)?;
            optimizer.zero_grad();
            loss.f_backward()?;
            optimizer.step();
            steps += 1;
        }
    }
    let after = losses(net, &data)?;
    if !(after.policy.is_finite() && after.value.is_finite()) {
        return Err(TchError::Kind(format!(
            "training diverged: losses {after:?}"
        )));
    }
    Ok(TrainReport {
        samples: data.n,
        steps,
        before,
        after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::game::{Board, Outcome};
    use crate::net::NetConfig;
    use crate::records::{GameRecord, samples};
    use tch::Device;

    #[test]
    fn training_fits_the_targets() {
        // As the linear model's test: the search always liked the middle
        // and the first player won.
        let game = GameRecord {
            moves: vec![3, 2, 3, 2, 3, 2, 3],
            visits: vec![[0, 0, 1, 9, 0, 0, 0]; 7],
            outcome: Outcome::FirstWins,
            round: 1,
            simulations: 10,
            batch_size: 4,
        };
        let data = samples(&game).expect("samples");
        tch::manual_seed(7);
        let mut net = ResNet::new(
            NetConfig {
                channels: 8,
                blocks: 1,
            },
            Device::Cpu,
        )
        .expect("net");
        let config = TrainConfig {
            epochs: 60,
            batch_size: 4,
            learning_rate: 0.01,
            weight_decay: 1e-4,
            seed: 7,
        };
        let report = train(&mut net, &data, &config).expect("train");
        assert!(
            report.after.policy < report.before.policy * 0.8,
            "{report:?}"
        );
        assert!(report.after.value < report.before.value * 0.5, "{report:?}");
        assert_eq!(report.steps, 60 * 4, "14 positions in batches of 4");
        assert_eq!(net.greedy_move(&Board::new()).expect("greedy"), Some(3));
        let start = net.predict(&[Board::new()]).expect("predict");
        assert!(start[0].value > 0.5, "{start:?}");
    }
}
