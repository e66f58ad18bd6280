//! What a stage or a handler may reach outside the host: the destinations of its
//! `allowed_hosts` and the limits of its `http` table. Nothing is reachable by default; the
//! `wasi:http` calls that use these are in `capabilities/http/`.
//!
//! A destination is written `scheme://host[:port]`: the scheme `http` or `https`, a host name
//! or an IP address (a leading `*.` matches any name below the domain, never the domain
//! itself), and a port (the scheme's own when left out). No path, no user, no wildcard that is
//! not written.

use std::time::Duration;

use serde::Deserialize;

/// One entry of `allowed_hosts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedHost {
    pub scheme: Scheme,
    host: HostPattern,
    pub port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text.to_ascii_lowercase().as_str() {
            "http" => Some(Scheme::Http),
            "https" => Some(Scheme::Https),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    /// A host name (lowercase) or an IP address as written in a URL (`[::1]` for IPv6).
    Exact(String),
    /// `*.example.com`: any name ending in `.example.com`.
    Below(String),
}

/// Where a request goes: what an allowlist entry is matched against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub scheme: Scheme,
    /// Lowercase, as in the URL.
    pub host: String,
    pub port: u16,
}

impl Destination {
    /// The destination of `url`, or why it has none we can allow.
    pub fn of(url: &http::Uri) -> Result<Self, String> {
        let scheme = url
            .scheme_str()
            .and_then(Scheme::parse)
            .ok_or_else(|| format!("`{url}`: only http and https URLs are allowed"))?;
        let host = url
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("`{url}` has no host"))?
            .to_ascii_lowercase();
        let port = url.port_u16().unwrap_or(scheme.default_port());
        Ok(Self { scheme, host, port })
    }

    /// `scheme://host:port`, as metrics and logs name it.
    pub fn origin(&self) -> String {
        format!("{}://{}:{}", self.scheme.as_str(), self.host, self.port)
    }
}

impl AllowedHost {
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!(
                "allowed host {text:?} {why}; write `scheme://host[:port]`, e.g. \"https://api.example.com\" or \"http://127.0.0.1:9200\""
            )
        };
        let (scheme, rest) = text.split_once("://").ok_or_else(|| bad("has no scheme"))?;
        let scheme = Scheme::parse(scheme).ok_or_else(|| bad("is not http or https"))?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.is_empty()
            || rest.contains(['/', '?', '#', '@'])
            || rest.contains(char::is_whitespace)
        {
            return Err(bad("must be a scheme, a host and a port, nothing else"));
        }
        let (host, port) = match rest.rsplit_once(':') {
            // An IPv6 address without a port: `[::1]`.
            Some((_, tail))
                if rest.starts_with('[') && !rest.ends_with(']') && tail.contains(']') =>
            {
                (rest, None)
            }
            Some((host, port)) if !rest.ends_with(']') => {
                let port = port
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| bad("has a port that is not 1-65535"))?;
                (host, Some(port))
            }
            _ => (rest, None),
        };
        let host = host.to_ascii_lowercase();
        let pattern = match host.strip_prefix("*.") {
            Some(domain) if !domain.is_empty() && !domain.contains('*') => {
                HostPattern::Below(domain.to_string())
            }
            _ if host.contains('*') => {
                return Err(bad("has a wildcard other than a leading `*.`"));
            }
            _ if host.is_empty() => return Err(bad("has no host")),
            _ => HostPattern::Exact(host),
        };
        Ok(Self {
            scheme,
            host: pattern,
            port: port.unwrap_or(scheme.default_port()),
        })
    }

    pub fn allows(&self, to: &Destination) -> bool {
        self.scheme == to.scheme
            && self.port == to.port
            && match &self.host {
                HostPattern::Exact(host) => *host == to.host,
                HostPattern::Below(domain) => to
                    .host
                    .strip_suffix(domain.as_str())
                    .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
            }
    }
}

impl std::fmt::Display for AllowedHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let host = match &self.host {
            HostPattern::Exact(host) => host.clone(),
            HostPattern::Below(domain) => format!("*.{domain}"),
        };
        write!(f, "{}://{host}:{}", self.scheme.as_str(), self.port)
    }
}

/// How much outbound HTTP one try of a stage (or one handler run) may do: the `http` table of
/// `[defaults]`, a stage or a handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Requests per try (refused ones count); past it the try fails with budget
    /// `http_requests`.
    pub requests: u32,
    /// The largest request body; a larger one fails the request.
    pub request_bytes: usize,
    /// The largest response body; a larger one fails the request.
    pub response_bytes: usize,
    pub connect_timeout: Duration,
    /// One request, redirects included.
    pub timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            requests: 16,
            request_bytes: 1 << 20,
            response_bytes: 1 << 20,
            connect_timeout: Duration::from_secs(2),
            timeout: Duration::from_secs(10),
        }
    }
}

