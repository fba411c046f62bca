//! Credentials that change without a restart: the token file, the agent
//! join token and the TLS certificates are re-read on SIGHUP or the admin
//! `ReloadCredentials` call ([`Credentials::reload`]).
//!
//! What is in force lives in `watch` channels: [`crate::auth::Authorized`]
//! reads the current [`AuthConfig`] on every call, and the TLS acceptors
//! take the current rustls config for every new connection. A reload is
//! all or nothing: files that do not load, or a change that only a restart
//! can make (turning TLS on or off), leave the previous credentials in
//! force and answer one line saying why.
//!
//! Open streams are re-checked on every change ([`Revocable`]): a stream
//! whose credential no longer passes (a revoked token, a rotated join
//! token, a role no longer sufficient) ends with UNAUTHENTICATED or
//! PERMISSION_DENIED in its trailers. Connections already open keep the
//! certificate they were handshaken with; only new ones see the new one.
//!
//! The TLS a replica dials its peers with (their CA and this replica's
//! client certificate) is reloaded too ([`Credentials::peer_tls`]): the
//! Raft sender tasks redial with it as soon as it changes, so a rotated
//! certificate is presented to peers at once, not after a restart.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::watch;
use tokio_rustls::rustls::ServerConfig;
use tokio_stream::Stream;
use tokio_stream::wrappers::WatchStream;
use tonic::codegen::Bytes;
use tonic::codegen::http::HeaderMap;
use tonic::transport::ClientTlsConfig;

use crate::auth::AuthConfig;
use crate::error::CoordinatorError;

/// The TLS config a listener hands each new connection.
pub type TlsSource = watch::Receiver<Arc<ServerConfig>>;

/// The TLS the Raft transport dials peers with, followed as it changes.
pub type PeerTlsSource = watch::Receiver<ClientTlsConfig>;

/// Credentials as loaded from their files.
pub struct Loaded {
    /// TLS of the gRPC listener (`None` = plaintext).
    pub tls: Option<Arc<ServerConfig>>,
    /// TLS of the HTTP listener.
    pub http_tls: Option<Arc<ServerConfig>>,
    /// TLS for dialing peers: their CA and this replica's client identity
    /// (`None` = plaintext peers).
    pub peer_tls: Option<ClientTlsConfig>,
    /// Tokens, join token, peer roots.
    pub auth: AuthConfig,
}

/// Re-reads the credential files (the binary's loader, with the paths the
/// coordinator was started with); the error is one line naming the file.
#[derive(Clone)]
pub struct Reloader(Arc<dyn Fn() -> Result<Loaded, String> + Send + Sync>);

impl Reloader {
    /// A reloader calling `load`.
    pub fn new(load: impl Fn() -> Result<Loaded, String> + Send + Sync + 'static) -> Reloader {
        Reloader(Arc::new(load))
    }
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reloader")
    }
}

/// What a reload put in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reloaded {
    /// Client tokens now accepted (0 = the client API is open).
    pub tokens: usize,
    /// Whether new TLS certificates are served.
    pub tls: bool,
}

/// The credentials in force and the means to replace them.
pub struct Credentials {
    auth: watch::Sender<Arc<AuthConfig>>,
    tls: Option<watch::Sender<Arc<ServerConfig>>>,
    http_tls: Option<watch::Sender<Arc<ServerConfig>>>,
    peer_tls: Option<watch::Sender<ClientTlsConfig>>,
    reloader: Option<Reloader>,
    /// One reload at a time, so two SIGHUPs cannot interleave their sends.
    reloading: tokio::sync::Mutex<()>,
}

impl Credentials {
    /// Puts `loaded` in force; `reloader` re-reads it (`None` = reloads are
    /// refused: the credentials were not read from files).
    pub fn new(loaded: Loaded, reloader: Option<Reloader>) -> Arc<Credentials> {
        Arc::new(Credentials {
            auth: watch::Sender::new(Arc::new(loaded.auth)),
            tls: loaded.tls.map(watch::Sender::new),
            http_tls: loaded.http_tls.map(watch::Sender::new),
            peer_tls: loaded.peer_tls.map(watch::Sender::new),
            reloader,
            reloading: tokio::sync::Mutex::new(()),
        })
    }

    /// The credential checks in force, followed as they change.
    pub fn auth(&self) -> SharedAuth {
        SharedAuth {
            current: self.auth.subscribe(),
        }
    }

    /// The gRPC listener's TLS, followed as it changes.
    pub fn tls(&self) -> Option<TlsSource> {
        self.tls.as_ref().map(watch::Sender::subscribe)
    }

    /// The HTTP listener's TLS, followed as it changes.
    pub fn http_tls(&self) -> Option<TlsSource> {
        self.http_tls.as_ref().map(watch::Sender::subscribe)
    }

