//! A side's half of an operation, run in the FUSE thread itself, and the
//! rescue of a request whose inline call hangs.
//!
//! Owns: one slot per FUSE thread (the request it serves, and since when
//! and on which side it has been inside an inline call), the inline budget,
//! and the watchdog. Knows nothing of what a request does: the serving
//! layer hands each request over as a `Flight` with a rescue job.
//!
//! Why: a call handed to a lane costs two thread switches and two wakeups
//! (there and back) on top of FUSE's own. Run inline, a call costs none.
//! The price is that a hung side holds the FUSE thread in its syscall,
//! which no signal frees. So:
//! - the watchdog sleeps until the earliest deadline of a call in flight
//!   (no wakeup per request), and when an inline call has run for
//!   `side_timeout`, it has the engine take that side down and runs the
//!   request's rescue job on a thread of its own: the request is answered
//!   again from what the other side did (a change takes over the halves
//!   already done or under way; none is run twice). The hung thread, if it
//!   ever returns, finds its request taken and drops its result.
//! - at most `budget` FUSE threads are inside an inline call at once, so
//!   threads stuck in a hung side never take all of them: past the budget,
//!   a side's half goes to its lane as before.
//!
//! A change's gate pass, and the receiver of its mirror half on a lane or
//! the primary's result before the mirror's half runs inline, are parked
//! in the flight while an inline call runs, so that a rescuer can take them
//! over; the hung thread then holds none of them.

use std::any::Any;
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread;
use std::time::{Duration, Instant};

use super::gate::Pass;
use crate::spec::Side;

/// How a rescued request is answered.
pub enum Rescue {
    /// Run the request again: its hung side is down now, so it is served
    /// by the other.
    Rerun,
    /// Answer it with this errno (`noswitch`).
    Fail(i32),
}

pub type RescueJob = Box<dyn FnOnce(Rescue) + Send>;

/// `inline_since` of a flight that is not inside an inline call.
const IDLE: u64 = 0;
/// `inline_since` of a flight the watchdog has taken over.
const RESCUED: u64 = u64::MAX;

/// One request being served.
pub struct Flight {
    /// When the inline call in progress started (ns since the watch's
    /// epoch, plus one), `IDLE`, or `RESCUED`.
    inline_since: AtomicU64,
    /// The operation and the side of the inline call in progress.
    op: Mutex<(&'static str, Side)>,
    rescue: Mutex<Option<RescueJob>>,
    pass: Mutex<Option<Pass>>,
    mirror: Mutex<Mirror>,
}

/// The mirror's half of the change in flight, as far as a rescue cares.
#[derive(Default)]
struct Mirror {
    /// Parked while an inline call runs: the receiver of the mirror's half
    /// under way on its lane, or the primary's result while the mirror's
    /// half runs inline after it.
    parked: Option<Box<dyn Any + Send>>,
    /// A rescuer found none under way and runs its own: the hung thread
    /// must not start one any more.
    claimed: bool,
}

impl Flight {
    pub fn new(rescue: RescueJob) -> Arc<Flight> {
        Arc::new(Flight {
            inline_since: AtomicU64::new(IDLE),
            op: Mutex::new(("", Side::Primary)),
            rescue: Mutex::new(Some(rescue)),
            pass: Mutex::new(None),
            mirror: Mutex::new(Mirror::default()),
        })
    }

    /// True once the watchdog has taken this request over.
    pub fn rescued(&self) -> bool {
        self.inline_since.load(Ordering::Acquire) == RESCUED
    }

    pub fn park_pass(&self, pass: Pass) {
        *self.pass.lock().unwrap_or_else(|e| e.into_inner()) = Some(pass);
    }

    pub fn take_pass(&self) -> Option<Pass> {
        self.pass.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Starts the mirror's half (`start` queues it and gives its
    /// receiver, or gives the primary's result before the mirror's half
    /// runs inline) and parks what it gives, unless a rescuer has claimed
    /// the change: then nothing is started and false is returned. One lock
    /// covers both, so the half is never started twice.
    pub fn start_mirror<R: Send + 'static>(&self, start: impl FnOnce() -> R) -> bool {
        let mut m = self.mirror.lock().unwrap_or_else(|e| e.into_inner());
        if m.claimed {
            return false;
        }
        m.parked = Some(Box::new(start()));
        true
    }

    /// What `start_mirror` parked, if it is of type `R`.
    pub fn take_mirror<R: Send + 'static>(&self) -> Option<R> {
        let b = self.mirror.lock().unwrap_or_else(|e| e.into_inner()).parked.take()?;
        b.downcast::<R>().ok().map(|b| *b)
    }

