//! One behaviour suite, two backends: a behaviour test takes a [`Backend`] and passes its
//! [`Backend::flags`] to `stagehand serve`; [`on_both_backends!`](crate::on_both_backends) runs
//! it once embedded and once on a real `redis-server`, so the modes cannot drift apart.

use crate::cluster::RedisServer;

/// Where the jobs of a behaviour test live.
pub enum Backend {
    /// The default: the node's own sled store.
    Embedded,
    /// A `redis-server` of the test's own (killed when the test ends), and its URL.
    Redis(RedisServer, String),
}

impl Backend {
    /// A fresh `redis-server` on a free port.
    pub fn redis() -> Self {
        let server = RedisServer::start().expect("redis-server starts");
        let url = server.url();
        Self::Redis(server, url)
    }

    /// The `serve` flags that put a node on this backend, then `extra`.
    pub fn flags<'a>(&'a self, extra: &[&'a str]) -> Vec<&'a str> {
        let mut flags = match self {
            Self::Embedded => Vec::new(),
            Self::Redis(_, url) => vec!["--redis", url.as_str()],
        };
        flags.extend_from_slice(extra);
        flags
    }

    /// eco-scan served on this backend, its data under `data` (node `a`, and `b`): one
    /// embedded node; two Redis-mode nodes with 8 slots each, so that work and effects are
    /// shared.
    pub fn eco_scan_nodes(
        &self,
        mock: &crate::MockLlm,
        data: &std::path::Path,
    ) -> Vec<crate::Server> {
        let names: &[&str] = match self {
            Self::Embedded => &["a"],
            Self::Redis(..) => &["a", "b"],
        };
        let extra: &[&str] = match self {
            Self::Embedded => &[],
            Self::Redis(..) => &["--slots", "8"],
        };
        names
            .iter()
            .map(|name| crate::serve_eco_scan(mock, &data.join(name), &self.flags(extra)))
            .collect()
    }

    /// `stagehand inspect <what>` where this backend keeps it: the store in `data` (which no
    /// server may hold then), or Redis.
    pub fn inspect(&self, data: &std::path::Path, what: &[&str]) -> Vec<serde_json::Value> {
        match self {
            Self::Embedded => crate::inspect(data, what),
            Self::Redis(_, url) => crate::inspect_redis(url, what),
        }
    }
}

/// For each `fn name(backend: Backend)`, a module `name` with two tests, `embedded` and
/// `redis`, that run it on each backend.
#[macro_export]
macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => {$(
        mod $test {
            #[test]
            fn embedded() {
                super::$test($crate::backends::Backend::Embedded)
            }

            #[test]
            fn redis() {
                super::$test($crate::backends::Backend::redis())
            }
        }
    )*};
}