    /// The TLS peers are dialed with, followed as it changes.
    pub fn peer_tls(&self) -> Option<PeerTlsSource> {
        self.peer_tls.as_ref().map(watch::Sender::subscribe)
    }

    /// Re-reads every credential file and puts them in force together, or
    /// changes nothing and says why.
    pub async fn reload(&self) -> Result<Reloaded, CoordinatorError> {
        let Some(reloader) = self.reloader.clone() else {
            return Err(CoordinatorError::FailedPrecondition(
                "credentials were not read from files; nothing to reload".into(),
            ));
        };
        let _one_at_a_time = self.reloading.lock().await;
        let loaded = tokio::task::spawn_blocking(move || (reloader.0)())
            .await
            .map_err(|e| CoordinatorError::Unavailable(format!("reload task failed: {e}")))?
            .map_err(|e| {
                CoordinatorError::FailedPrecondition(format!(
                    "reload refused, the previous credentials stay in force: {e}"
                ))
            })?;
        check_reload(
            [
                self.tls.is_some(),
                self.http_tls.is_some(),
                self.peer_tls.is_some(),
            ],
            &loaded,
        )?;
        let reloaded = Reloaded {
            tokens: loaded.auth.tokens.as_ref().map_or(0, Vec::len),
            tls: loaded.tls.is_some(),
        };
        if let (Some(sender), Some(tls)) = (&self.tls, loaded.tls) {
            sender.send_replace(tls);
        }
        if let (Some(sender), Some(tls)) = (&self.http_tls, loaded.http_tls) {
            sender.send_replace(tls);
        }
        if let (Some(sender), Some(tls)) = (&self.peer_tls, loaded.peer_tls) {
            sender.send_replace(tls);
        }
        // Last: streams re-check against the new checks once they are sent.
        self.auth.send_replace(Arc::new(loaded.auth));
        tracing::info!(
            tokens = reloaded.tokens,
            tls = reloaded.tls,
            "credentials reloaded"
        );
        Ok(reloaded)
    }
}

/// Refuses a reload that only a restart can make: the listeners' schemes
/// are fixed when they bind (clients and peers dial `https://` or
/// `http://`), and so are the schemes of the peer URLs. `now` says which of
/// the listener, HTTP and peer TLS are on.
fn check_reload(now: [bool; 3], loaded: &Loaded) -> Result<(), CoordinatorError> {
    let refuse = |what: &str| {
        Err(CoordinatorError::FailedPrecondition(format!(
            "reload refused, the previous credentials stay in force: {what} needs a restart"
        )))
    };
    let next = [
        loaded.tls.is_some(),
        loaded.http_tls.is_some(),
        loaded.peer_tls.is_some(),
    ];
    if now[..2] != next[..2] {
        return refuse(if now[0] {
            "turning TLS off"
        } else {
            "turning TLS on"
        });
    }
    if now[2] != next[2] {
        return refuse(if now[2] {
            "turning peer TLS (--tls-ca) off"
        } else {
            "turning peer TLS (--tls-ca) on"
        });
    }
    Ok(())
}

/// The credential checks in force (a receiver of [`Credentials`]).
#[derive(Clone)]
pub struct SharedAuth {
    current: watch::Receiver<Arc<AuthConfig>>,
}

impl SharedAuth {
    /// Checks that never change (tests, and coordinators without files).
    pub fn fixed(config: AuthConfig) -> SharedAuth {
        let (_, current) = watch::channel(Arc::new(config));
        SharedAuth { current }
    }

    /// The checks in force now.
    pub fn current(&self) -> Arc<AuthConfig> {
        self.current.borrow().clone()
    }

    /// The checks in force now, then each replacement.
    pub fn changes(&self) -> WatchStream<Arc<AuthConfig>> {
        WatchStream::new(self.current.clone())
    }

    /// [`AuthConfig::check_http_read`] with the checks in force.
    pub fn check_http_read(&self, what: &str, headers: &HeaderMap) -> Result<(), CoordinatorError> {
        self.current().check_http_read(what, headers)
    }
}

/// Whether a call's credential still passes under a new configuration.
pub type StillValid = Box<dyn Fn(&AuthConfig) -> Result<(), CoordinatorError> + Send>;

/// A response body that ends, with the refusal in its trailers, as soon
/// as the call's credential no longer passes (see the module docs).
pub struct Revocable {
    inner: tonic::body::Body,
    changes: WatchStream<Arc<AuthConfig>>,
    still_valid: StillValid,
    ended: bool,
}

impl Revocable {
    /// Wraps a response body of a call checked with `still_valid`.
    pub fn new(
        inner: tonic::body::Body,
        changes: WatchStream<Arc<AuthConfig>>,
        still_valid: StillValid,
    ) -> Revocable {
        Revocable {
            inner,
            changes,
            still_valid,
            ended: false,
        }
    }
}

