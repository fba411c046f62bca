//! `gantry submit` made idempotent for real: one retry loop that sends the
//! same submission key again through failovers, elections and broken
//! connections, with its policy as two pure functions tested as tables.

use std::time::{Duration, Instant};

use gantry_proto as pb;

use crate::client::{CliError, Setup, connect_leader, exit};

/// What a failed attempt at a submit says about the jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No coordinator could be reached: the request never left, so this
    /// attempt created nothing.
    NotSent,
    /// Sent without a definite answer: a broken connection, not-leader
    /// (the replica may have lost its leadership after appending the
    /// entry), an election, a timeout, an internal error. The jobs may
    /// exist; the same submission key makes a retry safe.
    Unknown,
    /// A definite refusal (bad input, credentials, a missing feature):
    /// every retry would get the same answer.
    Refused,
}

/// Classifies a failed call. Transport failures carry their cause as the
/// status's source (or arrive as INTERNAL "h2 protocol error" or CANCELLED
/// when the server died mid-call); a certificate refusal is a refusal.
pub fn classify(status: &tonic::Status) -> Failure {
    if std::error::Error::source(status).is_some() {
        if CliError::from(status.clone()).code == exit::DENIED {
            return Failure::Refused;
        }
        return Failure::Unknown;
    }
    match status.code() {
        tonic::Code::Unavailable
        | tonic::Code::DeadlineExceeded
        | tonic::Code::Cancelled
        | tonic::Code::Aborted
        | tonic::Code::Unknown
        | tonic::Code::Internal => Failure::Unknown,
        _ => Failure::Refused,
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Wait this long, then try again with the same key.
    RetryAfter(Duration),
    /// Stop and report.
    GiveUp,
}

/// The retry policy of an idempotent submit: refusals are final; a cluster
/// that never answered is given up at once (a wrong address must not hang
/// for the whole deadline, and nothing was sent); anything else is retried
/// after `delay` while that still ends before `retry_for` has elapsed.
pub fn next_attempt(
    failure: Failure,
    sent_before: bool,
    elapsed: Duration,
    retry_for: Duration,
    delay: Duration,
) -> Next {
    match failure {
        Failure::Refused => Next::GiveUp,
        Failure::NotSent if !sent_before => Next::GiveUp,
        Failure::NotSent | Failure::Unknown if elapsed + delay < retry_for => {
            Next::RetryAfter(delay)
        }
        Failure::NotSent | Failure::Unknown => Next::GiveUp,
    }
}

/// Longest wait for one submit attempt's answer. A submit commits in
/// milliseconds; a retry after a slow one is safe (same key).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Submits `request` (whose submission key must be set) to the leader,
/// retrying transport errors, not-leader answers and elections with the same
/// key until `retry_for` has passed, following the leader's address and the
/// address list on each try. The key makes every retry safe: the state
/// machine answers a key it has seen with the ids it created, so a failover
/// never creates the jobs twice. On giving up, the error says whether jobs
/// may exist, with the key to retry with.
pub async fn submit(
    opts: &crate::ClientOpts,
    request: pb::SubmitRequest,
    retry_for: Duration,
) -> Result<pb::SubmitResponse, CliError> {
    debug_assert!(!request.submission_key.is_empty());
    let setup = Setup::new(opts)?;
    let start = Instant::now();
    let deadline = start + retry_for;
    let mut delay = Duration::from_millis(100);
    let mut sent = false;
    let mut maybe_created = false;
    loop {
        let (failure, error) = match connect_leader(&setup, deadline, !sent).await {
            Ok(mut client) => {
                sent = true;
                // A leader that hangs (stopped, partitioned: no reset comes)
                // must not hold the whole deadline: an attempt gets at most
                // ATTEMPT_TIMEOUT, then the key is tried elsewhere; at least
                // a second, so a last attempt can still succeed.
                let left = deadline
                    .saturating_duration_since(Instant::now())
                    .clamp(Duration::from_secs(1), ATTEMPT_TIMEOUT);
                match tokio::time::timeout(left, client.submit(request.clone())).await {
                    Ok(Ok(response)) => return Ok(response.into_inner()),
                    Ok(Err(status)) => (classify(&status), CliError::from(status)),
                    Err(_) => (
                        Failure::Unknown,
                        CliError {
                            code: exit::UNAVAILABLE,
                            message: format!("no answer within {left:?}"),
                        },
                    ),
                }
            }
            Err(error) if error.code == exit::UNAVAILABLE => (Failure::NotSent, error),
            Err(error) => (Failure::Refused, error),
        };
        maybe_created |= failure == Failure::Unknown;
        match next_attempt(failure, sent, start.elapsed(), retry_for, delay) {
            Next::RetryAfter(wait) => {
                tracing::debug!(error = %error.message, "submit: retrying with the same key");
                tokio::time::sleep(wait).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            Next::GiveUp => {
                return Err(gave_up(error, maybe_created, &request.submission_key));
            }
        }
    }
}

/// The error of a submit that gave up: whether jobs may exist, plainly.
fn gave_up(error: CliError, maybe_created: bool, key: &str) -> CliError {
    let message = if maybe_created {
        format!(
            "{}; the jobs may or may not have been created: run the same submit with --key {key} \
             to find out (a key never creates jobs twice)",
            error.message
        )
    } else if error.code == exit::UNAVAILABLE {
        format!("{}; no job was created", error.message)
    } else {
        error.message
    };
    CliError {
        code: error.code,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_classified_by_what_they_say_about_the_jobs() {
        let transport = tonic::Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset by peer",
        )));
        let cases = [
            (
                "not leader",
                tonic::Status::unavailable("not leader"),
                Failure::Unknown,
            ),
            (
                "timeout",
                tonic::Status::deadline_exceeded("late"),
                Failure::Unknown,
            ),
            (
                "stream cancelled",
                tonic::Status::cancelled("h2"),
                Failure::Unknown,
            ),
            (
                "server died",
                tonic::Status::internal("h2 protocol error"),
                Failure::Unknown,
            ),
            ("transport", transport, Failure::Unknown),
            (
                "bad spec",
                tonic::Status::invalid_argument("jobs[0]"),
                Failure::Refused,
            ),
            (
                "no token",
                tonic::Status::unauthenticated("token"),
                Failure::Refused,
            ),
            (
                "role",
                tonic::Status::permission_denied("admin"),
                Failure::Refused,
            ),
            (
                "too large",
                tonic::Status::resource_exhausted("size"),
                Failure::Refused,
            ),
            (
                "not built",
                tonic::Status::unimplemented("x"),
                Failure::Refused,
            ),
        ];
        for (name, status, expect) in cases {
            assert_eq!(classify(&status), expect, "{name}");
        }
    }

    #[test]
    fn retry_policy() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        let cases = [
            // (failure, sent before, elapsed, retry for, delay) -> next
            (
                "refusal is final",
                Failure::Refused,
                true,
                s(0),
                s(30),
                ms(100),
                Next::GiveUp,
            ),
            (
                "nobody ever answered",
                Failure::NotSent,
                false,
                s(0),
                s(30),
                ms(100),
                Next::GiveUp,
            ),
            (
                "leader gone after a send",
                Failure::NotSent,
                true,
                s(2),
                s(30),
                ms(400),
                Next::RetryAfter(ms(400)),
            ),
            (
                "unknown outcome",
                Failure::Unknown,
                true,
                s(0),
                s(30),
                ms(100),
                Next::RetryAfter(ms(100)),
            ),
            (
                "deadline reached",
                Failure::Unknown,
                true,
                s(30),
                s(30),
                ms(100),
                Next::GiveUp,
            ),
            (
                "wait would pass it",
                Failure::Unknown,
                true,
                ms(29_500),
                s(30),
                s(1),
                Next::GiveUp,
            ),
            (
                "no retries asked",
                Failure::Unknown,
                true,
                s(0),
                s(0),
                ms(100),
                Next::GiveUp,
            ),
        ];
        for (name, failure, sent, elapsed, retry_for, delay, expect) in cases {
            assert_eq!(
                next_attempt(failure, sent, elapsed, retry_for, delay),
                expect,
                "{name}"
            );
        }
    }

    #[test]
    fn giving_up_says_whether_jobs_may_exist() {
        let unreachable = || CliError {
            code: exit::UNAVAILABLE,
            message: "cannot reach coordinator".into(),
        };
        let never_sent = gave_up(unreachable(), false, "cli-k");
        assert_eq!(never_sent.code, exit::UNAVAILABLE);
        assert_eq!(
            never_sent.message,
            "cannot reach coordinator; no job was created"
        );
        let unknown = gave_up(unreachable(), true, "cli-k");
        assert_eq!(unknown.code, exit::UNAVAILABLE);
        assert!(
            unknown.message.contains("may or may not have been created")
                && unknown.message.contains("--key cli-k"),
            "{}",
            unknown.message
        );
        let refused = gave_up(CliError::invalid("jobs[0].name: bad"), false, "cli-k");
        assert_eq!(
            (refused.code, refused.message.as_str()),
            (exit::INVALID, "jobs[0].name: bad")
        );
    }
}
