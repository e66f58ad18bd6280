//! Stagehand: a self-hosted engine for slow, multi-step LLM pipelines whose stages are
//! WebAssembly components.
//!
//! A *job* is a batch of *items*; each item runs through the *stages* of a *pipeline*, each
//! stage a component implementing the `stage` world of `wit/pipeline.wit`. Stages reach the
//! world only through the host's imports (LLM, kv lookups, handlers, progress, log).
//!
//! # Layout
//!
//! - [`model`]: the job vocabulary every layer shares: jobs, options, item results, and what
//!   a submission, a cancel or a reprocess came to.
//! - [`config`]: the pipeline file (TOML) into a checked [`config::PipelineConfig`].
//! - [`limits`]: every bound on what a client or a guest controls, checked where it enters.
//! - [`outbound`]: what a component may reach over HTTP (`allowed_hosts`) and how much
//!   (`http` limits).
//! - [`runtime`]: wasmtime, set up once: engine with the pooling allocator, epoch ticker for
//!   CPU budgets and cancellation, compile cache, loading components and invoking them in
//!   fresh stores with memory caps; a try waiting on a host call gives up its store and is run
//!   again from its journal when the answer is in.
//! - [`capabilities`]: the host side of every WIT import and of `wasi:http` (requests made
//!   by the host for a grant, secrets filled in and scrubbed), the per-invocation store data,
//!   and the journal of a try's host-call answers.
//! - [`store`]: everything durable, in sled: jobs, items, stage outputs, results, effects,
//!   idempotency keys, dead letters; flushes are group-committed.
//! - [`memory`]: the node's memory budget, which items in flight are charged against.
//! - [`pipeline`]: a loaded pipeline (components, capabilities, per-stage limits), what the
//!   pipelines of a node share ([`pipeline::NodeResources`]), every revision served, kept by
//!   content ([`pipeline::Revisions`]), and the registry of them by name and revision
//!   ([`pipeline::Pipelines`]).
//! - [`backend`]: where jobs live, behind six seams ([`backend::JobBackend`],
//!   [`backend::ItemStore`], [`backend::EventSource`], [`backend::EffectQueue`],
//!   [`backend::Records`], [`backend::Changes`]) and two implementations:
//!   [`backend::embedded`] (sled; the [`backend::embedded::JobManager`] runs submitted jobs in
//!   this process, resumes them after a restart, reprocesses dead letters) and
//!   [`backend::redis`] (jobs, items, results, event logs, work, cancels, effects, handlers'
//!   records and operators' changes shared by several nodes: `serve --redis`,
//!   `worker --redis`).
//! - [`jobs`]: running items through stages (retries, time limits, dead letters), items of a
//!   job under a concurrency limit, effects; used by both backends.
//! - [`events`]: what a job's events are, the SSE view of a log (from either backend), and the
//!   live (unlogged) tokens of streamed LLM answers.
//! - [`versions`]: stage versions installed while serving (hot swap), kept across restarts and,
//!   in Redis mode, applied by every node of the cluster.
//! - [`deploy`]: pipelines deployed while serving (`PUT /v1/pipelines/{name}` with a tar
//!   bundle): checked and compiled before an atomic swap, kept across restarts and, in Redis
//!   mode, applied by every node of the cluster.
//! - [`kv_reloads`]: kv namespaces reloaded while serving, in Redis mode on every node.
//! - [`follow`]: Redis mode: every node applies the deploys, stage versions and kv reloads
//!   published on any node, and catches up before it takes work.
//! - [`watch`]: settled file-change bursts, for `serve --watch` and kv namespace reloads.
//! - [`metrics`]: every Prometheus metric, named in one place.
//! - [`node`]: the composition root: a node (store, runtime, pipelines, backend, effect runner,
//!   work loop, sweepers, watchers) built once for `serve`, `worker` and `run`, with one
//!   shutdown.
//! - [`api`]: the HTTP API (axum).
//! - [`cli`]: the `stagehand` command: arguments into [`node::NodeSettings`], and a front
//!   (HTTP, none, a progress bar) on the node.
//!
//! # Life of a request
//!
//! Embedded mode (`stagehand serve`): `POST /v1/jobs` ([`api`]) finds the pipeline it names in
//! the node's [`pipeline::Pipelines`], checks the body against [`limits`] and that pipeline's
//! limits, and hands it to the node's [`backend::JobBackend`], here
//! [`backend::embedded::Embedded`]: the [`backend::embedded::JobManager`] writes the job, its items and its `job.started` event to sled, flushes,
//! answers 202, and runs the job in a task of this process. Each item's stage events go to the
//! job's [`backend::embedded::EventLog`], which SSE followers read from sled after a wake-up.
//!
//! Redis mode (`serve --redis`, `worker --redis`): the same route hands the job to
//! [`backend::redis::Cluster`], which writes job, items and first event to Redis and puts the items on
//! a shared work stream; every node's work loop ([`backend::redis::run_worker`]) takes items from it,
//! runs them with the same [`jobs::run_item`], and writes results and events back to Redis,
//! where any node's SSE route reads them. Cancels reach every node by pub/sub.
//!
//! # Flow of an item
//!
//! [`jobs::run_item`] builds each stage's input envelope from the item and the stored outputs of
//! earlier stages, takes the stage's current version at entry, runs it in a fresh store, checks
//! and persists its output, and finally stores the item's [`model::ItemResult`] with the digest,
//! duration and guest CPU of every stage that ran.

pub mod api;
pub mod backend;
pub mod capabilities;
pub mod cli;
pub mod config;
pub mod deploy;
pub mod events;
pub mod follow;
pub mod jobs;
pub mod kv_reloads;
pub mod limits;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod node;
pub mod outbound;
pub mod pipeline;
pub mod runtime;
pub mod store;
pub mod text;
pub mod versions;
pub mod watch;
