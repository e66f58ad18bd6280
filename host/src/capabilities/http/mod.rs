//! `wasi:http/outgoing-handler`: a stage's or a handler's requests to the hosts its
//! `allowed_hosts` grant, and to nothing else (`outbound.rs` has the grant's rules). The guest
//! uses the standard interface, so any language's wasip2 HTTP client works; the host makes
//! the request (`send.rs`), not the guest's sockets, which stay off.
//!
//! A stage's request is journaled like an LLM call, and a stage waiting on one holds no
//! instance: the first run that makes it is evicted as soon as the request's body is
//! complete, the host sends it and records the whole response, and the stage runs again from
//! its start, its journal answering the request. A replay must send the same request: the
//! journal keys it by method, URL and headers, and the answer checks the body's sha256.
//! Requests a run makes while another is pending (a client that sends several at once) wait
//! with it; any other journaled host call made meanwhile ends the run there, to be made again
//! after the answers. A request whose response the guest never waits for is not sent.
//! Handlers are never evicted: their requests go out at once.

mod secrets;
mod send;

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use tokio::sync::{Notify, oneshot};
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument as _;
use wasmtime::component::Linker;
use wasmtime::component::Resource;
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode, Method, Scheme};
use wasmtime_wasi_http::p2::body::{HyperIncomingBody, HyperOutgoingBody};
use wasmtime_wasi_http::p2::types::{HostFutureIncomingResponse, HostOutgoingRequest};
use wasmtime_wasi_http::{
    RequestOptions, WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView,
};

pub use self::secrets::Secrets;
pub use self::send::{Asker, FullRequest, HttpFailure, Reply};
use super::journal::{Answered, Waiting};
use super::{Answer, CallKind, Counted, HostState, Request};
use crate::outbound::{AllowedHost, Destination, HttpLimits};

/// What one stage or handler may reach: its `allowed_hosts` and `http` limits, who it is (for
/// logs and metrics), and the client its requests go through.
pub struct HttpGrant {
    pub allowed: Vec<AllowedHost>,
    pub limits: HttpLimits,
    asker: Asker,
    /// The pipeline's secrets, which its requests' headers may use.
    secrets: Arc<Secrets>,
    client: reqwest::Client,
}

impl HttpGrant {
    pub fn new(
        allowed: Vec<AllowedHost>,
        limits: HttpLimits,
        asker: Asker,
        secrets: Arc<Secrets>,
    ) -> Self {
        Self {
            allowed,
            limits,
            asker,
            secrets,
            client: send::client(limits.connect_timeout),
        }
    }

    /// Nothing allowed: what a component checked outside a pipeline has.
    pub fn none() -> Arc<Self> {
        Arc::new(Self::new(
            Vec::new(),
            HttpLimits::default(),
            Asker::default(),
            Arc::default(),
        ))
    }

