//! Key layouts of the sled trees (see the table in `store/mod.rs`).

use anyhow::{Result, bail};
use uuid::Uuid;

/// Job id then the item index, big-endian so that sled's order is the index order.
pub fn item(job: Uuid, index: u64) -> [u8; 24] {
    let mut key = [0; 24];
    key[..16].copy_from_slice(job.as_bytes());
    key[16..].copy_from_slice(&index.to_be_bytes());
    key
}

/// The first key after every item key of `job`.
pub fn job_end(job: Uuid) -> Vec<u8> {
    let mut key = job.as_bytes().to_vec();
    key.push(0xff);
    key
}

pub fn index_of(key: &[u8]) -> Result<u64> {
    match key.get(16..24) {
        Some(bytes) => Ok(u64::from_be_bytes(bytes.try_into().expect("8 bytes"))),
        None => bail!("malformed item key of {} bytes", key.len()),
    }
}

pub fn stage_output(job: Uuid, index: u64, stage: &str) -> Vec<u8> {
    let mut key = item(job, index).to_vec();
    key.extend_from_slice(stage.as_bytes());
    key
}

/// The prefix of a stage journal's entries: the stage output key, then a zero byte (so that
/// stage `a`'s prefix is no prefix of stage `ab`'s).
pub fn journal(job: Uuid, index: u64, stage: &str) -> Vec<u8> {
    let mut key = stage_output(job, index, stage);
    key.push(0);
    key
}

/// The item index and stage of a `stage_output` key.
pub fn stage_output_of(key: &[u8]) -> Result<(u64, String)> {
    let stage = String::from_utf8_lossy(key.get(24..).unwrap_or_default()).into_owned();
    Ok((index_of(key)?, stage))
}

/// The item index, stage and position of a `journal_entry` key.
pub fn journal_entry_of(key: &[u8]) -> Result<(u64, String, u64)> {
    let Some((head, position)) = key.split_last_chunk::<8>() else {
        bail!("malformed journal key of {} bytes", key.len());
    };
    // `head` is a `journal` prefix: a `stage_output` key and a zero byte.
    let (index, stage) = stage_output_of(head.split_last().map_or(head, |(_, rest)| rest))?;
    Ok((index, stage, u64::from_be_bytes(*position)))
}

/// Entry `position` of the journal under `prefix`, big-endian so that sled's order is the
/// journal's.
pub fn journal_entry(prefix: &[u8], position: usize) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(&(position as u64).to_be_bytes());
    key
}

/// `scope`, a zero byte, then `name`: names never contain a zero byte in practice, and the
/// scope prefix lets one collection be scanned alone.
pub fn named(scope: &str, name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(scope.len() + 1 + name.len());
    key.extend_from_slice(scope.as_bytes());
    key.push(0);
    key.extend_from_slice(name.as_bytes());
    key
}
