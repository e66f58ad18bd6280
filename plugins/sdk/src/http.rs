//! Outbound HTTP through `wasi:http/outgoing-handler`, blocking, for stages and handlers whose
//! pipeline file grants them hosts (`allowed_hosts`). Anything else is refused by the host with
//! `ErrorCode::HttpRequestDenied`; so is a redirect that leaves the list. Write a secret as a
//! `{{secret:NAME}}` placeholder in a header; the host fills it in for the hosts it is bound to.
//!
//! ```ignore
//! let reply = stagehand_sdk::http::Request::get("http://127.0.0.1:9200/rules?q=bottle")
//!     .header("authorization", "Bearer {{secret:RULES_KEY}}")
//!     .send()?;
//! let rules: serde_json::Value = reply.json()?;
//! ```

use crate::stage::wasi::http::outgoing_handler;
use crate::stage::wasi::http::types::{
    ErrorCode, Fields, Method, OutgoingBody, OutgoingRequest, Scheme,
};
use crate::stage::wasi::io::streams::StreamError;

/// A request to build and send.
#[derive(Debug, Clone)]
pub struct Request {
    method: Method,
    url: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

/// A whole response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

/// Why a request got no response: the `wasi:http` error code, or a URL this module cannot
/// read.
#[derive(Debug, Clone)]
pub enum Error {
    Url(String),
    Http(ErrorCode),
    Body(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Url(url) => write!(f, "not an http(s) URL: {url:?}"),
            Error::Http(ErrorCode::HttpRequestDenied) => {
                write!(
                    f,
                    "HttpRequestDenied: the host refused the destination (not in the stage's `allowed_hosts`)"
                )
            }
            Error::Http(code) => write!(f, "{code:?}"),
            Error::Body(why) => write!(f, "{why}"),
        }
    }
}

impl From<Error> for crate::StageError {
    fn from(error: Error) -> Self {
        crate::StageError::Retryable(format!("outbound request failed: {error}"))
    }
}

impl Request {
    pub fn new(method: &str, url: &str) -> Self {
        let method = match method.to_ascii_uppercase().as_str() {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            "PATCH" => Method::Patch,
            "OPTIONS" => Method::Options,
            other => Method::Other(other.to_string()),
        };
        Self {
            method,
            url: url.to_string(),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn get(url: &str) -> Self {
        Self::new("GET", url)
    }

    pub fn post(url: &str) -> Self {
        Self::new("POST", url)
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers
            .push((name.to_string(), value.as_bytes().to_vec()));
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// A JSON body, with its content type.
    pub fn json(self, value: &impl serde::Serialize) -> Self {
        let body = serde_json::to_vec(value).expect("a serialisable value");
        self.header("content-type", "application/json").body(body)
    }

    /// Send it and read the whole response. The host may answer from the stage's journal:
    /// a stage waiting on a request runs again from its start once the answer is in, so make
    /// the same requests in the same order given the same input.
    pub fn send(self) -> Result<Response, Error> {
        let (scheme, rest) = self
            .url
            .split_once("://")
            .ok_or_else(|| Error::Url(self.url.clone()))?;
        let scheme = match scheme {
            "http" => Scheme::Http,
            "https" => Scheme::Https,
            _ => return Err(Error::Url(self.url.clone())),
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(at) if rest[at..].starts_with('/') => (&rest[..at], rest[at..].to_string()),
            Some(at) => (&rest[..at], format!("/{}", &rest[at..])),
            None => (rest, "/".to_string()),
        };
        let headers = Fields::from_list(&self.headers)
            .map_err(|e| Error::Body(format!("a header cannot be sent: {e:?}")))?;
        let request = OutgoingRequest::new(headers);
        let bad = |what: &str| Error::Body(format!("the request's {what} was refused"));
        request
            .set_method(&self.method)
            .map_err(|()| bad("method"))?;
        request
            .set_scheme(Some(&scheme))
            .map_err(|()| bad("scheme"))?;
        request
            .set_authority(Some(authority))
            .map_err(|()| bad("authority"))?;
        request
            .set_path_with_query(Some(&path))
            .map_err(|()| bad("path"))?;
        let body = request.body().map_err(|()| bad("body"))?;
        // Sent first, then the body written: the host reads it as it comes.
        let future = outgoing_handler::handle(request, None).map_err(Error::Http)?;
        {
            let stream = body.write().map_err(|()| bad("body stream"))?;
            for chunk in self.body.chunks(4096) {
                stream
                    .blocking_write_and_flush(chunk)
                    .map_err(|e| Error::Body(format!("writing the body: {e:?}")))?;
            }
        }
        OutgoingBody::finish(body, None).map_err(Error::Http)?;
        future.subscribe().block();
        let response = match future.get() {
            Some(Ok(Ok(response))) => response,
            Some(Ok(Err(code))) => return Err(Error::Http(code)),
            _ => return Err(Error::Body("no response".into())),
        };
        let status = response.status();
        let headers = response.headers().entries();
        let incoming = response.consume().map_err(|()| bad("response body"))?;
        let mut body = Vec::new();
        {
            let stream = incoming.stream().map_err(|()| bad("response stream"))?;
            loop {
                match stream.blocking_read(64 * 1024) {
                    Ok(chunk) => body.extend_from_slice(&chunk),
                    Err(StreamError::Closed) => break,
                    Err(StreamError::LastOperationFailed(e)) => {
                        return Err(Error::Body(format!(
                            "reading the response: {}",
                            e.to_debug_string()
                        )));
                    }
                }
            }
        }
        Ok(Response {
            status,
            headers,
            body,
        })
    }
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, crate::StageError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            crate::StageError::Fatal(format!(
                "the response (status {}) is not the JSON expected: {e}",
                self.status
            ))
        })
    }

    /// The first value of header `name` (case-insensitive), as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
}
