//! The pipeline file: TOML in, a validated [`PipelineConfig`] out.
//!
//! Every mistake is reported with the offending key and its line, because the person reading the
//! error is an operator with the file open in an editor. Parse errors come from `toml` (which
//! already names line and key); checks that need more than one key (duplicate names, files that
//! do not exist) use the spans `toml::Spanned` keeps.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use sha2::Digest as _;
use toml::Spanned;

use crate::limits::{Budgets, BudgetsSpec, JobLimits};

/// A pipeline as the operator wrote it, paths resolved against the file's folder.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub name: String,
    /// Where the file was read from, for messages.
    pub source: PathBuf,
    pub llm: LlmConfig,
    pub run: RunConfig,
    pub stages: Vec<StageConfig>,
    pub handlers: BTreeMap<String, HandlerConfig>,
    pub kv: BTreeMap<String, PathBuf>,
    /// `[secrets.NAME]`, by name.
    pub secrets: BTreeMap<String, SecretConfig>,
    /// What one job may ask for (`[limits]`).
    pub limits: JobLimits,
    /// Every file the pipeline file names (components, kv files): the path as written -> where
    /// it was found. A revision is these files' contents and the pipeline file's.
    pub files: BTreeMap<PathBuf, PathBuf>,
}

/// Where LLM calls go: `[llm]` and `[providers.NAME]`.
#[derive(Debug, Clone)]
pub struct LlmConfig {
    /// Every provider by name; an `[llm]` table with a `base_url` is the one named `default`.
    pub providers: BTreeMap<String, ProviderConfig>,
    /// The providers a stage without its own `providers` uses, in failover order.
    pub route: Vec<String>,
    /// LLM tokens (prompt and completion) one job may use, unless its `max_tokens` option
    /// says otherwise; none by default.
    pub max_tokens_per_job: Option<u64>,
}

impl LlmConfig {
    /// Send every provider's requests to `base_url` (`--llm-url`: a pipeline tried against a
    /// mock or a local server).
    pub fn point_all_at(&mut self, base_url: &str) {
        for provider in self.providers.values_mut() {
            provider.base_url = base_url.to_string();
        }
    }
}

/// One OpenAI-compatible endpoint: a hosted API, a vLLM, llama.cpp or Ollama server, a gateway.
#[derive(Debug, Clone)]
pub struct ProviderConfig {
    /// The OpenAI-compatible API root, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// Model used when a stage does not name one.
    pub model: String,
    /// The API keys, used in turn (round-robin), each with its own limits. Empty: no key sent.
    pub keys: Vec<KeyConfig>,
    /// A model name a stage asks for -> the name this provider knows it by.
    pub model_map: BTreeMap<String, String>,
    pub timeout_ms: u64,
    pub max_concurrent_requests: usize,
    /// The provider's rate limits (token buckets); none by default.
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    /// Limits of single models (by this provider's name for them), on top of the provider's.
    pub models: BTreeMap<String, ModelLimits>,
}

/// One API key: the environment variable that holds it (never the key itself) and the limits
/// the provider gives that key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    pub env: String,
    #[serde(default)]
    pub max_concurrent_requests: Option<usize>,
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    #[serde(default)]
    pub tokens_per_minute: Option<u32>,
}

impl ProviderConfig {
    /// Zero limits would stop every request forever.
    fn check(&self) -> Result<()> {
        let limits = std::iter::once((
            "the provider".to_string(),
            Some(self.max_concurrent_requests),
            self.requests_per_minute,
            self.tokens_per_minute,
        ))
        .chain(self.models.iter().map(|(name, m)| {
            (
                format!("model {name:?}"),
                m.max_concurrent_requests,
                m.requests_per_minute,
                m.tokens_per_minute,
            )
        }))
        .chain(self.keys.iter().map(|k| {
            (
                format!("key ${}", k.env),
                k.max_concurrent_requests,
                k.requests_per_minute,
                k.tokens_per_minute,
            )
        }));
        for (whose, concurrent, rpm, tpm) in limits {
            if concurrent == Some(0) || rpm == Some(0) || tpm == Some(0) {
                bail!(
                    "a limit of {whose} is 0; limits must be at least 1 (leave one out for none)"
                );
            }
        }
        if self.timeout_ms == 0 {
            bail!("`timeout_ms` must be at least 1");
        }
        if !(self.base_url.starts_with("http://") || self.base_url.starts_with("https://")) {
            bail!(
                "`base_url` {:?} must start with http:// or https://",
                self.base_url
            );
        }
        Ok(())
    }
}

