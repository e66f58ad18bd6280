//! The runtime against real guests: a misbehaving guest fails only its item, with an error that
//! names the stage and the reason, and the host goes on serving.

mod support;

use std::time::{Duration, Instant};

use stagehand::config::PipelineConfig;
use stagehand::jobs::ItemLimits;
use stagehand::model::ItemStatus;
use stagehand::runtime::{CacheOutcome, Runtime, RuntimeOptions, StageComponent};
use support::{Fixture, plugin, run_one, run_one_with};
use tokio_util::sync::CancellationToken;

fn hostile(limits: &str) -> String {
    format!(
        "[[stage]]\nname = \"hostile\"\ncomponent = \"{}\"\n{limits}\n",
        plugin("hostile")
    )
}

async fn failure_of(limits: &str, item: &str) -> (String, String) {
    let fixture = Fixture::new();
    // One try: these tests are about how a single try fails.
    let pipeline = fixture
        .load(fixture.config(&hostile(&format!("max_attempts = 1\n{limits}"))))
        .await;
    let result = run_one(&pipeline, item, &CancellationToken::new()).await;
    assert_eq!(
        result.status,
        ItemStatus::Failed,
        "{item} should fail: {result:?}"
    );
    let error = result.error.expect("a failed item has an error");
    assert_eq!(error.stage, "hostile");
    (error.kind, error.message)
}

