//! Batch entries: the commands proposed in one round of the replica loop
//! share one log entry (tikv raftstore's write batches), so a burst of
//! submits costs one entry, one fsync and one storage batch.
//!
//! Layout of an entry: the tag byte [`TAG`], the number of commands (`u32`
//! little endian), then each command as its length (`u32` LE) and its
//! bytes, as the application encoded it. An entry that does not start
//! with the tag was written before batches existed and is one command
//! (the coordinator's commands were JSON, which never starts with
//! [`TAG`]). A batch entry is never empty, so an empty entry stays what
//! raft-rs appends for a new leader.

/// First byte of a batch entry (not valid UTF-8, so never JSON's first).
pub const TAG: u8 = 0xB1;
/// An entry stops growing past this many commands...
pub(crate) const MAX_COMMANDS: usize = 1024;
/// ...or past this many bytes (a larger command gets an entry of its own).
pub(crate) const MAX_BYTES: usize = 1 << 20;

const HEADER: usize = 5;
const LENGTH: usize = 4;

/// Encodes commands as one batch entry.
pub fn encode<C: AsRef<[u8]>>(commands: &[C]) -> Vec<u8> {
    let size = HEADER
        + commands
            .iter()
            .map(|c| LENGTH + c.as_ref().len())
            .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.push(TAG);
    out.extend_from_slice(&u32_of(commands.len()).to_le_bytes());
    for command in commands {
        let command = command.as_ref();
        out.extend_from_slice(&u32_of(command.len()).to_le_bytes());
        out.extend_from_slice(command);
    }
    out
}

/// A length as the `u32` of the layout. Commands are bounded far below
/// 4 GiB (gRPC messages, [`MAX_BYTES`]), and so is their number.
fn u32_of(length: usize) -> u32 {
    u32::try_from(length).unwrap_or(u32::MAX)
}

/// The commands of an entry, in order: a batch's, or the whole entry when
/// it was written before batches. An error names what is wrong; the
/// entry is then corrupt (nothing this code writes).
pub fn decode(data: &[u8]) -> Result<Vec<&[u8]>, String> {
    let Some(rest) = data.strip_prefix(&[TAG]) else {
        return Ok(vec![data]);
    };
    let (count, mut rest) = take_u32(rest).ok_or("a batch entry without its count")?;
    // Every command takes at least its length: a count past that is a lie,
    // and must not size an allocation.
    if count as usize > rest.len() / LENGTH {
        return Err(format!(
            "a batch entry of {count} commands in {} bytes",
            data.len()
        ));
    }
    let mut commands = Vec::with_capacity(count as usize);
    for i in 0..count {
        let (length, after) =
            take_u32(rest).ok_or_else(|| format!("batch command {i}: no length"))?;
        let length = length as usize;
        if length > after.len() {
            return Err(format!(
                "batch command {i}: {length} bytes, {} left",
                after.len()
            ));
        }
        let (command, after) = after.split_at(length);
        commands.push(command);
        rest = after;
    }
    if !rest.is_empty() {
        return Err(format!(
            "{} bytes after the last of {count} batch commands",
            rest.len()
        ));
    }
    Ok(commands)
}

fn take_u32(data: &[u8]) -> Option<(u32, &[u8])> {
    let (head, rest) = data.split_first_chunk::<LENGTH>()?;
    Some((u32::from_le_bytes(*head), rest))
}

/// The proposals of one round, each with the reply its proposer waits for
/// (`None` for the application's own proposals).
pub(crate) struct Batch<R> {
    commands: Vec<Vec<u8>>,
    replies: Vec<Option<R>>,
}

impl<R> Default for Batch<R> {
    fn default() -> Self {
        Batch {
            commands: Vec::new(),
            replies: Vec::new(),
        }
    }
}

impl<R> Batch<R> {
    pub(crate) fn push(&mut self, command: Vec<u8>, reply: Option<R>) {
        self.commands.push(command);
        self.replies.push(reply);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }

