//! For plugin authors. `stagehand plugin check <file.wasm>`: what a component imports and
//! exports, and whether it can run as a stage or a handler (and if not, what is missing), before
//! it goes near a pipeline. `stagehand plugin new <name> [--lang rust|python|js]`: a stage to
//! start from, with its own copy of the WIT, that builds and runs as it is
//! (tests/tests/plugin_new.rs).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};

use super::default_data_dir;
use crate::runtime::{Runtime, RuntimeOptions, describe};

#[derive(Args)]
pub struct PluginArgs {
    #[command(subcommand)]
    command: PluginCommand,
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Check a component against the worlds of wit/pipeline.wit and list its imports and
    /// exports. Exit status 0 if it implements at least one world.
    Check {
        component: PathBuf,
        /// Where compiled components are cached.
        #[arg(long, default_value_os_t = default_data_dir())]
        data_dir: PathBuf,
        /// A pipeline file that uses the component: its outbound HTTP grant is compared with
        /// the hosts the component could need.
        #[arg(long)]
        pipeline: Option<PathBuf>,
        /// The stage (or handler) of `--pipeline` to compare with; by default the one whose
        /// `component` is this file.
        #[arg(long, requires = "pipeline")]
        stage: Option<String>,
    },
    /// Write a new stage, `<dir>/<name>/`, that builds into a component of the `stage` world:
    /// a Rust crate (cargo), a Python module (componentize-py) or a JavaScript module (jco).
    New {
        /// The stage's name: lowercase letters, digits, `-` and `_`, starting with a letter.
        name: String,
        /// Where to create its directory.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The language to write it in.
        #[arg(long, value_enum, default_value_t = Lang::Rust)]
        lang: Lang,
    },
}

/// The languages `plugin new` writes stages in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Lang {
    Rust,
    Python,
    Js,
}

