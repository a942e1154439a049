//! Running an op list against a fresh world, quiet periods, and shrinking a failure.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use eni_testkit::eventually;
use eni_testkit::faults::Stats;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tracing::{info, warn};

use crate::Error;
use crate::check::{self, CheckConfig, CheckResult, effective};
use crate::ops::{self, Op};
use crate::world::{ControllerTiming, World};

/// Settings of one run.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// The eni-controller binary.
    pub controller: PathBuf,
    /// Seed (also drives the pauses between operations).
    pub seed: u64,
    /// Controller timing flags.
    pub timing: ControllerTiming,
    /// Invariant settings.
    pub check: CheckConfig,
    /// How long a quiet period may take to converge.
    pub converge_deadline: Duration,
    /// Stop applying operations after this long (then one last quiet period).
    pub duration: Option<Duration>,
    /// Where controller logs go (a sub-directory per run).
    pub log_root: PathBuf,
    /// After the last quiet period, no mutating EC2 call may come for this long (zero:
    /// not checked).
    pub idle_window: Duration,
}

/// A failed quiet period.
#[derive(Clone, Debug)]
pub struct Failure {
    /// Index of the quiet period's op in the list.
    pub at: usize,
    /// The broken invariants at the deadline.
    pub violations: Vec<String>,
}

/// What a run did.
#[derive(Debug, Default)]
pub struct Report {
    /// Operations applied (quiet periods included).
    pub ops_run: usize,
    /// Operations skipped because their precondition did not hold.
    pub ops_skipped: usize,
    /// Applied operations by kind.
    pub by_kind: BTreeMap<String, usize>,
    /// Quiet periods that passed.
    pub quiet_passed: usize,
    /// Invariant assertions that held (over the passing checks).
    pub assertions_passed: u64,
    /// Convergence time of each passing quiet period.
    pub converge_times: Vec<Duration>,
    /// Fault-layer counters at the end.
    pub stats: Stats,
    /// Wall time.
    pub wall: Duration,
    /// Controller exits nobody asked for.
    pub unexpected_exits: Vec<String>,
    /// The failure, if any.
    pub failure: Option<Failure>,
    /// Where the logs are.
    pub log_dir: PathBuf,
}

/// Runs `ops` against a fresh world.
pub async fn run(cfg: &RunConfig, ops: &[Op], label: &str) -> Result<Report, Error> {
    let started = Instant::now();
    let log_dir = cfg.log_root.join(label);
    let mut world = World::start(&cfg.controller, cfg.timing.clone(), log_dir.clone()).await?;
    world.start_replica(0).await?;
    let mut rng = StdRng::seed_from_u64(cfg.seed ^ 0x5eed_9a05e);
    let mut report = Report {
        log_dir,
        ..Report::default()
    };
    let mut stop = false;
    for (i, op) in ops.iter().enumerate() {
        if let Some(d) = cfg.duration
            && started.elapsed() >= d
            && !stop
        {
            info!("duration reached: one last quiet period");
            stop = true;
        }
        if stop && *op != Op::Quiet {
            continue;
        }
        if *op == Op::Quiet {
            report.ops_run += 1;
            *report.by_kind.entry("quiet".into()).or_default() += 1;
            let t = Instant::now();
            let (mut passed, mut result) = quiet(&mut world, cfg).await?;
            let last = stop || ops[i + 1..].iter().all(|o| *o == Op::Quiet);
            if passed
                && last
                && !cfg.idle_window.is_zero()
                && let Some(v) = idle(&world, cfg.idle_window).await
            {
                passed = false;
                result.violations.push(v);
            }
            if passed {
                report.quiet_passed += 1;
                report.assertions_passed += result.assertions;
                report.converge_times.push(t.elapsed());
                info!(
                    op = i,
                    slots = result.slots,
                    blocked = result.blocked,
                    assertions = result.assertions,
                    took = ?t.elapsed(),
                    "quiet period passed"
                );
            } else {
                warn!(
                    op = i,
                    violations = result.violations.len(),
                    "quiet period FAILED"
                );
                report.failure = Some(Failure {
                    at: i,
                    violations: result.violations,
                });
                break;
            }
            if stop {
                break;
            }
            continue;
        }
        let applied = apply(&mut world, op).await?;
        info!(op = i, applied, "{op}");
        if applied {
            report.ops_run += 1;
            if let Some(k) = op.kind() {
                *report.by_kind.entry(format!("{k:?}")).or_default() += 1;
            }
        } else {
            report.ops_skipped += 1;
        }
        // Let the controller get going before the next operation: wait for a random
        // number of EC2 calls (or a random deadline), so operations land mid-flight.
        let calls = rng.random_range(0..25u64);
        let deadline = Duration::from_millis(rng.random_range(50..2500));
        let before = world.faults.stats().total.requests;
        let proxy = &world.faults;
        eventually(deadline, || async move {
            (proxy.stats().total.requests >= before + calls).then_some(())
        })
        .await;
    }
    report.stats = world.faults.stats();
    report.unexpected_exits = world.unexpected_exits.clone();
    report.wall = started.elapsed();
    Ok(report)
}

