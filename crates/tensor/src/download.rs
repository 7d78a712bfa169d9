//! A device-to-host copy that is waited for later: overlapped scheduling
//! queues the next step's work before it reads this step's sampled tokens.

use crate::{HostVec, Result};

/// A copy to the host in flight, made by [`Backend::download_start`]
/// (crate::Backend::download_start). [`wait`](Download::wait) blocks until
/// the copy has landed, which is after the work queued before it, not after
/// work queued since.
pub struct Download(Box<dyn FnOnce() -> Result<HostVec>>);

impl Download {
    /// A copy that has already landed (synchronous backends).
    pub fn ready(v: HostVec) -> Self {
        Download(Box::new(move || Ok(v)))
    }

    /// A copy that lands when `wait` returns.
    pub fn later(wait: impl FnOnce() -> Result<HostVec> + 'static) -> Self {
        Download(Box::new(wait))
    }

    /// Waits for the copy and returns the data.
    pub fn wait(self) -> Result<HostVec> {
        (self.0)()
    }
}

impl std::fmt::Debug for Download {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Download")
    }
}
