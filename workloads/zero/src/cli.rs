//! The stages, one module each, over the data directory they share.

pub mod data;
pub mod evaluate;
pub mod export;
pub mod learn_check;
pub mod promote;
pub mod selfplay;
pub mod train;

/// A seed that differs between jobs, attempts and rounds (`--seed` fixes one).
pub fn default_seed(tag: &str, round: u32) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (tag, round).hash(&mut hasher);
    hasher.finish()
}
