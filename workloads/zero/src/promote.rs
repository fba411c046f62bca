//! The promotion rule, the Elo history and the feedback to the next round,
//! as one pure function of the evaluation, the loop's state and the rule.

use serde::{Deserialize, Serialize};

/// When a candidate replaces the best model, and how the loop reacts when
/// candidates keep failing.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PromotionRule {
    /// Score (wins + half the draws, over games) at or above which the
    /// candidate is promoted.
    pub threshold: f64,
    /// Rounds without a promotion after which self-play searches harder.
    pub stall_rounds: u32,
    /// The most simulations feedback may ask for.
    pub max_simulations: u32,
}

impl Default for PromotionRule {
    fn default() -> Self {
        PromotionRule {
            threshold: 0.55,
            stall_rounds: 2,
            max_simulations: 800,
        }
    }
}

impl PromotionRule {
    /// Checks the rule's fields (one error naming the field).
    pub fn check(&self) -> Result<(), String> {
        if !(self.threshold > 0.0 && self.threshold <= 1.0) {
            return Err(format!("threshold: {} is not in (0, 1]", self.threshold));
        }
        if self.stall_rounds == 0 {
            return Err("stall_rounds: must be at least 1".into());
        }
        if self.max_simulations == 0 {
            return Err("max_simulations: must be at least 1".into());
        }
        Ok(())
    }
}

/// The loop's state between rounds (`state.json`): which round runs next
/// and the self-play settings it uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoopState {
    /// The round self-play, export, training, evaluation and promotion work on.
    pub round: u32,
    /// MCTS simulations per self-play move.
    pub simulations: u32,
    /// Opening moves played in proportion to visits (then the most visited).
    pub temperature_plies: u32,
    /// Rounds since the last promotion.
    pub stalled: u32,
    /// Elo of the best model.
    pub best_elo: f64,
    /// The round whose candidate is the best model (0: the untrained model).
    pub best_round: u32,
}

impl LoopState {
    /// The state before the first round.
    pub fn initial(simulations: u32) -> LoopState {
        LoopState {
            round: 1,
            simulations,
            temperature_plies: 8,
            stalled: 0,
            best_elo: 0.0,
            best_round: 0,
        }
    }
}

/// Games of a candidate against the best model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Match {
    /// Games the candidate won.
    pub wins: u32,
    /// Games it lost.
    pub losses: u32,
    /// Games drawn.
    pub draws: u32,
}

impl Match {
    /// Counts one game by its result for the candidate (1, 0 or -1).
    pub fn record(&mut self, value: f32) {
        if value > 0.0 {
            self.wins += 1;
        } else if value < 0.0 {
            self.losses += 1;
        } else {
            self.draws += 1;
        }
    }

    /// Games played.
    pub fn games(&self) -> u32 {
        self.wins + self.losses + self.draws
    }

    /// Wins plus half the draws, over games (0.5 for no games).
    pub fn score(&self) -> f64 {
        if self.games() == 0 {
            return 0.5;
        }
        (f64::from(self.wins) + 0.5 * f64::from(self.draws)) / f64::from(self.games())
    }
}

/// One line of the ratings history (`ratings.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rating {
    /// The round evaluated.
    pub round: u32,
    /// The candidate's score against the best model.
    pub score: f64,
    /// The candidate's Elo (the best model's plus the difference its score shows).
    pub candidate_elo: f64,
    /// The best model's Elo before this round.
    pub best_elo: f64,
    /// Whether the candidate became the best model.
    pub promoted: bool,
    /// The candidate's games against the best model.
    pub result: Match,
}

/// What promotion decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Whether the candidate replaces the best model.
    pub promoted: bool,
    /// The history line to append.
    pub rating: Rating,
    /// The state for the next round.
    pub next: LoopState,
}

/// The Elo difference a score shows, clamped to +-800 (a score of 0 or 1
/// over a few games is not an infinite difference).
pub fn elo_difference(score: f64) -> f64 {
    let s = score.clamp(0.01, 0.99);
    -400.0 * (1.0 / s - 1.0).log10()
}