impl http_body::Body for Revocable {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        // A closed channel (the coordinator stopping) yields None: no more
        // changes, the body goes on as it is.
        while let Poll::Ready(Some(config)) = Pin::new(&mut this.changes).poll_next(cx) {
            if let Err(error) = (this.still_valid)(&config) {
                this.ended = true;
                tracing::info!(%error, "stream closed: its credential no longer passes");
                let status = tonic::Status::from(error);
                let mut trailers = HeaderMap::new();
                if let Err(status) = status.add_header(&mut trailers) {
                    return Poll::Ready(Some(Err(status)));
                }
                return Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))));
            }
        }
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(None) = frame {
            this.ended = true;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{BearerToken, Role};
    use http_body_util::BodyExt;

    fn tokens(names: &[&str]) -> AuthConfig {
        AuthConfig {
            tokens: Some(
                names
                    .iter()
                    .map(|n| BearerToken {
                        name: n.to_string(),
                        token: format!("{n}-secret-0123456789"),
                        role: Role::User,
                    })
                    .collect(),
            ),
            ..AuthConfig::default()
        }
    }

    fn loaded(auth: AuthConfig) -> Loaded {
        Loaded {
            tls: None,
            http_tls: None,
            peer_tls: None,
            auth,
        }
    }

    #[tokio::test]
    async fn a_reload_replaces_all_or_nothing() {
        let next = Arc::new(std::sync::Mutex::new(Ok::<_, String>(vec!["bob"])));
        let source = next.clone();
        let reloader = Reloader::new(move || {
            let names = source.lock().expect("lock").clone()?;
            Ok(loaded(tokens(&names)))
        });
        let credentials = Credentials::new(loaded(tokens(&["alice"])), Some(reloader));
        let auth = credentials.auth();
        let names = |auth: &SharedAuth| -> Vec<String> {
            let config = auth.current();
            config
                .tokens
                .iter()
                .flatten()
                .map(|t| t.name.clone())
                .collect()
        };
        assert_eq!(names(&auth), ["alice"]);
        let reloaded = credentials.reload().await.expect("reload");
        assert_eq!(
            reloaded,
            Reloaded {
                tokens: 1,
                tls: false
            }
        );
        assert_eq!(names(&auth), ["bob"]);
        *next.lock().expect("lock") = Err("--tokens t.yaml: [0].role: unknown role".into());
        let error = credentials.reload().await.expect_err("bad file");
        assert_eq!(
            error.to_string(),
            "reload refused, the previous credentials stay in force: --tokens t.yaml: [0].role: unknown role"
        );
        assert_eq!(names(&auth), ["bob"], "a failed reload changes nothing");
        let fixed = Credentials::new(loaded(AuthConfig::default()), None);
        assert!(
            fixed
                .reload()
                .await
                .expect_err("no files")
                .to_string()
                .contains("nothing to reload")
        );
    }

    #[test]
    fn tls_cannot_be_switched_by_a_reload() {
        let plain = loaded(AuthConfig::default());
        assert!(check_reload([false; 3], &plain).is_ok());
        let error = check_reload([true; 3], &plain).expect_err("tls off");
        assert!(
            error
                .to_string()
                .contains("turning TLS off needs a restart"),
            "{error}"
        );
        let error = check_reload([false, false, true], &plain).expect_err("peer tls off");
        assert!(
            error
                .to_string()
                .contains("turning peer TLS (--tls-ca) off needs a restart"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_stream_ends_when_its_token_is_revoked() {
        let credentials = Credentials::new(loaded(tokens(&["alice", "bob"])), None);
        let auth = credentials.auth();
        let (mut tx, rx) =
            futures::channel::mpsc::channel::<Result<http_body::Frame<Bytes>, tonic::Status>>(4);
        let inner = tonic::body::Body::new(http_body_util::StreamBody::new(rx));
        let alice_valid: StillValid = Box::new(|config: &AuthConfig| {
            let known = config.tokens.iter().flatten().any(|t| t.name == "alice");
            if known {
                Ok(())
            } else {
                Err(CoordinatorError::Unauthenticated(
                    "bearer token not recognised".into(),
                ))
            }
        });
        let mut body = Revocable::new(inner, auth.changes(), alice_valid);
        tx.try_send(Ok(http_body::Frame::data(Bytes::from_static(b"one"))))
            .expect("send");
        let frame = body.frame().await.expect("frame").expect("ok");
        assert_eq!(frame.into_data().expect("data"), Bytes::from_static(b"one"));
        // Revoke alice: the next frame is the trailers with the refusal.
        credentials.auth.send_replace(Arc::new(tokens(&["bob"])));
        let frame = body.frame().await.expect("frame").expect("ok");
        let trailers = frame.into_trailers().expect("trailers");
        assert_eq!(trailers["grpc-status"], "16", "{trailers:?}");
        assert!(body.frame().await.is_none(), "nothing after the trailers");
    }
}
