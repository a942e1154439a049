//! Bounded coalescing of reconcile triggers.
//!
//! Node daemons write `status.nodeReports`, the controller writes status, Nodes change:
//! one NodeENI can see several watch events a second. Reconciling on each would repeat
//! the same pass; kube's own debounce coalesces them, but it is trailing-edge only: every
//! new event pushes the pass out again, so a NodeENI whose status keeps being written is
//! never reconciled at all. Here a trigger runs once its object has been quiet for
//! `quiet`, and never later than `max` after the first trigger it coalesced.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The pending triggers and when each is due. Synchronous: the driver below feeds it
/// the clock.
#[derive(Debug)]
pub struct Coalescer<T> {
    quiet: Duration,
    max: Duration,
    // Per key: when its first pending trigger arrived, and when it is due.
    pending: HashMap<T, (Instant, Instant)>,
}

impl<T: Hash + Eq + Clone> Coalescer<T> {
    /// `max` is raised to `quiet` if smaller.
    pub fn new(quiet: Duration, max: Duration) -> Self {
        Self {
            quiet,
            max: max.max(quiet),
            pending: HashMap::new(),
        }
    }

    /// Records a trigger for `key` at `now`.
    pub fn offer(&mut self, key: T, now: Instant) {
        let quiet_until = now + self.quiet;
        self.pending
            .entry(key)
            .and_modify(|(first, due)| *due = quiet_until.min(*first + self.max))
            .or_insert((now, quiet_until));
    }

    /// When the earliest pending trigger is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.pending.values().map(|(_, due)| *due).min()
    }

    /// Removes and returns the triggers due at `now`, earliest first.
    pub fn take_due(&mut self, now: Instant) -> Vec<T> {
        let mut due: Vec<(Instant, T)> = self
            .pending
            .iter()
            .filter(|(_, (_, d))| *d <= now)
            .map(|(k, (_, d))| (*d, k.clone()))
            .collect();
        due.sort_by_key(|(d, _)| *d);
        for (_, k) in &due {
            self.pending.remove(k);
        }
        due.into_iter().map(|(_, k)| k).collect()
    }

    /// Removes and returns every pending trigger.
    pub fn drain(&mut self) -> Vec<T> {
        self.pending.drain().map(|(k, _)| k).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// `input` coalesced per item (see the module docs). Pending items are flushed when
/// `input` ends. Spawns its driver on the current Tokio runtime.
pub fn coalesced<T, S>(input: S, quiet: Duration, max: Duration) -> impl Stream<Item = T> + Send
where
    T: Hash + Eq + Clone + Send + 'static,
    S: Stream<Item = T> + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut pending = Coalescer::new(quiet, max);
        let mut input = std::pin::pin!(input);
        loop {
            let due = pending.next_due();
            tokio::select! {
                item = input.next() => match item {
                    Some(key) => pending.offer(key, Instant::now()),
                    None => {
                        for key in pending.drain() {
                            let _ = tx.send(key);
                        }
                        return;
                    }
                },
                () = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                    for key in pending.take_due(Instant::now()) {
                        if tx.send(key).is_err() {
                            return;
                        }
                    }
                }
            }
        }
    });
    crate::tokio_stream_from(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(2);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_lone_trigger_waits_the_quiet_period() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(Q, MAX);
        c.offer("a", t0);
        assert_eq!(c.next_due(), Some(t0 + Q));
        assert!(c.take_due(t0 + ms(499)).is_empty());
        assert_eq!(c.take_due(t0 + Q), vec!["a"]);
        assert!(c.is_empty());
    }

    #[test]
    fn a_burst_is_one_trigger_after_the_last_event() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(Q, MAX);
        for i in 0..5 {
            c.offer("a", t0 + ms(100 * i));
        }
        assert_eq!(c.next_due(), Some(t0 + ms(400) + Q));
        assert_eq!(c.take_due(t0 + ms(900)), vec!["a"]);
    }

    #[test]
    fn constant_events_still_trigger_within_the_bound() {
        // The starvation kube's trailing debounce has: an event every 100 ms forever.
        let t0 = Instant::now();
        let mut c = Coalescer::new(Q, MAX);
        let mut fired = Vec::new();
        for i in 0..100u64 {
            let now = t0 + ms(100 * i);
            fired.extend(c.take_due(now).into_iter().map(|k| (k, now)));
            c.offer("a", now);
        }
        // Every 2 s (the bound), one trigger.
        let times: Vec<u64> = fired
            .iter()
            .map(|(_, at)| at.duration_since(t0).as_millis() as u64)
            .collect();
        assert_eq!(times, vec![2000, 4000, 6000, 8000]);
    }

    #[test]
    fn keys_are_independent_and_come_out_earliest_first() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(Q, MAX);
        c.offer("b", t0 + ms(10));
        c.offer("a", t0 + ms(20));
        c.offer("b", t0 + ms(300));
        assert_eq!(c.take_due(t0 + ms(600)), vec!["a"]);
        assert_eq!(c.take_due(t0 + ms(800)), vec!["b"]);
    }

    #[test]
    fn max_below_quiet_is_quiet() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(Q, ms(10));
        c.offer("a", t0);
        c.offer("a", t0 + ms(100));
        assert_eq!(c.next_due(), Some(t0 + Q));
    }

    #[tokio::test(start_paused = true)]
    async fn the_stream_flushes_what_is_pending_when_its_input_ends() {
        let input = futures::stream::iter(["a", "b", "a"]);
        let out: Vec<&str> = coalesced(input, Q, MAX).collect().await;
        let mut out = out;
        out.sort();
        assert_eq!(out, vec!["a", "b"]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_stream_emits_after_the_quiet_period() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut out = Box::pin(coalesced(crate::tokio_stream_from(rx), Q, MAX));
        let start = Instant::now();
        tx.send(1).expect("receiver alive");
        tx.send(1).expect("receiver alive");
        assert_eq!(out.next().await, Some(1));
        assert_eq!(start.elapsed(), Q);
    }
}