/// A model's own limits; unset ones are the provider's alone.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelLimits {
    pub max_concurrent_requests: Option<usize>,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Items in flight at once, per job (a job's `options.concurrency` overrides it).
    #[serde(default = "defaults::concurrency")]
    pub concurrency: usize,
    /// Stage instances alive at once across every job, so this sizes the instance pool; more
    /// wait in line (FIFO) instead of failing. A stage waiting on the LLM or a handler past
    /// `evict_after_ms` holds none.
    #[serde(default = "defaults::max_stage_calls")]
    pub max_stage_calls: usize,
    /// How long a host call (the LLM, `dispatch.call`) may keep a stage's instance waiting;
    /// past it the instance is dropped and the stage resumes by replay when the answer is in
    /// (see `capabilities/journal.rs`). Up to [`MAX_EVICT_AFTER_MS`].
    #[serde(default = "defaults::evict_after_ms")]
    pub evict_after_ms: u64,
    /// Memory the node's items in flight may take, in MiB, across every job: each item is
    /// charged an estimate when it starts (see [`crate::memory`]) and waits while the budget is
    /// spent. From [`crate::memory::MIN_MEMORY_BUDGET_MIB`] to
    /// [`crate::memory::MAX_MEMORY_BUDGET_MIB`], and no more than the machine has.
    #[serde(default = "defaults::memory_budget_mib")]
    pub memory_budget_mib: u64,
    /// Effects (emitted dispatches) running at once.
    #[serde(default = "defaults::effect_concurrency")]
    pub effect_concurrency: usize,
    /// A stage output is checkpointed to the store before the next stage starts when the stage
    /// took at least this long; quicker stages simply run again after a crash. 0 checkpoints
    /// every stage.
    #[serde(default = "defaults::checkpoint_after_ms")]
    pub checkpoint_after_ms: u64,
    /// Wall-clock limit for one item through every stage, retries and back-off included
    /// (default: none; each stage still has its own `timeout_ms`).
    #[serde(default)]
    pub item_timeout_ms: Option<u64>,
}

/// The most `[run] max_stage_calls`: the pool reserves slots for twice as many instances
/// (stages and the handlers they call), and 10,000 stage calls made the process abort when it
/// later could not map a thread's stack (docs/BENCHMARKS.md); 2,000 were measured to work.
pub const MAX_STAGE_CALLS: usize = 2048;

/// The longest `[run] evict_after_ms`: a minute of a live instance per waiting call is as long
/// as keeping instances can be worth.
pub const MAX_EVICT_AFTER_MS: u64 = 60_000;

impl RunConfig {
    /// What [`crate::runtime::Call::evict_after`] gets.
    pub fn evict_after(&self) -> Option<std::time::Duration> {
        Some(std::time::Duration::from_millis(self.evict_after_ms))
    }
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            concurrency: defaults::concurrency(),
            max_stage_calls: defaults::max_stage_calls(),
            evict_after_ms: defaults::evict_after_ms(),
            memory_budget_mib: defaults::memory_budget_mib(),
            effect_concurrency: defaults::effect_concurrency(),
            checkpoint_after_ms: defaults::checkpoint_after_ms(),
            item_timeout_ms: None,
        }
    }
}

/// Resource limits of one component invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Linear memory the guest may grow to.
    pub memory_bytes: usize,
    /// Guest CPU time (time spent waiting on host calls such as the LLM does not count).
    pub cpu: Duration,
    /// Wall-clock time for the whole invocation, host calls included.
    pub timeout: Duration,
    /// Largest output accepted from the guest.
    pub max_output_bytes: usize,
    /// What one try may do through its host calls.
    pub budgets: Budgets,
    /// What one try may do through outbound HTTP (`http`).
    pub http: crate::outbound::HttpLimits,
}

/// Optional overrides of [`Limits`], as written in `[defaults]`, a stage or a handler.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSpec {
    pub memory_mib: Option<usize>,
    pub cpu_ms: Option<u64>,
    pub timeout_ms: Option<u64>,
    pub max_output_kib: Option<usize>,
    pub budgets: Option<BudgetsSpec>,
    pub http: Option<crate::outbound::HttpLimitsSpec>,
}

