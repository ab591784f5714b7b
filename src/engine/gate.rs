//! The change gate: many changes pass at once; a resync step or a switch of
//! the write-intent epoch holds them all off for a moment.
//!
//! Owns: the count of changes in flight. A change holds a `Pass` from
//! before it reaches either side until it has been settled (and, for an
//! open, until its handle is registered). `exclusive` waits for the passes
//! out and keeps new ones waiting; it prefers the waiting exclusive holder,
//! so a stream of changes cannot starve a resync. A thread must not take a
//! second pass while holding one.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

#[derive(Debug, Default)]
struct State {
    passes: u64,
    /// Exclusive holders waiting or holding.
    exclusive: u64,
    held: bool,
}

#[derive(Debug, Default)]
struct Inner {
    state: Mutex<State>,
    cond: Condvar,
}

#[derive(Clone, Debug, Default)]
pub struct Gate {
    inner: Arc<Inner>,
}

/// A change in flight; dropping it lets an exclusive holder in.
#[derive(Debug)]
pub struct Pass {
    inner: Arc<Inner>,
}

/// Changes held off while this lives.
#[derive(Debug)]
pub struct Exclusive {
    inner: Arc<Inner>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, g: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.cond.wait(g).unwrap_or_else(|e| e.into_inner())
    }
}

impl Gate {
    pub fn pass(&self) -> Pass {
        let mut s = self.inner.lock();
        while s.exclusive > 0 {
            s = self.inner.wait(s);
        }
        s.passes += 1;
        Pass {
            inner: self.inner.clone(),
        }
    }

    pub fn exclusive(&self) -> Exclusive {
        let mut s = self.inner.lock();
        s.exclusive += 1;
        while s.passes > 0 || s.held {
            s = self.inner.wait(s);
        }
        s.held = true;
        Exclusive {
            inner: self.inner.clone(),
        }
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        let mut s = self.inner.lock();
        s.passes -= 1;
        // Only an exclusive holder waits for the passes to drain (a wake
        // is a system call even with no one waiting: one per change).
        if s.passes == 0 && s.exclusive > 0 {
            self.inner.cond.notify_all();
        }
    }
}

impl Drop for Exclusive {
    fn drop(&mut self) {
        let mut s = self.inner.lock();
        s.exclusive -= 1;
        s.held = false;
        self.inner.cond.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[test]
    fn exclusive_waits_for_passes_and_holds_new_ones_off() {
        let g = Gate::default();
        let p = g.pass();
        let inside = Arc::new(AtomicBool::new(false));
        let (g2, in2) = (g.clone(), inside.clone());
        let t = std::thread::spawn(move || {
            let _x = g2.exclusive();
            in2.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(100));
            in2.store(false, Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(!inside.load(Ordering::SeqCst), "a pass was out");
        drop(p);
        std::thread::sleep(Duration::from_millis(30));
        let _p = g.pass();
        assert!(
            !inside.load(Ordering::SeqCst),
            "a pass entered while exclusive was held"
        );
        t.join().unwrap();
    }
}
