//! Where each replica serves its HTTP API, learned from the Raft traffic.
//!
//! Every `Step` batch carries its sender's advertised HTTP base URL
//! (`RaftBatch.from_http`). A follower learns who leads only from the
//! leader's own messages (appends, heartbeats), so by the time it knows the
//! leader's id it has that leader's HTTP URL too: a follower's 503 on the
//! JSON API names it, and HTTP clients follow it. Nothing is stored or
//! replicated: after a leader change the new leader's first heartbeat
//! brings its URL, and a replica restarted on another port corrects its
//! entry with its next batch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Longest HTTP URL taken from a peer.
const MAX_URL_LEN: usize = 512;

/// Replica id -> HTTP base URL, shared by the peer service (which records)
/// and the handles (which read). Bounded: only members' batches reach it.
#[derive(Debug, Clone, Default)]
pub(crate) struct HttpUrls {
    /// A std mutex: held for one map operation, never across an await.
    urls: Arc<Mutex<HashMap<u64, String>>>,
}

impl HttpUrls {
    /// A directory that knows this replica's own URL (if it serves HTTP).
    pub(crate) fn new(id: u64, own: Option<&str>) -> HttpUrls {
        let urls = HttpUrls::default();
        if let Some(own) = own {
            urls.record(id, own);
        }
        urls
    }

    /// Records `from`'s URL as its batch gave it; an empty, overlong or
    /// non-http(s) URL is ignored (the replica serves no HTTP, or is
    /// broken: its followers then answer without a redirection).
    pub(crate) fn record(&self, from: u64, url: &str) {
        if !usable(url) {
            return;
        }
        let mut urls = self.urls.lock().unwrap_or_else(|p| p.into_inner());
        if urls.get(&from).map(String::as_str) != Some(url) {
            urls.insert(from, url.to_string());
        }
    }

    /// The HTTP base URL of replica `id`, once known.
    pub(crate) fn get(&self, id: u64) -> Option<String> {
        let urls = self.urls.lock().unwrap_or_else(|p| p.into_inner());
        urls.get(&id).cloned()
    }
}

/// Whether `url` is an http(s) base URL worth naming to clients.
fn usable(url: &str) -> bool {
    url.len() <= MAX_URL_LEN
        && url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))
            .is_some_and(|rest| {
                !rest.is_empty() && !rest.contains(|c: char| c.is_whitespace() || c.is_control())
            })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_recorded_replaced_and_bad_ones_ignored() {
        let urls = HttpUrls::new(1, Some("http://10.0.0.1:7080"));
        assert_eq!(urls.get(1).as_deref(), Some("http://10.0.0.1:7080"));
        assert_eq!(urls.get(2), None);
        for (url, kept) in [
            ("http://10.0.0.2:7080", "http://10.0.0.2:7080"),
            // A restart on another port replaces the entry.
            ("https://10.0.0.2:7443", "https://10.0.0.2:7443"),
            // Not a URL a client could follow: the last good one stays.
            ("", "https://10.0.0.2:7443"),
            ("ftp://10.0.0.2", "https://10.0.0.2:7443"),
            ("http://", "https://10.0.0.2:7443"),
            ("http://a b", "https://10.0.0.2:7443"),
            ("http://evil\r\nx: y", "https://10.0.0.2:7443"),
        ] {
            urls.record(2, url);
            assert_eq!(urls.get(2).as_deref(), Some(kept), "after {url:?}");
        }
        urls.record(3, &format!("http://{}", "a".repeat(MAX_URL_LEN)));
        assert_eq!(urls.get(3), None, "overlong");
    }
}
