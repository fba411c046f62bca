//! `gantry-bench etcd`: a yardstick for `e2e`. A three-member etcd on
//! loopback (Debian's `etcd-server`), written to over its gRPC API the way
//! `e2e` submits to Gantry: sequential puts to the leader (p50/p99), then
//! concurrent puts for a fixed time (puts/s and latency).
//!
//! The two etcd messages needed are declared here by hand (prost), so no
//! etcd protos are vendored.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde_json::{Value, json};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};

use crate::procs::{CpuMeter, CpuUsed, ProcGroup, free_ports};
use crate::stats::Latencies;

/// etcdserverpb.PutRequest (the fields used).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PutRequest {
    /// Key.
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    /// Value.
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

/// etcdserverpb.ResponseHeader.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ResponseHeader {
    /// Cluster id.
    #[prost(uint64, tag = "1")]
    pub cluster_id: u64,
    /// The answering member's id.
    #[prost(uint64, tag = "2")]
    pub member_id: u64,
    /// Store revision.
    #[prost(int64, tag = "3")]
    pub revision: i64,
    /// Raft term.
    #[prost(uint64, tag = "4")]
    pub raft_term: u64,
}

/// etcdserverpb.PutResponse (the header only).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PutResponse {
    /// Header.
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
}

/// etcdserverpb.StatusRequest.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StatusRequest {}

/// etcdserverpb.StatusResponse (the fields used).
#[derive(Clone, PartialEq, prost::Message)]
pub struct StatusResponse {
    /// Header.
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    /// etcd version.
    #[prost(string, tag = "2")]
    pub version: String,
    /// Member id of the leader (0 = none).
    #[prost(uint64, tag = "4")]
    pub leader: u64,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// The `etcd` binary.
    pub etcd: PathBuf,
    /// Sequential puts measured.
    pub puts: usize,
    /// Concurrent writers for the throughput phase (0 = skip it).
    pub concurrency: usize,
    /// Length of the throughput phase.
    pub duration: Duration,
    /// Bytes per value.
    pub value_size: usize,
}

/// Everything measured.
#[derive(Debug, Clone)]
pub struct EtcdReport {
    /// What ran.
    pub config: EtcdConfig,
    /// etcd's version.
    pub version: String,
    /// Sequential put latency against the leader.
    pub sequential: Latencies,
    /// Concurrent put latency.
    pub concurrent: Latencies,
    /// Concurrent puts acknowledged per second.
    pub puts_per_s: f64,
    /// Failed concurrent puts.
    pub errors: usize,
    /// CPU time of the concurrent phase: the three etcd members (measured)
    /// and this process (own: the writers), when it could be read.
    pub cpu: Option<CpuUsed>,
}

impl EtcdReport {
    /// CPU per acknowledged concurrent put, µs: (the three members',
    /// this process's); the yardstick for `e2e`'s CPU per job.
    pub fn cpu_per_put_us(&self) -> Option<(f64, f64)> {
        self.cpu?.per_op_us(self.concurrent.len())
    }

    /// The machine-readable record printed by `--json`.
    pub fn to_json(&self) -> Value {
        let c = &self.config;
        json!({
            "scenario": "etcd",
            "members": 3,
            "version": self.version,
            "value_bytes": c.value_size,
            "sequential_puts": self.sequential.len(),
            "sequential_put_p50_ms": self.sequential.ms(0.5),
            "sequential_put_p99_ms": self.sequential.ms(0.99),
            "sequential_put_mean_ms": self.sequential.mean_ms(),
            "concurrency": c.concurrency,
            "duration_s": c.duration.as_secs_f64(),
            "puts_per_s": self.puts_per_s,
            "concurrent_puts": self.concurrent.len(),
            "concurrent_put_p50_ms": self.concurrent.ms(0.5),
            "concurrent_put_p99_ms": self.concurrent.ms(0.99),
            "members_cpu_per_put_us": self.cpu_per_put_us().map(|(members, _)| members),
            "bench_cpu_per_put_us": self.cpu_per_put_us().map(|(_, bench)| bench),
            "errors": self.errors,
        })
    }

