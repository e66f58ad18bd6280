//! Memory and table limits of one store, with errors the runner can tell apart from traps.

use wasmtime::ResourceLimiter;

/// Raised (as the trap's error) when a guest grows past its memory cap.
#[derive(Debug, thiserror::Error)]
#[error("exceeded its memory cap of {cap_mib} MiB (tried to grow to {wanted_mib} MiB)")]
pub struct MemoryCapExceeded {
    pub cap_mib: usize,
    pub wanted_mib: usize,
}

/// Caps linear memory; growing past the cap traps with [`MemoryCapExceeded`] rather than
/// returning -1, because Rust guests abort on allocation failure with a message nobody sees.
pub struct Limiter {
    memory_bytes: usize,
}

impl Limiter {
    pub fn new(memory_bytes: usize) -> Self {
        Self { memory_bytes }
    }
}

const TABLE_ELEMENTS: usize = 100_000;

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes {
            return Err(MemoryCapExceeded {
                cap_mib: self.memory_bytes >> 20,
                wanted_mib: desired.div_ceil(1 << 20),
            }
            .into());
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= TABLE_ELEMENTS)
    }
}
