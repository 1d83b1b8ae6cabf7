//! The listeners: HTTP/1.1 on the Unix socket (callers identified with SO_PEERCRED), the
//! optional loopback TCP listener (token header), and the metrics listener. The server is a
//! function of its listeners and a shutdown future: tests bind temporary sockets and pass their
//! own future.

pub mod api;
mod limits;
mod observe;
pub mod unix;

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::time::Instant;

use crate::access::Caller;
use crate::secret::SecretString;
use crate::service::Service;
use api::ApiError;

/// Shared state of the request handlers.
pub struct App {
    pub service: Arc<Service>,
    pub migrator: Arc<crate::migrate::Migrator>,
    pub reloader: Arc<crate::reload::Reloader>,
    pub control: Arc<crate::control::ControlPlane>,
    /// The egress proxy (`/v1/proxy/…`).
    pub proxy: crate::proxy::Proxy,
    pub tcp_token: Option<SecretString>,
    pub token_header: HeaderName,
    pub max_body_bytes: usize,
    /// Where audit lines go; `None` with `log.audit = false`.
    pub audit_log: Option<crate::audit::AuditLog>,
    pub request_timeout: Duration,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub shutdown_grace: Duration,
    per_caller: Arc<limits::PerCaller>,
    /// Requests in flight, all callers together: beyond `max_concurrent_requests` a request is
    /// answered 503 at once instead of queueing without bound.
    in_flight: Arc<tokio::sync::Semaphore>,
    observed: observe::RequestMetrics,
    ready: AtomicBool,
}

impl App {
    pub fn new(
        service: Arc<Service>,
        migrator: Arc<crate::migrate::Migrator>,
        reloader: Arc<crate::reload::Reloader>,
        control: Arc<crate::control::ControlPlane>,
        tcp_token: Option<SecretString>,
    ) -> Result<Self, crate::audit::OpenError> {
        let runtime = service.runtime();
        let config = &runtime.config;
        let audit_log = if config.log.audit {
            Some(crate::audit::AuditLog::start(
                audit_settings(&config.log),
                Some(service.metrics().audit_dropped.clone()),
            )?)
        } else {
            None
        };
        let token_header = config
            .server
            .tcp
            .as_ref()
            .and_then(|t| HeaderName::from_bytes(t.token_header.as_bytes()).ok())
            .unwrap_or_else(|| HeaderName::from_static(crate::config::DEFAULT_TOKEN_HEADER));
        Ok(Self {
            proxy: crate::proxy::Proxy::new(Arc::clone(&service), token_header.clone()),
            tcp_token,
            token_header,
            max_body_bytes: config.server.max_body_bytes,
            audit_log,
            request_timeout: config.server.request_timeout,
            header_read_timeout: config.server.header_read_timeout,
            body_read_timeout: config.server.body_read_timeout,
            shutdown_grace: config.server.shutdown_grace,
            per_caller: limits::PerCaller::new(config.server.max_requests_per_caller),
            in_flight: Arc::new(tokio::sync::Semaphore::new(
                config.server.max_concurrent_requests,
            )),
            observed: observe::RequestMetrics::new(),
            ready: AtomicBool::new(false),
            service,
            migrator,
            reloader,
            control,
        })
    }

    /// Whether credential accesses are audited.
    pub fn audits(&self) -> bool {
        self.audit_log.is_some()
    }

