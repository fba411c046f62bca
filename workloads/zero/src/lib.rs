//! `gantry-zero`: a reference workload for Gantry, an AlphaZero-style loop
//! on Connect Four whose stages run as Gantry jobs.
//!
//! Layout: [`game`] (rules), [`mcts`] (PUCT search over many games with one
//! batched evaluation per simulation), [`model`] (policy-value functions:
//! a linear model and random rollouts), `net` (with the `tch` feature: the
//! residual network and its training), [`checkpoint`] (model files of either
//! kind, the one type the stages use), [`records`] (game files and training
//! tensors), [`npz`] (the tensor file format), [`atomic`] (write-then-rename),
//! [`promote`] (the promotion rule, Elo and feedback), [`data`] (the data
//! directory the stages share) and [`stages`] (the subcommands).
//!
//! This crate depends on nothing else of Gantry's: it talks to Gantry only
//! through what every job sees (`{batch_size}`, `GANTRY_*` variables,
//! snapshot copies, exit codes).

pub mod atomic;
pub mod checkpoint;
pub mod game;
pub mod mcts;
pub mod model;
#[cfg(feature = "tch")]
pub mod net;
pub mod npz;
pub mod promote;
pub mod records;
pub mod train;