impl LimitsSpec {
    fn over(self, base: Limits) -> Result<Limits> {
        let http = match self.http {
            Some(spec) => spec.over(base.http).map_err(anyhow::Error::msg)?,
            None => base.http,
        };
        Ok(Limits {
            memory_bytes: self.memory_mib.map_or(base.memory_bytes, |m| m << 20),
            cpu: self.cpu_ms.map_or(base.cpu, Duration::from_millis),
            timeout: self.timeout_ms.map_or(base.timeout, Duration::from_millis),
            max_output_bytes: self
                .max_output_kib
                .map_or(base.max_output_bytes, |k| k << 10),
            budgets: self.budgets.map_or(base.budgets, |b| b.over(base.budgets)),
            http,
        })
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_bytes: 64 << 20,
            cpu: Duration::from_secs(2),
            timeout: Duration::from_secs(300),
            max_output_bytes: 1 << 20,
            budgets: Budgets::default(),
            http: crate::outbound::HttpLimits::default(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct StageConfig {
    pub name: String,
    pub component: PathBuf,
    /// At most this many items in this stage at once (`None`: only the run's concurrency).
    pub concurrency: Option<usize>,
    pub limits: Limits,
    pub retry: RetryPolicy,
    /// The LLM providers its calls go to, in failover order.
    pub providers: Vec<String>,
    /// `[stage.config]`: what the stage reads through the `config` import.
    pub settings: StageSettings,
    /// Where its outbound HTTP requests may go.
    pub allowed_hosts: Vec<crate::outbound::AllowedHost>,
}

/// A stage's settings (`[stage.config]`), and their digest, which each result records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StageSettings {
    pub values: BTreeMap<String, String>,
    /// sha256 (hex) of the settings as a JSON object; empty when the stage has none.
    pub digest: String,
}

impl StageSettings {
    pub fn new(values: BTreeMap<String, String>) -> Self {
        let digest = if values.is_empty() {
            String::new()
        } else {
            let json = serde_json::to_vec(&values).expect("strings serialise");
            hex::encode(sha2::Sha256::digest(json))
        };
        Self { values, digest }
    }
}

/// How often a stage is tried for an item, and how long to wait between tries.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Tries in all, the first included; 1 means no retry.
    pub max_attempts: u32,
    /// Wait before the second try; doubled for each later one, with jitter.
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The wait before attempt `next` (2, 3, ...): exponential, capped, with "equal jitter"
    /// (half fixed, half spread by `spread` in 0..1) so that items failing together do not
    /// retry together.
    pub fn delay(&self, next: u32, spread: f64) -> Duration {
        let doublings = next.saturating_sub(2).min(20);
        let full = self
            .backoff
            .saturating_mul(1 << doublings)
            .min(self.max_backoff);
        full / 2 + full.mul_f64(spread.clamp(0.0, 1.0) / 2.0)
    }
}

/// `[secrets.NAME]`: where a secret's value is on the node, and the hosts it may be sent to
/// (`capabilities/http/secrets.rs`).
#[derive(Debug, Clone)]
pub struct SecretConfig {
    pub env: Option<String>,
    pub file: Option<PathBuf>,
    pub hosts: Vec<crate::outbound::AllowedHost>,
}

#[derive(Debug, Clone)]
pub struct HandlerConfig {
    pub component: PathBuf,
    pub limits: Limits,
    /// Where its outbound HTTP requests may go.
    pub allowed_hosts: Vec<crate::outbound::AllowedHost>,
}

/// `[run] memory_budget_mib` within its bounds and no more than `machine_mib`: a budget the
/// machine cannot give would let items in flight grow until the kernel kills the node.
fn check_memory_budget(mib: u64, machine_mib: Option<u64>) -> Result<()> {
    use crate::memory::{MAX_MEMORY_BUDGET_MIB, MIN_MEMORY_BUDGET_MIB};
    if !(MIN_MEMORY_BUDGET_MIB..=MAX_MEMORY_BUDGET_MIB).contains(&mib) {
        bail!(
            "`[run] memory_budget_mib` is {MIN_MEMORY_BUDGET_MIB} to {MAX_MEMORY_BUDGET_MIB}, \
             not {mib}"
        );
    }
    if let Some(machine) = machine_mib
        && mib > machine
    {
        bail!(
            "`[run] memory_budget_mib` ({mib}) is more than this machine's memory ({machine} \
             MiB): items in flight would be killed by the kernel before they waited"
        );
    }
    Ok(())
}

mod defaults {
    pub fn llm_timeout_ms() -> u64 {
        120_000
    }
    pub fn llm_max_concurrent_requests() -> usize {
        64
    }
    pub fn concurrency() -> usize {
        64
    }
    pub fn max_stage_calls() -> usize {
        256
    }
    pub fn evict_after_ms() -> u64 {
        10
    }
    pub fn memory_budget_mib() -> u64 {
        crate::memory::default_budget_mib()
    }
    pub fn effect_concurrency() -> usize {
        8
    }
    pub fn checkpoint_after_ms() -> u64 {
        2
    }
}

/// The file's shape, before checks that span several keys.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    name: Spanned<String>,
    #[serde(default)]
    llm: Option<RawProvider>,
    #[serde(default)]
    providers: BTreeMap<Spanned<String>, RawProvider>,
    #[serde(default)]
    run: RunConfig,
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default)]
    stage: Vec<RawStage>,
    #[serde(default)]
    handlers: BTreeMap<Spanned<String>, RawHandler>,
    #[serde(default)]
    kv: BTreeMap<Spanned<String>, RawKv>,
    #[serde(default)]
    secrets: BTreeMap<Spanned<String>, RawSecret>,
    #[serde(default)]
    limits: JobLimits,
}

