//! The store under concurrent use, as a burst of submits uses it.

use std::time::Duration;

use stagehand::backend::embedded::EventLog;
use stagehand::events::Event;
use stagehand::events::view::{Coalescing, JobView};
use stagehand::model::JobRecord;
use stagehand::store::Store;

/// Many jobs created at once (batched writes, a flush each) while their event logs are read and
/// appended: every flush returns. sled 0.34's own `flush_async` deadlocked here.
#[test]
fn concurrent_submits_all_become_durable() {
    // A deadlock blocks the runtime's threads, so the watchdog lives outside the runtime.
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(burst_of_submits());
        let _ = done.send(());
    });
    finished
        .recv_timeout(Duration::from_secs(60))
        .expect("1,000 concurrent submits finish (no flush deadlock)");
}

async fn burst_of_submits() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let events = EventLog::new(&store).unwrap();
    let submits: Vec<_> = (0..1000)
        .map(|i| {
            let (store, events) = (store.clone(), events.clone());
            tokio::spawn(async move {
                let items =
                    (0..3).map(move |n| Ok(format!("{{\"n\": {n}, \"job\": {i}}}").into_bytes()));
                let job = store.create_job(JobRecord::new("burst"), items).await?;
                events.append(job.id, &Event::JobStarted { total: job.total })?;
                store.flush().await?;
                anyhow::Ok(job.id)
            })
        })
        .collect();
    let all = async {
        let mut ids = Vec::new();
        for submit in submits {
            ids.push(submit.await.unwrap().unwrap());
        }
        ids
    };
    let ids = all.await;
    for id in ids {
        assert_eq!(store.job(id).unwrap().unwrap().total, 3);
        assert_eq!(store.items(id).count(), 3);
        assert!(events.last(id).unwrap().is_some());
    }
}

/// Following a finished job (e.g. after a restart) leaves nothing behind in memory; following
/// a running one keeps its wake-up channel, which its next event needs.
#[tokio::test]
async fn views_of_finished_jobs_release_their_wake_up_channel() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let (finished, running) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    {
        let before_restart = EventLog::new(&store).unwrap();
        before_restart
            .append(finished, &Event::JobStarted { total: 0 })
            .unwrap();
        before_restart
            .append(
                finished,
                &Event::JobCompleted {
                    succeeded: 0,
                    failed: 0,
                    total: 0,
                },
            )
            .unwrap();
    }
    let events = EventLog::new(&store).unwrap();
    events
        .append(running, &Event::JobStarted { total: 1 })
        .unwrap();
    assert_eq!(events.heads_in_memory(), 1);

    // To the end, and stopped half-way (a client that disconnects).
    let source: stagehand::backend::Events = std::sync::Arc::new(events.clone());
    let mut view = JobView::new(source.clone(), finished, 0, 0, Coalescing::default())
        .await
        .unwrap();
    while view.next().await.unwrap().is_some() {}
    drop(view);
    let half = JobView::new(source.clone(), finished, 0, 1, Coalescing::default())
        .await
        .unwrap();
    assert_eq!(events.heads_in_memory(), 2);
    drop(half);
    assert_eq!(events.heads_in_memory(), 1, "only the running job's");

    let view = JobView::new(source.clone(), running, 1, 0, Coalescing::default())
        .await
        .unwrap();
    drop(view);
    assert_eq!(events.heads_in_memory(), 1);
    assert_eq!(
        events
            .append(running, &Event::JobFailed { error: "x".into() })
            .unwrap(),
        2,
        "numbering goes on"
    );
}

/// After a restart, effects that were claimed and never finished are marked interrupted (not
/// run again); finished ones are left alone.
#[tokio::test]
async fn running_effects_are_interrupted_after_a_restart() {
    use stagehand::store::{EffectRecord, EffectState, EmitOutcome};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let effect = |key: &str| EffectRecord {
        pipeline: "test".into(),
        revision: String::new(),
        handler: "save".into(),
        key: key.into(),
        payload: "{}".into(),
        job_id: uuid::Uuid::nil(),
        item_id: uuid::Uuid::nil(),
        item_index: 0,
        stage: "reward".into(),
        state: EffectState::Pending,
        created_at: 0,
        finished_at: None,
        output: None,
        error: None,
        runs: 0,
        node: None,
    };
    {
        let store = Store::open(&path).unwrap();
        for key in ["cut-short", "finished"] {
            assert_eq!(
                store.emit_effect(&effect(key)).unwrap(),
                EmitOutcome::Accepted
            );
        }
        for key in store.pending_effects(10).unwrap() {
            let mut claimed = store.claim_effect(&key).unwrap().unwrap();
            if claimed.key == "finished" {
                claimed.state = EffectState::Done;
                store.finish_effect(&claimed).unwrap();
            }
        }
        store.flush().await.unwrap();
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(store.interrupt_running_effects().unwrap(), 1);
    assert_eq!(store.interrupt_running_effects().unwrap(), 0, "only once");
    let state = |key| store.effect("save", key).unwrap().unwrap().state;
    assert_eq!(
        (state("cut-short"), state("finished")),
        (EffectState::Interrupted, EffectState::Done)
    );
    assert_eq!(store.effect("save", "cut-short").unwrap().unwrap().runs, 1);
}