/// Applies one operation; `false` if its precondition did not hold (skipped).
async fn apply(world: &mut World, op: &Op) -> Result<bool, Error> {
    world.flush_recreates().await?;
    let m = &world.model;
    Ok(match op {
        Op::Label { node, ne } | Op::Unlabel { node, ne } => {
            let on = matches!(op, Op::Label { .. });
            match m.nodes.get(node) {
                Some(n) if n.labels.contains(ne) != on => {
                    world.set_label(*node, *ne, on).await?;
                    true
                }
                _ => false,
            }
        }
        Op::NodeCreate { node, labels } => {
            if m.nodes.contains_key(node) {
                false
            } else {
                world.create_node(*node, labels).await?;
                true
            }
        }
        Op::NodeDelete { node } => match m.nodes.get(node) {
            Some(n) if !n.draining => {
                world.delete_node(*node).await?;
                true
            }
            _ => false,
        },
        Op::NodeDrain { node } => match m.nodes.get(node) {
            Some(n) if !n.draining => {
                world.drain_node(*node).await?;
                true
            }
            _ => false,
        },
        Op::NodeRelease { node } => match m.nodes.get(node) {
            Some(n) if n.draining => {
                world.release_node(*node).await?;
                true
            }
            _ => false,
        },
        Op::NodeeniCreate { ne, spec } => {
            if m.nodeenis.contains_key(ne) {
                false
            } else {
                world.apply_nodeeni(*ne, spec).await?;
                true
            }
        }
        Op::NodeeniEdit { ne, spec } => {
            if m.nodeenis.contains_key(ne) {
                world.apply_nodeeni(*ne, spec).await?;
                true
            } else {
                false
            }
        }
        Op::NodeeniDelete { ne } => {
            if m.nodeenis.contains_key(ne) {
                world.delete_nodeeni(*ne).await?;
                true
            } else {
                false
            }
        }
        Op::NodeeniRecreate { ne, spec } => {
            if m.nodeenis.contains_key(ne) {
                world.recreate_nodeeni(*ne, spec).await?;
                true
            } else {
                false
            }
        }
        Op::Kill { replica } => {
            if m.replicas.contains(replica) {
                world.kill_replica(*replica);
                true
            } else {
                false
            }
        }
        Op::Start { replica } => {
            if m.replicas.contains(replica) {
                false
            } else {
                world.start_replica(*replica).await?;
                true
            }
        }
        Op::KillLeader => match world.leader().await {
            Some(r) if world.model.replicas.contains(&r) => {
                world.kill_replica(r);
                true
            }
            _ => false,
        },
        Op::LeaderCut => match world.leader().await {
            Some(r) if world.model.replicas.contains(&r) => {
                world.cut_replica(r);
                true
            }
            _ => false,
        },
        Op::Throttle => {
            world.throttle_storm();
            true
        }
        Op::Errors => {
            world.error_burst();
            true
        }
        Op::Latency => {
            world.latency_spike();
            true
        }
        Op::HungDetach => {
            world.hung_detaches();
            true
        }
        Op::OobDetach { pick } => {
            let id = world.oob_detach(*pick).await?;
            info!(eni = ?id, "out-of-band detach");
            id.is_some()
        }
        Op::OobDelete { pick } => {
            let id = world.oob_delete(*pick).await?;
            info!(eni = ?id, "out-of-band delete");
            id.is_some()
        }
        Op::ForeignAttach { node, ne, offset } => {
            if m.nodes.get(node).is_some_and(|n| !n.draining) {
                // Every foreign ENI at the middle of a band is a twin cluster's.
                let id = world
                    .foreign_attach(*node, *ne, ops::band(*ne) + offset, *offset == 1)
                    .await?;
                info!(eni = ?id, "foreign ENI attached");
                id.is_some()
            } else {
                false
            }
        }
        Op::ForeignRemove { pick } => {
            let id = world.foreign_remove(*pick).await?;
            id.is_some()
        }
        Op::Quiet => true,
    })
}