/// `[secrets.NAME]`, before the checks.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecret {
    env: Option<String>,
    file: Option<PathBuf>,
    hosts: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStage {
    name: Spanned<String>,
    component: Spanned<PathBuf>,
    #[serde(default)]
    concurrency: Option<usize>,
    // The limits are spelled out, not `#[serde(flatten)]`ed: with flatten, serde loses the
    // line of an unknown key.
    memory_mib: Option<usize>,
    cpu_ms: Option<u64>,
    timeout_ms: Option<u64>,
    max_output_kib: Option<usize>,
    budgets: Option<BudgetsSpec>,
    http: Option<crate::outbound::HttpLimitsSpec>,
    /// Where its outbound HTTP requests may go (`outbound.rs`); nowhere when left out.
    allowed_hosts: Option<Vec<Spanned<String>>>,
    max_attempts: Option<u32>,
    backoff_ms: Option<u64>,
    max_backoff_ms: Option<u64>,
    providers: Option<Vec<Spanned<String>>>,
    /// `[stage.config]`: string settings the stage reads through the `config` import.
    #[serde(default)]
    config: BTreeMap<Spanned<String>, Spanned<String>>,
}

/// `[llm]` or `[providers.NAME]`, before the checks.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    base_url: Option<String>,
    model: Option<String>,
    api_key_env: Option<String>,
    #[serde(default)]
    keys: Vec<KeyConfig>,
    #[serde(default)]
    model_map: BTreeMap<String, String>,
    timeout_ms: Option<u64>,
    max_concurrent_requests: Option<usize>,
    requests_per_minute: Option<u32>,
    tokens_per_minute: Option<u32>,
    #[serde(default)]
    models: BTreeMap<String, ModelLimits>,
    // `[llm]` only: the default route and the job budget.
    providers: Option<Spanned<Vec<Spanned<String>>>>,
    max_tokens_per_job: Option<u64>,
}

impl RawProvider {
    /// Whether a provider is described here (and not only `[llm]`'s own keys).
    fn describes_provider(&self) -> bool {
        self.base_url.is_some()
            || self.model.is_some()
            || self.api_key_env.is_some()
            || !self.keys.is_empty()
            || !self.model_map.is_empty()
            || self.timeout_ms.is_some()
            || self.max_concurrent_requests.is_some()
            || self.requests_per_minute.is_some()
            || self.tokens_per_minute.is_some()
            || !self.models.is_empty()
    }

