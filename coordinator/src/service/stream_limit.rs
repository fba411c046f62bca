//! At most so many open streams (event watches and followed logs, over
//! gRPC and HTTP together) per client: per bearer token when tokens are
//! configured, per address otherwise (`--max-streams-per-client`). A stream
//! never ends on its own, so without a bound one client could hold every
//! task and buffer of the leader.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::error::CoordinatorError;

/// Streams one client may hold open at once unless configured otherwise.
pub const DEFAULT_MAX_STREAMS_PER_CLIENT: usize = 64;

/// Who a stream is counted against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StreamClient {
    /// A bearer token, by name.
    Token(String),
    /// A client without a token, by address (not port: each connection
    /// has its own).
    Address(IpAddr),
    /// Neither is known (an in-process caller): one shared count.
    Unknown,
}

impl StreamClient {
    /// The token when there is one, else the address, else unknown.
    pub fn new(token: Option<&str>, address: Option<IpAddr>) -> StreamClient {
        match (token, address) {
            (Some(name), _) => StreamClient::Token(name.to_string()),
            (None, Some(address)) => StreamClient::Address(address),
            (None, None) => StreamClient::Unknown,
        }
    }
}

impl fmt::Display for StreamClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamClient::Token(name) => write!(f, "token '{name}'"),
            StreamClient::Address(address) => write!(f, "client {address}"),
            StreamClient::Unknown => f.write_str("this client"),
        }
    }
}

/// The open streams per client, shared by the gRPC and the HTTP API.
#[derive(Debug, Clone)]
pub struct StreamLimit {
    max: usize,
    /// A std mutex: held for one map operation, never across an await.
    /// Holds only clients with an open stream, so it is bounded by them.
    open: Arc<Mutex<HashMap<StreamClient, usize>>>,
}

impl Default for StreamLimit {
    fn default() -> StreamLimit {
        StreamLimit::new(DEFAULT_MAX_STREAMS_PER_CLIENT)
    }
}

impl StreamLimit {
    /// At most `max` streams per client (at least 1).
    pub fn new(max: usize) -> StreamLimit {
        StreamLimit {
            max: max.max(1),
            open: Arc::default(),
        }
    }

    /// Counts one more stream for `client`, or refuses it naming the limit;
    /// the stream is counted until the permit is dropped.
    pub fn acquire(&self, client: StreamClient) -> Result<StreamPermit, CoordinatorError> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(client.clone()).or_insert(0);
        if *count >= self.max {
            return Err(CoordinatorError::TooManyStreams {
                client: client.to_string(),
                limit: self.max,
            });
        }
        *count += 1;
        Ok(StreamPermit {
            client,
            open: self.open.clone(),
        })
    }

    /// Streams `client` holds open now.
    pub fn open(&self, client: &StreamClient) -> usize {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.get(client).copied().unwrap_or(0)
    }
}

/// One open stream, counted against its client until dropped (keep it
/// with the response stream, so a client that goes away frees it at once).
#[derive(Debug)]
pub struct StreamPermit {
    client: StreamClient,
    open: Arc<Mutex<HashMap<StreamClient, usize>>>,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.client) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_client_gets_its_own_bound_and_a_closed_stream_frees_its_place() {
        let limit = StreamLimit::new(2);
        let alice = StreamClient::new(Some("alice"), Some([127, 0, 0, 1].into()));
        let bob = StreamClient::new(Some("bob"), Some([127, 0, 0, 1].into()));
        let anonymous = StreamClient::new(None, Some([10, 0, 0, 7].into()));
        let first = limit.acquire(alice.clone()).expect("first");
        let _second = limit.acquire(alice.clone()).expect("second");
        let refused = limit.acquire(alice.clone()).expect_err("third");
        assert_eq!(
            refused.to_string(),
            "too many open streams: token 'alice' already holds 2, the limit (--max-streams-per-client); close one first"
        );
        assert_eq!(refused.http_status(), 429);
        assert_eq!(
            tonic::Status::from(refused).code(),
            tonic::Code::ResourceExhausted
        );
        // Another token from the same address is counted apart.
        let _bobs = limit.acquire(bob.clone()).expect("bob");
        let _anon = limit.acquire(anonymous.clone()).expect("by address");
        let _anon2 = limit.acquire(anonymous.clone()).expect("second by address");
        let refused = limit.acquire(anonymous).expect_err("third by address");
        assert!(
            refused
                .to_string()
                .contains("client 10.0.0.7 already holds 2"),
            "{refused}"
        );
        drop(first);
        assert_eq!(limit.open(&alice), 1);
        let _again = limit.acquire(alice.clone()).expect("a place was freed");
        assert_eq!(limit.open(&alice), 2);
        drop((_again, _second));
        assert!(
            limit.open.lock().expect("lock").get(&alice).is_none(),
            "no entry left"
        );
    }
}
