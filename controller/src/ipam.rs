//! The pure pool planner: one ENI's pod address pool (spec bounds, what EC2 has assigned,
//! the pool last published in status, the node's report) -> the EC2 calls to make and the
//! pool to publish.
//!
//! Nothing here does I/O. Everything it reads comes from EC2 (`DescribeNetworkInterfaces`,
//! `DescribeInstanceTypes`) and the API server (the NodeENI's status: the published pool
//! and the node daemon's report), so a restarted controller plans the same thing.
//!
//! A *unit* is what EC2 assigns: one secondary address, or one /28 prefix (16 addresses)
//! in prefixes mode. The pool's life cycle, per unit:
//!
//! 1. assigned in EC2 (`AssignPrivateIpAddresses` with a count; batched: one call per
//!    ENI and pass) -> published in `status.attachments[].ipam` -> the node daemon copies
//!    it into its state file -> cni-helper hands it to pods;
//! 2. when more than `warmTarget` addresses are free, free units move to `releasing`: no
//!    longer published, so the node stops handing them out;
//! 3. the node reports them `released` (out of its pool, no pod using them) -> the
//!    controller unassigns them (one call per ENI and pass) -> EC2 no longer lists them ->
//!    they leave `releasing`.
//!
//! A unit in `releasing` never returns to the pool (a stale node report could otherwise
//! call a re-published unit released); a refill assigns new units. Units of the other
//! kind (secondary addresses on a prefixes ENI after a mode change, or the reverse) are
//! drained the same way.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use eni_api::{EniPool, InterfaceIpam, IpamMode, IpamSpec, PREFIX_ADDRESSES};

/// One ENI's pool as observed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolObserved {
    /// Secondary addresses EC2 lists on the ENI (the primary excluded).
    pub addresses: BTreeSet<String>,
    /// /28 prefixes EC2 lists on the ENI.
    pub prefixes: BTreeSet<String>,
    /// The instance type's `Ipv4AddressesPerInterface` (primary, addresses and prefixes
    /// count one each), when known.
    pub limit: Option<i32>,
}

/// An EC2 call for one ENI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PoolAction {
    /// `AssignPrivateIpAddresses` with `SecondaryPrivateIpAddressCount`.
    AssignAddresses(i32),
    /// `AssignPrivateIpAddresses` with `Ipv4PrefixCount`.
    AssignPrefixes(i32),
    /// `UnassignPrivateIpAddresses` with `PrivateIpAddress.N`.
    UnassignAddresses(Vec<String>),
    /// `UnassignPrivateIpAddresses` with `Ipv4Prefix.N`.
    UnassignPrefixes(Vec<String>),
}

/// How the pool stands after the planned calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolState {
    /// Free addresses between minimum and warm target (or at the maximum with enough
    /// free), nothing being released.
    Ready,
    /// Addresses being assigned or released.
    Progressing,
    /// Fewer than `minimum` free and no room to assign more (maximum or instance limit).
    AtLimit,
}

/// The planner's answer for one ENI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolPlan {
    /// The pool to publish in status.
    pub pool: EniPool,
    /// EC2 calls to make now, in order.
    pub actions: Vec<PoolAction>,
    /// Where the pool stands.
    pub state: PoolState,
}

fn parse_ip(s: &str) -> Option<u32> {
    s.trim().parse::<Ipv4Addr>().ok().map(u32::from)
}

/// (first address, size) of an address or a prefix; `None` when malformed.
fn span(unit: &str) -> Option<(u32, u32)> {
    match unit.split_once('/') {
        Some((ip, len)) => {
            let len: u32 = len.parse().ok().filter(|l| *l <= 32)?;
            let base = parse_ip(ip)?;
            let size = 1u64 << (32 - len);
            Some((base, u32::try_from(size).unwrap_or(u32::MAX)))
        }
        None => parse_ip(unit).map(|ip| (ip, 1)),
    }
}

/// Addresses of `in_use` inside `unit`.
fn used_in(unit: &str, in_use: &BTreeSet<u32>) -> usize {
    match span(unit) {
        Some((base, size)) => in_use.range(base..=base.saturating_add(size - 1)).count(),
        None => 0,
    }
}

