//! Gantry's benchmarks as a library, so the `gantry-bench` binary and the
//! criterion benches share one workload generator.
//!
//! - [`rng`]: a seeded deterministic generator (splitmix64).
//! - [`workload`]: synthetic fleets and job streams.
//! - [`sched`]: the pure-placement scenario behind `gantry-bench sched`.
//! - [`e2e`]: three coordinator processes, a simulated fleet, submit load
//!   and a leader kill (`gantry-bench e2e`).
//! - [`etcd`]: a three-member etcd's sequential put latency, as a yardstick
//!   (`gantry-bench etcd`).
//! - [`heartbeats`]: one coordinator process and 10,000 simulated agents
//!   heartbeating on shared connections (`gantry-bench heartbeats`).
//! - [`chaos`]: the nemesis of `integration-tests` run long, with its
//!   checker's verdict and recovery times (`gantry-bench chaos`).
//! - [`soak`]: one coordinator with retention scaled down, jobs finishing
//!   without end; RSS, disk, history and submit latency every N jobs
//!   (`gantry-bench soak`).
//! - [`ray`]: Ray's fractional-GPU task benchmark beside `e2e` in the
//!   same run (`gantry-bench ray`).
//! - [`ci`]: the performance-regression check CI runs, ratios measured
//!   in one process against `bench/baseline.json` (`gantry-bench ci`).
//! - [`snapshot`]: how long a Raft snapshot of N active jobs takes to
//!   write and to install, as files now and as one sled value before
//!   (`gantry-bench snapshot`).
//! - [`procs`], [`stats`]: child processes and latency quantiles.

pub mod chaos;
pub mod ci;
pub mod e2e;
pub mod etcd;
pub mod heartbeats;
pub mod procs;
pub mod ray;
pub mod rng;
pub mod sched;
pub mod snapshot;
pub mod soak;
pub mod stats;
pub mod workload;
