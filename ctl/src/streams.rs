//! The CLI's long-lived streams: `gantry logs` and `gantry watch`.
//!
//! A stream is served by the leader, and outlives connections: when the
//! leader dies or the connection breaks mid-stream, the command connects to
//! whichever coordinator leads now (the address list and the followers'
//! pointers, as every command does) and resumes exactly where it stopped:
//! logs from the byte after the last one printed, events from the index
//! after the last one shown. Nothing is printed twice and nothing is
//! skipped. A failure to open the stream (no leader within the connect
//! deadline, a refusal, an unknown job, a `--from` below the compaction
//! floor) ends the command with its error, as before.

use gantry_proto as pb;
use tokio_stream::StreamExt;

use crate::ClientOpts;
use crate::client::{self, CliError, Client, exit};
use crate::output::{self, Format, escape, outln};

/// Most reconnections of one command in a row without anything received in
/// between: a stream that breaks again at once is not a passing failover.
const MAX_RESUMES: u32 = 10;
/// Pause before the first reconnection; the n-th waits n times as long.
const RESUME_PAUSE: std::time::Duration = std::time::Duration::from_millis(200);

/// How one stream ended: opening it failed (final), or it broke after it
/// was open (worth resuming when the connection was what failed).
enum Broken {
    Open(CliError),
    Stream(CliError),
}

/// Whether to go on after a broken stream (after a pause), or the error
/// that ends the command. A stream that broke is resumed when the
/// connection or the leader was what failed; so is a reopening that finds
/// the new leader not ready yet (the job's agent not reconnected to it).
/// The first opening's failures are final, as for any command.
async fn resume(broken: Broken, resumes: &mut u32, progressed: bool) -> Result<(), CliError> {
    if progressed {
        *resumes = 0;
    }
    let error = match broken {
        Broken::Open(error) if *resumes == 0 => return Err(error),
        Broken::Open(error) | Broken::Stream(error) => error,
    };
    // A refusal or a bad request would be refused again.
    if error.code != exit::UNAVAILABLE || *resumes >= MAX_RESUMES {
        return Err(error);
    }
    *resumes += 1;
    eprintln!(
        "gantry: stream interrupted ({}); reconnecting",
        escape(&error.message)
    );
    tokio::time::sleep(RESUME_PAUSE * *resumes).await;
    Ok(())
}

/// `gantry logs`: the job's output, raw; with `follow`, until the attempt
/// ended, across failovers.
pub(crate) async fn logs(
    id: u64,
    follow: bool,
    stderr: bool,
    attempt: u32,
    opts: ClientOpts,
) -> Result<(), CliError> {
    let mut request = pb::LogsRequest {
        job_id: id,
        stream: if stderr { "stderr" } else { "stdout" }.into(),
        follow,
        attempt,
        offset: 0,
    };
    let mut resumes = 0;
    loop {
        let start = request.offset;
        match copy_logs(&mut request, &opts).await {
            Ok(()) => return Ok(()),
            Err(broken) => resume(broken, &mut resumes, request.offset > start).await?,
        }
    }
}

/// One connection's worth of [`logs`]: prints chunks and moves
/// `request.offset` past each one printed.
async fn copy_logs(request: &mut pb::LogsRequest, opts: &ClientOpts) -> Result<(), Broken> {
    let mut client = client::connect(opts).await.map_err(Broken::Open)?;
    let mut chunks = client
        .logs(request.clone())
        .await
        .map_err(|status| Broken::Open(status.into()))?
        .into_inner();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|status| Broken::Stream(status.into()))?;
        // The job's own output, raw, as `kubectl logs` and `docker logs`
        // print it: it is what the job wrote, and escaping would corrupt
        // binary or colored output piped to a file. Only this command
        // prints unescaped.
        output::write_stdout_bytes(&chunk.data);
        request.offset = chunk.offset + chunk.data.len() as u64;
    }
    Ok(())
}

/// `gantry watch`: events as they are committed, from `from` (default: the
/// next one), across failovers.
pub(crate) async fn watch(
    job: Option<u64>,
    kind: Option<String>,
    pipeline: Option<String>,
    from: Option<u64>,
    opts: ClientOpts,
) -> Result<(), CliError> {
    // The first connection reads the next index (when not given) and
    // serves the stream; reconnections open their own.
    let mut first = client::connect(&opts).await?;
    let from_index = match from {
        Some(index) => index,
        None => {
            first
                .status(pb::StatusRequest {})
                .await?
                .into_inner()
                .last_event_index
                + 1
        }
    };
    let mut request = pb::WatchEventsRequest {
        from_index,
        job_id: job.unwrap_or(0),
        kind: kind.unwrap_or_default(),
        pipeline: pipeline.unwrap_or_default(),
    };
    let mut client = Some(first);
    let mut resumes = 0;
    loop {
        let start = request.from_index;
        match print_events(&mut request, client.take(), &opts).await {
            Ok(()) => return Ok(()),
            Err(broken) => resume(broken, &mut resumes, request.from_index > start).await?,
        }
    }
}

/// One connection's worth of [`watch`] (on `client`, else a new one):
/// prints events and moves `request.from_index` past each one printed.
async fn print_events(
    request: &mut pb::WatchEventsRequest,
    client: Option<Client>,
    opts: &ClientOpts,
) -> Result<(), Broken> {
    let mut client = match client {
        Some(client) => client,
        None => client::connect(opts).await.map_err(Broken::Open)?,
    };
    let mut events = client
        .watch_events(request.clone())
        .await
        .map_err(|status| Broken::Open(status.into()))?
        .into_inner();
    while let Some(event) = events.next().await {
        let event = event.map_err(|status| Broken::Stream(status.into()))?;
        print_event(&event, opts.output);
        request.from_index = event.index + 1;
    }
    Ok(())
}

fn print_event(event: &pb::Event, format: Format) {
    match format {
        Format::Json => outln!("{}", output::event_json(event)),
        Format::Table => outln!(
            "{:>6}  job {:<6} {:<20} {:<10} {:<10} {}{}",
            event.index,
            event.job_id,
            escape(&event.job_name),
            escape(&event.kind),
            escape(&event.state),
            if event.node.is_empty() {
                String::new()
            } else {
                format!("on {} (attempt {}) ", escape(&event.node), event.attempt)
            },
            escape(&event.message)
        ),
    }
}