/// Plans one ENI's pool. `mode` is the mode in effect on this ENI (prefixes fall back to
/// secondary addresses on non-Nitro instance types: the caller decides). `previous` is the
/// pool published last (None: never published, or status lost); `node` is the node
/// daemon's report for this ENI (None: not reported yet: nothing is released).
pub fn plan_pool(
    spec: &IpamSpec,
    mode: IpamMode,
    observed: &PoolObserved,
    previous: Option<&EniPool>,
    node: Option<&InterfaceIpam>,
) -> PoolPlan {
    let unit_size = match mode {
        IpamMode::SecondaryIps => 1,
        IpamMode::Prefixes => PREFIX_ADDRESSES,
    };
    let (ours, other) = match mode {
        IpamMode::SecondaryIps => (&observed.addresses, &observed.prefixes),
        IpamMode::Prefixes => (&observed.prefixes, &observed.addresses),
    };
    let in_use: BTreeSet<u32> = node
        .map(|n| n.in_use.iter().filter_map(|a| parse_ip(a)).collect())
        .unwrap_or_default();
    let released: BTreeSet<&str> = node
        .map(|n| n.released.iter().map(String::as_str).collect())
        .unwrap_or_default();

    // Releasing: what was releasing and EC2 still has, plus every unit of the other kind.
    let mut releasing: BTreeSet<String> = previous
        .map(|p| {
            p.releasing
                .iter()
                .filter(|u| ours.contains(*u) || other.contains(*u))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    releasing.extend(other.iter().cloned());
    // Published: everything of our kind EC2 has that is not releasing (new units join).
    let mut published: BTreeSet<String> = ours
        .iter()
        .filter(|u| !releasing.contains(*u))
        .cloned()
        .collect();

    let used = |units: &BTreeSet<String>| -> i32 {
        units
            .iter()
            .map(|u| used_in(u, &in_use))
            .sum::<usize>()
            .try_into()
            .unwrap_or(i32::MAX)
    };
    let size = |units: &BTreeSet<String>| -> i32 {
        i32::try_from(units.len())
            .unwrap_or(i32::MAX)
            .saturating_mul(unit_size)
    };
    let warm = spec.warm_target.max(0);
    let minimum = spec.minimum();
    let mut free = size(&published) - used(&published);
    let mut actions = Vec::new();
    let mut at_limit = false;

    if free < minimum {
        // Refill up to the warm target, within maximumPerENI and the instance limit
        // (every assigned unit occupies a slot, releasing ones too, and the primary).
        let need_addresses = warm - free;
        let need = (need_addresses + unit_size - 1) / unit_size;
        let max_units = spec
            .maximum_per_eni
            .map(|m| m / unit_size)
            .unwrap_or(i32::MAX);
        let assigned_ours = i32::try_from(ours.len()).unwrap_or(i32::MAX);
        let room_max = max_units.saturating_sub(assigned_ours);
        let slots = i32::try_from(ours.len() + other.len()).unwrap_or(i32::MAX);
        let room_limit = observed.limit.map(|l| l - 1 - slots).unwrap_or(i32::MAX);
        let n = need.min(room_max).min(room_limit).max(0);
        if n > 0 {
            actions.push(match mode {
                IpamMode::SecondaryIps => PoolAction::AssignAddresses(n),
                IpamMode::Prefixes => PoolAction::AssignPrefixes(n),
            });
        }
        if free + n * unit_size < minimum {
            at_limit = true;
        }
    } else if node.is_some() {
        // Shrink towards the warm target with fully free units, highest first, as long
        // as what stays free is still at least the warm target.
        let candidates: Vec<String> = published
            .iter()
            .rev()
            .filter(|u| used_in(u, &in_use) == 0)
            .cloned()
            .collect();
        for unit in candidates {
            if free - unit_size < warm {
                break;
            }
            published.remove(&unit);
            releasing.insert(unit);
            free -= unit_size;
        }
    }

    // Unassign what the node released and no pod uses (a belt-and-braces check of the
    // node's own).
    let ready_to_go: Vec<&String> = releasing
        .iter()
        .filter(|u| released.contains(u.as_str()) && used_in(u, &in_use) == 0)
        .collect();
    let addresses: Vec<String> = ready_to_go
        .iter()
        .filter(|u| !u.contains('/'))
        .map(|u| (*u).clone())
        .collect();
    let prefixes: Vec<String> = ready_to_go
        .iter()
        .filter(|u| u.contains('/'))
        .map(|u| (*u).clone())
        .collect();
    if !addresses.is_empty() {
        actions.push(PoolAction::UnassignAddresses(addresses));
    }
    if !prefixes.is_empty() {
        actions.push(PoolAction::UnassignPrefixes(prefixes));
    }

    let state = if at_limit {
        PoolState::AtLimit
    } else if actions.is_empty() && releasing.is_empty() {
        PoolState::Ready
    } else {
        PoolState::Progressing
    };
    let pool_size = size(&published);
    let in_use_count = used(&published);
    let (addresses, prefixes) = match mode {
        IpamMode::SecondaryIps => (published.into_iter().collect(), Vec::new()),
        IpamMode::Prefixes => (Vec::new(), published.into_iter().collect()),
    };
    PoolPlan {
        pool: EniPool {
            mode: mode.as_str().to_string(),
            addresses,
            prefixes,
            releasing: releasing.into_iter().collect(),
            pool_size,
            in_use: in_use_count,
            free: pool_size - in_use_count,
        },
        actions,
        state,
    }
}

/// The mode in effect on an instance type: `prefixes` only where prefixes are supported
/// (`Some(true)`: Nitro); `None` (unknown) falls back too.
pub fn effective_mode(spec: &IpamSpec, nitro: Option<bool>) -> IpamMode {
    match (spec.mode, nitro) {
        (IpamMode::Prefixes, Some(true)) => IpamMode::Prefixes,
        _ => IpamMode::SecondaryIps,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(warm: i32, minimum: i32, max: Option<i32>) -> IpamSpec {
        IpamSpec {
            mode: IpamMode::SecondaryIps,
            warm_target: warm,
            minimum: Some(minimum),
            maximum_per_eni: max,
        }
    }

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn addrs(n: u32) -> BTreeSet<String> {
        (0..n)
            .map(|i| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 1, 10)) + i).to_string())
            .collect()
    }

    fn observed(addresses: BTreeSet<String>, limit: Option<i32>) -> PoolObserved {
        PoolObserved {
            addresses,
            prefixes: BTreeSet::new(),
            limit,
        }
    }

    fn report(in_use: &[&str], released: &[&str]) -> InterfaceIpam {
        InterfaceIpam {
            pool: Vec::new(),
            in_use: in_use.iter().map(|s| s.to_string()).collect(),
            released: released.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn empty_eni_is_filled_to_the_warm_target_in_one_call() {
        let p = plan_pool(
            &spec(8, 4, None),
            IpamMode::SecondaryIps,
            &observed(BTreeSet::new(), Some(10)),
            None,
            None,
        );
        assert_eq!(p.actions, [PoolAction::AssignAddresses(8)]);
        assert_eq!(p.state, PoolState::Progressing);
        assert_eq!(p.pool.pool_size, 0);
    }

    #[test]
    fn new_addresses_are_published_and_a_warm_pool_is_left_alone() {
        let p = plan_pool(
            &spec(8, 4, None),
            IpamMode::SecondaryIps,
            &observed(addrs(8), Some(10)),
            None,
            Some(&report(&[], &[])),
        );
        assert!(p.actions.is_empty(), "{:?}", p.actions);
        assert_eq!(p.state, PoolState::Ready);
        assert_eq!(p.pool.addresses.len(), 8);
        assert_eq!((p.pool.pool_size, p.pool.in_use, p.pool.free), (8, 0, 8));
    }

    #[test]
    fn refill_below_minimum_counts_in_use_addresses() {
        // 8 assigned, 5 in use: 3 free < 4 -> 5 more for 8 free.
        let a = addrs(8);
        let used: Vec<&str> = a.iter().take(5).map(String::as_str).collect();
        let p = plan_pool(
            &spec(8, 4, None),
            IpamMode::SecondaryIps,
            &observed(a.clone(), None),
            None,
            Some(&report(&used, &[])),
        );
        assert_eq!(p.actions, [PoolAction::AssignAddresses(5)]);
        assert_eq!((p.pool.in_use, p.pool.free), (5, 3));
        // 4 free: at the minimum, nothing to do.
        let used: Vec<&str> = a.iter().take(4).map(String::as_str).collect();
        let p = plan_pool(
            &spec(8, 4, None),
            IpamMode::SecondaryIps,
            &observed(a.clone(), None),
            None,
            Some(&report(&used, &[])),
        );
        assert!(p.actions.is_empty());
    }

    #[test]
    fn never_beyond_the_instance_limit_or_the_maximum() {
        // m5.large: 10 per interface = primary + 9.
        let p = plan_pool(
            &spec(20, 20, None),
            IpamMode::SecondaryIps,
            &observed(addrs(3), Some(10)),
            None,
            None,
        );
        assert_eq!(p.actions, [PoolAction::AssignAddresses(6)]);
        assert_eq!(p.state, PoolState::AtLimit);
        let p = plan_pool(
            &spec(8, 4, Some(5)),
            IpamMode::SecondaryIps,
            &observed(addrs(3), Some(50)),
            None,
            None,
        );
        assert_eq!(p.actions, [PoolAction::AssignAddresses(2)]);
        // Full and all in use: at the limit, no call.
        let a = addrs(9);
        let used: Vec<&str> = a.iter().map(String::as_str).collect();
        let p = plan_pool(
            &spec(8, 4, None),
            IpamMode::SecondaryIps,
            &observed(a.clone(), Some(10)),
            None,
            Some(&report(&used, &[])),
        );
        assert!(p.actions.is_empty());
        assert_eq!(p.state, PoolState::AtLimit);
    }

    #[test]
    fn shrink_takes_free_addresses_out_first_and_unassigns_after_the_node_released_them() {
        // 12 assigned, 2 in use, warm 8: 10 free -> 2 to release.
        let a = addrs(12);
        let used: Vec<&str> = a.iter().take(2).map(String::as_str).collect();
        let p = plan_pool(
            &spec(8, 4, None),
            IpamMode::SecondaryIps,
            &observed(a.clone(), None),
            None,
            Some(&report(&used, &[])),
        );
        assert!(
            p.actions.is_empty(),
            "nothing unassigned before the node agrees"
        );
        assert_eq!(p.pool.releasing, ["10.0.1.20", "10.0.1.21"]);
        assert_eq!(p.pool.addresses.len(), 10);
        assert_eq!(p.pool.free, 8);
        assert_eq!(p.state, PoolState::Progressing);

        // Level-triggered: the same inputs give the same answer.
        let again = plan_pool(
            &spec(8, 4, None),
            IpamMode::SecondaryIps,
            &observed(a.clone(), None),
            Some(&p.pool),
            Some(&report(&used, &[])),
        );
        assert_eq!(again.pool, p.pool);
        assert!(again.actions.is_empty());

        // The node released one of them: that one is unassigned.
        let p2 = plan_pool(
            &spec(8, 4, None),
            IpamMode::SecondaryIps,
            &observed(a.clone(), None),
            Some(&p.pool),
            Some(&report(&used, &["10.0.1.21"])),
        );
        assert_eq!(
            p2.actions,
            [PoolAction::UnassignAddresses(vec!["10.0.1.21".into()])]
        );
        // EC2 no longer lists it: it leaves releasing.
        let mut after = a.clone();
        after.remove("10.0.1.21");
        let p3 = plan_pool(
            &spec(8, 4, None),
            IpamMode::SecondaryIps,
            &observed(after, None),
            Some(&p2.pool),
            Some(&report(&used, &["10.0.1.21"])),
        );
        assert_eq!(p3.pool.releasing, ["10.0.1.20"]);
        assert!(p3.actions.is_empty());
    }

    #[test]
    fn addresses_in_use_are_never_released() {
        // 12 assigned, the top 10 in use, warm 1: only 10.0.1.10 and .11 are free.
        let a = addrs(12);
        let used: Vec<&str> = a.iter().skip(2).map(String::as_str).collect();
        let p = plan_pool(
            &spec(1, 0, None),
            IpamMode::SecondaryIps,
            &observed(a.clone(), None),
            None,
            Some(&report(&used, &[])),
        );
        assert_eq!(p.pool.releasing, ["10.0.1.11"]);
        // Even if a node claims an in-use address released, it is not unassigned.
        let mut prev = p.pool.clone();
        prev.releasing.push("10.0.1.21".into());
        let p = plan_pool(
            &spec(1, 0, None),
            IpamMode::SecondaryIps,
            &observed(a.clone(), None),
            Some(&prev),
            Some(&report(&used, &["10.0.1.21", "10.0.1.11"])),
        );
        assert_eq!(
            p.actions,
            [PoolAction::UnassignAddresses(vec!["10.0.1.11".into()])]
        );
    }

    #[test]
    fn nothing_is_released_without_a_node_report() {
        let p = plan_pool(
            &spec(2, 1, None),
            IpamMode::SecondaryIps,
            &observed(addrs(9), None),
            None,
            None,
        );
        assert!(p.actions.is_empty());
        assert!(p.pool.releasing.is_empty());
    }

    #[test]
    fn releasing_units_never_return_a_refill_assigns_new_ones() {
        let a = addrs(4);
        let prev = EniPool {
            mode: "secondaryIPs".into(),
            addresses: vec!["10.0.1.10".into(), "10.0.1.11".into()],
            releasing: vec!["10.0.1.12".into(), "10.0.1.13".into()],
            ..EniPool::default()
        };
        let p = plan_pool(
            &spec(4, 2, None),
            IpamMode::SecondaryIps,
            &observed(a, Some(10)),
            Some(&prev),
            Some(&report(&["10.0.1.10"], &[])),
        );
        // 1 free < 2: 3 new, the slots of the releasing ones counted.
        assert_eq!(p.actions, [PoolAction::AssignAddresses(3)]);
        assert_eq!(p.pool.releasing, ["10.0.1.12", "10.0.1.13"]);
    }

    #[test]
    fn prefixes_mode_counts_sixteen_per_prefix() {
        let ipam = IpamSpec {
            mode: IpamMode::Prefixes,
            warm_target: 8,
            minimum: Some(4),
            maximum_per_eni: None,
        };
        let p = plan_pool(
            &ipam,
            IpamMode::Prefixes,
            &PoolObserved {
                limit: Some(10),
                ..PoolObserved::default()
            },
            None,
            None,
        );
        assert_eq!(p.actions, [PoolAction::AssignPrefixes(1)]);
        // One prefix, 13 in use: 3 free < 4 -> one more prefix.
        let in_use: Vec<String> = (0..13).map(|i| format!("10.0.1.{}", 32 + i)).collect();
        let in_use: Vec<&str> = in_use.iter().map(String::as_str).collect();
        let obs = PoolObserved {
            prefixes: set(&["10.0.1.32/28"]),
            limit: Some(10),
            ..PoolObserved::default()
        };
        let p = plan_pool(
            &ipam,
            IpamMode::Prefixes,
            &obs,
            None,
            Some(&report(&in_use, &[])),
        );
        assert_eq!(p.actions, [PoolAction::AssignPrefixes(1)]);
        assert_eq!(p.pool.prefixes, ["10.0.1.32/28"]);
        assert_eq!((p.pool.pool_size, p.pool.in_use, p.pool.free), (16, 13, 3));
        // Two prefixes, none in use, warm 8: one could go but 16 - 16 < 8 keeps it...
        let obs = PoolObserved {
            prefixes: set(&["10.0.1.32/28", "10.0.1.48/28"]),
            limit: Some(10),
            ..PoolObserved::default()
        };
        let p = plan_pool(
            &ipam,
            IpamMode::Prefixes,
            &obs,
            None,
            Some(&report(&[], &[])),
        );
        assert_eq!(p.pool.releasing, ["10.0.1.48/28"], "32 free, 16 stay");
        // ... a prefix with one address in use stays.
        let p = plan_pool(
            &ipam,
            IpamMode::Prefixes,
            &obs,
            None,
            Some(&report(&["10.0.1.50"], &[])),
        );
        assert_eq!(p.pool.releasing, ["10.0.1.32/28"]);
        // maximumPerENI 20 allows one prefix.
        let capped = IpamSpec {
            maximum_per_eni: Some(20),
            ..ipam.clone()
        };
        let obs = PoolObserved {
            prefixes: set(&["10.0.1.32/28"]),
            limit: Some(10),
            ..PoolObserved::default()
        };
        let p = plan_pool(
            &capped,
            IpamMode::Prefixes,
            &obs,
            None,
            Some(&report(&in_use, &[])),
        );
        assert!(p.actions.is_empty());
        assert_eq!(p.state, PoolState::AtLimit);
    }

    #[test]
    fn the_other_kind_is_drained_after_a_mode_change() {
        let ipam = IpamSpec {
            mode: IpamMode::Prefixes,
            ..IpamSpec::default()
        };
        let obs = PoolObserved {
            addresses: set(&["10.0.1.10", "10.0.1.11"]),
            prefixes: BTreeSet::new(),
            limit: Some(10),
        };
        let p = plan_pool(
            &ipam,
            IpamMode::Prefixes,
            &obs,
            None,
            Some(&report(&["10.0.1.10"], &["10.0.1.11"])),
        );
        assert_eq!(
            p.actions,
            [
                PoolAction::AssignPrefixes(1),
                PoolAction::UnassignAddresses(vec!["10.0.1.11".into()])
            ]
        );
        assert_eq!(p.pool.releasing, ["10.0.1.10", "10.0.1.11"]);
    }

    #[test]
    fn prefixes_fall_back_off_nitro() {
        let ipam = IpamSpec {
            mode: IpamMode::Prefixes,
            ..IpamSpec::default()
        };
        assert_eq!(effective_mode(&ipam, Some(true)), IpamMode::Prefixes);
        assert_eq!(effective_mode(&ipam, Some(false)), IpamMode::SecondaryIps);
        assert_eq!(effective_mode(&ipam, None), IpamMode::SecondaryIps);
        assert_eq!(
            effective_mode(&IpamSpec::default(), Some(true)),
            IpamMode::SecondaryIps
        );
    }
}
