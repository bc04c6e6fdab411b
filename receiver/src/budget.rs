//! Bounded memory whatever peers send: a request layer that accounts for every gRPC message
//! from its 5-byte length prefix until it has arrived whole.
//!
//! tonic reserves a message's claimed length as soon as its prefix arrives and keeps what
//! arrived until the rest does, so a peer could pin 16 MiB with 5 bytes, or hold unfinished
//! messages for ever. Here a message's claimed length is taken from its agent's budget and the
//! receiver's before tonic sees the prefix; past either the stream fails with
//! RESOURCE_EXHAUSTED at once (waiting would leave the bytes in HTTP/2 buffers instead). The
//! budget stays taken while tonic holds the decoded message: on a stream until the handler asks
//! for the next one, on a unary call until the request ends (which must follow its one message
//! within `message_timeout`). A message must arrive whole within `message_timeout` of its first
//! byte, and a stream may not go `stream_idle_timeout` without one; time the handler spends
//! before asking for more data does not count against the peer. Upload streams are also capped
//! per agent, and every request marks its connection busy (see [`crate::admission`]).

use crate::admission::{ActiveRequest, Admission};
use crate::config::Limits;
use bytes::Buf;
use http_body::Frame;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tonic::body::Body;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::Status;

/// The gRPC length prefix: a compression flag and a big-endian u32 length.
const PREFIX: usize = 5;

/// The shared budgets behind the layer.
pub struct Budgets {
    limits: Limits,
    admission: Option<Arc<Admission>>,
    global: Arc<Semaphore>,
    agents: Mutex<HashMap<String, AgentBudget>>,
}

#[derive(Clone)]
struct AgentBudget {
    partial: Arc<Semaphore>,
    uploads: Arc<Semaphore>,
}

impl Budgets {
    pub fn new(limits: Limits, admission: Option<Arc<Admission>>) -> Arc<Budgets> {
        Arc::new(Budgets {
            global: Arc::new(Semaphore::new(limits.max_partial_bytes)),
            limits,
            admission,
            agents: Mutex::new(HashMap::new()),
        })
    }

    fn agent(&self, name: &str) -> AgentBudget {
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        agents
            .entry(name.to_owned())
            .or_insert_with(|| AgentBudget {
                partial: Arc::new(Semaphore::new(self.limits.max_partial_bytes_per_agent)),
                uploads: Arc::new(Semaphore::new(self.limits.max_uploads_per_agent)),
            })
            .clone()
    }
}

/// The tower layer that puts [`Budgets`] in front of the service.
#[derive(Clone)]
pub struct BudgetLayer(pub Arc<Budgets>);

impl<S> tower::Layer<S> for BudgetLayer {
    type Service = Budgeted<S>;

    fn layer(&self, inner: S) -> Budgeted<S> {
        Budgeted {
            inner,
            budgets: self.0.clone(),
        }
    }
}

/// The service behind a [`BudgetLayer`].
#[derive(Clone)]
pub struct Budgeted<S> {
    inner: S,
    budgets: Arc<Budgets>,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S> tower::Service<http::Request<Body>> for Budgeted<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let b = &self.budgets;
        let conn = req
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|i| i.get_ref().remote_addr())
            .and_then(|addr| b.admission.as_ref().and_then(|a| a.conn(addr)));
        // Requests with no verified connection (none reach here over TLS) share one budget;
        // the handlers refuse them anyway.
        let agent = b.agent(conn.as_ref().map_or("", |c| c.agent.as_str()));
        let active = conn.as_ref().map(|c| c.request());
        let upload = if req.uri().path().ends_with("/Upload") {
            match agent.uploads.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    let msg = format!(
                        "too many upload streams open for this agent (max_uploads_per_agent = {})",
                        b.limits.max_uploads_per_agent
                    );
                    tracing::warn!(agent = %conn.as_ref().map_or("", |c| c.agent.as_str()), "{msg}");
                    let resp = Status::resource_exhausted(msg).into_http();
                    return Box::pin(async move { Ok(resp) });
                }
            }
        } else {
            None
        };
        let unary = upload.is_none();
        let (parts, body) = req.into_parts();
        let body = Body::new(BudgetBody {
            inner: body,
            unary,
            finished: None,
            messages: 0,
            handed_at: None,
            agent: agent.partial,
            global: b.global.clone(),
            held: None,
            prefix: [0; PREFIX],
            prefix_len: 0,
            remaining: 0,
            deadline: Box::pin(tokio::time::sleep(b.limits.stream_idle_timeout)),
            limits: b.limits.clone(),
            _upload: upload,
            failed: false,
        });
        let fut = self.inner.call(http::Request::from_parts(parts, body));
        Box::pin(async move {
            let r = fut.await;
            drop::<Option<ActiveRequest>>(active);
            r
        })
    }
}