/// Faults off, a replica running, then poll the invariants until they all hold or the
/// deadline passes. Returns whether they held and the last check. Replicas cut off from
/// the API server stay up until their lease-loss grace has passed (so a replica that
/// keeps acting is caught), then they are killed.
async fn quiet(world: &mut World, cfg: &RunConfig) -> Result<(bool, CheckResult), Error> {
    world.faults_off();
    world.ensure_replicas().await?;
    let end = Instant::now() + cfg.converge_deadline;
    let grace_ms = cfg.check.lease_loss_grace.as_millis() as u64;
    let result = loop {
        world.flush_recreates().await?;
        world.ensure_replicas().await?;
        let result = check::check(world, &cfg.check).await?;
        let waiting_for_cut = world
            .model
            .cut
            .iter()
            .any(|(_, at)| crate::world::unix_ms() < at + grace_ms + 2000);
        if result.violations.is_empty() && !waiting_for_cut {
            break (true, result);
        }
        if Instant::now() >= end {
            break (false, result);
        }
        // The poll interval of this deadline-bound poll: moto and the controller share
        // two cores, so the invariants (a full describe) are read twice a second.
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    world.end_cut_offs();
    Ok(result)
}

/// After convergence: no mutating EC2 call for `window` (a resync pass included).
async fn idle(world: &World, window: Duration) -> Option<String> {
    let before = world.faults.stats().mutating.requests;
    let moved = eventually(window, || async {
        let now = world.faults.stats().mutating.requests;
        (now > before).then_some(now)
    })
    .await;
    moved.map(|now| {
        format!(
            "{} mutating EC2 calls within {window:?} after convergence (idle)",
            now - before
        )
    })
}

/// Outcome of a soak with shrinking.
#[derive(Debug)]
pub struct Soak {
    /// The full run.
    pub report: Report,
    /// The shortest failing op list found (quiet last), if the run failed and shrinking
    /// was on.
    pub shrunk: Option<(Vec<Op>, Failure)>,
    /// Runs made while shrinking.
    pub shrink_runs: usize,
}

/// Whether `ops` (with a quiet period appended) fails from a fresh world.
async fn fails(cfg: &RunConfig, ops: &[Op], label: &str) -> Result<Option<Failure>, Error> {
    let mut list = ops.to_vec();
    if list.last() != Some(&Op::Quiet) {
        list.push(Op::Quiet);
    }
    let cfg = RunConfig {
        duration: None,
        ..cfg.clone()
    };
    let r = run(&cfg, &list, label).await?;
    Ok(r.failure)
}

/// Searches for the shortest failing prefix of `ops[..=failure.at]` (binary search on the
/// prefix length), then tries dropping single operations from it, within `max_runs`
/// fresh-world runs.
pub async fn shrink(
    cfg: &RunConfig,
    ops: &[Op],
    failure: &Failure,
    max_runs: usize,
) -> Result<(Vec<Op>, Failure, usize), Error> {
    let mut runs = 0;
    let mut best: Vec<Op> = ops[..=failure.at].to_vec();
    let mut best_failure = failure.clone();
    // Prefix lengths (without the trailing quiet): lo passes (assumed), hi fails.
    let mut lo = 0usize;
    let mut hi = failure.at;
    while hi - lo > 1 && runs < max_runs {
        let mid = lo + (hi - lo) / 2;
        runs += 1;
        info!(prefix = mid, lo, hi, "shrink: trying prefix");
        match fails(cfg, &ops[..mid], &format!("shrink-{runs:02}-prefix-{mid}")).await? {
            Some(f) => {
                hi = mid;
                best = ops[..mid].to_vec();
                best.push(Op::Quiet);
                best_failure = f;
            }
            None => lo = mid,
        }
    }
    // Drop single non-quiet operations, last first.
    let mut i = best.len().saturating_sub(1);
    while i > 0 && runs < max_runs {
        i -= 1;
        if best[i] == Op::Quiet {
            continue;
        }
        let mut candidate = best.clone();
        candidate.remove(i);
        runs += 1;
        info!(
            drop = i,
            len = candidate.len(),
            "shrink: trying without one op"
        );
        if let Some(f) = fails(cfg, &candidate, &format!("shrink-{runs:02}-drop-{i}")).await? {
            best = candidate;
            best_failure = f;
        }
    }
    Ok((best, best_failure, runs))
}

/// Runs the soak and, on failure, shrinks it.
pub async fn soak(
    cfg: &RunConfig,
    ops: &[Op],
    shrink_on: bool,
    max_shrink_runs: usize,
) -> Result<Soak, Error> {
    let report = run(cfg, ops, "main").await?;
    let mut out = Soak {
        report,
        shrunk: None,
        shrink_runs: 0,
    };
    if shrink_on && let Some(f) = out.report.failure.clone() {
        eprintln!(
            "soak FAILED at op {} (seed {}); shrinking (at most {max_shrink_runs} runs)...",
            f.at, cfg.seed
        );
        let (list, failure, runs) = shrink(cfg, ops, &f, max_shrink_runs).await?;
        out.shrunk = Some((list, failure));
        out.shrink_runs = runs;
    }
    Ok(out)
}

/// The figures of a run, for humans.
pub fn figures(r: &Report, seed: u64) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "== soak figures (seed {seed})");
    let _ = writeln!(
        s,
        "ops run: {} (skipped as inapplicable: {}); quiet periods passed: {}; invariant checks passed: {}",
        r.ops_run, r.ops_skipped, r.quiet_passed, r.assertions_passed
    );
    let _ = writeln!(s, "ops by kind: {:?}", r.by_kind);
    if !r.converge_times.is_empty() {
        let mut t = r.converge_times.clone();
        t.sort();
        let _ = writeln!(
            s,
            "convergence per quiet period: median {:.1?}, max {:.1?}",
            t[t.len() / 2],
            t[t.len() - 1]
        );
    }
    let st = &r.stats;
    let _ = writeln!(
        s,
        "EC2 calls: {} total; mutating {} (throttled {}, injected {}, rejected {}, upstream errors {}); describe {} (throttled {}, injected {})",
        st.total.requests,
        st.mutating.requests,
        st.mutating.throttled,
        st.mutating.injected,
        st.mutating.rejected,
        st.mutating.upstream_errors,
        st.describe.requests,
        st.describe.throttled,
        st.describe.injected
    );
    for (action, a) in &st.actions {
        let _ = writeln!(
            s,
            "  {action:<36} {:>6} requests, {:>5} forwarded, {:>4} throttled, {:>4} injected, errors {:?}",
            a.requests, a.forwarded, a.throttled, a.injected, a.errors
        );
    }
    let per: Vec<u64> = st
        .enis
        .iter()
        .filter(|(k, _)| k.starts_with("eni-"))
        .map(|(_, a)| effective(a))
        .collect();
    if !per.is_empty() {
        let mut sorted = per.clone();
        sorted.sort();
        let total: u64 = per.iter().sum();
        let _ = writeln!(
            s,
            "mutating calls per ENI that reached EC2 ({} ENIs): mean {:.2}, median {}, p95 {}, max {}",
            per.len(),
            total as f64 / per.len() as f64,
            sorted[sorted.len() / 2],
            sorted[(sorted.len() * 95 / 100).min(sorted.len() - 1)],
            sorted[sorted.len() - 1]
        );
        if let Some((worst, a)) = st
            .enis
            .iter()
            .filter(|(k, _)| k.starts_with("eni-"))
            .max_by_key(|(_, a)| effective(a))
        {
            let _ = writeln!(s, "  costliest ENI {worst}: {a:?}");
        }
    }
    let tokens: Vec<(&String, u64)> = st
        .enis
        .iter()
        .filter(|(k, _)| k.starts_with("token:"))
        .map(|(k, a)| (k, effective(a)))
        .filter(|(_, n)| *n > 0)
        .collect();
    if !tokens.is_empty() {
        let _ = writeln!(
            s,
            "creates that produced no ENI (per client token): {} tokens, max {}",
            tokens.len(),
            tokens.iter().map(|(_, n)| *n).max().unwrap_or(0)
        );
    }
    if !r.unexpected_exits.is_empty() {
        let _ = writeln!(s, "unexpected controller exits: {:?}", r.unexpected_exits);
    }
    let _ = writeln!(
        s,
        "wall time: {:.1?}; logs: {}",
        r.wall,
        r.log_dir.display()
    );
    s
}