    /// For a rescuer: what `start_mirror` parked, or None after making
    /// sure that the hung thread will not start the mirror's half.
    pub fn claim_mirror<R: Send + 'static>(&self) -> Option<R> {
        let mut m = self.mirror.lock().unwrap_or_else(|e| e.into_inner());
        m.claimed = true;
        m.parked.take()?.downcast::<R>().ok().map(|b| *b)
    }
}

thread_local! {
    /// The request this thread serves (a FUSE thread, or a rescuer).
    static CURRENT: RefCell<Option<Arc<Flight>>> = const { RefCell::new(None) };
    /// Set in a rescuer: the current request is being served again.
    static RESCUER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// This FUSE thread's slot in the watch, once it has one.
    static SLOT: RefCell<Option<usize>> = const { RefCell::new(None) };
}

/// The request this thread serves, if any.
pub fn current() -> Option<Arc<Flight>> {
    CURRENT.with(|c| c.borrow().clone())
}

/// True in a rescuer serving the current request again.
pub fn rescuing() -> bool {
    RESCUER.with(|r| r.get())
}

/// True in a thread whose request the watchdog took over: what it does
/// now is dropped, and it must not answer.
pub fn abandoned() -> bool {
    !rescuing() && current().is_some_and(|f| f.rescued())
}

fn set_current(f: Option<Arc<Flight>>) {
    CURRENT.with(|c| *c.borrow_mut() = f);
}

struct Slot {
    flight: Mutex<Option<Arc<Flight>>>,
}

/// The FUSE threads' slots, the budget and the watchdog's clock.
pub struct Watch {
    slots: Box<[Slot]>,
    next_slot: AtomicUsize,
    /// Inline calls in progress, including ones stuck in a hung side.
    inside: AtomicUsize,
    budget: usize,
    timeout: Duration,
    epoch: Instant,
    armed: AtomicBool,
}

/// While it lives, the calling FUSE thread is inside an inline call.
pub struct Inside<'a> {
    watch: &'a Watch,
    pub flight: Arc<Flight>,
    since: u64,
    ended: bool,
}

impl Inside<'_> {
    /// When the call started, on the watch's clock: a later call of the
    /// same request resumes its deadline (`Watch::resume`).
    pub fn since(&self) -> u64 {
        self.since
    }

    /// Ends the inline call; false if the watchdog took the request over
    /// meanwhile (the caller drops what it has and answers nothing).
    pub fn finish(mut self) -> bool {
        self.ended = true;
        self.end()
    }

    fn end(&self) -> bool {
        let ok = self
            .flight
            .inline_since
            .compare_exchange(self.since, IDLE, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        self.watch.inside.fetch_sub(1, Ordering::AcqRel);
        ok
    }
}

impl Drop for Inside<'_> {
    fn drop(&mut self) {
        if !self.ended {
            self.end();
        }
    }
}

