//! A small pool of byte buffers for write data handed to the side lanes and
//! for read results coming back from them, so that neither allocates in the
//! steady state.

use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

/// At most this many idle buffers are kept.
const KEEP: usize = 64;

static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// A buffer that goes back to the pool when dropped.
pub struct PooledBuf {
    buf: Vec<u8>,
}

impl PooledBuf {
    pub fn copy_of(data: &[u8]) -> PooledBuf {
        let mut buf = POOL.lock().unwrap_or_else(|e| e.into_inner()).pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(data);
        PooledBuf { buf }
    }

    /// A zero-filled buffer of `len` bytes, e.g. for a read.
    pub fn zeroed(len: usize) -> PooledBuf {
        let mut buf = POOL.lock().unwrap_or_else(|e| e.into_inner()).pop().unwrap_or_default();
        buf.clear();
        buf.resize(len, 0);
        PooledBuf { buf }
    }

    pub fn truncate(&mut self, len: usize) {
        self.buf.truncate(len);
    }
}

impl Deref for PooledBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf
    }
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < KEEP {
            pool.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_buffers() {
        let a = PooledBuf::copy_of(&[1u8; 4096]);
        let ptr = a.buf.as_ptr();
        drop(a);
        let b = PooledBuf::copy_of(&[2u8; 100]);
        assert_eq!(&b[..], &[2u8; 100][..]);
        // No other unit test uses the pool, so the same allocation comes back.
        assert_eq!(b.buf.as_ptr(), ptr);
        assert!(b.buf.capacity() >= 4096);
    }
}