    /// Where `url` goes and the allowlist entry it falls under (as metrics name it), or why
    /// none does.
    pub fn check(&self, url: &http::Uri) -> Result<(Destination, String), String> {
        let to = Destination::of(url)?;
        match self.allowed.iter().find(|entry| entry.allows(&to)) {
            Some(entry) => Ok((to, entry.to_string())),
            None if self.allowed.is_empty() => Err(format!(
                "{} is not allowed: the component has no `allowed_hosts`",
                to.origin()
            )),
            None => Err(format!(
                "{} is not in `allowed_hosts` ({})",
                to.origin(),
                self.allowed
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
}

/// The `wasi:http` state of one store.
pub(crate) struct Outbound {
    ctx: WasiHttpCtx,
    hooks: Hooks,
    pub(crate) grant: Arc<HttpGrant>,
    /// Stages journal their requests; handlers send them at once.
    journaled: bool,
    /// Requests this run made that go out once it is evicted, in call order.
    pending: Vec<Pending>,
    /// Woken when the first pending request's body is complete: the run is evicted then.
    pub(crate) ready: Arc<Notify>,
    /// Set when the run is to end at a host call made while a request is pending.
    evicting: bool,
    /// Set by a replayed request whose body is not the one journaled.
    diverged: Arc<Mutex<Option<String>>>,
}

/// A request made by this run and not sent yet.
struct Pending {
    request: Request,
    body: oneshot::Receiver<Result<FullRequest, HttpFailure>>,
}

impl Outbound {
    pub(crate) fn new(grant: Arc<HttpGrant>, journaled: bool) -> Self {
        Self {
            ctx: WasiHttpCtx::new(),
            hooks: Hooks,
            grant,
            journaled,
            pending: Vec::new(),
            ready: Arc::new(Notify::new()),
            evicting: false,
            diverged: Arc::default(),
        }
    }

    /// A replayed request whose body differed from the journaled one.
    pub(crate) fn diverged(&self) -> Option<String> {
        self.diverged.lock().expect("never poisoned").clone()
    }

    /// Whether a request is pending: another journaled host call must not go before it.
    pub(crate) fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    pub(crate) fn evict(&mut self) {
        self.evicting = true;
    }
}

impl HostState {
    /// What the run that just stopped waits on: its pending requests whose bodies are complete,
    /// in call order, each already sent on a task of its own (dropping it stops the request);
    /// `signalled` when the runner stopped the run because a request's body was complete.
    /// `None` when the run did not stop for its requests; empty when it stopped before the
    /// first one's body was written.
    pub(crate) fn take_evicted(&mut self, signalled: bool) -> Option<Vec<Waiting>> {
        let outbound = &mut self.outbound;
        let pending = std::mem::take(&mut outbound.pending);
        if pending.is_empty() || !(signalled || outbound.evicting) {
            return None;
        }
        let mut waits = Vec::new();
        let mut dropped = 0;
        for mut p in pending {
            match p.body.try_recv() {
                Ok(full) if dropped == 0 => {
                    let grant = outbound.grant.clone();
                    let send = async move {
                        let answer = match full {
                            Ok(full) => send::send(&grant, full).await,
                            Err(failure) => Err(failure),
                        };
                        Answered {
                            answer: Answer::Http(answer),
                            llm_calls: Vec::new(),
                        }
                    };
                    waits.push(Waiting {
                        request: p.request,
                        task: AbortOnDropHandle::new(tokio::spawn(send.in_current_span())),
                    });
                }
                _ => dropped += 1,
            }
        }
        // What a dropped request spent is given back: the next run makes it again.
        self.journal.spent.http_requests = self.journal.spent.http_requests.saturating_sub(dropped);
        Some(waits)
    }
}

impl WasiHttpView for HostState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.outbound.ctx,
            table: &mut self.table,
            hooks: &mut self.outbound.hooks,
        }
    }
}

/// The crate's defaults, except that requests never go through it: `handle` below makes them.
struct Hooks;

impl WasiHttpHooks for Hooks {
    fn send_request(
        &mut self,
        _request: http::Request<wasmtime_wasi_http::WasiBody>,
        _options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> Box<
        dyn Future<
                Output = Result<
                    (
                        http::Response<wasmtime_wasi_http::WasiBody>,
                        Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
                    ),
                    wasmtime_wasi_http::Error,
                >,
            > + Send,
    > {
        Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) })
    }
}

/// A guest's request as `handle` receives it: its body may still be being written.
struct Parts {
    method: http::Method,
    url: http::Uri,
    headers: Vec<(String, Vec<u8>)>,
    body: Option<HyperOutgoingBody>,
}

impl Parts {
    /// The request once the guest has written its whole body (at most `limit` bytes).
    async fn complete(self, limit: usize) -> Result<FullRequest, HttpFailure> {
        Ok(FullRequest {
            body: collect(self.body, limit).await?,
            method: self.method,
            url: self.url,
            headers: self.headers,
        })
    }
}

fn parts(request: HostOutgoingRequest) -> Result<Parts, ErrorCode> {
    let method = match request.method {
        Method::Get => http::Method::GET,
        Method::Head => http::Method::HEAD,
        Method::Post => http::Method::POST,
        Method::Put => http::Method::PUT,
        Method::Delete => http::Method::DELETE,
        Method::Connect => http::Method::CONNECT,
        Method::Options => http::Method::OPTIONS,
        Method::Trace => http::Method::TRACE,
        Method::Patch => http::Method::PATCH,
        Method::Other(m) => http::Method::from_bytes(m.as_bytes())
            .map_err(|_| ErrorCode::HttpRequestMethodInvalid)?,
    };
    let scheme = match request.scheme {
        None | Some(Scheme::Https) => "https".to_string(),
        Some(Scheme::Http) => "http".to_string(),
        Some(Scheme::Other(other)) => other,
    };
    let authority = request.authority.unwrap_or_default();
    let path = request.path_with_query.unwrap_or_else(|| "/".into());
    let url = http::Uri::builder()
        .scheme(scheme.as_str())
        .authority(authority.as_str())
        .path_and_query(path.as_str())
        .build()
        .map_err(|_| ErrorCode::HttpRequestUriInvalid)?;
    let headers = request
        .headers
        .iter()
        .map(|(name, value)| (name.as_str().to_string(), value.as_bytes().to_vec()))
        .collect();
    Ok(Parts {
        method,
        url,
        headers,
        body: request.body,
    })
}

/// The whole body, up to `limit` bytes.
async fn collect(body: Option<HyperOutgoingBody>, limit: usize) -> Result<Bytes, HttpFailure> {
    let Some(body) = body else {
        return Ok(Bytes::new());
    };
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => {
            Err(HttpFailure::RequestTooLarge(limit as u64))
        }
        Err(error) => Err(HttpFailure::Protocol(format!("the request body: {error}"))),
    }
}

