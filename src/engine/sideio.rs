//! How a side call is issued off the FUSE thread: a lane of worker threads
//! per side, fed by a queue under a mutex.
//!
//! Owns: the lane threads and their queue. Knows nothing of sides' health
//! or of what a job does.
//!
//! Idle workers sleep on a condition variable and are woken one per job,
//! and only when one is idle; nothing spins or yields. (crossbeam's
//! receivers spin and then `sched_yield` before they park: on two vCPUs
//! that stole the CPU from the threads doing the work, about 35 yields
//! per fsync'd write.)

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;

pub type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    /// Workers asleep waiting for a job.
    idle: usize,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
}

/// A pool of worker threads for one side. Lives as long as the process.
pub struct Lane {
    shared: Arc<Shared>,
}

impl Lane {
    /// Starts `threads` workers named `{name}-{i}`.
    pub fn start(name: &str, threads: usize) -> io::Result<Lane> {
        let shared = Arc::new(Shared::default());
        for i in 0..threads {
            let s = shared.clone();
            thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || work(&s))?;
        }
        Ok(Lane { shared })
    }

    /// Queues `job`; it runs on the first worker free. One futex wake at
    /// most, and none when every worker is busy (a busy worker takes the
    /// next job without sleeping).
    pub fn send(&self, job: Job) {
        let mut q = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.jobs.push_back(job);
        let wake = q.idle > 0;
        drop(q);
        if wake {
            self.shared.ready.notify_one();
        }
    }
}

fn work(s: &Shared) {
    loop {
        let mut q = s.queue.lock().unwrap_or_else(|e| e.into_inner());
        let job = loop {
            if let Some(job) = q.jobs.pop_front() {
                break job;
            }
            q.idle += 1;
            q = s.ready.wait(q).unwrap_or_else(|e| e.into_inner());
            q.idle -= 1;
        };
        drop(q);
        job();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn runs_every_job_and_a_stuck_job_holds_only_its_worker() {
        let lane = Lane::start("test", 2).unwrap();
        let (tx, rx) = mpsc::channel();
        // One worker is stuck for the whole test.
        lane.send(Box::new(|| thread::sleep(Duration::from_secs(5))));
        for i in 0..100 {
            let tx = tx.clone();
            lane.send(Box::new(move || tx.send(i).unwrap()));
        }
        let mut got: Vec<i32> = (0..100)
            .map(|_| rx.recv_timeout(Duration::from_secs(2)).expect("a job did not run"))
            .collect();
        got.sort();
        assert_eq!(got, (0..100).collect::<Vec<_>>());
    }
}
