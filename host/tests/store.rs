//! The store under concurrent use, as a burst of submits uses it.

use std::time::Duration;

use stagehand::events::{Event, EventLog};
use stagehand::store::{JobRecord, Store};

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
    let events = EventLog::new(store.tree("events").unwrap());
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
