//! Connect Four on a 7x6 board, as two bitboards.
//!
//! Bit `col * 7 + row` is the cell in column `col`, row `row` (row 0 at the
//! bottom); bit `col * 7 + 6` stays empty so that shifts by 1, 6, 7 and 8
//! never wrap a line from one column into the next.

use thiserror::Error;

/// Columns of the board.
pub const COLUMNS: usize = 7;
/// Rows of the board.
pub const ROWS: usize = 6;
/// Cells of the board.
pub const CELLS: usize = COLUMNS * ROWS;
/// Length of [`Board::features`]: the mover's stones, then the opponent's.
pub const FEATURES: usize = 2 * CELLS;

/// How a finished game ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The player who moved first connected four.
    FirstWins,
    /// The player who moved second connected four.
    SecondWins,
    /// The board filled up.
    Draw,
}

impl Outcome {
    /// The result for `player` (0 moves first): 1 win, 0 draw, -1 loss.
    pub fn value_for(self, player: usize) -> f32 {
        match (self, player) {
            (Outcome::Draw, _) => 0.0,
            (Outcome::FirstWins, 0) | (Outcome::SecondWins, 1) => 1.0,
            _ => -1.0,
        }
    }
}

/// A move the board refuses.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum GameError {
    /// The column does not exist.
    #[error("column {0} is off the board (0..{COLUMNS})")]
    NoSuchColumn(usize),
    /// The column is full.
    #[error("column {0} is full")]
    ColumnFull(usize),
    /// The game has already ended.
    #[error("the game is over")]
    GameOver,
}

/// A position: whose stones are where, and whether the game is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Board {
    /// Stones of the first and the second player.
    stones: [u64; 2],
    /// Stones in each column.
    heights: [u8; COLUMNS],
    /// Moves played so far.
    plies: u8,
    outcome: Option<Outcome>,
}

impl Default for Board {
    fn default() -> Self {
        Board::new()
    }
}

impl Board {
    /// The empty board, first player to move.
    pub fn new() -> Board {
        Board {
            stones: [0; 2],
            heights: [0; COLUMNS],
            plies: 0,
            outcome: None,
        }
    }

    /// The position after `moves` (columns) from the empty board.
    pub fn from_moves(moves: &[u8]) -> Result<Board, GameError> {
        let mut board = Board::new();
        for &column in moves {
            board.play(usize::from(column))?;
        }
        Ok(board)
    }

    /// The player to move: 0 (first) or 1 (second).
    pub fn to_move(&self) -> usize {
        usize::from(self.plies % 2)
    }

    /// Moves played so far.
    pub fn plies(&self) -> usize {
        usize::from(self.plies)
    }

    /// How the game ended, or `None` while it goes on.
    pub fn outcome(&self) -> Option<Outcome> {
        self.outcome
    }

    /// Whether a stone may be dropped into `column` now.
    pub fn is_legal(&self, column: usize) -> bool {
        self.outcome.is_none() && column < COLUMNS && usize::from(self.heights[column]) < ROWS
    }

    /// Legal moves, as a mask over the columns.
    pub fn legal(&self) -> [bool; COLUMNS] {
        std::array::from_fn(|c| self.is_legal(c))
    }

    /// Drops the mover's stone into `column`.
    pub fn play(&mut self, column: usize) -> Result<(), GameError> {
        if self.outcome.is_some() {
            return Err(GameError::GameOver);
        }
        if column >= COLUMNS {
            return Err(GameError::NoSuchColumn(column));
        }
        if usize::from(self.heights[column]) >= ROWS {
            return Err(GameError::ColumnFull(column));
        }
        let player = self.to_move();
        self.stones[player] |= 1u64 << (column * 7 + usize::from(self.heights[column]));
        self.heights[column] += 1;
        self.plies += 1;
        if connects_four(self.stones[player]) {
            self.outcome = Some(if player == 0 {
                Outcome::FirstWins
            } else {
                Outcome::SecondWins
            });
        } else if self.plies() == CELLS {
            self.outcome = Some(Outcome::Draw);
        }
        Ok(())
    }

    /// The owner (0 or 1) of the cell at `row` (0 at the bottom) and `column`.
    pub fn cell(&self, row: usize, column: usize) -> Option<usize> {
        let bit = 1u64 << (column * 7 + row);
        (0..2).find(|&p| self.stones[p] & bit != 0)
    }

