//! Loading components: read, hash, compile (or fetch from the cache), check the world, and
//! pre-instantiate once so that each invocation only has to instantiate.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, HasSelf, Linker};

use super::bindings::{handler::HandlerPre, stage::StagePre};
use super::{CacheOutcome, Runtime, digest};
use crate::capabilities::{HostState, HttpGrant};
use crate::config::Limits;

/// The two worlds of `wit/pipeline.wit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum World {
    Stage,
    Handler,
}

impl World {
    /// The function a component of this world must export.
    fn export(self) -> &'static str {
        match self {
            World::Stage => "run",
            World::Handler => "handle",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            World::Stage => "stage",
            World::Handler => "handler",
        }
    }
}

/// What every loaded component carries, whatever its world.
#[derive(Debug, Clone)]
pub struct LoadedComponent {
    /// Name in the pipeline file.
    pub name: String,
    /// sha256 of the `.wasm`: the version's identity.
    pub digest: String,
    pub cache: CacheOutcome,
    /// From the first byte read to ready to instantiate.
    pub load_time: Duration,
}

/// A stage version, ready to instantiate.
pub struct StageComponent {
    pub meta: LoadedComponent,
    pub(crate) pre: StagePre<HostState>,
}

/// A handler, ready to instantiate, with its limits.
pub struct HandlerComponent {
    pub meta: LoadedComponent,
    pub limits: Limits,
    /// What its outbound HTTP requests may reach.
    pub grant: Arc<HttpGrant>,
    pub(crate) pre: HandlerPre<HostState>,
}

impl StageComponent {
    pub async fn load(runtime: &Runtime, name: &str, path: &Path) -> Result<Arc<Self>> {
        let bytes = read(path)?;
        Self::from_bytes(runtime, name, bytes)
            .await
            .with_context(|| format!("stage `{name}` ({})", path.display()))
    }

    pub async fn from_bytes(runtime: &Runtime, name: &str, bytes: Vec<u8>) -> Result<Arc<Self>> {
        let started = Instant::now();
        let (digest, component, cache) = compile(runtime, bytes).await?;
        let linker = stage_linker(runtime)?;
        let pre = StagePre::new(pre_instantiate(runtime, &linker, &component, World::Stage)?)?;
        let meta = LoadedComponent {
            name: name.to_string(),
            digest,
            cache,
            load_time: started.elapsed(),
        };
        Ok(Arc::new(Self { meta, pre }))
    }
}

impl HandlerComponent {
    pub async fn load(
        runtime: &Runtime,
        name: &str,
        path: &Path,
        limits: Limits,
        grant: Arc<HttpGrant>,
    ) -> Result<Arc<Self>> {
        let started = Instant::now();
        let bytes = read(path)?;
        let load = async {
            let (digest, component, cache) = compile(runtime, bytes).await?;
            let linker = handler_linker(runtime)?;
            let pre = HandlerPre::new(pre_instantiate(
                runtime,
                &linker,
                &component,
                World::Handler,
            )?)?;
            let meta = LoadedComponent {
                name: name.to_string(),
                digest,
                cache,
                load_time: started.elapsed(),
            };
            anyhow::Ok(Arc::new(Self {
                meta,
                limits,
                grant,
                pre,
            }))
        };
        load.await
            .with_context(|| format!("handler `{name}` ({})", path.display()))
    }
}

/// What a component is, for plugin authors: its digest, what it imports and exports, and which
/// of the pipeline's worlds it implements (or why not).
#[derive(Debug)]
pub struct Description {
    pub digest: String,
    pub imports: Vec<String>,
    pub exports: Vec<String>,
    /// Per world: `Ok` if the component can run as it, else why not.
    pub worlds: Vec<(World, Result<(), String>)>,
}

