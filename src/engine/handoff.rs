//! A small channel for handing a side's result back to the waiting FUSE
//! thread: a mutex, a condition variable and a queue of at most two items.
//!
//! Owns nothing else. It exists because the waiter should go to sleep at
//! once: a spinning-then-yielding receiver (as crossbeam's is) costs extra
//! context switches on a small machine, and every request waits here.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

pub use crossbeam_channel::RecvTimeoutError;

struct Inner<T> {
    items: VecDeque<T>,
    senders: usize,
}

struct Shared<T> {
    inner: Mutex<Inner<T>>,
    ready: Condvar,
}

pub struct Sender<T> {
    shared: Arc<Shared<T>>,
}

pub struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

pub fn channel<T>() -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        inner: Mutex::new(Inner {
            items: VecDeque::with_capacity(2),
            senders: 1,
        }),
        ready: Condvar::new(),
    });
    (Sender { shared: shared.clone() }, Receiver { shared })
}

impl<T> Sender<T> {
    pub fn send(&self, v: T) {
        let mut g = self.shared.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.items.push_back(v);
        drop(g);
        self.shared.ready.notify_one();
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.shared.inner.lock().unwrap_or_else(|e| e.into_inner()).senders += 1;
        Sender {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let mut g = self.shared.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.senders -= 1;
        // A receiver waits only while nothing is queued, and `send` woke it
        // for what is: only the last sender leaving an empty queue wakes it.
        let wake = g.senders == 0 && g.items.is_empty();
        drop(g);
        if wake {
            self.shared.ready.notify_all();
        }
    }
}

impl<T> Receiver<T> {
    /// Waits until an item arrives, every sender is gone, or `deadline`
    /// (None: no deadline) passes.
    fn wait(&self, deadline: Option<Instant>) -> Result<T, RecvTimeoutError> {
        let mut g = self.shared.inner.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(v) = g.items.pop_front() {
                return Ok(v);
            }
            if g.senders == 0 {
                return Err(RecvTimeoutError::Disconnected);
            }
            g = match deadline {
                None => self.shared.ready.wait(g).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Err(RecvTimeoutError::Timeout);
                    }
                    self.shared
                        .ready
                        .wait_timeout(g, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    pub fn recv(&self) -> Result<T, RecvTimeoutError> {
        self.wait(None)
    }

    pub fn recv_deadline(&self, deadline: Instant) -> Result<T, RecvTimeoutError> {
        self.wait(Some(deadline))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn hands_over_items_and_notices_timeouts_and_lost_senders() {
        let (tx, rx) = channel();
        let tx2 = tx.clone();
        std::thread::spawn(move || tx2.send(7));
        assert_eq!(rx.recv().unwrap(), 7);
        let soon = Instant::now() + Duration::from_millis(20);
        assert!(matches!(rx.recv_deadline(soon), Err(RecvTimeoutError::Timeout)));
        drop(tx);
        assert!(matches!(rx.recv(), Err(RecvTimeoutError::Disconnected)));
    }
}
