//! Restart is always safe: a store holding jobs that cannot run (options past the limits, as a
//! client once crash-looped a server with; options of another version; another pipeline's job;
//! a record that is not JSON) and a result that no reader could render. The real server starts
//! on it, serves, fails each such job once with its reason, shows the bad result as an error
//! entry beside the good one, and starts again just as well.

mod support;

use serde_json::json;
use stagehand::model::{ItemResult, ItemStatus, JobOptions, JobRecord, JobState};
use stagehand::store::Store;
use stagehand_tests::{client, get_json, job_results, job_status, serve, wait_for_job};
use uuid::Uuid;

fn pipeline(dir: &std::path::Path) -> std::path::PathBuf {
    let text = format!(
        "name = \"restart\"\n[llm]\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"none\"\n\
         [[stage]]\nname = \"hostile\"\ncomponent = \"{}\"\n",
        support::plugin("hostile")
    );
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Jobs written straight into the store, as an older or a careless version would have.
struct Planted {
    huge_concurrency: Uuid,
    other_pipeline: Uuid,
    future_option: Uuid,
    not_json: Uuid,
    healthy: Uuid,
    deep_result: Uuid,
}

fn plant(data: &std::path::Path) -> Planted {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let store = Store::open(&data.join("store")).unwrap();
        let echo = || vec![Ok(br#"{"do":"echo"}"#.to_vec())];
        let running = |pipeline: &str, options: JobOptions| {
            let mut job = JobRecord::new(pipeline);
            job.options = options;
            job
        };
        let huge = running(
            "restart",
            JobOptions {
                concurrency: Some(4_294_967_296),
                ..JobOptions::default()
            },
        );
        let huge = store.create_job(huge, echo()).await.unwrap().id;
        let other = running("another", JobOptions::default());
        let other = store.create_job(other, echo()).await.unwrap().id;
        let healthy = running("restart", JobOptions::default());
        let healthy = store.create_job(healthy, echo()).await.unwrap().id;

        let jobs = store.tree("jobs").unwrap();
        let future = running("restart", JobOptions::default());
        let future_id = future.id;
        let mut record = serde_json::to_value(&future).unwrap();
        record["options"] = json!({ "concurrency": 2, "priority": "high" });
        store.create_job(future, echo()).await.unwrap();
        jobs.insert(future_id.as_bytes(), serde_json::to_vec(&record).unwrap())
            .unwrap();
        let not_json = Uuid::now_v7();
        jobs.insert(not_json.as_bytes(), b"\x00garbage".to_vec())
            .unwrap();

        // A finished job whose first result has an output 200 levels deep (stored before
        // outputs were bounded) and whose second is fine.
        let mut done = JobRecord::new("restart");
        done.state = JobState::Completed;
        let done = store
            .create_job(done, vec![Ok(b"1".to_vec()), Ok(b"2".to_vec())])
            .await
            .unwrap();
        for (index, output) in [
            (0, format!("{}{}", "[".repeat(200), "]".repeat(200))),
            (1, r#"{"hostile":{"ok":true}}"#.to_string()),
        ] {
            let result = ItemResult {
                index,
                item_id: done.item_id(index),
                status: ItemStatus::Succeeded,
                output: Some(serde_json::value::RawValue::from_string(output).unwrap()),
                error: None,
                stages: Vec::new(),
                finished_at: 1,
                revision: String::new(),
            };
            store.put_result(done.id, &result).unwrap();
        }
        store.flush().await.unwrap();
        Planted {
            huge_concurrency: huge,
            other_pipeline: other,
            future_option: future_id,
            not_json,
            healthy,
            deep_result: done.id,
        }
    })
}

fn failure_of(server: &stagehand_tests::Server, job: Uuid) -> String {
    let status = job_status(server, &job.to_string());
    assert_eq!(status["state"], "failed", "{status}");
    status["error"].as_str().unwrap().to_string()
}

#[test]
fn a_store_of_jobs_that_cannot_run_starts_serves_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let planted = plant(&data);
    let pipeline = pipeline(dir.path());

    for start in 0..2 {
        let server = serve(&pipeline, &data, None, &[]);
        let reason = failure_of(&server, planted.huge_concurrency);
        assert!(
            reason.contains("`options.concurrency` is 4294967296; it must be 1 to 1024"),
            "{reason}"
        );
        let reason = failure_of(&server, planted.other_pipeline);
        assert!(reason.contains("pipeline `another`"), "{reason}");
        let reason = failure_of(&server, planted.future_option);
        assert!(reason.contains("unknown field `priority`"), "{reason}");
        let reason = failure_of(&server, planted.not_json);
        assert!(
            reason.contains("the stored job record cannot be read"),
            "{reason}"
        );
        let healthy = wait_for_job(&server, &planted.healthy.to_string());
        assert_eq!(
            (healthy["state"].as_str(), healthy["succeeded"].as_u64()),
            (Some("completed"), Some(1))
        );

        // The bad job's log ends with its reason, once however often the server starts.
        let events = client()
            .get(server.url(&format!("/v1/jobs/{}/events", planted.huge_concurrency)))
            .send()
            .unwrap()
            .text()
            .unwrap();
        assert_eq!(
            events.matches("event: job.failed").count(),
            1,
            "start {start}: {events}"
        );

        // The unreadable result is an error entry; the rest of its page is served.
        let results = job_results(&server, &planted.deep_result.to_string());
        assert_eq!(results.len(), 2);
        assert_eq!(results[0]["error"]["kind"], "unreadable", "{}", results[0]);
        let message = results[0]["error"]["message"].as_str().unwrap();
        assert!(message.contains("nests 200 levels deep"), "{message}");
        assert_eq!(results[1]["output"]["hostile"]["ok"], true);

        let listed = get_json(&server, "/v1/jobs?state=failed");
        assert_eq!(listed["jobs"].as_array().unwrap().len(), 4, "{listed}");
        // Dropping the server kills it (SIGKILL); the next round starts on the same store.
    }
}