pub async fn plugin(args: PluginArgs) -> Result<ExitCode> {
    let (component, data_dir, pipeline, stage) = match args.command {
        PluginCommand::Check {
            component,
            data_dir,
            pipeline,
            stage,
        } => (component, data_dir, pipeline, stage),
        PluginCommand::New { name, dir, lang } => {
            let created = new_stage(&name, &dir, lang)?;
            let file = name.replace('-', "_");
            let (build, wasm) = match lang {
                Lang::Rust => (
                    "cargo build --release --target wasm32-wasip2".to_string(),
                    format!("target/wasm32-wasip2/release/{file}.wasm"),
                ),
                Lang::Python => (
                    format!("componentize-py -d wit -w stage componentize -p . app -o {file}.wasm"),
                    format!("{file}.wasm"),
                ),
                Lang::Js => (
                    "npm install && npm run build".to_string(),
                    format!("{file}.wasm"),
                ),
            };
            println!("created {}", created.display());
            println!("  build: cd {} && {build}", created.display());
            println!("  check: stagehand plugin check {wasm}");
            return Ok(ExitCode::SUCCESS);
        }
    };
    let runtime = Runtime::new(RuntimeOptions {
        max_instances: 4,
        max_memory_bytes: 64 << 20,
        cache_dir: data_dir.join("compiled"),
    })?;
    let description = describe(&runtime, &component).await?;
    println!("{}", component.display());
    println!("  sha256  {}", description.digest);
    println!("  imports");
    for import in &description.imports {
        println!("    {import}");
    }
    println!("  exports");
    for export in &description.exports {
        println!("    {export}");
    }
    outbound_report(
        &component,
        &description.imports,
        pipeline.as_deref(),
        stage.as_deref(),
    )?;
    let mut implements_one = false;
    for (world, verdict) in &description.worlds {
        match verdict {
            Ok(()) => {
                implements_one = true;
                println!("  world `{}`: ok", world.name());
            }
            Err(why) => println!("  world `{}`: no: {why}", world.name()),
        }
    }
    Ok(if implements_one {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The outbound HTTP a component could need (it imports `wasi:http/outgoing-handler`; the
/// http(s) origins written in its code and, with a pipeline, in its stage's settings) next to
/// what the pipeline grants it.
fn outbound_report(
    component: &Path,
    imports: &[String],
    pipeline: Option<&Path>,
    stage: Option<&str>,
) -> Result<()> {
    let uses_http = imports
        .iter()
        .any(|i| i.starts_with("wasi:http/outgoing-handler"));
    let bytes =
        std::fs::read(component).with_context(|| format!("cannot read {}", component.display()))?;
    // Origins in the code only matter when it can make requests, and say nothing when the
    // code is an interpreter's: its standard library is full of documentation URLs.
    let interpreter = interpreter_in(&bytes);
    let mut needed: Vec<(String, &str)> = match (uses_http, interpreter) {
        (true, None) => origins_in(&bytes)
            .into_iter()
            .map(|origin| (origin, "its code"))
            .collect(),
        _ => Vec::new(),
    };
    let mut grant = None;
    if let Some(path) = pipeline {
        let config = crate::config::PipelineConfig::load(path)?;
        let wanted = std::fs::canonicalize(component).ok();
        let same = |file: &Path| std::fs::canonicalize(file).ok() == wanted;
        let found = config
            .stages
            .iter()
            .find(|s| stage.map_or_else(|| same(&s.component), |n| s.name == n))
            .map(|s| (s.name.clone(), s.allowed_hosts.clone(), Some(&s.settings)))
            .or_else(|| {
                config
                    .handlers
                    .iter()
                    .find(|(n, h)| stage.map_or_else(|| same(&h.component), |w| *n == w))
                    .map(|(n, h)| (format!("handler {n}"), h.allowed_hosts.clone(), None))
            });
        let Some((name, allowed, settings)) = found else {
            bail!(
                "{} has no stage or handler {}",
                path.display(),
                stage.map_or_else(
                    || format!("using {}", component.display()),
                    |s| format!("`{s}`")
                )
            );
        };
        for value in settings.into_iter().flat_map(|s| s.values.values()) {
            needed.extend(
                origins_in(value.as_bytes())
                    .into_iter()
                    .map(|o| (o, "its settings")),
            );
        }
        grant = Some((name, allowed));
    }
    needed.sort();
    needed.dedup_by(|a, b| a.0 == b.0);
    println!("  outbound HTTP");
    println!(
        "    {}",
        if uses_http {
            "imports wasi:http/outgoing-handler: it can make requests, to granted hosts only"
        } else {
            "does not import wasi:http/outgoing-handler: it makes no requests"
        }
    );
    if let (true, Some(language)) = (uses_http, interpreter) {
        println!(
            "    its code is not scanned for hosts: a {language} component carries its \
             interpreter, whose own strings would show"
        );
    }
    for (origin, whence) in &needed {
        let verdict = match &grant {
            None => String::new(),
            Some((_, allowed)) => {
                let granted = origin
                    .parse::<http::Uri>()
                    .ok()
                    .and_then(|uri| crate::outbound::Destination::of(&uri).ok())
                    .is_some_and(|to| allowed.iter().any(|a| a.allows(&to)));
                if granted {
                    ": granted"
                } else {
                    ": NOT granted"
                }
                .to_string()
            }
        };
        println!("    may need {origin} (in {whence}){verdict}");
    }
    if let Some((name, allowed)) = &grant {
        let list: Vec<String> = allowed.iter().map(ToString::to_string).collect();
        println!(
            "    `{name}` is granted: {}",
            if list.is_empty() {
                "nothing".to_string()
            } else {
                list.join(", ")
            }
        );
    }
    Ok(())
}

/// The language whose interpreter a component carries, by the marks its build tool leaves.
fn interpreter_in(bytes: &[u8]) -> Option<&'static str> {
    let has = |mark: &[u8]| memchr::memmem::find(bytes, mark).is_some();
    if has(b"componentize-py") {
        Some("Python")
    } else if has(b"ComponentizeJS") || has(b"StarlingMonkey") {
        Some("JavaScript")
    } else {
        None
    }
}

/// The distinct `http://` and `https://` origins written in `bytes`, at most 32.
fn origins_in(bytes: &[u8]) -> Vec<String> {
    let mut found = std::collections::BTreeSet::new();
    for scheme in [&b"http://"[..], &b"https://"[..]] {
        for start in memchr::memmem::find_iter(bytes, scheme) {
            let host_start = start + scheme.len();
            let end = bytes[host_start..]
                .iter()
                .position(|b| !(b.is_ascii_alphanumeric() || b"-.:[]".contains(b)))
                .map_or(bytes.len(), |n| host_start + n);
            let origin = String::from_utf8_lossy(&bytes[start..end])
                .trim_end_matches([':', '.'])
                .to_string();
            if end > host_start && found.len() < 32 {
                found.insert(origin);
            }
        }
    }
    found.into_iter().collect()
}

/// A template file: its path in the new stage's directory, and its text, with `{{name}}`,
/// `{{crate}}` (the name as Rust spells it, which is also the `.wasm` file's name) and `{{jco}}`.
type TemplateFile = (&'static str, &'static str);

const RUST_TEMPLATE: [TemplateFile; 3] = [
    (
        "Cargo.toml",
        include_str!("../../templates/stage/rust/Cargo.toml.template"),
    ),
    (
        "src/lib.rs",
        include_str!("../../templates/stage/rust/src/lib.rs.template"),
    ),
    (
        "README.md",
        include_str!("../../templates/stage/rust/README.md.template"),
    ),
];

const PYTHON_TEMPLATE: [TemplateFile; 3] = [
    (
        "app.py",
        include_str!("../../templates/stage/python/app.py.template"),
    ),
    (
        "README.md",
        include_str!("../../templates/stage/python/README.md.template"),
    ),
    (
        "stagehand_sdk.py",
        include_str!("../../../plugins/python/sdk/stagehand_sdk.py"),
    ),
];

const JS_TEMPLATE: [TemplateFile; 3] = [
    (
        "app.js",
        include_str!("../../templates/stage/js/app.js.template"),
    ),
    (
        "package.json",
        include_str!("../../templates/stage/js/package.json.template"),
    ),
    (
        "README.md",
        include_str!("../../templates/stage/js/README.md.template"),
    ),
];

/// The contract every new stage carries a copy of, with the `wasi:http` WIT it imports.
const WIT: [TemplateFile; 8] = [
    (
        "wit/pipeline.wit",
        include_str!("../../../wit/pipeline.wit"),
    ),
    (
        "wit/deps/cli.wit",
        include_str!("../../../wit/deps/cli.wit"),
    ),
    (
        "wit/deps/clocks.wit",
        include_str!("../../../wit/deps/clocks.wit"),
    ),
    (
        "wit/deps/filesystem.wit",
        include_str!("../../../wit/deps/filesystem.wit"),
    ),
    (
        "wit/deps/http.wit",
        include_str!("../../../wit/deps/http.wit"),
    ),
    ("wit/deps/io.wit", include_str!("../../../wit/deps/io.wit")),
    (
        "wit/deps/random.wit",
        include_str!("../../../wit/deps/random.wit"),
    ),
    (
        "wit/deps/sockets.wit",
        include_str!("../../../wit/deps/sockets.wit"),
    ),
];

/// The jco release a new JavaScript stage builds with: the one `plugins/js/package.json` pins.
const JCO_VERSION: &str = "1.34.0";

fn new_stage(name: &str, dir: &Path, lang: Lang) -> Result<PathBuf> {
    let well_formed = name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !well_formed || name.len() > 64 {
        bail!(
            "{name:?} is not a usable name: lowercase letters, digits, `-` and `_`, starting \
             with a letter, at most 64"
        );
    }
    let root = dir.join(name);
    if root.exists() {
        bail!("{} already exists; nothing was written", root.display());
    }
    let crate_name = name.replace('-', "_");
    let files: &[TemplateFile] = match lang {
        Lang::Rust => &RUST_TEMPLATE,
        Lang::Python => &PYTHON_TEMPLATE,
        Lang::Js => &JS_TEMPLATE,
    };
    for (path, text) in files.iter().chain(&WIT) {
        let path = root.join(path);
        let text = text
            .replace("{{name}}", name)
            .replace("{{crate}}", &crate_name)
            .replace("{{jco}}", JCO_VERSION);
        std::fs::create_dir_all(path.parent().expect("template paths have a parent"))
            .with_context(|| format!("cannot create {}", root.display()))?;
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_javascript_stages_use_the_jco_the_plugins_pin() {
        let pinned = include_str!("../../../plugins/js/package.json");
        assert!(
            pinned.contains(&format!("\"@bytecodealliance/jco\": \"{JCO_VERSION}\"")),
            "plugins/js/package.json and JCO_VERSION differ"
        );
    }
}