    fn into_provider(self) -> Result<ProviderConfig> {
        let base_url = self.base_url.context("`base_url` is missing")?;
        let model = self
            .model
            .context("`model` (the default model) is missing")?;
        let keys = match (self.api_key_env, self.keys) {
            (Some(_), keys) if !keys.is_empty() => {
                bail!("give `api_key_env` (one key) or `keys` (several), not both")
            }
            (Some(env), _) => vec![KeyConfig {
                env,
                max_concurrent_requests: None,
                requests_per_minute: None,
                tokens_per_minute: None,
            }],
            (None, keys) => keys,
        };
        let provider = ProviderConfig {
            base_url,
            model,
            keys,
            model_map: self.model_map,
            timeout_ms: self.timeout_ms.unwrap_or_else(defaults::llm_timeout_ms),
            max_concurrent_requests: self
                .max_concurrent_requests
                .unwrap_or_else(defaults::llm_max_concurrent_requests),
            requests_per_minute: self.requests_per_minute,
            tokens_per_minute: self.tokens_per_minute,
            models: self.models,
        };
        provider.check()?;
        Ok(provider)
    }
}

/// `[defaults]`: limits for every stage and handler, retries for every stage.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    memory_mib: Option<usize>,
    cpu_ms: Option<u64>,
    timeout_ms: Option<u64>,
    max_output_kib: Option<usize>,
    budgets: Option<BudgetsSpec>,
    http: Option<crate::outbound::HttpLimitsSpec>,
    max_attempts: Option<u32>,
    backoff_ms: Option<u64>,
    max_backoff_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHandler {
    component: Spanned<PathBuf>,
    memory_mib: Option<usize>,
    cpu_ms: Option<u64>,
    timeout_ms: Option<u64>,
    max_output_kib: Option<usize>,
    budgets: Option<BudgetsSpec>,
    http: Option<crate::outbound::HttpLimitsSpec>,
    allowed_hosts: Option<Vec<Spanned<String>>>,
}

macro_rules! limits_of {
    ($raw:expr) => {
        LimitsSpec {
            memory_mib: $raw.memory_mib,
            cpu_ms: $raw.cpu_ms,
            timeout_ms: $raw.timeout_ms,
            max_output_kib: $raw.max_output_kib,
            budgets: $raw.budgets,
            http: $raw.http,
        }
    };
}