    /// Writes out the audit lines still buffered; the last step of a shutdown.
    pub fn close_audit(&self) {
        if let Some(log) = &self.audit_log {
            log.close();
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }
}

fn audit_settings(log: &crate::config::LogConfig) -> crate::audit::Settings {
    crate::audit::Settings {
        format: match log.format {
            crate::config::LogFormat::Text => crate::audit::Format::Text,
            crate::config::LogFormat::Json => crate::audit::Format::Json,
        },
        file: log.audit_file.clone(),
        flush_interval: log.audit_flush_interval,
        buffer: log.audit_buffer,
        blocking: log.audit_blocking,
    }
}

pub struct Listeners {
    pub unix: UnixListener,
    pub tcp: Option<TcpListener>,
    pub metrics: Option<TcpListener>,
}

#[derive(Clone, Copy)]
enum Transport {
    Unix(Caller),
    Tcp,
}

/// Serves every listener until `shutdown` completes, then stops accepting and drains the
/// connections in flight for at most the configured grace period.
pub async fn run(listeners: Listeners, app: Arc<App>, shutdown: impl Future<Output = ()>) {
    let graceful = GracefulShutdown::new();
    let Listeners { unix, tcp, metrics } = listeners;
    tokio::pin!(shutdown);
    // One back-off per listener: the metrics port running out of luck must not stall the socket.
    let (mut unix_errors, mut tcp_errors, mut metrics_errors) = (
        limits::AcceptErrors::new(),
        limits::AcceptErrors::new(),
        limits::AcceptErrors::new(),
    );
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = unix.accept() => match accepted {
                Ok((stream, _)) => {
                    unix_errors.succeeded();
                    let caller = match stream.peer_cred() {
                        Ok(cred) => Caller::Unix { uid: cred.uid(), gid: cred.gid(), pid: cred.pid() },
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read peer credentials; closing connection");
                            continue;
                        }
                    };
                    serve_api(&app, &graceful, stream, Transport::Unix(caller));
                }
                Err(e) => unix_errors.failed(&e).await,
            },
            accepted = accept_tcp(tcp.as_ref()) => match accepted {
                Ok(stream) => {
                    tcp_errors.succeeded();
                    serve_api(&app, &graceful, stream, Transport::Tcp)
                }
                Err(e) => tcp_errors.failed(&e).await,
            },
            accepted = accept_tcp(metrics.as_ref()) => match accepted {
                Ok(stream) => {
                    metrics_errors.succeeded();
                    serve_metrics(&app, &graceful, stream)
                }
                Err(e) => metrics_errors.failed(&e).await,
            },
        }
    }
    drop((unix, tcp, metrics));
    app.set_ready(false);
    if tokio::time::timeout(app.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?app.shutdown_grace, "connections still open after the shutdown grace period; closing them");
    }
}

async fn accept_tcp(listener: Option<&TcpListener>) -> std::io::Result<tokio::net::TcpStream> {
    match listener {
        Some(l) => l.accept().await.map(|(s, _)| {
            let _ = s.set_nodelay(true);
            s
        }),
        None => std::future::pending().await,
    }
}

fn serve_api<S>(app: &Arc<App>, graceful: &GracefulShutdown, stream: S, transport: Transport)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let app_for_conn = Arc::clone(app);
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let app = Arc::clone(&app_for_conn);
        async move {
            let started = Instant::now();
            let target = api::classify(request.method(), request.uri().path());
            let route = target.route;
            let response = match admit(&app, &request, transport) {
                Err(e) => e.into_response(),
                Ok(caller) => 'admitted: {
                    // Held until the answer is ready: one caller's slow requests use up its
                    // own share, not everybody's.
                    let Some(_slot) = app.per_caller.try_acquire(&caller) else {
                        app.service.metrics().requests_shed[1].inc();
                        break 'admitted overloaded(true).into_response();
                    };
                    let Ok(_permit) = app.in_flight.try_acquire() else {
                        app.service.metrics().requests_shed[0].inc();
                        break 'admitted overloaded(false).into_response();
                    };
                    // A call through the proxy runs under its upstream's own timeouts, which
                    // may well be longer than an API request's. A timeout far beyond any real
                    // one must not overflow the clock.
                    let deadline = (route != api::RouteId::Proxy).then(|| {
                        started
                            .checked_add(app.request_timeout)
                            .unwrap_or_else(|| started + Duration::from_secs(86_400 * 365))
                    });
                    let mut unwritten = Vec::new();
                    // Boxed once: moved into hyper's task, the handler's state would be
                    // copied at every move.
                    let response = Box::pin(api::handle(
                        &app,
                        caller,
                        target,
                        request,
                        deadline,
                        &mut unwritten,
                    ))
                    .await;
                    // Audit lines waiting for room (log.audit_blocking) are written with no
                    // deadline running: the request is answered only once they are.
                    if let Some(log) = &app.audit_log {
                        for line in unwritten {
                            log.append(line).await;
                        }
                    }
                    response
                }
            };
            let status = response.status();
            let elapsed = started.elapsed();
            tracing::debug!(
                route = route.as_str(),
                status = status.as_u16(),
                micros = elapsed.as_micros() as u64,
                "request"
            );
            let metrics = app.service.metrics();
            // An upstream's own 403, passed through the proxy, is no refusal of credproxy's.
            let upstreams = response
                .extensions()
                .get::<crate::proxy::UpstreamAnswer>()
                .is_some();
            if status == StatusCode::FORBIDDEN && !upstreams {
                metrics.access_denied.inc();
            }
            app.observed
                .observe(metrics, route, status.as_u16(), elapsed.as_secs_f64());
            Ok::<_, Infallible>(response)
        }
    });
    // Half-closed connections are answered: a client may send its request and shut down its
    // write side (as `nc -N` and some proxies do) and still expect the response.
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .half_close(true)
        .header_read_timeout(app.header_read_timeout)
        .serve_connection(TokioIo::new(stream), service);
    let connection = graceful.watch(connection);
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    });
}

