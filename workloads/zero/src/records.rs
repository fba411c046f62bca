//! Finished games as files, and the training tensors made from them.
//!
//! A game is one JSON file (the moves, the search's visit counts at every
//! move, the result and how it was played). Export turns a round's games
//! into three float32 arrays, each position also mirrored left to right
//! (Connect Four is symmetric):
//!
//! - `x`: `[N, 2, 6, 7]`, the mover's stones then the opponent's
//!   ([`Board::features`]);
//! - `pi`: `[N, 7]`, the visit distribution of the search (the policy target);
//! - `z`: `[N]`, the game's result for the mover (the value target).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::game::{Board, COLUMNS, FEATURES, GameError, Outcome, ROWS, mirror_column};
use crate::npz::Array;

/// One finished self-play game.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GameRecord {
    /// Columns played, in order.
    pub moves: Vec<u8>,
    /// Root visit counts of the search before each move.
    pub visits: Vec<[u32; COLUMNS]>,
    /// How it ended.
    pub outcome: Outcome,
    /// The round it was played in.
    pub round: u32,
    /// Simulations per move.
    pub simulations: u32,
    /// Leaves evaluated per batch (the job's batch size).
    pub batch_size: usize,
}

/// A game file that does not describe a finished legal game.
#[derive(Debug, Error, PartialEq)]
pub enum RecordError {
    /// A move is illegal.
    #[error("move {index}: {source}")]
    Move {
        /// Position of the move in the record.
        index: usize,
        /// Why the board refused it.
        source: GameError,
    },
    /// Moves and visit counts do not pair up.
    #[error("{moves} moves but {visits} visit counts")]
    Lengths {
        /// Moves recorded.
        moves: usize,
        /// Visit counts recorded.
        visits: usize,
    },
    /// The recorded result is not what the moves lead to.
    #[error("recorded outcome {recorded:?}, but the moves give {actual:?}")]
    Outcome {
        /// In the file.
        recorded: Outcome,
        /// From replaying the moves.
        actual: Option<Outcome>,
    },
}

impl GameRecord {
    /// Replays the moves: every move legal, the game over exactly at the
    /// end, with the recorded outcome.
    pub fn check(&self) -> Result<(), RecordError> {
        if self.moves.len() != self.visits.len() {
            return Err(RecordError::Lengths {
                moves: self.moves.len(),
                visits: self.visits.len(),
            });
        }
        let mut board = Board::new();
        for (index, &column) in self.moves.iter().enumerate() {
            board
                .play(usize::from(column))
                .map_err(|source| RecordError::Move { index, source })?;
        }
        if board.outcome() != Some(self.outcome) {
            return Err(RecordError::Outcome {
                recorded: self.outcome,
                actual: board.outcome(),
            });
        }
        Ok(())
    }
}

/// Training tensors, as built by [`samples`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Samples {
    /// `N * FEATURES` values.
    pub x: Vec<f32>,
    /// `N * COLUMNS` values.
    pub pi: Vec<f32>,
    /// `N` values.
    pub z: Vec<f32>,
}

impl Samples {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.z.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.z.is_empty()
    }

    /// Appends another set.
    pub fn extend(&mut self, other: Samples) {
        self.x.extend(other.x);
        self.pi.extend(other.pi);
        self.z.extend(other.z);
    }

    /// The arrays of the NPZ file.
    pub fn to_arrays(&self) -> BTreeMap<String, Array> {
        let n = self.len();
        let mut arrays = BTreeMap::new();
        arrays.insert(
            "x".into(),
            Array {
                shape: vec![n, 2, ROWS, COLUMNS],
                data: self.x.clone(),
            },
        );
        arrays.insert(
            "pi".into(),
            Array {
                shape: vec![n, COLUMNS],
                data: self.pi.clone(),
            },
        );
        arrays.insert(
            "z".into(),
            Array {
                shape: vec![n],
                data: self.z.clone(),
            },
        );
        arrays
    }

    /// Reads the arrays of an NPZ file back, checking their shapes.
    pub fn from_arrays(arrays: &BTreeMap<String, Array>) -> Result<Samples, String> {
        let get = |name: &str| arrays.get(name).ok_or_else(|| format!("no array {name:?}"));
        let (x, pi, z) = (get("x")?, get("pi")?, get("z")?);
        let n = z.shape.first().copied().unwrap_or(0);
        if z.shape != [n] || x.shape != [n, 2, ROWS, COLUMNS] || pi.shape != [n, COLUMNS] {
            return Err(format!(
                "shapes x {:?}, pi {:?}, z {:?} are not [N, 2, {ROWS}, {COLUMNS}], [N, {COLUMNS}], [N]",
                x.shape, pi.shape, z.shape
            ));
        }
        Ok(Samples {
            x: x.data.clone(),
            pi: pi.data.clone(),
            z: z.data.clone(),
        })
    }
}