/// The retry keys of a stage or of `[defaults]` over `base`.
macro_rules! retry_of {
    ($raw:expr, $base:expr) => {
        RetryPolicy {
            max_attempts: $raw.max_attempts.unwrap_or($base.max_attempts),
            backoff: $raw.backoff_ms.map_or($base.backoff, Duration::from_millis),
            max_backoff: $raw
                .max_backoff_ms
                .map_or($base.max_backoff, Duration::from_millis),
        }
    };
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKv {
    file: Spanned<PathBuf>,
}

impl PipelineConfig {
    /// Read and check a pipeline file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read pipeline file {}", path.display()))?;
        Self::parse(&text, path)
    }

    /// Check a pipeline file's text; `path` resolves relative component and kv paths.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let dir = path.parent().unwrap_or(Path::new("."));
        Self::parse_with(text, path, &|written| {
            let resolved = dir.join(written);
            match resolved.is_file() {
                true => Ok(resolved),
                false => Err(format!("no such file {}", resolved.display())),
            }
        })
    }

    /// Check a pipeline file's text, finding the files it names with `find` (the path as
    /// written -> where it is, or why it is missing): a deployed bundle's files are not next to
    /// it on disk. `path` names the file in messages.
    pub fn parse_with(
        text: &str,
        path: &Path,
        find: &dyn Fn(&Path) -> std::result::Result<PathBuf, String>,
    ) -> Result<Self> {
        let raw: RawPipeline =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let at = |span: Range<usize>, message: String| -> anyhow::Error {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            anyhow::anyhow!("{}:{line}: {message}", path.display())
        };
        let files = std::cell::RefCell::new(BTreeMap::new());
        let file = |p: &Spanned<PathBuf>, key: &str| -> Result<PathBuf> {
            let resolved =
                find(p.get_ref()).map_err(|why| at(p.span(), format!("`{key}`: {why}")))?;
            files
                .borrow_mut()
                .insert(p.get_ref().clone(), resolved.clone());
            Ok(resolved)
        };
        let check_name = |name: &Spanned<String>, what: &str| -> Result<()> {
            let n = name.get_ref();
            let ok = !n.is_empty()
                && n.len() <= crate::limits::MAX_NAME
                && n.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
                });
            if !ok {
                return Err(at(
                    name.span(),
                    format!("{what} name {n:?} must be 1-64 characters of a-z, 0-9, '-' and '_'"),
                ));
            }
            Ok(())
        };

        check_name(&raw.name, "pipeline")?;
        let llm = Self::llm(&raw, path, &at, &check_name)?;
        if raw.stage.is_empty() {
            bail!("{}: the pipeline has no `[[stage]]`", path.display());
        }
        let base = limits_of!(raw.defaults)
            .over(Limits::default())
            .with_context(|| format!("{}: `[defaults]`", path.display()))?;
        let base_retry = retry_of!(raw.defaults, RetryPolicy::default());
        let mut stages: Vec<StageConfig> = Vec::new();
        for s in &raw.stage {
            check_name(&s.name, "stage")?;
            if stages.iter().any(|seen| seen.name == *s.name.get_ref()) {
                return Err(at(
                    s.name.span(),
                    format!("stage `{}` is defined twice", s.name.get_ref()),
                ));
            }
            if s.concurrency == Some(0) {
                return Err(at(
                    s.name.span(),
                    format!(
                        "stage `{}`: `concurrency` must be at least 1",
                        s.name.get_ref()
                    ),
                ));
            }
            let retry = retry_of!(s, base_retry);
            if retry.max_attempts == 0 {
                return Err(at(
                    s.name.span(),
                    format!(
                        "stage `{}`: `max_attempts` must be at least 1 (1: no retry)",
                        s.name.get_ref()
                    ),
                ));
            }
            let providers = match &s.providers {
                Some(names) => {
                    for name in names {
                        if !llm.providers.contains_key(name.get_ref()) {
                            return Err(at(
                                name.span(),
                                format!(
                                    "stage `{}`: no provider `{}` (there are: {})",
                                    s.name.get_ref(),
                                    name.get_ref(),
                                    names_of(&llm.providers)
                                ),
                            ));
                        }
                    }
                    if names.is_empty() {
                        return Err(at(
                            s.name.span(),
                            format!("stage `{}`: `providers` is empty", s.name.get_ref()),
                        ));
                    }
                    names.iter().map(|n| n.get_ref().clone()).collect()
                }
                None if llm.route.is_empty() => {
                    return Err(at(
                        s.name.span(),
                        format!(
                            "stage `{}`: the pipeline has several providers ({}) and no \
                             default: give the stage `providers = [...]` or set \
                             `[llm] providers = [...]`",
                            s.name.get_ref(),
                            names_of(&llm.providers)
                        ),
                    ));
                }
                None => llm.route.clone(),
            };
            stages.push(StageConfig {
                name: s.name.get_ref().clone(),
                component: file(&s.component, "component")?,
                concurrency: s.concurrency,
                limits: limits_of!(s)
                    .over(base)
                    .map_err(|e| at(s.name.span(), format!("stage `{}`: {e}", s.name.get_ref())))?,
                retry,
                providers,
                allowed_hosts: allowed_hosts_of(s.allowed_hosts.as_deref(), &at)?,
                settings: settings_of(s, &at)?,
            });
        }
        let mut handlers = BTreeMap::new();
        for (name, h) in &raw.handlers {
            check_name(name, "handler")?;
            let limits = limits_of!(h)
                .over(base)
                .map_err(|e| at(name.span(), format!("handler `{}`: {e}", name.get_ref())))?;
            handlers.insert(
                name.get_ref().clone(),
                HandlerConfig {
                    component: file(&h.component, "component")?,
                    limits,
                    allowed_hosts: allowed_hosts_of(h.allowed_hosts.as_deref(), &at)?,
                },
            );
        }
        let mut secrets = BTreeMap::new();
        for (name, secret) in &raw.secrets {
            let n = name.get_ref();
            if n.is_empty()
                || n.len() > crate::limits::MAX_NAME
                || !n
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(at(
                    name.span(),
                    format!(
                        "secret name {n:?} must be 1-64 characters of A-Z, a-z, 0-9, '-' and '_'"
                    ),
                ));
            }
            if secret.env.is_some() == secret.file.is_some() {
                return Err(at(
                    name.span(),
                    format!("secret `{n}`: give `env` (a variable) or `file`, one of them"),
                ));
            }
            if secret.hosts.is_empty() {
                return Err(at(
                    name.span(),
                    format!("secret `{n}`: `hosts` is empty, so it could go nowhere"),
                ));
            }
            secrets.insert(
                n.clone(),
                SecretConfig {
                    env: secret.env.clone(),
                    file: secret.file.clone(),
                    hosts: allowed_hosts_of(Some(&secret.hosts), &at)?,
                },
            );
        }
        let mut kv = BTreeMap::new();
        for (name, k) in &raw.kv {
            check_name(name, "kv namespace")?;
            kv.insert(name.get_ref().clone(), file(&k.file, "file")?);
        }
        if raw.run.concurrency == 0
            || raw.run.effect_concurrency == 0
            || raw.run.max_stage_calls == 0
        {
            bail!(
                "{}: `[run]` concurrencies must be at least 1",
                path.display()
            );
        }
        if raw.run.max_stage_calls > MAX_STAGE_CALLS {
            bail!(
                "{}: `[run] max_stage_calls` is at most {MAX_STAGE_CALLS}, not {}: it sizes the \
                 instance pool, whose memory mappings a larger one would outgrow; a stage \
                 waiting on the LLM holds no instance, so more are rarely needed",
                path.display(),
                raw.run.max_stage_calls
            );
        }
        if raw.run.evict_after_ms > MAX_EVICT_AFTER_MS {
            bail!(
                "{}: `[run] evict_after_ms` is at most {MAX_EVICT_AFTER_MS}, not {}",
                path.display(),
                raw.run.evict_after_ms
            );
        }
        check_memory_budget(raw.run.memory_budget_mib, crate::memory::machine_mib())
            .with_context(|| path.display().to_string())?;
        let limits = raw.limits;
        if limits.max_items == 0
            || limits.max_item_kib == 0
            || limits.max_concurrency == 0
            || limits.max_timeout_ms == 0
            || limits.max_job_tokens == 0
        {
            bail!("{}: `[limits]` must be at least 1", path.display());
        }
        if raw.run.concurrency > limits.max_concurrency {
            bail!(
                "{}: `[run] concurrency` ({}) is over `[limits] max_concurrency` ({})",
                path.display(),
                raw.run.concurrency,
                limits.max_concurrency
            );
        }
        if let Some(tokens) = llm.max_tokens_per_job
            && (tokens == 0 || tokens > limits.max_job_tokens)
        {
            bail!(
                "{}: `[llm] max_tokens_per_job` must be 1 to `[limits] max_job_tokens` ({})",
                path.display(),
                limits.max_job_tokens
            );
        }
        Ok(Self {
            name: raw.name.into_inner(),
            source: path.to_path_buf(),
            llm,
            run: raw.run,
            stages,
            handlers,
            kv,
            secrets,
            limits: raw.limits,
            files: files.into_inner(),
        })
    }

    /// `[llm]` and `[providers.NAME]`: the providers by name and the default route.
    fn llm(
        raw: &RawPipeline,
        path: &Path,
        at: &dyn Fn(Range<usize>, String) -> anyhow::Error,
        check_name: &dyn Fn(&Spanned<String>, &str) -> Result<()>,
    ) -> Result<LlmConfig> {
        let mut providers = BTreeMap::new();
        for (name, p) in &raw.providers {
            check_name(name, "provider")?;
            let whose = format!("{}: `[providers.{}]`", path.display(), name.get_ref());
            if p.providers.is_some() || p.max_tokens_per_job.is_some() {
                bail!("{whose}: `providers` and `max_tokens_per_job` belong in `[llm]`");
            }
            let provider = p.clone().into_provider().context(whose)?;
            providers.insert(name.get_ref().clone(), provider);
        }
        let llm = raw.llm.as_ref();
        if let Some(llm) = llm.filter(|l| l.describes_provider()) {
            if providers.contains_key("default") {
                bail!(
                    "{}: `[llm]` describes the provider `default`, and so does \
                     `[providers.default]`",
                    path.display()
                );
            }
            let provider = llm
                .clone()
                .into_provider()
                .with_context(|| format!("{}: `[llm]`", path.display()))?;
            providers.insert("default".to_string(), provider);
        }
        if providers.is_empty() {
            bail!(
                "{}: no LLM provider: add `[llm]` with `base_url` and `model`, or \
                 `[providers.NAME]` tables",
                path.display()
            );
        }
        let route = match llm.and_then(|l| l.providers.as_ref()) {
            Some(names) => {
                for name in names.get_ref() {
                    if !providers.contains_key(name.get_ref()) {
                        return Err(at(
                            name.span(),
                            format!(
                                "`[llm] providers`: no provider `{}` (there are: {})",
                                name.get_ref(),
                                names_of(&providers)
                            ),
                        ));
                    }
                }
                if names.get_ref().is_empty() {
                    return Err(at(names.span(), "`[llm] providers` is empty".into()));
                }
                names
                    .get_ref()
                    .iter()
                    .map(|n| n.get_ref().clone())
                    .collect()
            }
            None if providers.contains_key("default") => vec!["default".to_string()],
            None if providers.len() == 1 => providers.keys().cloned().collect(),
            None => Vec::new(),
        };
        Ok(LlmConfig {
            providers,
            route,
            max_tokens_per_job: llm.and_then(|l| l.max_tokens_per_job),
        })
    }

    /// The largest memory any component of this pipeline may use: sizes the instance pool.
    pub fn max_memory_bytes(&self) -> usize {
        let stages = self.stages.iter().map(|s| s.limits.memory_bytes);
        let handlers = self.handlers.values().map(|h| h.limits.memory_bytes);
        stages
            .chain(handlers)
            .max()
            .unwrap_or(Limits::default().memory_bytes)
    }
}