    /// Every reply, for failing them all.
    pub(crate) fn into_replies(self) -> impl Iterator<Item = R> {
        self.replies.into_iter().flatten()
    }

    /// The entries to propose, in order: each the encoded commands of up
    /// to [`MAX_COMMANDS`] and [`MAX_BYTES`], with their replies in the
    /// same order.
    pub(crate) fn into_entries(self) -> Vec<(Vec<u8>, Vec<Option<R>>)> {
        let mut entries = Vec::new();
        let mut replies = self.replies.into_iter();
        let mut start = 0;
        while start < self.commands.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < self.commands.len()
                && end - start < MAX_COMMANDS
                && (end == start || bytes + self.commands[end].len() <= MAX_BYTES)
            {
                bytes += self.commands[end].len();
                end += 1;
            }
            let chunk = &self.commands[start..end];
            entries.push((encode(chunk), replies.by_ref().take(chunk.len()).collect()));
            start = end;
        }
        entries
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn entries_round_trip() {
        let cases: &[&[&[u8]]] = &[
            &[b"{\"a\":1}"],
            &[b"x", b"yz", b"{}"],
            &[&[TAG], &[0, 0, 0, 0], b"last"],
        ];
        for commands in cases {
            let entry = encode(commands);
            assert_eq!(entry[0], TAG);
            assert_eq!(decode(&entry).unwrap(), commands.to_vec());
        }
        assert_eq!(decode(&encode::<&[u8]>(&[])).unwrap(), Vec::<&[u8]>::new());
    }

    /// An entry from before batches is one command, whole.
    #[test]
    fn an_unbatched_entry_is_one_command() {
        let legacy = br#"{"RequestCancel":{"at_ms":1,"job":2}}"#;
        assert_eq!(decode(legacy).unwrap(), vec![&legacy[..]]);
    }

    #[test]
    fn corrupt_entries_are_errors() {
        let good = encode(&[&b"abc"[..], b"de"]);
        let cases: &[(&[u8], &str)] = &[
            (&[TAG, 1, 0], "without its count"),
            (&[TAG, 9, 0, 0, 0, 1, 0, 0, 0], "9 commands in 9 bytes"),
            (&[TAG, 255, 255, 255, 255], "4294967295 commands"),
            (&good[..good.len() - 1], "2 bytes, 1 left"),
            (&[TAG, 1, 0, 0, 0, 0, 0, 0, 0, 7], "1 bytes after"),
        ];
        for (entry, fragment) in cases {
            let error = decode(entry).unwrap_err();
            assert!(error.contains(fragment), "{entry:?}: {error}");
        }
    }

    /// Proposals of one round share entries within the limits, in order,
    /// each keeping its own reply.
    #[test]
    fn batches_split_at_the_limits() {
        let mut batch = Batch::default();
        assert!(batch.is_empty());
        for i in 0..(MAX_COMMANDS + 2) {
            batch.push(i.to_string().into_bytes(), Some(i));
        }
        batch.push(vec![b'x'; MAX_BYTES + 1], None);
        batch.push(b"after".to_vec(), Some(9999));
        let entries = batch.into_entries();
        let shape: Vec<usize> = entries.iter().map(|(_, r)| r.len()).collect();
        assert_eq!(shape, [MAX_COMMANDS, 2, 1, 1]);
        let mut next = 0;
        for (entry, replies) in &entries[..2] {
            let commands = decode(entry).unwrap();
            assert_eq!(commands.len(), replies.len());
            for (command, reply) in commands.iter().zip(replies) {
                assert_eq!(*command, next.to_string().as_bytes());
                assert_eq!(*reply, Some(next));
                next += 1;
            }
        }
        assert_eq!(entries[2].1, [None]);
        assert_eq!(decode(&entries[3].0).unwrap(), [b"after"]);
        assert_eq!(entries[3].1, [Some(9999)]);
    }
}
