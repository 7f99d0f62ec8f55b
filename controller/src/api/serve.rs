//! Serving the API: the accept loop with what `axum::serve` does not do —
//! at most [`MAX_CONNECTIONS`] connections at once (further ones wait in
//! the listen backlog), a deadline for a request's headers (and a TLS
//! handshake), so that clients that connect and say nothing cannot use the
//! slots up, TLS (`--tls-cert`, `--tls-key`), and `TCP_NODELAY` on every
//! connection. The API runs on a runtime and a thread of its own
//! ([`serve_apart`]): a controller busy with thousands of hosts does not
//! make readers wait for a worker thread.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 256;
/// How long a client may take to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// [`serve`] on a runtime of its own, on a thread of its own, so that the
/// kernel schedules the API beside the controller's runtime instead of
/// behind its tasks. `app` is made there, so that what the router keeps
/// up to date in the background (the status snapshot) runs there too.
/// The future ends when the server has stopped. Call it from the thread
/// that runs `block_on`, not from a task: the API's thread takes the
/// priority of the thread that starts it, and the runtime's are lowered
/// ([`crate::priority`]).
pub fn serve_apart(
    listener: TcpListener,
    app: impl FnOnce() -> Router + Send + 'static,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: CancellationToken,
) -> std::io::Result<impl std::future::Future<Output = ()>> {
    let listener = listener.into_std()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (done, stopped) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("cim-api".to_string())
        .spawn(move || {
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => serve(listener, app(), tls, shutdown).await,
                    Err(e) => tracing::error!(error = %e, "the API cannot listen"),
                }
            });
            drop(done);
        })?;
    Ok(async move {
        let _ = stopped.await;
    })
}

/// Serves `app` on `listener` until `shutdown` fires; over TLS when `tls`
/// is given (the handshake has the headers' deadline too).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: CancellationToken,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => return,
            permit = Arc::clone(&slots).acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let (stream, _) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait, then go on.
                    tracing::warn!(error = %e, "cannot accept an API connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // A response's last short segment goes out at once, not after the
        // ACK of what came before it (which a client's delayed ACK holds
        // back): what HTTP servers do.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on an API connection");
        }
        let app = app.clone();
        let shutdown = shutdown.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            match acceptor {
                None => serve_connection(stream, app, shutdown).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => serve_connection(tls, app, shutdown).await,
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                }
            }
            drop(permit);
        });
    }
}

/// Serves one connection until it ends (or, at shutdown, a moment after).
async fn serve_connection<I>(io: I, app: Router, shutdown: CancellationToken)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(app));
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        () = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            // Event streams never end by themselves.
            let _ = tokio::time::timeout(Duration::from_secs(1), connection).await;
        }
    }
}
