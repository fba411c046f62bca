//! Monte-Carlo tree search with PUCT selection, many trees at once.
//!
//! Each simulation of [`search`] descends every tree to one leaf and
//! evaluates all their leaves in one call of the [`Evaluator`]: with as many
//! trees as the job's batch size, every call is one full batch (fewer only as
//! the last games end). A leaf whose game is over is scored exactly and never
//! sent to the evaluator.

use rand::Rng;
use rand::rngs::SmallRng;

use crate::game::{Board, COLUMNS};
use crate::model::{EvalError, Evaluation, Evaluator};

/// Search settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SearchConfig {
    /// Exploration weight of the prior in PUCT.
    pub c_puct: f32,
    /// Weight of the root noise mixed into the prior in self-play (0: none).
    pub noise_weight: f32,
}

impl Default for SearchConfig {
    fn default() -> Self {
        SearchConfig {
            c_puct: 1.5,
            noise_weight: 0.25,
        }
    }
}

#[derive(Debug, Clone)]
struct Node {
    board: Board,
    prior: f32,
    visits: u32,
    /// Sum of results from the view of the player who moved into this node,
    /// so that a parent picks the child with the highest mean.
    value_sum: f32,
    /// `(column, node index)` once expanded.
    children: Vec<(usize, usize)>,
}

/// One search tree, rooted at the position to move from.
#[derive(Debug, Clone)]
pub struct Tree {
    nodes: Vec<Node>,
    /// Noise mixed into the root's prior when it is expanded.
    root_noise: Option<[f32; COLUMNS]>,
    config: SearchConfig,
}

/// A leaf waiting for its evaluation: the path from the root.
#[derive(Debug, Clone)]
pub struct Leaf {
    path: Vec<usize>,
}

impl Tree {
    /// A tree for `board`; with `noise` (self-play), root noise drawn from
    /// `rng` is mixed into the root prior.
    pub fn new(board: Board, config: SearchConfig, rng: Option<&mut SmallRng>) -> Tree {
        let root_noise = rng.filter(|_| config.noise_weight > 0.0).map(dirichlet_one);
        Tree {
            nodes: vec![Node {
                board,
                prior: 1.0,
                visits: 0,
                value_sum: 0.0,
                children: Vec::new(),
            }],
            root_noise,
            config,
        }
    }

    /// The root position.
    pub fn board(&self) -> &Board {
        &self.nodes[0].board
    }

    /// Descends to a leaf by PUCT. A leaf whose game is over is scored and
    /// backed up here (`None`); otherwise the leaf needs an evaluation.
    pub fn select(&mut self) -> Option<(Leaf, Board)> {
        let mut path = vec![0];
        let mut at = 0;
        while !self.nodes[at].children.is_empty() {
            at = self.best_child(at);
            path.push(at);
        }
        let board = self.nodes[at].board;
        match board.outcome() {
            Some(outcome) => {
                self.backup(&path, outcome.value_for(board.to_move()));
                None
            }
            None => Some((Leaf { path }, board)),
        }
    }

    fn best_child(&self, parent: usize) -> usize {
        let node = &self.nodes[parent];
        let sqrt_n = (node.visits.max(1) as f32).sqrt();
        let score = |&(_, child): &(usize, usize)| {
            let child = &self.nodes[child];
            let q = if child.visits == 0 {
                0.0
            } else {
                child.value_sum / child.visits as f32
            };
            q + self.config.c_puct * child.prior * sqrt_n / (1.0 + child.visits as f32)
        };
        // Children exist (the caller checked); the first wins ties.
        let mut best = node.children[0];
        for &child in &node.children[1..] {
            if score(&child) > score(&best) {
                best = child;
            }
        }
        best.1
    }

    /// Expands `leaf` with its evaluation and backs the value up.
    pub fn expand(&mut self, leaf: Leaf, evaluation: Evaluation) {
        let Some(&at) = leaf.path.last() else {
            return;
        };
        let board = self.nodes[at].board;
        let mut prior = masked_prior(&board, &evaluation.policy);
        if let (0, Some(noise)) = (at, self.root_noise) {
            let w = self.config.noise_weight;
            let noisy: [f32; COLUMNS] =
                std::array::from_fn(|c| (1.0 - w) * prior[c] + w * noise[c]);
            prior = masked_prior(&board, &noisy);
        }
        if self.nodes[at].children.is_empty() {
            for column in (0..COLUMNS).filter(|&c| board.is_legal(c)) {
                let mut next = board;
                if next.play(column).is_err() {
                    continue;
                }
                self.nodes.push(Node {
                    board: next,
                    prior: prior[column],
                    visits: 0,
                    value_sum: 0.0,
                    children: Vec::new(),
                });
                let index = self.nodes.len() - 1;
                self.nodes[at].children.push((column, index));
            }
        }
        self.backup(&leaf.path, evaluation.value.clamp(-1.0, 1.0));
    }

