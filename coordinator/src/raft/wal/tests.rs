#![allow(clippy::unwrap_used)]

use super::*;

fn entry(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        data: vec![index as u8; 100].into(),
        ..Default::default()
    }
}

fn hard_state(term: u64, commit: u64) -> HardState {
    HardState {
        term,
        vote: 1,
        commit,
        ..Default::default()
    }
}

/// Opens `dir`, returning the log and every record read back.
fn open(dir: &Path, segment_bytes: u64) -> (Wal, Vec<Record>) {
    let mut records = Vec::new();
    let wal = Wal::open(dir, segment_bytes, &mut |record, _| {
        records.push(record);
        Ok(())
    })
    .unwrap();
    (wal, records)
}

fn entries_of(records: &[Record]) -> Vec<u64> {
    records
        .iter()
        .filter_map(|record| match record {
            Record::Entry(entry) => Some(entry.index),
            _ => None,
        })
        .collect()
}

fn segment_files(dir: &Path) -> Vec<u64> {
    segment_paths(dir)
        .unwrap()
        .into_iter()
        .map(|(seq, _)| seq)
        .collect()
}

/// What was written comes back in order after a reopen, each segment
/// headed by the hard state of its creation; each open writes to a new
/// segment and one that never got a record is removed.
#[test]
fn records_come_back_in_order_across_opens() {
    let dir = tempfile::tempdir().unwrap();
    let (mut wal, records) = open(dir.path(), DEFAULT_SEGMENT_BYTES);
    assert!(records.is_empty() && wal.is_empty());
    wal.push_hard_state(&hard_state(2, 0)).unwrap();
    wal.push_entry(&entry(1, 2)).unwrap();
    wal.push_entry(&entry(2, 2)).unwrap();
    wal.sync().unwrap();
    wal.push_reset(1);
    wal.sync().unwrap();
    drop(wal);

    let (mut wal, records) = open(dir.path(), DEFAULT_SEGMENT_BYTES);
    assert_eq!(
        records,
        vec![
            // The head of the segment: the hard state when it was created.
            Record::HardState(hard_state(2, 0)),
            Record::HardState(hard_state(2, 0)),
            Record::Entry(entry(1, 2)),
            Record::Entry(entry(2, 2)),
            Record::Reset(1),
        ]
    );
    wal.push_hard_state(&hard_state(3, 1)).unwrap();
    wal.push_entry(&entry(2, 3)).unwrap();
    wal.sync().unwrap();
    assert_eq!(segment_files(dir.path()), [1, 2]);
    drop(wal);

    // An open that writes nothing leaves no segment behind.
    let (wal, records) = open(dir.path(), DEFAULT_SEGMENT_BYTES);
    assert_eq!(entries_of(&records), [1, 2, 2]);
    assert_eq!(records.last(), Some(&Record::Entry(entry(2, 3))));
    drop(wal);
    assert_eq!(segment_files(dir.path()), [1, 2]);
}

/// A write cut short (a torn last record, or garbage where it was going)
/// ends its segment's records: what came before is read, the next open
/// writes to a new segment and both are read after it.
#[test]
fn a_torn_write_ends_its_segment_and_the_log_goes_on_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut wal, _) = open(dir.path(), DEFAULT_SEGMENT_BYTES);
    for index in 1..=3 {
        wal.push_entry(&entry(index, 1)).unwrap();
    }
    wal.sync().unwrap();
    let end = wal.current.as_ref().unwrap().offset;
    drop(wal);
    let path = dir.path().join(format!("{:016x}.wal", 1));
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    // The last record's last byte flipped: its CRC fails.
    let mut byte = [0u8; 1];
    std::fs::File::open(&path)
        .unwrap()
        .read_exact_at(&mut byte, end - 1)
        .unwrap();
    file.write_all_at(&[byte[0] ^ 0xff], end - 1).unwrap();
    // A record head with a length past the file where the next write went.
    file.write_all_at(&[0xff, 0xff, 0x00, 0x00, 1, 2, 3, 4], end)
        .unwrap();
    drop(file);

    let (mut wal, records) = open(dir.path(), DEFAULT_SEGMENT_BYTES);
    assert_eq!(entries_of(&records), [1, 2]);
    wal.push_entry(&entry(3, 2)).unwrap();
    wal.sync().unwrap();
    drop(wal);
    let (_, records) = open(dir.path(), DEFAULT_SEGMENT_BYTES);
    assert_eq!(entries_of(&records), [1, 2, 3]);
    assert_eq!(records.last(), Some(&Record::Entry(entry(3, 2))));

    // A segment whose header was never written whole is removed.
    std::fs::write(dir.path().join(format!("{:016x}.wal", 9)), b"GWAL").unwrap();
    let (_, records) = open(dir.path(), DEFAULT_SEGMENT_BYTES);
    assert_eq!(entries_of(&records), [1, 2, 3]);
    assert_eq!(segment_files(dir.path()), [1, 2]);
}

/// Writes that do not fit start a new segment, headed by the latest hard
/// state; old segments go once every index they name is compacted, the
/// current one never; a write larger than a segment gets one of its own.
#[test]
fn segments_roll_over_and_go_once_compacted() {
    let dir = tempfile::tempdir().unwrap();
    let segment_bytes = 8192;
    let (mut wal, _) = open(dir.path(), segment_bytes);
    for index in 1..=200 {
        if index == 20 {
            wal.push_hard_state(&hard_state(4, 19)).unwrap();
        }
        wal.push_entry(&entry(index, 1)).unwrap();
        wal.write_out().unwrap();
    }
    wal.sync().unwrap();
    let count = wal.segments();
    assert!(count >= 3, "{count} segments");
    assert_eq!(segment_files(dir.path()).len(), count);

    // Nothing compacted: nothing goes.
    assert!(!wal.remove_one_through(0).unwrap());
    assert_eq!(wal.segments(), count);
    while wal.remove_one_through(200).unwrap() {}
    assert_eq!(wal.segments(), 1, "the current segment stays");
    drop(wal);

    let (mut wal, records) = open(dir.path(), segment_bytes);
    assert_eq!(records.first(), Some(&Record::HardState(hard_state(4, 19))));
    assert_eq!(entries_of(&records).last(), Some(&200));
    let big = Entry {
        index: 201,
        term: 1,
        data: vec![7u8; 3 * segment_bytes as usize].into(),
        ..Default::default()
    };
    wal.push_entry(&big).unwrap();
    wal.sync().unwrap();
    drop(wal);
    let (_, records) = open(dir.path(), segment_bytes);
    assert_eq!(records.last(), Some(&Record::Entry(big)));
}
