//! Secrets a guest may *use* and never *read*. The pipeline file names where each is (an
//! environment variable or a file on the node) and the hosts it may go to; a guest writes
//! `{{secret:NAME}}` in a header value, and the host puts the value in only on a request to
//! one of those hosts (each redirect hop is checked again), refusing the request otherwise.
//! A response that carries a value back (a service echoing its headers) has it replaced by
//! the placeholder before the guest or the journal sees it, so a value is never in a guest,
//! a journal, a result or a log.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result, bail};

use crate::config::SecretConfig;
use crate::outbound::{AllowedHost, Destination};

/// The longest secret value read, in bytes.
pub const MAX_SECRET_BYTES: usize = 8192;

const OPEN: &str = "{{secret:";
const CLOSE: &str = "}}";

/// A pipeline's secrets, by name.
#[derive(Default)]
pub struct Secrets {
    by_name: BTreeMap<String, Secret>,
}

struct Secret {
    value: String,
    hosts: Vec<AllowedHost>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only: a value never goes to a log.
        f.debug_list().entries(self.by_name.keys()).finish()
    }
}

impl Secrets {
    /// Read every secret `configs` names: a missing variable or file fails the load.
    pub fn load(configs: &BTreeMap<String, SecretConfig>) -> Result<Self> {
        let mut by_name = BTreeMap::new();
        for (name, config) in configs {
            let value = match (&config.env, &config.file) {
                (Some(env), None) => std::env::var(env)
                    .with_context(|| format!("secret `{name}`: the variable `{env}` is not set"))?,
                (None, Some(file)) => std::fs::read_to_string(file)
                    .with_context(|| format!("secret `{name}`: cannot read {}", file.display()))?
                    .trim_end_matches(['\n', '\r'])
                    .to_string(),
                _ => bail!("secret `{name}`: give `env` or `file`"),
            };
            if value.is_empty() || value.len() > MAX_SECRET_BYTES {
                bail!("secret `{name}`: the value must be 1 to {MAX_SECRET_BYTES} bytes");
            }
            if http::HeaderValue::from_str(&value).is_err() {
                bail!("secret `{name}`: the value cannot go in a header (a control character)");
            }
            by_name.insert(
                name.clone(),
                Secret {
                    value,
                    hosts: config.hosts.clone(),
                },
            );
        }
        Ok(Self { by_name })
    }

    /// `value` with each placeholder filled in for a request to `to`, and the names of the
    /// secrets used; an error (the request is refused) for a secret unknown or not bound to
    /// `to`.
    pub fn fill(&self, value: &[u8], to: &Destination) -> Result<(Vec<u8>, Vec<String>), String> {
        let Ok(text) = std::str::from_utf8(value) else {
            return Ok((value.to_vec(), Vec::new()));
        };
        if !text.contains(OPEN) {
            return Ok((value.to_vec(), Vec::new()));
        }
        let mut filled = String::with_capacity(text.len());
        let mut used = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find(OPEN) {
            filled.push_str(&rest[..start]);
            let after = &rest[start + OPEN.len()..];
            let Some(end) = after.find(CLOSE) else {
                return Err("an unterminated `{{secret:` placeholder".into());
            };
            let name = &after[..end];
            let Some(secret) = self.by_name.get(name) else {
                return Err(format!("no secret `{name}` in the pipeline file"));
            };
            if !secret.hosts.iter().any(|h| h.allows(to)) {
                return Err(format!(
                    "secret `{name}` is not bound to {} (its `hosts`: {})",
                    to.origin(),
                    secret
                        .hosts
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            filled.push_str(&secret.value);
            used.push(name.to_string());
            rest = &after[end + CLOSE.len()..];
        }
        filled.push_str(rest);
        Ok((filled.into_bytes(), used))
    }

    /// `bytes` with the value of each secret in `used` replaced by its placeholder.
    pub fn scrub(&self, bytes: &mut Vec<u8>, used: &[String]) {
        for name in used {
            let Some(secret) = self.by_name.get(name) else {
                continue;
            };
            let placeholder = format!("{OPEN}{name}{CLOSE}");
            replace_all(bytes, secret.value.as_bytes(), placeholder.as_bytes());
        }
    }
}

fn replace_all(bytes: &mut Vec<u8>, from: &[u8], to: &[u8]) {
    if from.is_empty() || memchr::memmem::find(bytes, from).is_none() {
        return;
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut last = 0;
    for at in memchr::memmem::find_iter(bytes, from) {
        out.extend_from_slice(&bytes[last..at]);
        out.extend_from_slice(to);
        last = at + from.len();
    }
    out.extend_from_slice(&bytes[last..]);
    *bytes = out;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets() -> Secrets {
        let mut by_name = BTreeMap::new();
        by_name.insert(
            "KEY".to_string(),
            Secret {
                value: "s3cr3t".into(),
                hosts: vec![AllowedHost::parse("https://api.example.com").unwrap()],
            },
        );
        Secrets { by_name }
    }

    fn to(url: &str) -> Destination {
        Destination::of(&url.parse().unwrap()).unwrap()
    }

    #[test]
    fn a_placeholder_is_filled_only_for_its_hosts() {
        let s = secrets();
        let (filled, used) = s
            .fill(b"Bearer {{secret:KEY}}", &to("https://api.example.com/x"))
            .unwrap();
        assert_eq!(filled, b"Bearer s3cr3t");
        assert_eq!(used, ["KEY"]);
        let refused = s
            .fill(b"Bearer {{secret:KEY}}", &to("https://evil.net/"))
            .unwrap_err();
        assert!(
            refused.contains("not bound to https://evil.net:443"),
            "{refused}"
        );
        assert!(!refused.contains("s3cr3t"));
        assert!(
            s.fill(b"{{secret:OTHER}}", &to("https://api.example.com/"))
                .is_err()
        );
        assert!(
            s.fill(b"{{secret:KEY", &to("https://api.example.com/"))
                .is_err()
        );
        let (plain, used) = s.fill(b"no placeholder", &to("https://evil.net/")).unwrap();
        assert_eq!((plain.as_slice(), used.len()), (&b"no placeholder"[..], 0));
    }

    #[test]
    fn a_value_sent_back_is_scrubbed() {
        let s = secrets();
        let mut body = b"{\"auth\": \"Bearer s3cr3t\", \"again\": \"s3cr3ts3cr3t\"}".to_vec();
        s.scrub(&mut body, &["KEY".to_string()]);
        let text = String::from_utf8(body).unwrap();
        assert!(!text.contains("s3cr3t"), "{text}");
        assert!(text.contains("Bearer {{secret:KEY}}"));
    }
}