    /// `value` is for the player to move at the end of `path`.
    fn backup(&mut self, path: &[usize], value: f32) {
        let mut value = -value;
        for &index in path.iter().rev() {
            let node = &mut self.nodes[index];
            node.visits += 1;
            node.value_sum += value;
            value = -value;
        }
    }

    /// Visits of each root move.
    pub fn visits(&self) -> [u32; COLUMNS] {
        let mut out = [0; COLUMNS];
        for &(column, child) in &self.nodes[0].children {
            out[column] = self.nodes[child].visits;
        }
        out
    }
}

/// The prior restricted to legal moves and normalised (uniform over legal
/// moves when the policy gives them no weight).
fn masked_prior(board: &Board, policy: &[f32; COLUMNS]) -> [f32; COLUMNS] {
    let legal = board.legal();
    let weight = |c: usize| {
        if legal[c] && policy[c].is_finite() {
            policy[c].max(0.0)
        } else {
            0.0
        }
    };
    let sum: f32 = (0..COLUMNS).map(weight).sum();
    let count = legal.iter().filter(|&&l| l).count().max(1) as f32;
    std::array::from_fn(|c| match (legal[c], sum > 0.0) {
        (false, _) => 0.0,
        (true, true) => weight(c) / sum,
        (true, false) => 1.0 / count,
    })
}

/// A draw from Dirichlet(1, ..., 1): normalised exponential samples.
fn dirichlet_one(rng: &mut SmallRng) -> [f32; COLUMNS] {
    let draws: [f32; COLUMNS] = std::array::from_fn(|_| -(1.0 - rng.random::<f32>()).ln());
    let sum: f32 = draws.iter().sum();
    std::array::from_fn(|c| draws[c] / sum)
}

/// Runs `simulations` simulations on every tree, evaluating the leaves of
/// all trees in one batch per simulation. Stops at the first evaluation
/// that fails.
pub fn search<E: Evaluator>(
    trees: &mut [Tree],
    simulations: u32,
    evaluator: &mut E,
) -> Result<(), EvalError> {
    let owners = vec![0; trees.len()];
    search_split(
        trees,
        &owners,
        simulations,
        &mut [evaluator as &mut dyn Evaluator],
    )
}

/// [`search`] where tree `i` asks `evaluators[owners[i]]` (in a match, each
/// side's own network): per simulation, one batch per evaluator, holding
/// the leaves of every tree it owns.
pub fn search_split(
    trees: &mut [Tree],
    owners: &[usize],
    simulations: u32,
    evaluators: &mut [&mut dyn Evaluator],
) -> Result<(), EvalError> {
    for _ in 0..simulations {
        for (owner, evaluator) in evaluators.iter_mut().enumerate() {
            let mut leaves = Vec::with_capacity(trees.len());
            let mut boards = Vec::with_capacity(trees.len());
            for (index, tree) in trees.iter_mut().enumerate() {
                if owners.get(index) != Some(&owner) {
                    continue;
                }
                if let Some((leaf, board)) = tree.select() {
                    leaves.push((index, leaf));
                    boards.push(board);
                }
            }
            if boards.is_empty() {
                continue;
            }
            let evaluations = evaluator.evaluate(&boards)?;
            if evaluations.len() != boards.len() {
                return Err(EvalError(format!(
                    "{} evaluations for {} positions",
                    evaluations.len(),
                    boards.len()
                )));
            }
            for ((index, leaf), evaluation) in leaves.into_iter().zip(evaluations) {
                trees[index].expand(leaf, evaluation);
            }
        }
    }
    Ok(())
}