/// Every position of a checked game and its mirror image.
pub fn samples(game: &GameRecord) -> Result<Samples, RecordError> {
    game.check()?;
    let mut out = Samples::default();
    let mut board = Board::new();
    let mut mirrored = Board::new();
    for (&column, visits) in game.moves.iter().zip(&game.visits) {
        let total = visits.iter().sum::<u32>().max(1) as f32;
        let z = game.outcome.value_for(board.to_move());
        for (position, flip) in [(&board, false), (&mirrored, true)] {
            out.x.extend_from_slice(&position.features());
            out.pi.extend((0..COLUMNS).map(|c| {
                let from = if flip { mirror_column(c) } else { c };
                visits[from] as f32 / total
            }));
            out.z.push(z);
        }
        let column = usize::from(column);
        board.play(column).map_err(|source| RecordError::Move {
            index: board.plies(),
            source,
        })?;
        mirrored
            .play(mirror_column(column))
            .map_err(|source| RecordError::Move {
                index: mirrored.plies(),
                source,
            })?;
    }
    debug_assert_eq!(out.x.len(), out.len() * FEATURES);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::npz;

    fn record() -> GameRecord {
        GameRecord {
            moves: vec![0, 1, 0, 1, 0, 1, 0],
            visits: vec![[1, 2, 3, 4, 5, 6, 7]; 7],
            outcome: Outcome::FirstWins,
            round: 1,
            simulations: 28,
            batch_size: 8,
        }
    }

    #[test]
    fn a_game_becomes_mirrored_samples_that_survive_npz() {
        let game = record();
        let samples = samples(&game).expect("samples");
        assert_eq!(samples.len(), 14);
        // The first position, and its mirror.
        assert_eq!(samples.z[..4], [1.0, 1.0, -1.0, -1.0]);
        assert_eq!(samples.pi[0], 1.0 / 28.0);
        assert_eq!(samples.pi[COLUMNS], 7.0 / 28.0, "mirrored policy");
        // After the first move (column 0), the mirror has the stone in column 6.
        let second = &samples.x[2 * FEATURES..3 * FEATURES];
        let second_mirror = &samples.x[3 * FEATURES..4 * FEATURES];
        assert_eq!((second[42], second_mirror[42 + 6]), (1.0, 1.0));

        let bytes = npz::encode(&samples.to_arrays()).expect("encode");
        let back = Samples::from_arrays(&npz::decode(&bytes).expect("decode")).expect("shapes");
        assert_eq!(back, samples);
    }

    #[test]
    fn broken_records_are_refused() {
        let mut short = record();
        short.visits.pop();
        assert_eq!(
            short.check(),
            Err(RecordError::Lengths {
                moves: 7,
                visits: 6
            })
        );
        let mut lie = record();
        lie.outcome = Outcome::Draw;
        assert!(matches!(lie.check(), Err(RecordError::Outcome { .. })));
        let mut unfinished = record();
        unfinished.moves.pop();
        unfinished.visits.pop();
        assert!(matches!(
            samples(&unfinished),
            Err(RecordError::Outcome { actual: None, .. })
        ));
        let mut illegal = record();
        illegal.moves[2] = 9;
        assert!(matches!(
            illegal.check(),
            Err(RecordError::Move { index: 2, .. })
        ));
        let mut arrays = record_arrays();
        arrays.remove("pi");
        assert!(Samples::from_arrays(&arrays).is_err());
    }

    fn record_arrays() -> BTreeMap<String, Array> {
        samples(&record()).expect("samples").to_arrays()
    }
}
