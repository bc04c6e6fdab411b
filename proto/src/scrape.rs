//! The plain-HTTP endpoint both daemons serve Prometheus metrics on: reads the request head
//! (bounded in size and time), renders the metrics on a blocking thread, answers and closes.

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Largest request head read.
const MAX_HEAD: usize = 16 * 1024;

/// Serves `render()` (None answers 500) to every connection until the task is dropped.
pub async fn serve<F>(listener: TcpListener, render: F)
where
    F: Fn() -> Option<String> + Send + Sync + Clone + 'static,
{
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            // EMFILE and friends: do not spin.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let render = render.clone();
        tokio::spawn(answer(sock, render));
    }
}

async fn answer<F>(mut sock: TcpStream, render: F)
where
    F: Fn() -> Option<String> + Send + 'static,
{
    // The whole head, so closing never resets a client still sending it.
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        true
    })
    .await;
    if !matches!(read, Ok(true)) {
        return;
    }
    let body = tokio::task::spawn_blocking(render).await.ok().flatten();
    let resp = match body {
        Some(b) => format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
            b.len()
        ),
        None => "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            .to_owned(),
    };
    let _ = sock.write_all(resp.as_bytes()).await;
    let _ = sock.shutdown().await;
}