/// A request body that takes each message's claimed length from the budgets until the message
/// has arrived whole.
struct BudgetBody {
    inner: Body,
    /// A call of one request message (every method but Upload).
    unary: bool,
    /// The budget of the last whole message, held while tonic may still hold it.
    finished: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
    /// Whole messages so far.
    messages: u64,
    /// When the last frame was handed on: until the next poll, time is the handler's.
    handed_at: Option<Instant>,
    agent: Arc<Semaphore>,
    global: Arc<Semaphore>,
    /// The budget of the message arriving now.
    held: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
    prefix: [u8; PREFIX],
    prefix_len: usize,
    /// Bytes of the current message still to come.
    remaining: u64,
    /// The current message's deadline, or the stream's idle deadline between messages.
    deadline: Pin<Box<Sleep>>,
    limits: Limits,
    _upload: Option<OwnedSemaphorePermit>,
    failed: bool,
}

impl BudgetBody {
    fn in_message(&self) -> bool {
        self.prefix_len > 0 || self.remaining > 0
    }

    /// Follows the message framing through `data`, taking and releasing budget.
    fn account(&mut self, mut data: &[u8]) -> Result<(), Status> {
        while !data.is_empty() {
            if self.unary && self.messages > 0 {
                return Err(Status::invalid_argument(
                    "a unary call carries exactly one message",
                ));
            }
            if self.remaining == 0 {
                if self.prefix_len == 0 {
                    let at = Instant::now() + self.limits.message_timeout;
                    self.deadline.as_mut().reset(at);
                }
                let take = (PREFIX - self.prefix_len).min(data.len());
                self.prefix[self.prefix_len..self.prefix_len + take].copy_from_slice(&data[..take]);
                self.prefix_len += take;
                data.advance(take);
                if self.prefix_len < PREFIX {
                    break;
                }
                let claimed = u32::from_be_bytes([
                    self.prefix[1],
                    self.prefix[2],
                    self.prefix[3],
                    self.prefix[4],
                ]);
                // tonic refuses lengths past its limit before reserving; count them as the
                // limit so they are refused there, with tonic's own error.
                let n = claimed.min(rewind_proto::format::MAX_MESSAGE_BYTES as u32 + 1);
                let agent = self.agent.clone().try_acquire_many_owned(n);
                let global = self.global.clone().try_acquire_many_owned(n);
                match (agent, global) {
                    (Ok(a), Ok(g)) => self.held = Some((a, g)),
                    (a, _) => {
                        let which = if a.is_err() {
                            format!(
                                "this agent's ({} MiB, max_partial_mib_per_agent)",
                                self.limits.max_partial_bytes_per_agent >> 20
                            )
                        } else {
                            format!(
                                "the receiver's ({} MiB, max_partial_mib)",
                                self.limits.max_partial_bytes >> 20
                            )
                        };
                        return Err(Status::resource_exhausted(format!(
                            "a message of {claimed} bytes does not fit in {which} budget for messages still arriving"
                        )));
                    }
                }
                self.prefix_len = 0;
                self.remaining = u64::from(claimed);
                if self.remaining == 0 {
                    self.message_done();
                }
            } else {
                let take = (self.remaining.min(data.len() as u64)) as usize;
                self.remaining -= take as u64;
                data.advance(take);
                if self.remaining == 0 {
                    self.message_done();
                }
            }
        }
        Ok(())
    }

    fn message_done(&mut self) {
        self.messages += 1;
        self.finished = self.held.take();
        // A unary call must end soon after its message; a stream may wait for the next one.
        let wait = if self.unary {
            self.limits.message_timeout
        } else {
            self.limits.stream_idle_timeout
        };
        self.deadline.as_mut().reset(Instant::now() + wait);
    }

    fn fail(&mut self, status: Status) -> Poll<Option<Result<Frame<bytes::Bytes>, Status>>> {
        self.failed = true;
        self.held = None;
        self.finished = None;
        tracing::warn!(message = status.message(), "request stream cut");
        Poll::Ready(Some(Err(status)))
    }
}

