//! `e2e --rate R`: an open-loop submit load. Submits leave at a fixed
//! offered rate whatever the answers, and each is timed from when it was
//! due, not from when it could be sent: a stall of the coordinator then
//! shows in every latency behind it instead of lowering the load it is
//! offered (coordinated omission, which a closed loop of N submitters
//! hides).

use std::time::{Duration, Instant};

use pb::gantry_client::GantryClient;
use tonic::transport::Channel;

use super::{Acked, Load, pb, submit_request};

/// Submits in flight at most; past it the load is no longer the offered
/// one and the run says so (an error per submit it could not send).
const MAX_IN_FLIGHT: usize = 20_000;

/// Submits `total` jobs at `rate` per second over `clients` (round robin).
pub(super) async fn load(
    clients: &[GantryClient<Channel>],
    rate: f64,
    total: u64,
    run: &str,
) -> anyhow::Result<Load> {
    let interval = Duration::from_secs_f64(1.0 / rate.max(1e-3));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut out = Load {
        acked: Vec::new(),
        errors: 0,
        first_error: None,
        start,
        end: start,
    };
    for i in 0..total {
        let due = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        while let Some(done) = tasks.try_join_next() {
            collect(&mut out, done?);
        }
        if tasks.len() >= MAX_IN_FLIGHT {
            out.errors += 1;
            out.first_error.get_or_insert_with(|| {
                format!("over {MAX_IN_FLIGHT} submits in flight: the offered rate is not kept")
            });
            continue;
        }
        let mut client = clients[i as usize % clients.len()].clone();
        let request = submit_request(format!("{run}-open-{i}"));
        tasks.spawn(async move {
            match tokio::time::timeout(Duration::from_secs(10), client.submit(request)).await {
                Ok(Ok(response)) => {
                    let latency = due.elapsed();
                    Ok(response
                        .into_inner()
                        .job_ids
                        .into_iter()
                        .map(|job| Acked {
                            job,
                            sent: due,
                            latency,
                        })
                        .collect())
                }
                Ok(Err(status)) => Err(status.to_string()),
                Err(_) => Err("timed out after 10 s".to_string()),
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        collect(&mut out, done?);
    }
    out.end = out.last_ack();
    Ok(out)
}

fn collect(out: &mut Load, done: Result<Vec<Acked>, String>) {
    match done {
        Ok(acked) => out.acked.extend(acked),
        Err(error) => {
            out.errors += 1;
            out.first_error.get_or_insert(error);
        }
    }
}
