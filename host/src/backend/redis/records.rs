//! Handlers' records in Redis ([`Records`]): one hash per collection ([`keys::records`]), so
//! that every node's handlers read what any node's wrote.

use anyhow::{Context, Result};
use async_trait::async_trait;
use redis::AsyncCommands;

use super::{Cluster, keys};
use crate::backend::Records;

#[async_trait]
impl Records for Cluster {
    async fn put(&self, collection: &str, key: &str, value: &[u8]) -> Result<()> {
        let records = keys::records(collection);
        self.idempotent(|mut conn| {
            let records = records.clone();
            async move { conn.hset::<_, _, _, ()>(records, key, value).await }
        })
        .await
        .context("cannot write a record in Redis")
    }

    async fn get(&self, collection: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let records = keys::records(collection);
        self.idempotent(|mut conn| {
            let records = records.clone();
            async move { conn.hget(records, key).await }
        })
        .await
        .context("cannot read a record in Redis")
    }
}

/// Call `each` on every (key, value) of `collection` in Redis at `conn` (`stagehand inspect
/// records --redis`), a page at a time.
pub async fn each_record(
    conn: &mut impl redis::aio::ConnectionLike,
    collection: &str,
    mut each: impl FnMut(String, Vec<u8>) -> Result<()>,
) -> Result<()> {
    let mut cursor = 0u64;
    loop {
        let (next, page): (u64, Vec<(String, Vec<u8>)>) = redis::cmd("HSCAN")
            .arg(keys::records(collection))
            .arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .context("cannot list records in Redis")?;
        for (key, value) in page {
            each(key, value)?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}
