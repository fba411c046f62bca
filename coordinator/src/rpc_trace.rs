//! A span per gRPC request: every log line written while a request is
//! handled carries its method path and peer address, and its completion is
//! logged at debug with the gRPC status code and latency.
//!
//! A tower layer rather than tonic's `Server::trace_fn`: `trace_fn` only
//! opens the span, and the completion line needs the response. The status is
//! read from the response headers, which hold it for errors (tonic sends them
//! "trailers-only"); a response without it is OK so far (a stream may still
//! end with an error in its trailers), and the latency is to the headers.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::codegen::{Service, http};
use tonic::transport::server::TcpConnectInfo;
use tracing::Instrument;

/// Wraps a service so that each request gets an `rpc` span (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct RpcTraceLayer;

impl<S> tower_layer::Layer<S> for RpcTraceLayer {
    type Service = RpcTrace<S>;

    fn layer(&self, inner: S) -> RpcTrace<S> {
        RpcTrace { inner }
    }
}

/// The service made by [`RpcTraceLayer`].
#[derive(Debug, Clone)]
pub struct RpcTrace<S> {
    inner: S,
}

impl<S, B, R> Service<http::Request<B>> for RpcTrace<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let peer = request
            .extensions()
            .get::<TcpConnectInfo>()
            .and_then(TcpConnectInfo::remote_addr)
            .map(|addr| addr.to_string())
            .unwrap_or_default();
        let span = tracing::info_span!("rpc", method = %request.uri().path(), peer = %peer);
        let started = Instant::now();
        let response = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        Box::pin(
            async move {
                let result = response.await;
                let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
                match &result {
                    Ok(response) => {
                        let status = response
                            .headers()
                            .get("grpc-status")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse::<i32>().ok())
                            .map_or(tonic::Code::Ok, tonic::Code::from_i32);
                        tracing::debug!(status = ?status, latency_ms, "rpc done");
                    }
                    Err(_) => tracing::debug!(latency_ms, "rpc failed in transport"),
                }
                result
            }
            .instrument(span),
        )
    }
}
