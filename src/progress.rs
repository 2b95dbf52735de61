//! How long work reports how far it is, without knowing who watches.
//!
//! Ops take a `&dyn Progress`; the CLI draws a bar on a terminal, the
//! daemon and `--json` pass [`Silent`]. No terminal crate is used below the
//! CLI.

use std::io::Read;

/// Progress of one piece of work measured in bytes.
pub trait Progress: Send + Sync {
    /// A stretch of work of `bytes` starts: the count starts again from 0
    /// (a verify reads a backup back, then restores it in a drill).
    fn set_total(&self, bytes: u64);
    /// `bytes` more are done.
    fn advance(&self, bytes: u64);
}

/// Reports nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Silent;

impl Progress for Silent {
    fn set_total(&self, _: u64) {}
    fn advance(&self, _: u64) {}
}

/// A reader that reports every byte read through it.
pub struct Counted<'p, R> {
    inner: R,
    progress: &'p dyn Progress,
}

impl<R> std::fmt::Debug for Counted<'_, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Counted")
    }
}

impl<'p, R: Read> Counted<'p, R> {
    pub fn new(inner: R, progress: &'p dyn Progress) -> Self {
        Counted { inner, progress }
    }
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.advance(n as u64);
        Ok(n)
    }
}