/// The move to play from root visits: the most visited at temperature 0
/// (ties to a random one), otherwise drawn in proportion to visits.
pub fn choose_move(visits: &[u32; COLUMNS], explore: bool, rng: &mut SmallRng) -> Option<usize> {
    let total: u32 = visits.iter().sum();
    if total == 0 {
        return None;
    }
    if explore {
        let mut pick = rng.random_range(0..total);
        for (column, &v) in visits.iter().enumerate() {
            if pick < v {
                return Some(column);
            }
            pick -= v;
        }
        return None;
    }
    let best = visits.iter().copied().max().unwrap_or(0);
    let tied: Vec<usize> = (0..COLUMNS).filter(|&c| visits[c] == best).collect();
    Some(tied[rng.random_range(0..tied.len())])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{LinearModel, RolloutEvaluator};
    use rand::SeedableRng;

    fn best_move(moves: &[u8], simulations: u32, seed: u64) -> usize {
        let board = Board::from_moves(moves).expect("legal");
        let config = SearchConfig {
            noise_weight: 0.0,
            ..SearchConfig::default()
        };
        let mut trees = vec![Tree::new(board, config, None)];
        let mut evaluator =
            RolloutEvaluator::new(LinearModel::untrained(), SmallRng::seed_from_u64(seed));
        search(&mut trees, simulations, &mut evaluator).expect("search");
        let mut rng = SmallRng::seed_from_u64(seed);
        choose_move(&trees[0].visits(), false, &mut rng).expect("a move")
    }

    #[test]
    fn the_search_takes_a_win_in_one() {
        // (moves so far, winning columns)
        let cases: &[(&[u8], &[usize])] = &[
            (&[0, 1, 0, 1, 0, 1], &[0]),             // vertical
            (&[1, 1, 2, 2, 3, 3], &[0, 4]),          // open horizontal three
            (&[6, 0, 1, 0, 1, 0, 1], &[0]),          // the second player's vertical
            (&[0, 1, 1, 2, 2, 3, 2, 3, 3, 6], &[3]), // diagonal (0,0)-(3,3)
        ];
        for seed in 0..3 {
            for (moves, wins) in cases {
                let chosen = best_move(moves, 200, seed);
                assert!(
                    wins.contains(&chosen),
                    "{moves:?} seed {seed}: played {chosen}"
                );
            }
        }
    }

    #[test]
    fn the_search_blocks_a_loss_in_one() {
        let cases: &[(&[u8], usize)] = &[
            (&[0, 1, 0, 1, 0], 0),                // block the vertical
            (&[6, 0, 6, 0, 5, 0], 0),             // the first player blocks
            (&[1, 0, 2, 1, 6, 2, 5, 3, 6, 3], 0), // the second player's row-1 three
        ];
        for seed in 0..3 {
            for (moves, block) in cases {
                assert_eq!(best_move(moves, 400, seed), *block, "{moves:?} seed {seed}");
            }
        }
    }

    #[test]
    fn every_simulation_is_one_batch_over_all_trees() {
        struct Counting(Vec<usize>);
        impl Evaluator for Counting {
            fn evaluate(&mut self, boards: &[Board]) -> Result<Vec<Evaluation>, EvalError> {
                self.0.push(boards.len());
                Ok(boards
                    .iter()
                    .map(|_| Evaluation {
                        policy: [1.0; COLUMNS],
                        value: 0.0,
                    })
                    .collect())
            }
        }
        let config = SearchConfig::default();
        let mut trees: Vec<Tree> = (0..5)
            .map(|_| Tree::new(Board::new(), config, None))
            .collect();
        let mut counting = Counting(Vec::new());
        search(&mut trees, 10, &mut counting).expect("search");
        assert_eq!(counting.0, vec![5; 10]);
        for tree in &trees {
            // The first simulation expands the root; nine reach children.
            assert_eq!(tree.visits().iter().sum::<u32>(), 9);
        }
    }

    #[test]
    fn a_failed_evaluation_stops_the_search_with_its_error() {
        struct Failing;
        impl Evaluator for Failing {
            fn evaluate(&mut self, _: &[Board]) -> Result<Vec<Evaluation>, EvalError> {
                Err(EvalError("out of memory".into()))
            }
        }
        struct Short;
        impl Evaluator for Short {
            fn evaluate(&mut self, _: &[Board]) -> Result<Vec<Evaluation>, EvalError> {
                Ok(Vec::new())
            }
        }
        let mut trees = vec![Tree::new(Board::new(), SearchConfig::default(), None); 2];
        let err = search(&mut trees, 4, &mut Failing).expect_err("failed");
        assert_eq!(err, EvalError("out of memory".into()));
        let err = search(&mut trees, 4, &mut Short).expect_err("short");
        assert!(err.0.contains("0 evaluations for 2 positions"), "{err}");
    }

    #[test]
    fn noise_and_priors_only_cover_legal_moves() {
        let board = Board::from_moves(&[0; 6]).expect("legal");
        let prior = masked_prior(&board, &[5.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
        assert_eq!(prior[0], 0.0);
        assert!((prior.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let uniform = masked_prior(&board, &[0.0; COLUMNS]);
        assert!((uniform[3] - 1.0 / 6.0).abs() < 1e-6);
        let mut rng = SmallRng::seed_from_u64(3);
        let noise = dirichlet_one(&mut rng);
        assert!((noise.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        assert_eq!(choose_move(&[0, 0, 5, 0, 0, 0, 0], true, &mut rng), Some(2));
        assert_eq!(choose_move(&[0; COLUMNS], false, &mut rng), None);
    }
}
