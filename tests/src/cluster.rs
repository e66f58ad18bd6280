//! Redis mode in tests and benchmarks: a real `redis-server` on a free loopback port, and
//! `stagehand worker` nodes.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{MockLlm, binary};

/// Debian's `redis-server` (`cargo xtask test` installs it), in memory only, on a free port;
/// killed when dropped.
pub struct RedisServer {
    child: Child,
    pub port: u16,
    /// The extra flags it was started with, for a restart.
    flags: Vec<String>,
}

impl RedisServer {
    pub fn start() -> Result<Self> {
        Self::start_with(&["--appendonly", "no"])
    }

    /// With extra `redis-server` flags, e.g. `--appendonly yes --appendfsync always`; its files
    /// go to a fresh temporary directory.
    pub fn start_with(flags: &[&str]) -> Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let flags: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
        let child = Self::spawn(port, &flags)?;
        let server = Self { child, port, flags };
        server.wait_until_up()?;
        Ok(server)
    }

    /// Kill the server (SIGKILL) and start it again on the same port with the same files: what
    /// it persisted (with `--appendonly yes`) is all that is left.
    pub fn kill_and_restart(&mut self) -> Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(self.port, &self.flags)?;
        self.wait_until_up()
    }

    fn spawn(port: u16, flags: &[String]) -> Result<Child> {
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--protected-mode", "no"])
            .args(["--dir", &std::env::temp_dir().display().to_string()])
            .args(["--appendfilename", &format!("stagehand-{port}.aof")])
            .args(["--appenddirname", &format!("stagehand-{port}")])
            .args(flags)
            .stdout(Stdio::null())
            .spawn()
            .context("cannot start redis-server (Debian package `redis-server`)")
    }

    fn wait_until_up(&self) -> Result<()> {
        let port = self.port;
        let client = redis::Client::open(self.url())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pong = client
                .get_connection()
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if pong.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("redis-server did not answer on port {port}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A connection for looking at what the nodes wrote.
    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection())
            .expect("redis-server answers")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `stagehand worker`: a node without HTTP; killed when dropped.
pub struct Worker {
    child: Child,
    /// Its consumer name in the work group.
    pub node: String,
}

impl Worker {
    /// Start a worker on `pipeline` with its own `data` dir, and wait until it takes work.
    pub fn start(
        pipeline: &Path,
        data: &Path,
        mock: &MockLlm,
        redis: &RedisServer,
        extra: &[&str],
    ) -> Result<Self> {
        let mut child = Command::new(binary("stagehand"))
            .arg("worker")
            .arg(pipeline)
            .arg("--data-dir")
            .arg(data)
            .args(["--redis", &redis.url(), "--llm-base-url", &mock.base_url()])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start stagehand worker")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
        let Some(node) = line
            .strip_prefix("worker ")
            .and_then(|l| l.split(' ').next())
        else {
            let _ = child.kill();
            bail!("stagehand worker did not say it joined: {line:?}");
        };
        Ok(Self {
            node: node.to_string(),
            child,
        })
    }

    /// The process, e.g. to kill it.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