    /// The human summary; the first line is the headline figure.
    pub fn human(&self) -> String {
        let c = &self.config;
        let mut out = format!(
            "{:.0} puts/s\n\
             gantry-bench etcd: 3 members of etcd {} on loopback, gRPC puts of {} bytes to the leader\n\
             sequential put ({} one at a time): p50 {:.2} ms, p99 {:.2} ms, mean {:.2} ms\n\
             concurrent ({} writers, {:.0} s): {} puts, p50 {:.2} ms, p99 {:.2} ms, {} errors",
            self.puts_per_s,
            self.version,
            c.value_size,
            self.sequential.len(),
            self.sequential.ms(0.5),
            self.sequential.ms(0.99),
            self.sequential.mean_ms(),
            c.concurrency,
            c.duration.as_secs_f64(),
            self.concurrent.len(),
            self.concurrent.ms(0.5),
            self.concurrent.ms(0.99),
            self.errors,
        );
        if let Some((members, bench)) = self.cpu_per_put_us() {
            out.push_str(&format!(
                "\nCPU per concurrent put: {members:.0} µs in the three members, {bench:.0} µs in this process"
            ));
        }
        out
    }
}

async fn unary<Req, Resp>(
    channel: Channel,
    path: &'static str,
    request: Req,
) -> anyhow::Result<Resp>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| anyhow!("not ready: {}", Into::<tonic::codegen::StdError>::into(e)))?;
    let codec: tonic_prost::ProstCodec<Req, Resp> = tonic_prost::ProstCodec::default();
    let response = grpc
        .unary(
            tonic::Request::new(request),
            PathAndQuery::from_static(path),
            codec,
        )
        .await?;
    Ok(response.into_inner())
}

async fn put(channel: Channel, key: String, value: Vec<u8>) -> anyhow::Result<()> {
    let _: PutResponse = unary(
        channel,
        "/etcdserverpb.KV/Put",
        PutRequest {
            key: key.into_bytes(),
            value,
        },
    )
    .await?;
    Ok(())
}

async fn member_status(url: &str) -> Option<StatusResponse> {
    let channel = Endpoint::from_shared(url.to_string())
        .ok()?
        .connect_timeout(Duration::from_millis(500))
        .connect()
        .await
        .ok()?;
    let call = unary::<StatusRequest, StatusResponse>(
        channel,
        "/etcdserverpb.Maintenance/Status",
        StatusRequest {},
    );
    tokio::time::timeout(Duration::from_secs(1), call)
        .await
        .ok()?
        .ok()
}