/// Applies the rule: promote at or above the threshold; after
/// `stall_rounds` rounds without a promotion, double the self-play
/// simulations (up to the maximum) and shorten the exploratory opening by
/// two moves, then count again.
pub fn decide(rule: &PromotionRule, state: &LoopState, result: Match) -> Decision {
    let score = result.score();
    let promoted = result.games() > 0 && score >= rule.threshold;
    let candidate_elo = state.best_elo + elo_difference(score);
    let mut next = state.clone();
    next.round = state.round + 1;
    if promoted {
        next.stalled = 0;
        next.best_elo = candidate_elo;
        next.best_round = state.round;
    } else {
        next.stalled = state.stalled + 1;
        if next.stalled >= rule.stall_rounds {
            next.simulations = state
                .simulations
                .saturating_mul(2)
                .min(rule.max_simulations)
                .max(state.simulations);
            next.temperature_plies = state.temperature_plies.saturating_sub(2);
            next.stalled = 0;
        }
    }
    Decision {
        promoted,
        rating: Rating {
            round: state.round,
            score,
            candidate_elo,
            best_elo: state.best_elo,
            promoted,
            result,
        },
        next,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn game(wins: u32, losses: u32, draws: u32) -> Match {
        Match {
            wins,
            losses,
            draws,
        }
    }

    #[test]
    fn promotion_is_at_or_above_the_threshold() {
        let rule = PromotionRule::default();
        let state = LoopState::initial(32);
        // (result, promoted)
        let cases = [
            (game(11, 9, 0), true),  // 0.55 exactly
            (game(10, 9, 1), false), // 0.525
            (game(10, 8, 2), true),  // draws count half: 0.55
            (game(20, 0, 0), true),
            (game(0, 0, 0), false), // no games, no promotion
            (game(0, 20, 0), false),
        ];
        for (result, promoted) in cases {
            let decision = decide(&rule, &state, result);
            assert_eq!(decision.promoted, promoted, "{result:?}");
            assert_eq!(decision.rating.promoted, promoted);
            assert_eq!(decision.next.round, 2);
            assert_eq!(decision.next.best_round, if promoted { 1 } else { 0 });
        }
        let strict = PromotionRule {
            threshold: 0.75,
            ..rule
        };
        assert!(!decide(&strict, &state, game(14, 6, 0)).promoted);
        assert!(decide(&strict, &state, game(15, 5, 0)).promoted);
    }

    #[test]
    fn elo_follows_the_score_and_the_best_model() {
        assert_eq!(elo_difference(0.5), 0.0);
        assert!((elo_difference(0.75) - 190.85).abs() < 0.01);
        assert!((elo_difference(1.0) - 798.25).abs() < 0.01, "clamped");
        assert!((elo_difference(0.0) + elo_difference(1.0)).abs() < 1e-9);
        let state = LoopState {
            best_elo: 100.0,
            ..LoopState::initial(32)
        };
        let promoted = decide(&PromotionRule::default(), &state, game(3, 1, 0));
        assert!((promoted.rating.candidate_elo - 290.85).abs() < 0.01);
        assert_eq!(promoted.next.best_elo, promoted.rating.candidate_elo);
        let kept = decide(&PromotionRule::default(), &state, game(1, 3, 0));
        assert_eq!(
            kept.next.best_elo, 100.0,
            "a failed candidate changes nothing"
        );
        assert_eq!(kept.rating.best_elo, 100.0);
    }

    #[test]
    fn stalled_rounds_make_self_play_search_harder() {
        let rule = PromotionRule {
            max_simulations: 100,
            ..PromotionRule::default()
        };
        let lose = game(0, 4, 0);
        let first = decide(&rule, &LoopState::initial(32), lose);
        assert_eq!((first.next.stalled, first.next.simulations), (1, 32));
        let second = decide(&rule, &first.next, lose);
        assert_eq!(
            (
                second.next.stalled,
                second.next.simulations,
                second.next.temperature_plies
            ),
            (0, 64, 6)
        );
        let third = decide(&rule, &decide(&rule, &second.next, lose).next, lose);
        assert_eq!(third.next.simulations, 100, "capped at the maximum");
        let win = decide(&rule, &first.next, game(4, 0, 0));
        assert_eq!((win.next.stalled, win.next.simulations), (0, 32));
    }

    #[test]
    fn bad_rules_name_the_field() {
        let bad = [
            (
                PromotionRule {
                    threshold: 0.0,
                    ..PromotionRule::default()
                },
                "threshold",
            ),
            (
                PromotionRule {
                    threshold: 1.5,
                    ..PromotionRule::default()
                },
                "threshold",
            ),
            (
                PromotionRule {
                    threshold: f64::NAN,
                    ..PromotionRule::default()
                },
                "threshold",
            ),
            (
                PromotionRule {
                    stall_rounds: 0,
                    ..PromotionRule::default()
                },
                "stall_rounds",
            ),
            (
                PromotionRule {
                    max_simulations: 0,
                    ..PromotionRule::default()
                },
                "max_simulations",
            ),
        ];
        for (rule, field) in bad {
            let err = rule.check().expect_err("refused");
            assert!(err.starts_with(field), "{err}");
        }
        PromotionRule::default()
            .check()
            .expect("the default is valid");
    }
}