/// The bounds of each key of the `http` table: `(key, min, max)`.
pub const HTTP_LIMIT_BOUNDS: [(&str, u64, u64); 5] = [
    ("requests", 1, 1024),
    ("request_kib", 1, 65_536),
    ("response_kib", 1, 65_536),
    ("connect_timeout_ms", 1, 60_000),
    ("timeout_ms", 1, 600_000),
];

/// The most response bytes one try may hold, `requests × response_kib`: a try's journal keeps
/// every reply, in memory and in the store, until the stage's output is kept.
pub const MAX_REPLY_BYTES_PER_TRY: u64 = 256 << 20;

/// Redirects one request follows, each checked against the allowlist.
pub const MAX_REDIRECTS: usize = 5;

/// Optional overrides of [`HttpLimits`], as written.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpLimitsSpec {
    pub requests: Option<u32>,
    pub request_kib: Option<u64>,
    pub response_kib: Option<u64>,
    pub connect_timeout_ms: Option<u64>,
    pub timeout_ms: Option<u64>,
}

impl HttpLimitsSpec {
    /// These overrides over `base`, or the first key out of its bounds.
    pub fn over(self, base: HttpLimits) -> Result<HttpLimits, String> {
        let values = [
            self.requests.map(u64::from),
            self.request_kib,
            self.response_kib,
            self.connect_timeout_ms,
            self.timeout_ms,
        ];
        for (value, (key, min, max)) in values.iter().zip(HTTP_LIMIT_BOUNDS) {
            if let Some(v) = value
                && !(min..=max).contains(v)
            {
                return Err(format!("`http.{key}` must be {min} to {max}, not {v}"));
            }
        }
        let kib = |v: Option<u64>, base: usize| v.map_or(base, |k| (k as usize) << 10);
        let ms = |v: Option<u64>, base: Duration| v.map_or(base, Duration::from_millis);
        let limits = HttpLimits {
            requests: self.requests.unwrap_or(base.requests),
            request_bytes: kib(self.request_kib, base.request_bytes),
            response_bytes: kib(self.response_kib, base.response_bytes),
            connect_timeout: ms(self.connect_timeout_ms, base.connect_timeout),
            timeout: ms(self.timeout_ms, base.timeout),
        };
        let held = u64::from(limits.requests) * limits.response_bytes as u64;
        if held > MAX_REPLY_BYTES_PER_TRY {
            return Err(format!(
                "`http.requests` × `http.response_kib` is at most {} KiB per try (a try keeps \
                 every reply until its stage's output is kept), not {}",
                MAX_REPLY_BYTES_PER_TRY >> 10,
                held >> 10
            ));
        }
        Ok(limits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to(url: &str) -> Destination {
        Destination::of(&url.parse().unwrap()).unwrap()
    }

    #[test]
    fn an_entry_allows_its_scheme_host_and_port_only() {
        let api = AllowedHost::parse("https://API.example.com").unwrap();
        assert!(api.allows(&to("https://api.example.com/v1?q=1")));
        assert!(api.allows(&to("https://api.example.com:443/")));
        assert!(
            !api.allows(&to("http://api.example.com/")),
            "another scheme"
        );
        assert!(
            !api.allows(&to("https://api.example.com:8443/")),
            "another port"
        );
        assert!(!api.allows(&to("https://api.example.com.evil.net/")));
        assert!(!api.allows(&to("https://evil.net/api.example.com")));

        let local = AllowedHost::parse("http://127.0.0.1:9200").unwrap();
        assert!(local.allows(&to("http://127.0.0.1:9200/x")));
        assert!(!local.allows(&to("http://127.0.0.1/x")));
        assert!(
            !local.allows(&to("http://localhost:9200/x")),
            "a name is not its address"
        );

        let below = AllowedHost::parse("https://*.example.com").unwrap();
        assert!(below.allows(&to("https://a.b.example.com/")));
        assert!(
            !below.allows(&to("https://example.com/")),
            "not the domain itself"
        );
        assert!(!below.allows(&to("https://badexample.com/")));

        let v6 = AllowedHost::parse("http://[::1]:8080").unwrap();
        assert!(v6.allows(&to("http://[::1]:8080/")));
        assert_eq!(v6.to_string(), "http://[::1]:8080");
    }

    #[test]
    fn entries_that_are_not_an_origin_are_refused() {
        for bad in [
            "api.example.com",
            "ftp://example.com",
            "https://example.com/path",
            "https://user@example.com",
            "https://*",
            "https://a.*.com",
            "https://example.com:0",
            "https://example.com:99999",
            "https://",
        ] {
            assert!(AllowedHost::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn limits_out_of_their_bounds_are_named() {
        let spec = HttpLimitsSpec {
            response_kib: Some(1 << 30),
            ..HttpLimitsSpec::default()
        };
        let error = spec.over(HttpLimits::default()).unwrap_err();
        assert!(
            error.contains("`http.response_kib` must be 1 to 65536"),
            "{error}"
        );
    }
}
