//! Every bound on a job spec that reaches the coordinator, in one place.
//! [`crate::convert`] checks them once, before anything is proposed to the
//! Raft log, and refuses with one line naming the field and the limit
//! (`jobs[0].constraints.labels: 100000 entries, at most 64`).
//!
//! Why bound everything: a stored job lives in memory on every replica, is
//! serialised into every snapshot, and its labels and names are read by every
//! scheduling pass and every hold reason. An unbounded list lets one submit
//! cost hundreds of megabytes and seconds of core time on every replica.
//! The numbers are generous for real work (the design's largest pipelines
//! use a handful of labels, locks and snapshots per job).

/// Bytes of one encoded submit request (the gRPC limit is larger, so this
/// answers with a field-naming error instead of a transport error).
pub const MAX_SUBMIT_BYTES: usize = 4 << 20;
/// Jobs in one submission.
pub const MAX_JOBS_PER_SUBMIT: usize = 10_000;
/// Stages of one pipeline run. A run is one submission, so this is the
/// per-submit bound, named for the message a pipeline gets.
pub const MAX_PIPELINE_STAGES: usize = MAX_JOBS_PER_SUBMIT;
/// Runs a `repeat: {max_runs: N}` loop may ask for (`forever` has no
/// bound but the run number's).
pub const MAX_PIPELINE_RUNS: u32 = 1_000_000;
/// Bytes of a submission's idempotency key.
pub const MAX_SUBMISSION_KEY_BYTES: usize = 256;

/// Characters of a job, lock, queue or pipeline name (names are also the
/// `after:` vocabulary and appear in every listing).
pub const MAX_NAME_LEN: usize = 128;

/// Arguments of a command. The byte limit alone let a million empty
/// arguments through: each costs a pointer in `execve` (E2BIG) and a
/// `String` on every replica.
pub const MAX_COMMAND_ARGS: usize = 4096;
/// Bytes of all arguments together (Linux refuses a single argument over
/// 128 KiB anyway).
pub const MAX_COMMAND_BYTES: usize = 128 << 10;

/// Environment variables of a job.
pub const MAX_ENV_VARS: usize = 256;
/// Bytes of one environment variable's name. Values are bounded by
/// [`MAX_ENV_BYTES`], names and values together.
pub const MAX_ENV_NAME_BYTES: usize = 256;
/// Bytes of all environment names and values together.
pub const MAX_ENV_BYTES: usize = 128 << 10;

/// Wanted node labels (`constraints.labels`). Every scheduling pass compares
/// them against candidate nodes, and a hold reason names them.
pub const MAX_LABELS: usize = 64;
/// Bytes of a label key.
pub const MAX_LABEL_KEY_BYTES: usize = 128;
/// Bytes of a label value.
pub const MAX_LABEL_VALUE_BYTES: usize = 256;
/// Accepted GPU models (`constraints.gpu_model`).
pub const MAX_GPU_MODELS: usize = 32;
/// Bytes of one GPU model name.
pub const MAX_GPU_MODEL_BYTES: usize = 128;

/// Named locks of one job.
pub const MAX_LOCKS: usize = 64;
/// `snapshot:` entries of one job.
pub const MAX_SNAPSHOTS: usize = 64;
/// Bytes of a snapshot's source path or target name (Linux's `PATH_MAX`).
pub const MAX_PATH_BYTES: usize = 4096;
/// `after:` names of one job. The edges of a submission are at most
/// `MAX_JOBS_PER_SUBMIT * MAX_AFTER`, and resolving them is linear.
pub const MAX_AFTER: usize = 256;
/// Tiers of a batch rule.
pub const MAX_BATCH_TIERS: usize = 16;

/// GPUs of one job.
pub const MAX_GPUS: u32 = 64;
/// GPU memory of one job, per GPU (also the largest tier `min_free`, model
/// size and over-use margin).
pub const MAX_GPU_MEMORY: u64 = 4 << 40;
/// CPU of one job, in millicores.
pub const MAX_CPU_MILLIS: u64 = 4096 * 1000;
/// Host memory of one job.
pub const MAX_HOST_MEMORY: u64 = 256 << 40;
/// Disk of one job.
pub const MAX_DISK: u64 = 1 << 50;
/// Attempts of one job.
pub const MAX_ATTEMPTS: u32 = 100;
/// Time limit of one attempt (30 days).
pub const MAX_TIMEOUT_MS: u64 = 30 * 24 * 3600 * 1000;
/// SIGTERM to SIGKILL of a preempted job (1 hour).
pub const MAX_PREEMPTION_GRACE_MS: u64 = 3600 * 1000;
/// Back-off before a retry (24 hours).
pub const MAX_BACKOFF_MS: u64 = 24 * 3600 * 1000;
/// Priorities lie in `-MAX_PRIORITY..=MAX_PRIORITY`.
pub const MAX_PRIORITY: i32 = 1000;

/// Characters of user text quoted back in an error message (an unknown
/// kind, mode or policy): the rest is elided, so a megabyte of junk gets a
/// one-line answer.
pub const MAX_ECHO_CHARS: usize = 64;

/// Longest GPU fault text kept from an agent's heartbeat, in characters
/// (agents bound it too; the coordinator never trusts that).
pub const MAX_GPU_FAULT_CHARS: usize = 200;

/// Nodes of one gang (`nodes: N`) at most.
pub const MAX_GANG_NODES: u32 = 256;