/// At most this many entries in one `allowed_hosts`.
const MAX_ALLOWED_HOSTS: usize = 64;

/// `allowed_hosts` of a stage or a handler.
fn allowed_hosts_of(
    written: Option<&[Spanned<String>]>,
    at: &dyn Fn(Range<usize>, String) -> anyhow::Error,
) -> Result<Vec<crate::outbound::AllowedHost>> {
    let written = written.unwrap_or_default();
    if written.len() > MAX_ALLOWED_HOSTS {
        return Err(at(
            written[MAX_ALLOWED_HOSTS].span(),
            format!(
                "`allowed_hosts` has {} entries; at most {MAX_ALLOWED_HOSTS}",
                written.len()
            ),
        ));
    }
    written
        .iter()
        .map(|entry| {
            crate::outbound::AllowedHost::parse(entry.get_ref()).map_err(|e| at(entry.span(), e))
        })
        .collect()
}

/// `[stage.config]`, checked against the limits of `crate::limits` (a guest reads it whole).
fn settings_of(
    stage: &RawStage,
    at: &dyn Fn(Range<usize>, String) -> anyhow::Error,
) -> Result<StageSettings> {
    use crate::limits::{
        MAX_SETTING_NAME, MAX_SETTING_VALUE, MAX_SETTINGS_BYTES, MAX_STAGE_SETTINGS,
    };
    let whose = format!("stage `{}`: `[stage.config]`", stage.name.get_ref());
    if stage.config.len() > MAX_STAGE_SETTINGS {
        return Err(at(
            stage.name.span(),
            format!(
                "{whose} has {} settings; at most {MAX_STAGE_SETTINGS}",
                stage.config.len()
            ),
        ));
    }
    let mut total = 0;
    let mut values = BTreeMap::new();
    for (name, value) in &stage.config {
        let (name_text, value_text) = (name.get_ref(), value.get_ref());
        if name_text.is_empty() || name_text.len() > MAX_SETTING_NAME {
            return Err(at(
                name.span(),
                format!("{whose}: a setting's name is 1 to {MAX_SETTING_NAME} bytes"),
            ));
        }
        if value_text.len() > MAX_SETTING_VALUE {
            return Err(at(
                value.span(),
                format!(
                    "{whose}: setting `{name_text}` is {} bytes; at most {MAX_SETTING_VALUE}",
                    value_text.len()
                ),
            ));
        }
        total += name_text.len() + value_text.len();
        if total > MAX_SETTINGS_BYTES {
            return Err(at(
                name.span(),
                format!("{whose}: the settings are over {MAX_SETTINGS_BYTES} bytes in all"),
            ));
        }
        values.insert(name_text.clone(), value_text.clone());
    }
    Ok(StageSettings::new(values))
}

fn names_of<T>(map: &BTreeMap<String, T>) -> String {
    map.keys()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}
