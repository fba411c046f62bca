//! The history's files alone: pieces across opens, what a crash leaves
//! (pieces sled never recorded, a piece half written), segments rolled
//! over and removed once pruned.

#![allow(clippy::unwrap_used)]

use super::*;

/// A retired job's record: `pad` bytes of reason make it larger.
fn job(id: u64, finished_ms: u64, pad: usize) -> st::JobRecord {
    st::JobRecord {
        id,
        state: "succeeded".into(),
        updated_at_ms: finished_ms,
        terminal_reason: "x".repeat(pad),
        pipeline: "nightly".into(),
        run: (id % 3) as u32 + 1,
        ..Default::default()
    }
}

fn jobs(ids: std::ops::Range<u64>, pad: usize) -> Vec<st::JobRecord> {
    ids.map(|id| job(id, 1_000 + id, pad)).collect()
}

/// Every kept job, chunk by chunk, oldest chunk first.
fn all_jobs(log: &HistoryLog) -> Vec<st::JobRecord> {
    let numbers: Vec<u64> = log.chunks().map(|(n, _)| n).collect();
    numbers
        .into_iter()
        .flat_map(|n| log.chunk_jobs(n).unwrap())
        .collect()
}

fn segment_lengths(dir: &Path) -> Vec<u64> {
    framed::numbered_files(dir, SUFFIX)
        .unwrap()
        .into_iter()
        .map(|(_, path)| std::fs::metadata(path).unwrap().len())
        .collect()
}

#[test]
fn pieces_come_back_across_opens_and_small_ones_share_a_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = HistoryLog::open(dir.path(), Recorded::default()).unwrap();
    for batch in 0..3 {
        log.add(jobs(batch * 10..batch * 10 + 10, 10)).unwrap();
    }
    let recorded = log.recorded();
    assert_eq!(recorded.next_piece, 3);
    assert_eq!(
        recorded.bytes,
        jobs(0..30, 10).iter().map(record_bytes).sum::<u64>()
    );
    assert_eq!(
        log.chunks().count(),
        1,
        "small pieces join the newest chunk"
    );
    let (_, chunk) = log.chunks().next().unwrap();
    assert_eq!((chunk.head.min_id, chunk.head.max_id), (0, 29));
    assert_eq!(chunk.head.jobs, 30);
    assert_eq!(chunk.runs.len(), 3);
    drop(log);

    let mut log = HistoryLog::open(dir.path(), recorded).unwrap();
    assert_eq!(all_jobs(&log), jobs(0..30, 10));
    assert_eq!(log.recorded(), recorded);
    // After an open, the next piece starts a chunk of its own.
    log.add(jobs(30..31, 10)).unwrap();
    assert_eq!(log.chunks().count(), 2);
    let recorded = log.recorded();
    drop(log);
    let log = HistoryLog::open(dir.path(), recorded).unwrap();
    assert_eq!(all_jobs(&log), jobs(0..31, 10));
}

/// A write appends its pieces, then crashes before sled records them:
/// the next open cuts them off, and the pieces appended after take their
/// numbers without the old ones ever coming back.
#[test]
fn pieces_sled_never_recorded_are_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = HistoryLog::open(dir.path(), Recorded::default()).unwrap();
    log.add(jobs(0..5, 10)).unwrap();
    let recorded = log.recorded();
    let committed_len = segment_lengths(dir.path());
    log.add(jobs(5..10, 10)).unwrap();
    drop(log);

    let mut log = HistoryLog::open(dir.path(), recorded).unwrap();
    assert_eq!(all_jobs(&log), jobs(0..5, 10));
    assert_eq!(segment_lengths(dir.path()), committed_len);
    assert_eq!(log.recorded(), recorded);
    log.add(jobs(20..22, 10)).unwrap();
    let recorded = log.recorded();
    drop(log);
    let log = HistoryLog::open(dir.path(), recorded).unwrap();
    let mut expected = jobs(0..5, 10);
    expected.extend(jobs(20..22, 10));
    assert_eq!(all_jobs(&log), expected);

    // Nothing recorded at all (a first write that never committed).
    drop(log);
    let log = HistoryLog::open(dir.path(), Recorded::default()).unwrap();
    assert_eq!(log.chunks().count(), 0);
}

