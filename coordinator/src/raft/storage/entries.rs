//! The log's entries after the compaction point: each one's term and
//! place in the segment files ([`super::super::wal`]), and the newest ones
//! also decoded in memory, up to a byte budget.
//!
//! Up to 10,000 entries lie between two compactions, and an entry may be
//! a batch of up to 1 MiB: held whole, the log could have cost a replica
//! hundreds of MiB. What raft-rs reads again is almost always the newest
//! entries (a follower's next append, the entries to apply), which stay
//! decoded; an older one (a lagging follower's) is read back from its file.

use std::collections::VecDeque;

use raft::eraftpb::Entry;

use super::super::RaftError;
use super::super::wal::Place;

/// Bytes of decoded entries held in memory (the newest).
pub(super) const CACHE_BYTES: u64 = 4 << 20;

/// One entry of the log.
struct Slot {
    term: u64,
    place: Place,
    /// The entry, while it is among the newest `CACHE_BYTES`.
    entry: Option<Entry>,
}

/// The entries from `first` on, contiguous.
pub(super) struct LogEntries {
    /// The index of `slots[0]` (the one after the compaction point).
    first: u64,
    slots: VecDeque<Slot>,
    /// `slots[cached_from..]` hold their entry.
    cached_from: usize,
    cached_bytes: u64,
    budget: u64,
}

impl LogEntries {
    /// An empty log whose next entry is `first`.
    pub(super) fn new(first: u64, budget: u64) -> LogEntries {
        LogEntries {
            first,
            slots: VecDeque::new(),
            cached_from: 0,
            cached_bytes: 0,
            budget,
        }
    }

    /// The index the next entry must have.
    pub(super) fn next_index(&self) -> u64 {
        self.first + self.slots.len() as u64
    }

    /// Index and term of the last entry, if any.
    pub(super) fn last(&self) -> Option<(u64, u64)> {
        self.slots
            .back()
            .map(|slot| (self.next_index() - 1, slot.term))
    }

    /// Appends `entry` (whose index must be [`Self::next_index`]), written
    /// at `place`.
    pub(super) fn push(&mut self, entry: Entry, place: Place) -> Result<(), RaftError> {
        if entry.index != self.next_index() {
            return Err(RaftError::Inconsistent(format!(
                "raft log has a gap: entry {} follows index {}",
                entry.index,
                self.next_index() - 1
            )));
        }
        self.cached_bytes += u64::from(place.len());
        self.slots.push_back(Slot {
            term: entry.term,
            place,
            entry: Some(entry),
        });
        while self.cached_bytes > self.budget && self.cached_from + 1 < self.slots.len() {
            let slot = &mut self.slots[self.cached_from];
            if slot.entry.take().is_some() {
                self.cached_bytes -= u64::from(slot.place.len());
            }
            self.cached_from += 1;
        }
        Ok(())
    }

    /// Drops the entries at and after `index`.
    pub(super) fn truncate_from(&mut self, index: u64) {
        while self.next_index() > index.max(self.first) {
            if let Some(slot) = self.slots.pop_back()
                && slot.entry.is_some()
            {
                self.cached_bytes -= u64::from(slot.place.len());
            }
        }
        self.cached_from = self.cached_from.min(self.slots.len());
    }

    /// Drops the entries at and before `index`: the log starts after it.
    pub(super) fn compact_through(&mut self, index: u64) {
        while self.first <= index {
            match self.slots.pop_front() {
                Some(slot) => {
                    if slot.entry.is_some() {
                        self.cached_bytes -= u64::from(slot.place.len());
                    }
                    self.cached_from = self.cached_from.saturating_sub(1);
                    self.first += 1;
                }
                None => self.first = index + 1,
            }
        }
    }

    fn slot(&self, index: u64) -> Option<&Slot> {
        let offset = usize::try_from(index.checked_sub(self.first)?).ok()?;
        self.slots.get(offset)
    }

    /// The term of the entry at `index`, when the log holds it.
    pub(super) fn term(&self, index: u64) -> Option<u64> {
        self.slot(index).map(|slot| slot.term)
    }

    /// The encoded size of the entry at `index`, when the log holds it.
    pub(super) fn size(&self, index: u64) -> Option<u64> {
        self.slot(index).map(|slot| u64::from(slot.place.len()))
    }

    /// The entry at `index` (from memory, or read back from its file),
    /// `None` when the log does not hold it.
    pub(super) fn get(&self, index: u64) -> Option<Result<Entry, RaftError>> {
        let slot = self.slot(index)?;
        Some(match &slot.entry {
            Some(entry) => Ok(entry.clone()),
            None => slot.place.read(),
        })
    }

    /// The bytes of decoded entries held.
    #[cfg(test)]
    pub(super) fn cached_bytes(&self) -> u64 {
        self.cached_bytes
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use protobuf::Message as _;

    use super::super::super::wal::Wal;
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: vec![index as u8; 1000].into(),
            ..Default::default()
        }
    }

    /// Past the budget only the newest entries stay decoded; the older
    /// ones are read back from their file, the same entries; truncation
    /// and compaction keep the count of what is held.
    #[test]
    fn older_entries_are_read_back_from_their_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path(), 1 << 20, &mut |_, _| Ok(())).unwrap();
        let mut log = LogEntries::new(1, 3_500);
        let entries: Vec<Entry> = (1..=10).map(|index| entry(index, 1)).collect();
        let places = wal.append_entries(&entries).unwrap();
        for (entry, place) in entries.iter().zip(places) {
            log.push(entry.clone(), place).unwrap();
        }
        let one = u64::from(entry(1, 1).compute_size());
        assert_eq!(log.cached_bytes(), 3 * one, "the newest three");
        for index in 1..=10 {
            assert_eq!(
                log.get(index).unwrap().unwrap(),
                entries[index as usize - 1]
            );
            assert_eq!(log.term(index), Some(1));
            assert_eq!(log.size(index), Some(one));
        }
        assert!(log.get(11).is_none() && log.get(0).is_none());

        let error = log.push(entry(12, 1), log_place(&mut wal, 12)).unwrap_err();
        assert!(error.to_string().contains("gap"), "{error}");
        log.truncate_from(9);
        assert_eq!(log.last(), Some((8, 1)));
        assert_eq!(log.cached_bytes(), one);
        log.push(entry(9, 2), log_place(&mut wal, 9)).unwrap();
        assert_eq!(log.get(9).unwrap().unwrap().term, 2);
        log.compact_through(8);
        assert_eq!(log.cached_bytes(), one);
        assert!(log.get(8).is_none());
        log.compact_through(20);
        assert_eq!(
            (log.last(), log.next_index(), log.cached_bytes()),
            (None, 21, 0)
        );
    }

    fn log_place(wal: &mut Wal, index: u64) -> Place {
        let term = if index == 9 { 2 } else { 1 };
        wal.append_entries(&[entry(index, term)]).unwrap().remove(0)
    }
}
