//! The HTTP client of the commands that drive a running server (`submit`, `jobs`, `results`,
//! `cancel`, `dlq`): where the server is, the token, and the API's errors as readable messages.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use reqwest::{Method, RequestBuilder, Response};
use serde_json::Value;

#[derive(Args, Clone)]
pub struct RemoteArgs {
    /// The server's root URL.
    #[arg(
        long,
        global = true,
        env = "STAGEHAND_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    pub server: String,
    /// Bearer token: the server's `--api-token`, or its `--admin-token` for admin commands.
    #[arg(long, global = true, env = "STAGEHAND_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// A server's API.
#[derive(Clone)]
pub struct Remote {
    http: reqwest::Client,
    root: String,
    token: Option<String>,
}

impl Remote {
    pub fn new(args: &RemoteArgs) -> Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .context("cannot build an HTTP client")?;
        Ok(Remote {
            http,
            root: args.server.trim_end_matches('/').to_string(),
            token: args.token.clone().filter(|t| !t.is_empty()),
        })
    }

    /// A request to `path` (from the root, e.g. `/v1/jobs`), with the token.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.root));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Send, and read a JSON answer; an error answer becomes its message.
    pub async fn json(&self, request: RequestBuilder) -> Result<Value> {
        let response = self.send(request).await?;
        if response.status() == reqwest::StatusCode::NO_CONTENT {
            return Ok(Value::Null);
        }
        response
            .json()
            .await
            .context("the server's answer is not JSON")
    }

    /// Send; a non-2xx answer becomes an error with the API's message.
    pub async fn send(&self, request: RequestBuilder) -> Result<Response> {
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.root))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or(body);
        bail!("the server answered {status}: {message}")
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        self.json(self.request(Method::GET, path)).await
    }
}
