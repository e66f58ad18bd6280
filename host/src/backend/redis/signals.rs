//! Pub/sub: `sh:wake` tells followers of a job that it has new events, `sh:cancel` tells every
//! node to interrupt a job's items, `sh:changed` that an operator changed something every node
//! applies. All are at most once; [`poll`] covers what they miss.

use std::time::Duration;

use futures::StreamExt;
use redis::AsyncCommands;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Cluster, keys};

/// How often followers re-read their logs and nodes check the cancel keys of their running
/// jobs, whatever pub/sub said.
const POLL: Duration = Duration::from_secs(1);

/// Subscribe, dispatch messages, and subscribe again after a lost connection.
pub(super) async fn listen(cluster: Cluster, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        if let Err(error) = listen_once(&cluster, &shutdown).await {
            tracing::warn!(error = %format!("{error:#}"), "Redis pub/sub lost; subscribing again");
        }
        // Whatever was published meanwhile is lost: look at the truth.
        cluster.wake_all();
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
            () = shutdown.cancelled() => {}
        }
    }
}

async fn listen_once(cluster: &Cluster, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let mut pubsub = cluster.inner.client.get_async_pubsub().await?;
    pubsub.subscribe(keys::WAKE_CHANNEL).await?;
    pubsub.subscribe(keys::CANCEL_CHANNEL).await?;
    pubsub.subscribe(keys::CHANGES_CHANNEL).await?;
    pubsub.subscribe(keys::TOKENS_CHANNEL).await?;
    let mut messages = pubsub.on_message();
    loop {
        let message = tokio::select! {
            message = messages.next() => message,
            () = shutdown.cancelled() => return Ok(()),
        };
        let Some(message) = message else {
            anyhow::bail!("the subscription ended");
        };
        if message.get_channel_name() == keys::TOKENS_CHANNEL {
            cluster.token_arrived(message.get_payload_bytes());
            continue;
        }
        let payload: String = message.get_payload().unwrap_or_default();
        match message.get_channel_name() {
            keys::WAKE_CHANNEL => {
                if let Some(job) = payload.split(' ').next().and_then(|j| j.parse().ok()) {
                    cluster.wake(job);
                }
            }
            keys::CANCEL_CHANNEL => {
                if let Ok(job) = payload.parse::<Uuid>() {
                    cluster.cancel_here(job);
                }
            }
            keys::CHANGES_CHANNEL => {
                if let Ok(n) = payload.parse::<u64>() {
                    cluster.heard_of_change(n);
                }
            }
            _ => {}
        }
    }
}

/// The backup of pub/sub: wake every follower and check the cancel key of every job running
/// here, once per [`POLL`].
pub(super) async fn poll(cluster: Cluster, shutdown: CancellationToken) {
    let mut conn = cluster.conn();
    loop {
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            () = shutdown.cancelled() => return,
        }
        cluster.wake_all();
        if let Err(error) = cluster.check_changes().await {
            tracing::warn!(error = %format!("{error:#}"), "cannot check for changes in Redis");
        }
        if let Err(error) = cluster.check_following().await {
            tracing::warn!(%error, "cannot check who follows live tokens in Redis");
        }
        for job in cluster.running_jobs() {
            match conn.exists::<_, bool>(keys::JobKeys::new(job).cancel).await {
                Ok(true) => cluster.cancel_here(job),
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(error = %error, "cannot check cancel flags in Redis");
                    break;
                }
            }
        }
    }
}