/// Runs `handler` until `deadline`; `None` if it did not finish by then. A handler that
/// finishes on its first poll (a cached read) never arms a timer.
async fn within<T>(deadline: Instant, handler: impl Future<Output = T>) -> Option<T> {
    let mut handler = std::pin::pin!(handler);
    let first = std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match handler.as_mut().poll(cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        })
    })
    .await;
    match first {
        Some(v) => Some(v),
        None => tokio::time::timeout_at(deadline, handler).await.ok(),
    }
}

/// Transport-level checks before a request reaches the API: on TCP, the token header and no
/// proxy headers (a request relayed by a proxy is not a local caller).
fn admit(app: &App, request: &Request<Incoming>, transport: Transport) -> Result<Caller, ApiError> {
    let headers = request.headers();
    if headers.contains_key("forwarded") || headers.contains_key("x-forwarded-for") {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "forwarded_rejected",
            "requests relayed through a proxy are refused",
        ));
    }
    match transport {
        Transport::Unix(caller) => Ok(caller),
        Transport::Tcp => {
            let presented = headers.get(&app.token_header).map(HeaderValue::as_bytes);
            let expected = app.tcp_token.as_ref().map(|t| t.expose().as_bytes());
            match (presented, expected) {
                (Some(p), Some(e)) if constant_time_eq(p, e) => Ok(Caller::Tcp),
                _ => Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "a valid token header is required on the TCP listener",
                )),
            }
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `503 request_timeout`: the handler ran past `server.request_timeout`.
fn timed_out() -> ApiError {
    ApiError {
        retry_after: Some(Duration::from_secs(1)),
        ..ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "request_timeout",
            "the request took longer than the configured timeout",
        )
    }
}

/// `503 overloaded`: every slot is taken, or (`own_share`) this caller's share of them.
fn overloaded(own_share: bool) -> ApiError {
    let error = ApiError {
        retry_after: Some(Duration::from_secs(1)),
        ..ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "too many requests in flight; retry shortly",
        )
    };
    if own_share {
        error.with_detail("this caller has server.max_requests_per_caller requests in flight")
    } else {
        error
    }
}

fn serve_metrics<S>(app: &Arc<App>, graceful: &GracefulShutdown, stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let app = Arc::clone(app);
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let app = Arc::clone(&app);
        async move {
            let response = match (request.method(), request.uri().path()) {
                (&hyper::Method::GET, "/metrics") => {
                    app.service.refresh_cache_gauge();
                    let mut r = Response::new(api::Body::full(app.service.metrics().render()));
                    r.headers_mut().insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                    );
                    r
                }
                (&hyper::Method::GET, "/healthz" | "/readyz") => {
                    let target = api::classify(request.method(), request.uri().path());
                    api::handle(&app, Caller::Tcp, target, request, None, &mut Vec::new()).await
                }
                _ => ApiError::not_found_route().into_response(),
            };
            Ok::<_, Infallible>(response)
        }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .half_close(true)
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(TokioIo::new(stream), service);
    let connection = graceful.watch(connection);
    tokio::spawn(async move {
        let _ = connection.await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_handler_done_at_once_needs_no_timer_and_a_slow_one_is_cut_at_the_deadline() {
        let deadline = Instant::now() + Duration::from_secs(10);
        assert_eq!(within(deadline, async { 7 }).await, Some(7));
        let slow = within(deadline, async {
            tokio::time::sleep(Duration::from_secs(9)).await;
            8
        });
        assert_eq!(slow.await, Some(8));
        let late = within(deadline, async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            9
        });
        assert_eq!(late.await, None);
        assert!(Instant::now() >= deadline);
    }
}