impl Watch {
    /// `threads` FUSE threads may take slots; `budget` of them may be
    /// inside an inline call at once.
    pub fn new(threads: usize, budget: usize, timeout: Duration) -> Watch {
        Watch {
            slots: (0..threads)
                .map(|_| Slot {
                    flight: Mutex::new(None),
                })
                .collect(),
            next_slot: AtomicUsize::new(0),
            inside: AtomicUsize::new(0),
            budget,
            timeout,
            epoch: Instant::now(),
            armed: AtomicBool::new(false),
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64 + 1
    }

    fn slot(&self) -> Option<usize> {
        SLOT.with(|s| {
            let mut s = s.borrow_mut();
            if s.is_none() {
                let i = self.next_slot.fetch_add(1, Ordering::AcqRel);
                if i < self.slots.len() {
                    *s = Some(i);
                }
            }
            *s
        })
    }

    /// Serves one request in this thread: `f` runs with `flight` as the
    /// current request, visible to the watchdog. Threads past the number of
    /// slots serve without inline calls.
    pub fn serve<T>(&self, flight: Arc<Flight>, f: impl FnOnce() -> T) -> T {
        let slot = self.slot();
        if let Some(i) = slot {
            *self.slots[i].flight.lock().unwrap_or_else(|e| e.into_inner()) = Some(flight.clone());
        }
        set_current(Some(flight));
        let r = f();
        set_current(None);
        if let Some(i) = slot {
            *self.slots[i].flight.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        r
    }

    /// Starts an inline call on `side` for the current request, if this
    /// thread serves one from a slot, the watchdog runs, and the budget
    /// allows.
    pub fn enter(&self, op: &'static str, side: Side) -> Option<Inside<'_>> {
        self.resume(op, side, self.now())
    }

    /// `enter`, with the deadline of a call that started at `since`: the
    /// mirror's half of a change, run after the primary's, shares the
    /// request's one `side_timeout`.
    pub fn resume(&self, op: &'static str, side: Side, since: u64) -> Option<Inside<'_>> {
        if !self.armed.load(Ordering::Acquire) {
            return None;
        }
        if rescuing() {
            return None;
        }
        let flight = current()?;
        SLOT.with(|s| *s.borrow())?;
        if self.inside.fetch_add(1, Ordering::AcqRel) >= self.budget {
            self.inside.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        *flight.op.lock().unwrap_or_else(|e| e.into_inner()) = (op, side);
        // A request taken over stays taken over.
        if flight
            .inline_since
            .compare_exchange(IDLE, since, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            self.inside.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Inside {
            watch: self,
            flight,
            since,
            ended: false,
        })
    }

    /// Inline calls in progress (some may be stuck in a hung side).
    pub fn inside(&self) -> usize {
        self.inside.load(Ordering::Acquire)
    }

    /// Runs the watchdog until `owner` is gone: it sleeps until the
    /// earliest deadline of an inline call in flight (or `timeout` when
    /// there is none: a call that starts meanwhile has its deadline after
    /// that), and hands each call past its deadline to `hung`, which
    /// returns whether to rescue it (it takes the side down). A rescued
    /// request's job runs on a thread of its own.
    pub fn run<O: Send + Sync + 'static>(
        self: Arc<Self>,
        owner: Weak<O>,
        hung: impl Fn(&O, &'static str, Side) -> Option<Rescue> + Send + 'static,
    ) -> std::io::Result<()> {
        self.armed.store(true, Ordering::Release);
        let watch = self.clone();
        thread::Builder::new().name("watchdog".into()).spawn(move || {
            loop {
                let Some(owner) = owner.upgrade() else { return };
                let now = watch.now();
                let limit = watch.timeout.as_nanos() as u64;
                let mut next = now + limit;
                for slot in watch.slots.iter() {
                    let Some(flight) = slot.flight.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
                        continue;
                    };
                    let since = flight.inline_since.load(Ordering::Acquire);
                    if since == IDLE || since == RESCUED {
                        continue;
                    }
                    if since + limit > now {
                        next = next.min(since + limit);
                        continue;
                    }
                    let (op, side) = *flight.op.lock().unwrap_or_else(|e| e.into_inner());
                    let Some(how) = hung(&owner, op, side) else { continue };
                    if flight
                        .inline_since
                        .compare_exchange(since, RESCUED, Ordering::AcqRel, Ordering::Acquire)
                        .is_err()
                    {
                        continue; // it returned just now
                    }
                    let job = flight.rescue.lock().unwrap_or_else(|e| e.into_inner()).take();
                    if let Some(job) = job {
                        let f = flight.clone();
                        let spawned = thread::Builder::new().name("rescue".into()).spawn(move || {
                            RESCUER.with(|r| r.set(true));
                            set_current(Some(f));
                            job(how);
                            set_current(None);
                        });
                        if let Err(e) = spawned {
                            log::error!("cannot start a rescue thread: {e}");
                        }
                    }
                }
                drop(owner);
                thread::sleep(Duration::from_nanos(next.saturating_sub(watch.now()).max(1_000_000)));
            }
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn a_call_past_its_deadline_is_rescued_once_and_the_budget_holds() {
        let owner = Arc::new(());
        let watch = Arc::new(Watch::new(4, 1, Duration::from_millis(100)));
        let (tx, rx) = mpsc::channel();
        watch
            .clone()
            .run(Arc::downgrade(&owner), |_, op, _| {
                (op == "read").then_some(Rescue::Rerun)
            })
            .unwrap();
        let w = watch.clone();
        let stuck = thread::spawn(move || {
            let tx2 = tx.clone();
            let flight = Flight::new(Box::new(move |how| {
                assert!(matches!(how, Rescue::Rerun));
                assert!(rescuing() && !abandoned());
                tx2.send("rescued").unwrap();
            }));
            w.serve(flight, || {
                let inside = w.enter("read", Side::Primary).expect("inline allowed");
                // A second inline call is past the budget of one.
                assert!(w.enter("read", Side::Primary).is_none());
                thread::sleep(Duration::from_millis(400));
                assert!(!inside.finish(), "the request was taken over");
                assert!(abandoned());
            });
            tx.send("returned").unwrap();
        });
        assert_eq!(rx.recv_timeout(Duration::from_secs(2)).unwrap(), "rescued");
        assert_eq!(rx.recv_timeout(Duration::from_secs(2)).unwrap(), "returned");
        stuck.join().unwrap();
        assert_eq!(watch.inside(), 0);
        // A quick call is not rescued, and nothing keeps its flight.
        let flight = Flight::new(Box::new(|_| panic!("rescued a quick call")));
        let weak = Arc::downgrade(&flight);
        watch.serve(flight, || assert!(watch.enter("read", Side::Primary).unwrap().finish()));
        assert!(weak.upgrade().is_none(), "the flight outlived its request");
        thread::sleep(Duration::from_millis(250));
    }
}