#[tokio::test]
async fn a_trap_fails_the_item_with_the_guests_panic_message() {
    let (kind, message) = failure_of("", r#"{"do":"trap"}"#).await;
    assert_eq!(kind, "trap");
    assert!(
        message.starts_with("stage `hostile`: the guest trapped"),
        "{message}"
    );
    assert!(
        message.contains("hostile stage asked to trap"),
        "the panic message is kept: {message}"
    );
}

#[tokio::test]
async fn an_infinite_loop_is_stopped_at_its_cpu_budget() {
    let started = Instant::now();
    let (kind, message) = failure_of("cpu_ms = 200", r#"{"do":"loop"}"#).await;
    assert_eq!(kind, "cpu_budget");
    assert!(message.contains("CPU budget of 200ms"), "{message}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "stopped long after its budget: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_memory_bomb_is_stopped_at_its_cap() {
    let (kind, message) = failure_of("memory_mib = 16", r#"{"do":"alloc"}"#).await;
    assert_eq!(kind, "memory_cap");
    assert!(message.contains("memory cap of 16 MiB"), "{message}");
}

#[tokio::test]
async fn a_wall_clock_timeout_covers_the_whole_stage() {
    let (kind, message) = failure_of("cpu_ms = 60000\ntimeout_ms = 300", r#"{"do":"loop"}"#).await;
    assert_eq!(kind, "timeout");
    assert!(message.contains("timed out after 300ms"), "{message}");
}

#[tokio::test]
async fn outputs_must_be_json_within_the_size_limit() {
    let (kind, message) =
        failure_of("max_output_kib = 1", r#"{"do":"big-output","size":5000}"#).await;
    assert_eq!(kind, "invalid_output");
    assert!(
        message.contains("5000 bytes, over the limit of 1024 bytes"),
        "{message}"
    );
    // "xxx" is not JSON.
    let (kind, _) = failure_of("", r#"{"do":"big-output","size":3}"#).await;
    assert_eq!(kind, "invalid_output");
}

/// The hostile stage with `retry` settings, run on `item` with `limits`.
async fn tries_of(retry: &str, item: &str, limits: ItemLimits) -> stagehand::model::ItemResult {
    let fixture = Fixture::new();
    let pipeline = fixture.load(fixture.config(&hostile(retry))).await;
    run_one_with(&pipeline, item, limits, &CancellationToken::new()).await
}

#[tokio::test]
async fn a_flaky_stage_succeeds_on_a_later_try() {
    let result = tries_of(
        "max_attempts = 3\nbackoff_ms = 10",
        r#"{"do":"flaky","until":3}"#,
        ItemLimits::default(),
    )
    .await;
    assert_eq!(result.status, ItemStatus::Succeeded, "{result:?}");
    assert_eq!(result.stages[0].attempt, 3);
    assert_eq!(
        result.output.unwrap().get(),
        r#"{"hostile":{"succeeded_at":3}}"#
    );
}

#[tokio::test]
async fn retries_stop_at_max_attempts_and_record_every_try() {
    let result = tries_of(
        "max_attempts = 4\nbackoff_ms = 10",
        r#"{"do":"retryable"}"#,
        ItemLimits::default(),
    )
    .await;
    let error = result.error.unwrap();
    let tries: Vec<(u32, &str)> = error
        .attempts
        .iter()
        .map(|a| (a.attempt, a.kind.as_str()))
        .collect();
    assert_eq!(
        tries,
        [
            (1, "retryable"),
            (2, "retryable"),
            (3, "retryable"),
            (4, "retryable")
        ]
    );
    // Back-off doubles: at least 5, 10 and 20 ms between tries (half of each is jitter).
    let at: Vec<u64> = error.attempts.iter().map(|a| a.at).collect();
    assert!(at.windows(2).all(|w| w[1] >= w[0]), "{at:?}");
    assert!(at[3] - at[0] >= 35, "{at:?}");
}

#[tokio::test]
async fn fatal_errors_and_invalid_outputs_are_not_retried() {
    for item in [
        r#"{"do":"fatal"}"#,
        r#"{"do":"big-output","size":3}"#,
        r#"{"do":"trap"}"#,
    ] {
        let result = tries_of(
            "max_attempts = 3\nbackoff_ms = 10",
            item,
            ItemLimits::default(),
        )
        .await;
        let error = result.error.unwrap();
        assert_eq!(error.attempts.len(), 1, "{item}: {error:?}");
        assert!(!error.retryable, "{item}");
    }
}

#[tokio::test]
async fn a_timed_out_try_is_retried() {
    let result = tries_of(
        "max_attempts = 2\nbackoff_ms = 10\ncpu_ms = 60000\ntimeout_ms = 100",
        r#"{"do":"loop"}"#,
        ItemLimits::default(),
    )
    .await;
    let error = result.error.unwrap();
    assert_eq!(error.kind, "timeout");
    assert_eq!(error.attempts.len(), 2, "{error:?}");
}

#[tokio::test]
async fn the_item_timeout_bounds_every_try_and_the_back_off() {
    let started = Instant::now();
    let result = tries_of(
        "max_attempts = 1000\nbackoff_ms = 20\nmax_backoff_ms = 40",
        r#"{"do":"retryable"}"#,
        ItemLimits {
            item_timeout: Some(Duration::from_millis(300)),
            ..ItemLimits::default()
        },
    )
    .await;
    let error = result.error.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(
        error.attempts.len() > 2 && error.attempts.len() < 1000,
        "{error:?}"
    );
    // The last try was not the one cut short by the item's limit: it gave up before
    // starting a wait that would pass the deadline, with the guest's own error.
    assert_eq!(error.kind, "retryable", "{error:?}");

    // A try that runs into the item's deadline is the item's timeout.
    let result = tries_of(
        "cpu_ms = 60000\ntimeout_ms = 5000",
        r#"{"do":"loop"}"#,
        ItemLimits {
            item_timeout: Some(Duration::from_millis(200)),
            ..ItemLimits::default()
        },
    )
    .await;
    let error = result.error.unwrap();
    assert_eq!(error.kind, "timeout");
    assert!(error.message.contains("200ms"), "{}", error.message);
}

#[tokio::test]
async fn guest_errors_keep_their_retryability() {
    let (kind, message) = failure_of("", r#"{"do":"retryable"}"#).await;
    assert_eq!(
        (kind.as_str(), message.as_str()),
        (
            "retryable",
            "stage `hostile`: the guest returned a retryable error: asked to fail, retryably"
        )
    );
    let (kind, _) = failure_of("", r#"{"do":"fatal"}"#).await;
    assert_eq!(kind, "fatal");
    let (kind, message) = failure_of("", r#"{"nothing":"here"}"#).await;
    assert_eq!(kind, "fatal");
    assert!(
        message.contains("invalid input: missing field `do`"),
        "{message}"
    );
}

#[tokio::test]
async fn the_host_keeps_serving_after_a_guest_misbehaves() {
    let fixture = Fixture::new();
    let pipeline = fixture
        .load(fixture.config(&hostile("cpu_ms = 100\nmemory_mib = 16")))
        .await;
    let cancel = CancellationToken::new();
    for bad in [r#"{"do":"trap"}"#, r#"{"do":"loop"}"#, r#"{"do":"alloc"}"#] {
        let result = run_one(&pipeline, bad, &cancel).await;
        assert_eq!(result.status, ItemStatus::Failed);
        let good = run_one(&pipeline, r#"{"do":"echo"}"#, &cancel).await;
        assert_eq!(good.status, ItemStatus::Succeeded, "after {bad}: {good:?}");
        assert_eq!(good.output.unwrap().get(), r#"{"hostile":{"echo":"echo"}}"#);
    }
}

#[tokio::test]
async fn cancelling_interrupts_a_running_guest() {
    let fixture = Fixture::new();
    let pipeline = fixture
        .load(fixture.config(&hostile("cpu_ms = 60000")))
        .await;
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        trigger.cancel();
    });
    let started = Instant::now();
    let result = run_one(&pipeline, r#"{"do":"loop"}"#, &cancel).await;
    assert_eq!(result.error.expect("cancelled").kind, "cancelled");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

/// Four guests looping on the CPU at once all stop when their token is cancelled, well before
/// their CPU budget (60 s) or wall clock (300 s) would stop them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_stops_every_looping_guest() {
    let fixture = Fixture::new();
    let pipeline = fixture
        .load(fixture.config(&hostile("cpu_ms = 60000")))
        .await;
    let cancel = CancellationToken::new();
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let (pipeline, cancel) = (pipeline.clone(), cancel.clone());
            tokio::spawn(async move {
                let result = run_one(&pipeline, r#"{"do":"loop"}"#, &cancel).await;
                (result, Instant::now())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cancelled_at = Instant::now();
    cancel.cancel();
    let mut last_stopped = cancelled_at;
    for run in runs {
        let (result, stopped) = run.await.unwrap();
        assert_eq!(result.error.expect("cancelled").kind, "cancelled");
        last_stopped = last_stopped.max(stopped);
    }
    let took = last_stopped - cancelled_at;
    eprintln!("cancel to the last of 4 looping guests stopped: {took:?}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[tokio::test]
async fn guests_see_no_environment_files_sockets_or_clock() {
    let fixture = Fixture::new();
    let pipeline = fixture.load(fixture.config(&hostile(""))).await;
    let cancel = CancellationToken::new();
    let env = run_one(&pipeline, r#"{"do":"env"}"#, &cancel).await;
    assert_eq!(
        env.output.expect("runs").get(),
        r#"{"hostile":{"home":null,"vars":0}}"#
    );
    let file = run_one(&pipeline, r#"{"do":"file"}"#, &cancel).await;
    assert_eq!(
        file.status,
        ItemStatus::Succeeded,
        "reading a host file must fail inside the guest: {file:?}"
    );

    // A socket: the listener is there, the guest may not reach it.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let item = format!(
        r#"{{"do":"socket","target":"{}"}}"#,
        listener.local_addr().unwrap()
    );
    let socket = run_one(&pipeline, &item, &cancel).await;
    assert_eq!(
        socket.status,
        ItemStatus::Succeeded,
        "connecting must fail inside the guest: {socket:?}"
    );
    let error: serde_json::Value = serde_json::from_str(socket.output.unwrap().get()).unwrap();
    assert!(error["hostile"]["socket_error"].is_string(), "{error}");
    assert_eq!(
        listener.accept().unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock,
        "the guest reached the listener"
    );

    // The clock: frozen at the job's creation, and no time passes on the monotonic one.
    let before = stagehand::model::now_ms();
    let clock = run_one(&pipeline, r#"{"do":"clock"}"#, &cancel).await;
    let after = stagehand::model::now_ms();
    let seen: serde_json::Value = serde_json::from_str(clock.output.unwrap().get()).unwrap();
    let (wall, elapsed) = (&seen["hostile"]["wall_ms"], &seen["hostile"]["elapsed_ns"]);
    assert_eq!(wall[0], wall[1], "the wall clock moved: {seen}");
    assert!(
        (before..=after).contains(&wall[0].as_u64().unwrap()),
        "{seen}"
    );
    assert_eq!(elapsed, 0, "{seen}");
}

#[tokio::test]
async fn a_component_of_the_wrong_world_is_refused_at_load() {
    let fixture = Fixture::new();
    let config = fixture.config(&format!(
        "[[stage]]\nname = \"oops\"\ncomponent = \"{}\"\n",
        plugin("character_match")
    ));
    let store = stagehand::store::Store::open(&fixture.dir.path().join("store")).unwrap();
    let resources =
        stagehand::pipeline::NodeResources::for_one(&config, fixture.dir.path(), store).unwrap();
    let error = match stagehand::pipeline::Pipeline::load(config, String::new(), &resources).await {
        Ok(_) => panic!("a handler is not a stage"),
        Err(e) => format!("{e:#}"),
    };
    assert!(error.contains("stage `oops`"), "{error}");
    assert!(error.contains("does not implement world `stage` of stagehand:pipeline@0.2.0: missing export `run` (it exports: handle)"), "{error}");
}

#[tokio::test]
async fn a_file_that_is_not_a_component_is_refused() {
    let fixture = Fixture::new();
    let runtime = Runtime::new(RuntimeOptions {
        max_instances: 4,
        max_memory_bytes: 16 << 20,
        cache_dir: fixture.dir.path().join("c"),
    })
    .unwrap();
    let error = StageComponent::from_bytes(&runtime, "x", b"hello".to_vec())
        .await
        .err()
        .expect("refused");
    assert_eq!(format!("{error:#}"), "not a WebAssembly file");
}

#[tokio::test]
async fn compiled_components_are_reused_after_a_restart() {
    let fixture = Fixture::new();
    let options = RuntimeOptions {
        max_instances: 4,
        max_memory_bytes: 64 << 20,
        cache_dir: fixture.dir.path().join("compiled"),
    };
    let bytes = std::fs::read(plugin("passthrough")).unwrap();
    let first =
        StageComponent::from_bytes(&Runtime::new(options.clone()).unwrap(), "p", bytes.clone())
            .await
            .unwrap();
    assert!(
        matches!(first.meta.cache, CacheOutcome::Compiled(_)),
        "{:?}",
        first.meta.cache
    );
    // A new runtime is what a restarted process has.
    let second = StageComponent::from_bytes(&Runtime::new(options).unwrap(), "p", bytes)
        .await
        .unwrap();
    assert_eq!(second.meta.cache, CacheOutcome::Hit);
    assert_eq!(first.meta.digest, second.meta.digest);
}

#[test]
fn pipeline_file_mistakes_name_the_key_and_line() {
    let fixture = Fixture::new();
    let base = "name = \"t\"\n[llm]\nbase_url = \"http://x/v1\"\nmodel = \"m\"\n";
    let error = |body: &str| {
        let path = fixture.write("p.toml", &format!("{base}{body}"));
        format!("{:#}", PipelineConfig::load(&path).expect_err("invalid"))
    };
    let unknown = error("[[stage]]\nname = \"a\"\ncomponent = \"x.wasm\"\nmemroy_mib = 3\n");
    assert!(
        unknown.contains("line 8") && unknown.contains("unknown field `memroy_mib`"),
        "{unknown}"
    );
    let missing = error("[[stage]]\nname = \"a\"\ncomponent = \"nope.wasm\"\n");
    assert!(
        missing.contains("p.toml:7: `component`: no such file"),
        "{missing}"
    );
    let wasm = fixture.write("a.wasm", "");
    let twice = error(&format!(
        "[[stage]]\nname = \"a\"\ncomponent = \"{0}\"\n[[stage]]\nname = \"a\"\ncomponent = \"{0}\"\n",
        wasm.display()
    ));
    assert!(
        twice.contains("p.toml:9: stage `a` is defined twice"),
        "{twice}"
    );
    let bad_name = error(&format!(
        "[[stage]]\nname = \"Big Stage\"\ncomponent = \"{}\"\n",
        wasm.display()
    ));
    assert!(
        bad_name.contains("p.toml:6: stage name \"Big Stage\" must be"),
        "{bad_name}"
    );
    let none = error("");
    assert!(none.contains("the pipeline has no `[[stage]]`"), "{none}");
    let stage = format!(
        "[[stage]]\nname = \"a\"\ncomponent = \"{}\"\n",
        wasm.display()
    );
    let zero = error(&format!(
        "[llm.models.\"m\"]\nrequests_per_minute = 0\n{stage}"
    ));
    assert!(
        zero.contains("`[llm]`: a limit of model \"m\" is 0"),
        "{zero}"
    );
    let typo = error(&format!("[llm.models.\"m\"]\nrpm = 5\n{stage}"));
    assert!(typo.contains("unknown field `rpm`"), "{typo}");
    let pool = error(&format!("[run]\nmax_stage_calls = 10000\n{stage}"));
    assert!(
        pool.contains("`[run] max_stage_calls` is at most 2048, not 10000"),
        "{pool}"
    );
    let evict = error(&format!("[run]\nevict_after_ms = 60001\n{stage}"));
    assert!(
        evict.contains("`[run] evict_after_ms` is at most 60000, not 60001"),
        "{evict}"
    );
    let no_memory = error(&format!("[run]\nmemory_budget_mib = 0\n{stage}"));
    assert!(
        no_memory.contains("`[run] memory_budget_mib` is 1 to 1048576, not 0"),
        "{no_memory}"
    );
    // 1 TiB is within the bounds, and more than this machine (or CI's) has.
    let too_much = error(&format!("[run]\nmemory_budget_mib = 1048576\n{stage}"));
    assert!(
        too_much.contains("`[run] memory_budget_mib` (1048576) is more than this machine's memory"),
        "{too_much}"
    );
}

/// Providers: `[llm]` is the one named `default`; `[providers.NAME]` add more; a stage names
/// its route or takes `[llm] providers`; every mistake names what is wrong.
#[test]
fn providers_and_routes_are_read_from_the_pipeline_file() {
    let fixture = Fixture::new();
    let wasm = fixture.write("a.wasm", "");
    let stage = |extra: &str| {
        format!(
            "[[stage]]\nname = \"a\"\ncomponent = \"{}\"\n{extra}",
            wasm.display()
        )
    };
    let load = |text: &str| PipelineConfig::load(&fixture.write("p.toml", text));
    let error = |text: &str| format!("{:#}", load(text).expect_err("invalid"));
    let two = "[providers.local]\nbase_url = \"http://l/v1\"\nmodel = \"q\"\n\
               [providers.hosted]\nbase_url = \"https://h/v1\"\nmodel = \"g\"\n\
               api_key_env = \"HOME\"\nmodel_map = { \"g-big\" = \"g\" }\n";

    let routed = load(&format!(
        "name = \"t\"\n[llm]\nproviders = [\"local\", \"hosted\"]\n{two}{}",
        stage("")
    ))
    .unwrap();
    assert_eq!(routed.llm.route, ["local", "hosted"]);
    assert_eq!(routed.stages[0].providers, ["local", "hosted"]);
    assert_eq!(routed.llm.providers["hosted"].keys[0].env, "HOME");
    assert_eq!(routed.llm.providers["hosted"].model_map["g-big"], "g");

    let own = load(&format!(
        "name = \"t\"\n{two}{}",
        stage("providers = [\"hosted\"]\n")
    ))
    .unwrap();
    assert_eq!(own.stages[0].providers, ["hosted"]);

    let no_route = error(&format!("name = \"t\"\n{two}{}", stage("")));
    assert!(
        no_route.contains(
            "stage `a`: the pipeline has several providers (hosted, local) and no default"
        ),
        "{no_route}"
    );
    let unknown = error(&format!(
        "name = \"t\"\n{two}{}",
        stage("providers = [\"nope\"]\n")
    ));
    assert!(
        unknown.contains("p.toml:13: stage `a`: no provider `nope` (there are: hosted, local)"),
        "{unknown}"
    );
    let both_keys = error(&format!(
        "name = \"t\"\n[providers.x]\nbase_url = \"http://x\"\nmodel = \"m\"\n\
         api_key_env = \"A\"\nkeys = [{{ env = \"B\" }}]\n{}",
        stage("")
    ));
    assert!(
        both_keys.contains("`[providers.x]`: give `api_key_env` (one key) or `keys`"),
        "{both_keys}"
    );
    let twice = error(&format!(
        "name = \"t\"\n[llm]\nbase_url = \"http://x\"\nmodel = \"m\"\n\
         [providers.default]\nbase_url = \"http://y\"\nmodel = \"m\"\n{}",
        stage("")
    ));
    assert!(
        twice.contains("and so does `[providers.default]`"),
        "{twice}"
    );
    let none = error(&format!("name = \"t\"\n{}", stage("")));
    assert!(none.contains("no LLM provider"), "{none}");
    let zero_key = error(&format!(
        "name = \"t\"\n[providers.x]\nbase_url = \"http://x\"\nmodel = \"m\"\n\
         keys = [{{ env = \"B\", requests_per_minute = 0 }}]\n{}",
        stage("")
    ));
    assert!(zero_key.contains("a limit of key $B is 0"), "{zero_key}");
    let scheme = error(&format!(
        "name = \"t\"\n[llm]\nbase_url = \"localhost:8080\"\nmodel = \"m\"\n{}",
        stage("")
    ));
    assert!(
        scheme.contains("must start with http:// or https://"),
        "{scheme}"
    );
}

/// Budgets and job limits come from `[defaults.budgets]`, a stage's own `budgets` and
/// `[limits]`; a typo among them names the key, and `[run] concurrency` must fit the limit.
#[test]
fn budgets_and_limits_are_read_from_the_pipeline_file() {
    let fixture = Fixture::new();
    let wasm = fixture.write("a.wasm", "");
    let base = "name = \"t\"\n[llm]\nbase_url = \"http://x/v1\"\nmodel = \"m\"\n";
    let stages = format!(
        "[[stage]]\nname = \"a\"\ncomponent = \"{0}\"\n[stage.budgets]\nllm_calls = 2\n\
         [[stage]]\nname = \"b\"\ncomponent = \"{0}\"\nbudgets = {{ emit_kib = 1 }}\n",
        wasm.display()
    );
    let text = format!(
        "{base}[defaults.budgets]\nllm_calls = 5\nlog_lines = 7\n[limits]\nmax_items = 10\n{stages}"
    );
    let config = PipelineConfig::load(&fixture.write("p.toml", &text)).unwrap();
    let (a, b) = (
        &config.stages[0].limits.budgets,
        &config.stages[1].limits.budgets,
    );
    assert_eq!((a.llm_calls, a.log_lines), (2, 7));
    assert_eq!((b.llm_calls, b.emit_bytes, b.emits), (5, 1024, 64));
    assert_eq!(config.limits.max_items, 10);
    assert_eq!(config.limits.max_concurrency, 1024);

    let error = |body: &str| {
        let path = fixture.write("q.toml", &format!("{base}{body}{stages}"));
        format!("{:#}", PipelineConfig::load(&path).expect_err("invalid"))
    };
    let typo = error("[defaults.budgets]\nllm_call = 3\n");
    assert!(typo.contains("unknown field `llm_call`"), "{typo}");
    let over = error("[run]\nconcurrency = 2000\n");
    assert!(
        over.contains("`[run] concurrency` (2000) is over `[limits] max_concurrency` (1024)"),
        "{over}"
    );
}

#[tokio::test]
async fn a_component_built_against_another_wit_version_is_told_to_rebuild() {
    let fixture = Fixture::new();
    let runtime = Runtime::new(RuntimeOptions {
        max_instances: 4,
        max_memory_bytes: 16 << 20,
        cache_dir: fixture.dir.path().join("c"),
    })
    .unwrap();
    let old = wat::parse_str(r#"(component (import "stagehand:pipeline/log@0.1.0" (instance)))"#)
        .unwrap();
    let error = StageComponent::from_bytes(&runtime, "x", old)
        .await
        .err()
        .expect("refused");
    let error = format!("{error:#}");
    assert!(
        error.contains(
            "was built against stagehand:pipeline@0.1.0; this host speaks stagehand:pipeline@0.2.0"
        ),
        "{error}"
    );
}

/// The stage's call for item 0 of one fixed job, try `attempt`.
fn hostile_call(
    pipeline: &stagehand::pipeline::Pipeline,
    attempt: u32,
) -> stagehand::runtime::Call {
    let context = stagehand::runtime::bindings::types::Context {
        job_id: "0190a5b2-7c3d-7e4f-8a9b-0c1d2e3f4a5b".into(),
        item_id: "5d3c0a9e-1b2f-5c4d-8e7f-6a5b4c3d2e1f".into(),
        item_index: 0,
        attempt,
        stage: "hostile".into(),
    };
    pipeline.stage_call(context, pipeline.stages[0].config.limits)
}

async fn hostile_run(
    pipeline: &stagehand::pipeline::Pipeline,
    call: stagehand::runtime::Call,
    item: &str,
) -> (
    Result<String, stagehand::runtime::Failure>,
    stagehand::runtime::CallStats,
) {
    let input = format!(r#"{{"item":{item},"stages":{{}}}}"#);
    pipeline.stages[0].current().run(call, &input).await
}

#[tokio::test]
async fn random_bytes_are_the_same_for_a_try_and_new_for_the_next() {
    let fixture = Fixture::new();
    let pipeline = fixture.load(fixture.config(&hostile(""))).await;
    let random = |attempt| {
        let pipeline = pipeline.clone();
        async move {
            let (output, _) = hostile_run(
                &pipeline,
                hostile_call(&pipeline, attempt),
                r#"{"do":"random"}"#,
            )
            .await;
            output.expect("runs")
        }
    };
    let (first, again, next_try) = (random(1).await, random(1).await, random(2).await);
    assert_eq!(first, again, "one try run twice must see the same bytes");
    assert_ne!(first, next_try, "the next try sees other bytes");
}

/// What hostile's `llm-once` asks for, with a prompt of `size` bytes.
fn llm_once_request(size: usize) -> stagehand::runtime::bindings::llm::ChatRequest {
    use stagehand::runtime::bindings::llm::{ChatRequest, ContentPart, Message, Role};
    ChatRequest {
        model: None,
        messages: vec![Message {
            role: Role::User,
            content: vec![ContentPart::Text("x".repeat(size))],
        }],
        max_tokens: Some(16),
        temperature: None,
        json_mode: false,
    }
}

fn journaled_answer(
    request: &stagehand::runtime::bindings::llm::ChatRequest,
    tokens: u32,
) -> (
    stagehand::capabilities::Request,
    stagehand::capabilities::Answer,
) {
    use stagehand::capabilities::{Answer, CallKind, Request};
    use stagehand::runtime::bindings::llm::{ChatResponse, FinishReason, Usage};
    let response = ChatResponse {
        text: "from the journal".into(),
        model: "m".into(),
        usage: Usage {
            prompt_tokens: tokens,
            completion_tokens: 1,
            estimated: false,
        },
        finish_reason: FinishReason::Stop,
        provider: "default".into(),
    };
    (
        Request::new(CallKind::Chat, request),
        Answer::Llm(Ok(response)),
    )
}

#[tokio::test]
async fn a_journaled_answer_is_replayed_without_asking_the_provider() {
    let fixture = Fixture::new();
    // The fixture's provider points at a closed port: only the journal can answer.
    let pipeline = fixture
        .load(fixture.config(&hostile("max_attempts = 1")))
        .await;
    let call = stagehand::runtime::Call {
        journal: stagehand::capabilities::Journal::with_answers([journaled_answer(
            &llm_once_request(5),
            41,
        )]),
        ..hostile_call(&pipeline, 1)
    };
    let (output, stats) = hostile_run(&pipeline, call, r#"{"do":"llm-once","size":5}"#).await;
    assert_eq!(
        output.expect("answered from the journal"),
        r#"{"tokens":42}"#
    );
    assert!(stats.llm.is_empty(), "no request went out: {:?}", stats.llm);

    // Without the journal the same call goes to the provider, and fails there.
    let (output, stats) = hostile_run(
        &pipeline,
        hostile_call(&pipeline, 1),
        r#"{"do":"llm-once","size":5}"#,
    )
    .await;
    assert!(output.is_err(), "{output:?}");
    assert_eq!(stats.llm.len(), 1);
}

#[tokio::test]
async fn a_guest_asking_for_another_call_than_its_journal_holds_diverged() {
    let fixture = Fixture::new();
    let pipeline = fixture
        .load(fixture.config(&hostile("max_attempts = 1")))
        .await;
    let diverged = |journal: Vec<_>, item: &'static str| {
        let pipeline = pipeline.clone();
        async move {
            let call = stagehand::runtime::Call {
                journal: stagehand::capabilities::Journal::with_answers(journal),
                ..hostile_call(&pipeline, 1)
            };
            let (output, stats) = hostile_run(&pipeline, call, item).await;
            let failure = output.expect_err("diverged");
            assert_eq!(failure.kind().as_str(), "diverged", "{failure}");
            assert!(!failure.retryable());
            assert!(stats.llm.is_empty(), "nothing went out: {:?}", stats.llm);
            failure.to_string()
        }
    };
    // Another prompt than the journaled one.
    let other = diverged(
        vec![journaled_answer(&llm_once_request(5), 1)],
        r#"{"do":"llm-once","size":6}"#,
    )
    .await;
    assert!(
        other.contains("host call 1 is `llm.chat` with other arguments than before"),
        "{other}"
    );
    // The same first call, then the guest ends where its journal holds a second one.
    let early = diverged(
        vec![
            journaled_answer(&llm_once_request(5), 1),
            journaled_answer(&llm_once_request(7), 1),
        ],
        r#"{"do":"llm-once","size":5}"#,
    )
    .await;
    assert!(
        early.contains("ended before host call 2 (`llm.chat`)"),
        "{early}"
    );
}

/// Guests that share one thread wait for each other; that wait is not their CPU. Sixteen guests
/// needing ~150 ms each run interleaved on one thread for ~2 s of wall clock: charged by wall
/// clock, every one would pass its 1 s budget.
#[tokio::test]
async fn guests_waiting_for_the_thread_are_not_charged_for_it() {
    let fixture = Fixture::new();
    let pipeline = fixture
        .load(fixture.config(&hostile("cpu_ms = 1000\nmax_attempts = 1")))
        .await;
    let runs = (0..16).map(|_| {
        hostile_run(
            &pipeline,
            hostile_call(&pipeline, 1),
            r#"{"do":"spin","size":150}"#,
        )
    });
    let started = Instant::now();
    let outcomes = futures::future::join_all(runs).await;
    eprintln!("16 spinning guests on one thread: {:?}", started.elapsed());
    for (output, stats) in outcomes {
        output.expect("within its CPU budget");
        assert!(stats.cpu < Duration::from_millis(1000), "{:?}", stats.cpu);
        assert!(stats.cpu > Duration::ZERO);
    }
}