/// Starts the members, finds the leader, measures; stops them on return.
pub fn run(config: &EtcdConfig) -> anyhow::Result<EtcdReport> {
    if !config.etcd.is_file() {
        bail!(
            "no etcd binary at {} (apt-get install etcd-server, or pass --etcd)",
            config.etcd.display()
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut procs = ProcGroup::new("gantry-bench-etcd-")?;
    let result = runtime.block_on(scenario(config, &mut procs));
    runtime.shutdown_timeout(Duration::from_secs(1));
    procs.stop_all(Duration::from_secs(3));
    result.map_err(|e| e.context(format!("etcd logs:\n{}", procs.log_tails(15))))
}

async fn scenario(config: &EtcdConfig, procs: &mut ProcGroup) -> anyhow::Result<EtcdReport> {
    let ports = free_ports(6)?;
    let client_urls: Vec<String> = ports[..3].iter().map(|a| format!("http://{a}")).collect();
    let peer_urls: Vec<String> = ports[3..].iter().map(|a| format!("http://{a}")).collect();
    let cluster = peer_urls
        .iter()
        .enumerate()
        .map(|(i, u)| format!("m{}={u}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let mut members = Vec::new();
    for i in 0..3 {
        let name = format!("m{}", i + 1);
        let data = procs.path().join(&name);
        let args: Vec<String> = vec![
            "--name".into(),
            name.clone(),
            "--data-dir".into(),
            data.display().to_string(),
            "--listen-client-urls".into(),
            client_urls[i].clone(),
            "--advertise-client-urls".into(),
            client_urls[i].clone(),
            "--listen-peer-urls".into(),
            peer_urls[i].clone(),
            "--initial-advertise-peer-urls".into(),
            peer_urls[i].clone(),
            "--initial-cluster".into(),
            cluster.clone(),
            "--initial-cluster-state".into(),
            "new".into(),
            "--initial-cluster-token".into(),
            "gantry-bench".into(),
            "--logger".into(),
            "zap".into(),
            "--log-level".into(),
            "warn".into(),
        ];
        members.push(procs.spawn(&name, &config.etcd, &args, &[])?);
    }
    // The leader: the member whose id the members name as leader.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (leader_url, version) = 'found: loop {
        for url in &client_urls {
            if let Some(status) = member_status(url).await
                && status.leader != 0
                && status.header.as_ref().map(|h| h.member_id) == Some(status.leader)
            {
                break 'found (url.clone(), status.version);
            }
        }
        if Instant::now() > deadline {
            bail!("the etcd members elected no leader within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("etcd: 3 members up; leader at {leader_url}");
    let channel = Endpoint::from_shared(leader_url.clone())?
        .tcp_nodelay(true)
        .connect()
        .await
        .context("connect to the etcd leader")?;
    let value = vec![b'x'; config.value_size];
    // Warm-up.
    for i in 0..50 {
        put(channel.clone(), format!("warm/{i}"), value.clone()).await?;
    }
    let mut sequential = Vec::with_capacity(config.puts);
    for i in 0..config.puts {
        let sent = Instant::now();
        put(channel.clone(), format!("seq/{i:08}"), value.clone()).await?;
        sequential.push(sent.elapsed());
    }

    let mut concurrent = Vec::new();
    let mut errors = 0usize;
    let mut puts_per_s = 0.0;
    let mut cpu = None;
    if config.concurrency > 0 {
        let connections = config.concurrency.div_ceil(16).max(1);
        let mut channels = Vec::new();
        for _ in 0..connections {
            channels.push(
                Endpoint::from_shared(leader_url.clone())?
                    .tcp_nodelay(true)
                    .connect()
                    .await?,
            );
        }
        let counter = Arc::new(AtomicU64::new(0));
        let meter = CpuMeter::start(procs.pids(&members));
        let start = Instant::now();
        let deadline = start + config.duration;
        let mut tasks = Vec::new();
        for task in 0..config.concurrency {
            let channel = channels[task % connections].clone();
            let value = value.clone();
            let counter = counter.clone();
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut errors = 0usize;
                let mut last = Instant::now();
                while Instant::now() < deadline {
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    let sent = Instant::now();
                    match put(channel.clone(), format!("load/{n:010}"), value.clone()).await {
                        Ok(()) => {
                            last = Instant::now();
                            latencies.push(last - sent);
                        }
                        Err(_) => errors += 1,
                    }
                }
                (latencies, errors, last)
            }));
        }
        let mut end = start;
        for task in tasks {
            let (latencies, e, last) = task.await?;
            concurrent.extend(latencies);
            errors += e;
            end = end.max(last);
        }
        puts_per_s = concurrent.len() as f64 / (end - start).as_secs_f64().max(1e-9);
        cpu = CpuMeter::used_or_report(meter, "etcd");
    }
    Ok(EtcdReport {
        config: config.clone(),
        version,
        sequential: Latencies::new(sequential),
        concurrent: Latencies::new(concurrent),
        puts_per_s,
        errors,
        cpu,
    })
}
