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
use sha2::Digest as _;
use tokio::sync::{Notify, oneshot};
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
use super::journal::Answered;
use super::{Answer, CallKind, Counted, HostState, Request};
use crate::outbound::{AllowedHost, Destination, HttpLimits};

/// What one stage or handler may reach: its `allowed_hosts`, and the client its requests go
/// through.
pub struct HttpGrant {
    pub allowed: Vec<AllowedHost>,
    /// The pipeline's secrets, which its requests' headers may use.
    secrets: Arc<Secrets>,
    client: reqwest::Client,
}

impl HttpGrant {
    pub fn new(allowed: Vec<AllowedHost>, limits: HttpLimits, secrets: Arc<Secrets>) -> Self {
        Self {
            allowed,
            secrets,
            client: send::client(limits.connect_timeout),
        }
    }

    /// Nothing allowed: what a stage without `allowed_hosts` has.
    pub fn none() -> Arc<Self> {
        Arc::new(Self::new(Vec::new(), HttpLimits::default(), Arc::default()))
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
    grant: Arc<HttpGrant>,
    pub(crate) limits: HttpLimits,
    asker: Asker,
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
    pub(crate) fn new(
        grant: Arc<HttpGrant>,
        limits: HttpLimits,
        asker: Asker,
        journaled: bool,
    ) -> Self {
        Self {
            ctx: WasiHttpCtx::new(),
            hooks: Hooks,
            grant,
            limits,
            asker,
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

/// The run's pending requests whose bodies are complete, in call order, to be sent while the
/// stage waits without its instance; `None` when the run did not stop for them.
pub(crate) struct Evicted {
    pub requests: Vec<(Request, Result<FullRequest, HttpFailure>)>,
}

impl HostState {
    /// What the run that just stopped leaves to send: `signalled` when the runner stopped it
    /// because a request's body was complete.
    pub(crate) fn take_evicted(&mut self, signalled: bool) -> Option<Evicted> {
        let outbound = &mut self.outbound;
        let pending = std::mem::take(&mut outbound.pending);
        if pending.is_empty() || !(signalled || outbound.evicting) {
            return None;
        }
        let mut requests = Vec::new();
        let mut dropped = 0;
        for mut p in pending {
            match p.body.try_recv() {
                Ok(full) if dropped == 0 => requests.push((p.request, full)),
                _ => dropped += 1,
            }
        }
        // What a dropped request spent is given back: the next run makes it again.
        self.journal.spent.http_requests = self.journal.spent.http_requests.saturating_sub(dropped);
        Some(Evicted { requests })
    }
}

/// Send the requests of an eviction at once; each answer as the journal keeps it.
pub(crate) async fn send_all(
    state_grant: Arc<HttpGrant>,
    limits: HttpLimits,
    asker: Asker,
    requests: Vec<(Request, Result<FullRequest, HttpFailure>)>,
) -> Vec<(Request, Answered)> {
    let sends = requests.into_iter().map(|(request, full)| {
        let (grant, asker) = (state_grant.clone(), asker.clone());
        async move {
            let answer = match full {
                Ok(full) => send::send(&grant, limits, &asker, full).await,
                Err(failure) => Err(failure),
            };
            (
                request,
                Answered {
                    answer: Answer::Http(answer),
                    llm_calls: Vec::new(),
                },
            )
        }
    });
    futures::future::join_all(sends).await
}

impl HostState {
    pub(crate) fn http_grant(&self) -> (Arc<HttpGrant>, HttpLimits, Asker) {
        let o = &self.outbound;
        (o.grant.clone(), o.limits, o.asker.clone())
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
        let Parts {
            method,
            url,
            headers,
            body,
        } = match parts(request) {
            Ok(parts) => parts,
            Err(code) => return Ok(Err(code)),
        };
        let limit = self.outbound.limits.request_bytes;
        let journaled = Request::new(
            CallKind::Http,
            &(method.as_str(), url.to_string(), &headers),
        );
        let future = if !self.outbound.journaled {
            self.spend(Counted::HttpRequests, 0)?;
            let (grant, limits, asker) = self.http_grant();
            HostFutureIncomingResponse::Pending(wasmtime_wasi::runtime::spawn(async move {
                let answer = match collect(body, limit).await {
                    Ok(body) => {
                        let full = FullRequest {
                            method,
                            url,
                            headers,
                            body,
                        };
                        send::send(&grant, limits, &asker, full).await
                    }
                    Err(failure) => Err(failure),
                };
                response_of(answer)
            }))
        } else if let Some(answer) = (!self.outbound.has_pending())
            .then(|| self.replayed(&journaled))
            .transpose()?
            .flatten()
        {
            let Answer::Http(answer) = answer else {
                return Err(wasmtime::Error::msg(
                    "the journal holds another kind of answer",
                ));
            };
            let diverged = self.outbound.diverged.clone();
            HostFutureIncomingResponse::Pending(wasmtime_wasi::runtime::spawn(async move {
                // The body is read whatever the answer, as the first run's was: a guest that
                // writes it after `handle` must not find it closed.
                let sent = collect(body, limit).await;
                if let Ok(reply) = &answer {
                    let sent = sent.map(|body| hex::encode(sha2::Sha256::digest(&body)));
                    if sent.as_ref().ok() != Some(&reply.request_body_sha256) {
                        *diverged.lock().expect("never poisoned") = Some(
                            "an outbound request was replayed with another body than before".into(),
                        );
                        return Err(wasmtime_wasi_http::Error::InternalError(Some(
                            "diverged on replay".into(),
                        )));
                    }
                }
                response_of(answer)
            }))
        } else {
            self.spend(Counted::HttpRequests, 0)?;
            let (sender, receiver) = oneshot::channel();
            let first = !self.outbound.has_pending();
            let ready = self.outbound.ready.clone();
            self.outbound.pending.push(Pending {
                request: journaled,
                body: receiver,
            });
            HostFutureIncomingResponse::Pending(wasmtime_wasi::runtime::spawn(async move {
                let full = collect(body, limit).await.map(|body| FullRequest {
                    method,
                    url,
                    headers,
                    body,
                });
                let _ = sender.send(full);
                if first {
                    ready.notify_one();
                }
                // The run is dropped before this answers: the answer comes by replay.
                std::future::pending().await
            }))
        };
        Ok(Ok(self.table.push(future)?))
    }
}