impl http_body::Body for BudgetBody {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if self.failed {
            return Poll::Ready(None);
        }
        if let Some(at) = self.handed_at.take() {
            // The handler had the last frame until now: not the peer's time.
            let later = self.deadline.deadline() + at.elapsed();
            self.deadline.as_mut().reset(later);
        }
        if !self.unary {
            // Asking for more data: the handler is done with the last whole message.
            self.finished = None;
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            let status = if self.in_message() {
                Status::deadline_exceeded(format!(
                    "a message did not arrive whole within {} s of its first byte",
                    self.limits.message_timeout.as_secs()
                ))
            } else {
                Status::deadline_exceeded(format!(
                    "no message on this stream for {} s",
                    self.limits.stream_idle_timeout.as_secs()
                ))
            };
            return self.fail(status);
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let data = data.clone();
                    if let Err(status) = self.account(&data) {
                        return self.fail(status);
                    }
                }
                self.handed_at = Some(Instant::now());
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(limits: &Limits) -> BudgetBody {
        BudgetBody {
            inner: Body::empty(),
            unary: false,
            finished: None,
            messages: 0,
            handed_at: None,
            agent: Arc::new(Semaphore::new(limits.max_partial_bytes_per_agent)),
            global: Arc::new(Semaphore::new(limits.max_partial_bytes)),
            held: None,
            prefix: [0; PREFIX],
            prefix_len: 0,
            remaining: 0,
            deadline: Box::pin(tokio::time::sleep(limits.stream_idle_timeout)),
            limits: limits.clone(),
            _upload: None,
            failed: false,
        }
    }

    fn prefix(len: u32) -> Vec<u8> {
        let mut p = vec![0u8];
        p.extend_from_slice(&len.to_be_bytes());
        p
    }

    #[tokio::test]
    async fn a_claimed_length_is_held_until_the_message_is_whole() {
        let limits = Limits::default();
        let mut b = body(&limits);
        let free = |b: &BudgetBody| b.agent.available_permits();
        let full = free(&b);
        // The prefix arrives split in two frames.
        b.account(&prefix(1000)[..2]).expect("first bytes");
        assert_eq!(free(&b), full, "nothing taken before the length is known");
        b.account(&prefix(1000)[2..]).expect("rest of the prefix");
        assert_eq!(free(&b), full - 1000);
        b.account(&[7u8; 999]).expect("body");
        assert_eq!(free(&b), full - 1000);
        // The last byte of one message and the next message's prefix in one frame.
        let mut frame = vec![7u8];
        frame.extend(prefix(0));
        frame.extend(prefix(10));
        b.account(&frame).expect("boundary");
        assert_eq!(free(&b), full - 10);
        b.account(&[1u8; 10]).expect("end");
        // Whole, but tonic holds the decoded message until the handler asks for more.
        assert_eq!(free(&b), full - 10);
        b.finished = None;
        assert_eq!(free(&b), full);
        assert_eq!(b.global.available_permits(), limits.max_partial_bytes);
    }

    #[tokio::test]
    async fn a_unary_call_carries_one_message_and_keeps_its_budget() {
        let limits = Limits::default();
        let mut b = body(&limits);
        b.unary = true;
        let full = b.agent.available_permits();
        let mut m = prefix(100);
        m.extend([3u8; 100]);
        b.account(&m).expect("one message");
        assert_eq!(
            b.agent.available_permits(),
            full - 100,
            "kept until the call ends"
        );
        let e = b.account(&prefix(0)).expect_err("a second message");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }

    #[tokio::test]
    async fn claims_past_the_agents_budget_are_refused_at_the_prefix() {
        let limits = Limits {
            max_partial_bytes_per_agent: 1 << 20,
            ..Limits::default()
        };
        let mut b = body(&limits);
        let per_agent = limits.max_partial_bytes_per_agent as u32;
        let mut other = body(&limits);
        other.agent = b.agent.clone();
        other.global = b.global.clone();
        b.account(&prefix(per_agent - 10)).expect("within budget");
        let e = other
            .account(&prefix(11))
            .expect_err("over the agent's budget");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("max_partial_mib_per_agent"), "{e}");
        let mut third = body(&limits);
        third.agent = b.agent.clone();
        third.account(&prefix(10)).expect("what is left fits");
    }
}