    /// The network's input: [`CELLS`] values for the mover's stones, then
    /// [`CELLS`] for the opponent's, row-major from the bottom row (the
    /// layout of the exported `x` tensor, shape `[2, ROWS, COLUMNS]`).
    pub fn features(&self) -> [f32; FEATURES] {
        let mover = self.to_move();
        let mut out = [0.0; FEATURES];
        for row in 0..ROWS {
            for column in 0..COLUMNS {
                if let Some(owner) = self.cell(row, column) {
                    let plane = usize::from(owner != mover);
                    out[plane * CELLS + row * COLUMNS + column] = 1.0;
                }
            }
        }
        out
    }
}

/// Whether a player's stones hold four in a line.
fn connects_four(stones: u64) -> bool {
    // 1: vertical, 7: horizontal, 6 and 8: the two diagonals.
    [1, 7, 6, 8].into_iter().any(|shift| {
        let pairs = stones & (stones >> shift);
        pairs & (pairs >> (2 * shift)) != 0
    })
}

/// The column mirrored left to right.
pub fn mirror_column(column: usize) -> usize {
    COLUMNS - 1 - column
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(moves: &[u8]) -> Option<Outcome> {
        Board::from_moves(moves).expect("legal moves").outcome()
    }

    #[test]
    fn four_in_a_line_wins_in_every_direction() {
        let cases: &[(&str, &[u8], Option<Outcome>)] = &[
            ("vertical", &[0, 1, 0, 1, 0, 1, 0], Some(Outcome::FirstWins)),
            (
                "horizontal",
                &[0, 0, 1, 1, 2, 2, 3],
                Some(Outcome::FirstWins),
            ),
            (
                "rising diagonal",
                &[0, 1, 1, 2, 2, 3, 2, 3, 3, 6, 3],
                Some(Outcome::FirstWins),
            ),
            (
                "falling diagonal",
                &[3, 2, 2, 1, 1, 0, 1, 0, 0, 6, 0],
                Some(Outcome::FirstWins),
            ),
            (
                "second player",
                &[6, 0, 1, 0, 1, 0, 1, 0],
                Some(Outcome::SecondWins),
            ),
            ("three only", &[0, 1, 0, 1, 0], None),
            // The top three cells of column 0 and the bottom of column 1
            // would be four consecutive bits without the sentinel row.
            (
                "no wrap between columns",
                &[1, 0, 6, 0, 6, 0, 0, 5, 0, 5, 0],
                None,
            ),
            ("horizontal broken by a gap", &[0, 0, 1, 1, 3, 3, 4], None),
        ];
        for (name, moves, expected) in cases {
            assert_eq!(outcome(moves), *expected, "{name}");
        }
    }

    #[test]
    fn a_full_board_without_a_line_is_a_draw() {
        // Columns filled in pairs 0-1, 2-3, 4-5 in a pattern without four,
        // then column 6.
        let mut moves = Vec::new();
        for pair in [[0u8, 1], [2, 3], [4, 5]] {
            for _ in 0..3 {
                moves.extend_from_slice(&[pair[0], pair[1]]);
            }
            for _ in 0..3 {
                moves.extend_from_slice(&[pair[1], pair[0]]);
            }
        }
        moves.extend_from_slice(&[6; 6]);
        let board = Board::from_moves(&moves).expect("legal");
        assert_eq!(board.plies(), CELLS);
        assert_eq!(board.outcome(), Some(Outcome::Draw));
        assert_eq!(board.legal(), [false; COLUMNS]);
    }

    #[test]
    fn illegal_moves_are_refused_and_change_nothing() {
        let mut full = Board::from_moves(&[0; 6]).expect("legal");
        let before = full;
        assert_eq!(full.play(0), Err(GameError::ColumnFull(0)));
        assert_eq!(full.play(7), Err(GameError::NoSuchColumn(7)));
        assert_eq!(full, before);
        let mut over = Board::from_moves(&[0, 1, 0, 1, 0, 1, 0]).expect("legal");
        assert_eq!(over.play(2), Err(GameError::GameOver));
        assert!(!over.is_legal(2));
    }

    #[test]
    fn features_are_from_the_movers_side() {
        let board = Board::from_moves(&[3]).expect("legal");
        let features = board.features();
        // The second player moves: the stone in column 3 is the opponent's.
        assert_eq!(features[3], 0.0);
        assert_eq!(features[CELLS + 3], 1.0);
        assert_eq!(features.iter().sum::<f32>(), 1.0);
        assert_eq!(Outcome::FirstWins.value_for(0), 1.0);
        assert_eq!(Outcome::FirstWins.value_for(1), -1.0);
        assert_eq!(Outcome::Draw.value_for(1), 0.0);
    }
}
