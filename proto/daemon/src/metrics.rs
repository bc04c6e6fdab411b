//! The plain-HTTP endpoint both daemons serve Prometheus metrics on: an axum handler over
//! hyper's HTTP/1 that renders the metrics on a blocking thread, answers and closes, with the
//! request head bounded in size and time.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::time::Duration;
use tokio::net::TcpListener;

/// Largest request head (request line and headers) read; a larger one is answered 431.
const MAX_HEAD: usize = 16 * 1024;

/// How long a client has to send its request head; then the connection is closed unanswered.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Prometheus' text exposition format.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Serves `render()` (None answers 500) on `listener` until the task is dropped. Every path and
/// method gets the metrics (`/metrics` is what scrapers ask for), one request per connection.
pub async fn serve<F>(listener: TcpListener, render: F)
where
    F: Fn() -> Option<String> + Send + Sync + Clone + 'static,
{
    let app = Router::new().fallback(move || answer(render.clone()));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_header_size(MAX_HEAD)
        .keep_alive(false)
        // A client that shuts its side down after the request still gets the answer.
        .half_close(true);
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            // EMFILE and friends: do not spin.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let conn = http.serve_connection(TokioIo::new(sock), TowerToHyperService::new(app.clone()));
        tokio::spawn(async move {
            // A client that left, stalled or sent no HTTP: the connection is closed either way.
            let _ = conn.await;
        });
    }
}

async fn answer<F>(render: F) -> Response
where
    F: FnOnce() -> Option<String> + Send + 'static,
{
    match tokio::task::spawn_blocking(render).await.ok().flatten() {
        Some(body) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response(),
        None => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn start(
        render: impl Fn() -> Option<String> + Send + Sync + Clone + 'static,
    ) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(serve(listener, render));
        addr
    }

    /// Sends `request` (then shuts the write side when `half_close`) and reads until the server
    /// closes the connection.
    async fn exchange(addr: SocketAddr, request: &[u8], half_close: bool) -> String {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(request).await.expect("send");
        if half_close {
            s.shutdown().await.expect("shutdown");
        }
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out)).await;
        assert!(read.is_ok(), "the server did not close the connection");
        String::from_utf8(out).expect("text")
    }

    fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
        let head = response.split("\r\n\r\n").next()?;
        head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    #[tokio::test]
    async fn answers_with_the_metrics_and_closes() {
        let addr = start(|| Some("rewind_up 1\n".to_owned())).await;
        // HTTP/1.1 asks to keep the connection; it is closed after the answer all the same.
        let r = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", false).await;
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert_eq!(header(&r, "content-type"), Some(CONTENT_TYPE), "{r}");
        assert_eq!(header(&r, "content-length"), Some("12"), "{r}");
        assert!(r.ends_with("\r\n\r\nrewind_up 1\n"), "{r}");
        // A bare HTTP/1.0 request, and a client that half-closes after it.
        let r = exchange(addr, b"GET /metrics HTTP/1.0\r\n\r\n", true).await;
        assert!(r.starts_with("HTTP/1.0 200 OK\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\nrewind_up 1\n"), "{r}");
        // Any path gets them, as before axum.
        let r = exchange(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", false).await;
        assert!(r.ends_with("\r\n\r\nrewind_up 1\n"), "{r}");
    }

    #[tokio::test]
    async fn a_failed_render_is_a_500_without_body() {
        let addr = start(|| None).await;
        let r = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", false).await;
        assert!(
            r.starts_with("HTTP/1.1 500 Internal Server Error\r\n"),
            "{r}"
        );
        assert_eq!(header(&r, "content-length"), Some("0"), "{r}");
        assert!(r.ends_with("\r\n\r\n"), "{r}");
    }

    #[tokio::test]
    async fn an_oversized_head_is_refused() {
        let addr = start(|| Some("rewind_up 1\n".to_owned())).await;
        let big = format!(
            "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(MAX_HEAD)
        );
        let r = exchange(addr, big.as_bytes(), false).await;
        assert!(r.starts_with("HTTP/1.1 431 "), "{r}");
    }

    /// A client that connects and says nothing is dropped after [`HEAD_TIMEOUT`] (the clock is
    /// paused and jumps to the next timer, so this takes no real time).
    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_dropped_after_the_head_timeout() {
        let addr = start(|| Some("rewind_up 1\n".to_owned())).await;
        let started = tokio::time::Instant::now();
        let r = exchange(addr, b"", false).await;
        let waited = started.elapsed();
        assert_eq!(r, "");
        assert!(
            waited >= HEAD_TIMEOUT && waited < HEAD_TIMEOUT + Duration::from_secs(5),
            "{waited:?}"
        );
    }
}