/// A crash in the middle of a piece's write leaves part of it: it is cut
/// off, and the next piece follows the last whole one.
#[test]
fn a_half_written_piece_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = HistoryLog::open(dir.path(), Recorded::default()).unwrap();
    log.add(jobs(0..5, 10)).unwrap();
    let recorded = log.recorded();
    drop(log);
    let (_, path) = framed::numbered_files(dir.path(), SUFFIX)
        .unwrap()
        .pop()
        .unwrap();
    let whole = std::fs::metadata(&path).unwrap().len();
    let mut torn = Vec::new();
    framed::push_frame(&mut torn, &[&[7; 100]]);
    torn.truncate(60);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(&torn);
    std::fs::write(&path, bytes).unwrap();

    let mut log = HistoryLog::open(dir.path(), recorded).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), whole);
    log.add(jobs(5..7, 10)).unwrap();
    let recorded = log.recorded();
    drop(log);
    let log = HistoryLog::open(dir.path(), recorded).unwrap();
    assert_eq!(all_jobs(&log), jobs(0..7, 10));
}

/// Small segments: pieces roll over into new ones (a chunk never spans
/// two); once the size cap prunes every chunk of a segment, its file is
/// removed, never the one being written; a reopen agrees.
#[test]
fn segments_roll_over_and_leave_once_their_chunks_are_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let segment_bytes = 16 << 10;
    let mut log = HistoryLog::open_sized(dir.path(), Recorded::default(), segment_bytes).unwrap();
    // 40 pieces of about 2 KiB: 8 a segment.
    for n in 0..40 {
        log.add(vec![job(n, 1_000 + n, 2_000)]).unwrap();
    }
    let segments = log.segment_count();
    assert!(segments >= 5, "{segments} segments");
    assert_eq!(segment_lengths(dir.path()).len(), segments);
    for (_, chunk) in log.chunks() {
        assert!(chunk.end <= segment_bytes + (4 << 10));
    }
    assert_eq!(
        all_jobs(&log),
        (0..40)
            .map(|n| job(n, 1_000 + n, 2_000))
            .collect::<Vec<_>>()
    );

    // A cap of a quarter keeps the newest quarter or so.
    let policy = RetentionPolicy {
        history_max_bytes: log.recorded().bytes / 4,
        ..RetentionPolicy::default()
    };
    assert!(log.write(&policy, &[], 2_000).unwrap());
    let kept = all_jobs(&log);
    assert!(!kept.is_empty() && kept.len() < 40);
    assert_eq!(kept.last().unwrap().id, 39);
    let first = kept[0].id;
    assert_eq!(
        kept,
        (first..40)
            .map(|n| job(n, 1_000 + n, 2_000))
            .collect::<Vec<_>>()
    );
    assert!(log.recorded().bytes <= policy.history_max_bytes);
    let left = log.segment_count();
    assert!(
        left < segments && left >= 1,
        "{left} of {segments} segments left"
    );
    assert_eq!(segment_lengths(dir.path()).len(), left);
    let recorded = log.recorded();
    drop(log);
    let log = HistoryLog::open_sized(dir.path(), recorded, segment_bytes).unwrap();
    assert_eq!(all_jobs(&log), kept);

    // Everything past its retention: every chunk leaves, but the segment
    // being written stays, and the next pieces go on in it.
    let mut log = log;
    let all_expired = RetentionPolicy {
        history_retention_ms: 1,
        ..RetentionPolicy::default()
    };
    for _ in 0..3 {
        log.write(&all_expired, &[], 1_000_000).unwrap();
    }
    assert_eq!(log.chunks().count(), 0);
    assert_eq!(log.recorded().bytes, 0);
    assert_eq!(log.segment_count(), 1);
    log.add(jobs(100..102, 10)).unwrap();
    let recorded = log.recorded();
    drop(log);
    let mut log = HistoryLog::open_sized(dir.path(), recorded, segment_bytes).unwrap();
    assert_eq!(all_jobs(&log), jobs(100..102, 10));

    // All of it pruned and reopened: the newest segment stays (its header
    // says how far the pieces went), and the pieces go on in it.
    log.write(&all_expired, &[], 2_000_000).unwrap();
    let recorded = log.recorded();
    drop(log);
    let mut log = HistoryLog::open_sized(dir.path(), recorded, segment_bytes).unwrap();
    assert_eq!((log.chunks().count(), log.segment_count()), (0, 1));
    log.add(jobs(200..201, 10)).unwrap();
    assert_eq!(log.recorded().next_piece, recorded.next_piece + 1);
    let recorded = log.recorded();
    drop(log);
    let log = HistoryLog::open_sized(dir.path(), recorded, segment_bytes).unwrap();
    assert_eq!(all_jobs(&log), jobs(200..201, 10));
}