/// Compile `path` (or take it from the cache) and check it against every world.
pub async fn describe(runtime: &Runtime, path: &Path) -> Result<Description> {
    let bytes = read(path)?;
    let (digest, component, _) = compile(runtime, bytes.clone()).await?;
    let engine = runtime.engine();
    let ty = component.component_type();
    let imports = ty
        .imports(engine)
        .map(|(name, _)| name.to_string())
        .collect();
    let exports = ty
        .exports(engine)
        .map(|(name, _)| name.to_string())
        .collect();
    let as_stage = StageComponent::from_bytes(runtime, "check", bytes)
        .await
        .map(drop)
        .map_err(|e| format!("{e:#}"));
    let as_handler =
        HandlerComponent::load(runtime, "check", path, Limits::default(), HttpGrant::none())
            .await
            .map(drop)
            // Without the "handler `check` (path)" context the loader adds.
            .map_err(|e| {
                e.chain()
                    .skip(1)
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(": ")
            });
    Ok(Description {
        digest,
        imports,
        exports,
        worlds: vec![(World::Stage, as_stage), (World::Handler, as_handler)],
    })
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

async fn compile(runtime: &Runtime, bytes: Vec<u8>) -> Result<(String, Component, CacheOutcome)> {
    if !bytes.starts_with(b"\0asm") {
        bail!("not a WebAssembly file");
    }
    let digest = digest(&bytes);
    let (component, outcome) = runtime
        .cache()
        .load(runtime.engine(), &digest, bytes)
        .await
        .context("not a valid component")?;
    Ok((digest, component, outcome))
}

/// What both worlds link to: WASI (no sockets, files or environment: `capabilities/mod.rs`
/// builds the context), `wasi:http` with our `handle`, and the interfaces they share. Each is
/// linked by itself: a world's own `add_to_linker` would also link wasmtime's `handle`.
fn shared_linker(runtime: &Runtime) -> Result<Linker<HostState>> {
    use super::bindings::{kv, log, types};
    let mut linker = Linker::new(runtime.engine());
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    crate::capabilities::http::add_to_linker(&mut linker)?;
    types::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
    kv::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
    log::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
    Ok(linker)
}

/// What a stage links to: the shared imports and the stage-only ones.
fn stage_linker(runtime: &Runtime) -> Result<Linker<HostState>> {
    use super::bindings::{config, dispatch, llm, progress};
    let mut linker = shared_linker(runtime)?;
    llm::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
    dispatch::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
    progress::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
    config::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
    Ok(linker)
}

/// What a handler links to: the shared imports and `records`.
fn handler_linker(runtime: &Runtime) -> Result<Linker<HostState>> {
    let mut linker = shared_linker(runtime)?;
    super::bindings::records::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
    Ok(linker)
}

/// The version of `wit/pipeline.wit` this host implements.
pub const WIT_VERSION: &str = "0.2.0";
const WIT_PACKAGE: &str = "stagehand:pipeline@0.2.0";

/// Check that `component` exports its world's function, then link its imports. Both failures
/// say what is missing, in the words of the WIT file, before anything runs.
fn pre_instantiate(
    runtime: &Runtime,
    linker: &Linker<HostState>,
    component: &Component,
    world: World,
) -> Result<wasmtime::component::InstancePre<HostState>> {
    let engine = runtime.engine();
    let exports: Vec<String> = component
        .component_type()
        .exports(engine)
        .map(|(name, _)| name.to_string())
        .collect();
    let other_version = component
        .component_type()
        .imports(engine)
        .filter_map(|(name, _)| {
            let version = name.strip_prefix("stagehand:pipeline/")?.split_once('@')?.1;
            (version != WIT_VERSION).then(|| version.to_string())
        })
        .next();
    if let Some(version) = other_version {
        bail!(
            "was built against stagehand:pipeline@{version}; this host speaks {WIT_PACKAGE}: \
             rebuild it against this release's wit/pipeline.wit (or its SDK)"
        );
    }
    let export = world.export();
    let exports_it = component
        .component_type()
        .exports(engine)
        .any(|(name, item)| name == export && matches!(item.ty, ComponentItem::ComponentFunc(_)));
    if !exports_it {
        bail!(
            "does not implement world `{}` of {WIT_PACKAGE}: missing export `{export}` (it exports: {})",
            world.name(),
            if exports.is_empty() {
                "nothing".to_string()
            } else {
                exports.join(", ")
            }
        );
    }
    linker
        .instantiate_pre(component)
        .map_err(anyhow::Error::from)
        .with_context(|| {
            format!(
                "its imports do not match world `{}` of {WIT_PACKAGE}",
                world.name()
            )
        })
}