/// The guest's view of a reply or a failure.
fn response_of(
    answer: Result<Reply, HttpFailure>,
) -> Result<
    (
        http::Response<HyperIncomingBody>,
        wasmtime_wasi::runtime::AbortOnDropJoinHandle<()>,
    ),
    wasmtime_wasi_http::Error,
> {
    let reply = answer.map_err(|failure| failure.to_wasi())?;
    let mut builder = http::Response::builder().status(reply.status);
    for (name, value) in &reply.headers {
        builder = builder.header(name, value);
    }
    let body = Full::new(Bytes::from(reply.body))
        .map_err(|never| match never {})
        .boxed_unsync();
    let response = builder
        .body(body)
        .map_err(|e| wasmtime_wasi_http::Error::InternalError(Some(e.to_string())))?;
    Ok((response, wasmtime_wasi::runtime::spawn(async {})))
}

/// The `wasi:http` version whose `outgoing-handler` we define; guests importing an earlier
/// 0.2 version are linked to it too (semver).
const OUTGOING_HANDLER: &str = "wasi:http/outgoing-handler@0.2.12";

/// `wasi:http/types` from wasmtime-wasi-http, and `outgoing-handler.handle` from here: the
/// crate's own would send the request with the instance alive and no grant.
pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    use wasmtime_wasi_http::p2::bindings::{LinkOptions, http};
    http::types::add_to_linker::<_, wasmtime_wasi_http::WasiHttp>(
        linker,
        &LinkOptions::default().into(),
        <HostState as WasiHttpView>::http,
    )?;
    linker.instance(OUTGOING_HANDLER)?.func_wrap(
        "handle",
        |mut store,
         (request, _options): (
            Resource<HostOutgoingRequest>,
            Option<Resource<RequestOptions>>,
        )| { Ok((store.data_mut().handle(request)?,)) },
    )?;
    Ok(())
}

impl HostState {
    fn handle(
        &mut self,
        request: Resource<HostOutgoingRequest>,
    ) -> wasmtime::Result<Result<Resource<HostFutureIncomingResponse>, ErrorCode>> {
        let request = self.table.delete(request)?;
        let parts = match parts(request) {
            Ok(parts) => parts,
            Err(code) => return Ok(Err(code)),
        };
        let limit = self.outbound.grant.limits.request_bytes;
        let journaled = Request::new(
            CallKind::Http,
            &(parts.method.as_str(), parts.url.to_string(), &parts.headers),
        );
        if !self.outbound.journaled {
            self.spend(Counted::HttpRequests, 0)?;
            let grant = self.outbound.grant.clone();
            let future = wasmtime_wasi::runtime::spawn(async move {
                let answer = match parts.complete(limit).await {
                    Ok(full) => send::send(&grant, full).await,
                    Err(failure) => Err(failure),
                };
                response_of(answer)
            });
            return Ok(Ok(self
                .table
                .push(HostFutureIncomingResponse::Pending(future))?));
        }
        // While a request is pending the run is past its journal: nothing to replay.
        let replayed = if self.outbound.has_pending() {
            None
        } else {
            self.replayed(&journaled)?
        };
        let future = match replayed {
            Some(Answer::Http(answer)) => {
                let diverged = self.outbound.diverged.clone();
                wasmtime_wasi::runtime::spawn(async move {
                    // The body is read whatever the answer, as the first run's was: a guest
                    // that writes it after `handle` must not find it closed.
                    let sent = collect(parts.body, limit).await;
                    if let Ok(reply) = &answer
                        && sent.ok().map(|body| send::body_digest(&body))
                            != Some(reply.request_body_sha256.clone())
                    {
                        *diverged.lock().expect("never poisoned") = Some(
                            "an outbound request was replayed with another body than before".into(),
                        );
                        return Err(wasmtime_wasi_http::Error::InternalError(Some(
                            "diverged on replay".into(),
                        )));
                    }
                    response_of(answer)
                })
            }
            Some(_) => {
                return Err(wasmtime::Error::msg(
                    "the journal holds another kind of answer",
                ));
            }
            None => {
                self.spend(Counted::HttpRequests, 0)?;
                let (sender, receiver) = oneshot::channel();
                let first = !self.outbound.has_pending();
                let ready = self.outbound.ready.clone();
                self.outbound.pending.push(Pending {
                    request: journaled,
                    body: receiver,
                });
                wasmtime_wasi::runtime::spawn(async move {
                    let _ = sender.send(parts.complete(limit).await);
                    if first {
                        ready.notify_one();
                    }
                    // The run is dropped before this answers: the answer comes by replay.
                    std::future::pending().await
                })
            }
        };
        Ok(Ok(self
            .table
            .push(HostFutureIncomingResponse::Pending(future))?))
    }
}
