//! Pod address pools (`spec.ipam`): after the ENI pass, each attached ENI's pool is
//! planned ([`crate::ipam::plan_pool`]) from the inventory (EC2's addresses and prefixes),
//! the instance type's limits, the pool last published in status and the node daemon's
//! report, and the EC2 calls are made: one assign or unassign call per ENI and kind,
//! through the same rate-limited EC2 client as everything else.

use std::collections::BTreeMap;

use eni_api::{EniPool, IpamMode, IpamSpec, NodeENI, condition, tags};
use futures::{FutureExt, StreamExt};
use kube::ResourceExt;
use tracing::{info, warn};

use super::{Context, Outcome};
use crate::ec2::{AttachmentState, Ec2, Eni};
use crate::inventory::lock;
use crate::ipam::{PoolAction, PoolObserved, PoolPlan, PoolState, effective_mode, plan_pool};

/// The IPAM condition: (status, reason, message).
pub(super) type IpamVerdict = (bool, &'static str, String);

/// The pools as status lists them now (carried through interim status writes).
pub(super) fn published(obj: &NodeENI) -> BTreeMap<String, EniPool> {
    obj.status
        .iter()
        .flat_map(|s| &s.attachments)
        .filter_map(|a| Some((a.eni_id.clone(), a.ipam.clone()?)))
        .filter(|(id, _)| !id.is_empty())
        .collect()
}

/// One ENI's inputs.
struct Work {
    eni: Eni,
    node: String,
    spec: IpamSpec,
    mode: IpamMode,
    observed: PoolObserved,
    previous: Option<EniPool>,
    report: Option<eni_api::InterfaceIpam>,
}

fn observed(eni: &Eni, limit: Option<i32>) -> PoolObserved {
    PoolObserved {
        addresses: eni.secondary_ips.iter().cloned().collect(),
        prefixes: eni.ipv4_prefixes.iter().cloned().collect(),
        limit,
    }
}

fn plan_of(w: &Work) -> PoolPlan {
    plan_pool(
        &w.spec,
        w.mode,
        &w.observed,
        w.previous.as_ref(),
        w.report.as_ref(),
    )
}

/// Plans and acts on the pools of the NodeENI's attached ENIs; records the pools to
/// publish and the IPAM condition in `outcome`.
pub(super) async fn pools<E: Ec2>(ctx: &Context<E>, obj: &NodeENI, outcome: &mut Outcome) {
    let name = obj.name_any();
    let previous = published(obj);
    if obj.spec.ipam.is_none() && previous.is_empty() {
        outcome.pools.clear();
        outcome.ipam = None;
        return;
    }
    if obj.metadata.deletion_timestamp.is_some() {
        // The ENIs are going, their addresses with them.
        return;
    }
    // Without an ipam section, pools published earlier drain: nothing assigned, every
    // free unit released once the node lets go of it.
    let draining_spec = IpamSpec {
        warm_target: 0,
        minimum: Some(0),
        ..IpamSpec::default()
    };
    let enis: Vec<Eni> = lock(&ctx.inventory)
        .owned_by(&name)
        .into_iter()
        .filter(|e| {
            e.attachment
                .as_ref()
                .is_some_and(|a| a.state == AttachmentState::Attached)
        })
        .collect();
    let reports = obj
        .status
        .as_ref()
        .map(|s| s.node_reports.clone())
        .unwrap_or_default();
    let mut unsupported: Vec<String> = Vec::new();
    let mut work = Vec::new();
    for eni in enis {
        let Some(att) = eni.attachment.clone() else {
            continue;
        };
        let prev = previous.get(&eni.id).cloned();
        let spec = match (&obj.spec.ipam, &prev) {
            (Some(s), _) => s.clone(),
            (None, Some(_)) => draining_spec.clone(),
            (None, None) => continue,
        };
        let instance_type = ctx
            .instances
            .get(&att.instance_id)
            .map(|i| i.instance_type)
            .unwrap_or_default();
        let (limit, nitro) = ctx.instances.ip_limits(&instance_type);
        let mode = match (&obj.spec.ipam, &prev) {
            (Some(s), _) => {
                let m = effective_mode(s, nitro);
                if s.mode == IpamMode::Prefixes && m != IpamMode::Prefixes {
                    let t = if instance_type.is_empty() {
                        format!("unknown type of {}", att.instance_id)
                    } else {
                        instance_type.clone()
                    };
                    if !unsupported.contains(&t) {
                        unsupported.push(t);
                    }
                }
                m
            }
            (None, Some(p)) if p.mode == IpamMode::Prefixes.as_str() => IpamMode::Prefixes,
            _ => IpamMode::SecondaryIps,
        };
        let node = eni.tags.get(tags::NODE).cloned().unwrap_or_default();
        let report = reports
            .iter()
            .find(|r| r.node_name == node)
            .and_then(|r| r.interfaces.iter().find(|i| i.eni_id == eni.id))
            .and_then(|i| i.ipam.clone());
        work.push(Work {
            observed: observed(&eni, limit),
            eni,
            node,
            spec,
            mode,
            previous: prev,
            report,
        });
    }

    // Act: one chain per ENI, as many at once as the ENI chains.
    let parallel = ctx.config.parallel_operations.max(1);
    // The futures are made (and boxed) before the stream runs: a closure over `&Work`
    // kept inside the stream would make the reconcile future not `Send` for every lifetime.
    let chains: Vec<futures::future::BoxFuture<'_, Option<String>>> = work
        .iter()
        .map(|w| act(ctx, w, plan_of(w)).map(Result::err).boxed())
        .collect();
    let errors: Vec<String> = futures::stream::iter(chains)
        .buffer_unordered(parallel)
        .collect::<Vec<Option<String>>>()
        .await
        .into_iter()
        .flatten()
        .collect();

    // What to publish: planned again from the inventory as the calls left it.
    let mut pools = BTreeMap::new();
    let mut at_limit = Vec::new();
    let mut progressing = 0;
    for w in &work {
        let eni = lock(&ctx.inventory).get(&w.eni.id).cloned();
        let Some(eni) = eni else { continue };
        let again = Work {
            observed: observed(&eni, w.observed.limit),
            previous: w.previous.clone(),
            report: w.report.clone(),
            spec: w.spec.clone(),
            eni,
            node: w.node.clone(),
            mode: w.mode,
        };
        let p = plan_of(&again);
        match p.state {
            PoolState::Ready => {}
            PoolState::Progressing => progressing += 1,
            PoolState::AtLimit => at_limit.push(format!("{} ({})", w.node, w.eni.id)),
        }
        let drained = obj.spec.ipam.is_none()
            && p.pool.addresses.is_empty()
            && p.pool.prefixes.is_empty()
            && p.pool.releasing.is_empty();
        if !drained {
            pools.insert(w.eni.id.clone(), p.pool);
        }
    }
    outcome.pools = pools;
    outcome.pools_pending = progressing > 0 || !errors.is_empty();

    outcome.ipam = obj.spec.ipam.as_ref().map(|_| {
        let fallback = (!unsupported.is_empty()).then(|| {
            format!(
                "prefixes need a Nitro instance type; secondary addresses are used on {}",
                unsupported.join(", ")
            )
        });
        let with_fallback = |m: String| match &fallback {
            Some(f) => format!("{m}; {f}"),
            None => m,
        };
        if let Some(e) = errors.first() {
            (
                false,
                condition::EC2_ERROR,
                with_fallback(format!("assigning pod addresses: {e}")),
            )
        } else if !at_limit.is_empty() {
            (
                false,
                condition::POOL_AT_LIMIT,
                with_fallback(format!(
                    "fewer than minimum free addresses and no room for more (maximumPerENI or the instance type's Ipv4AddressesPerInterface) on {}",
                    at_limit.join(", ")
                )),
            )
        } else if progressing > 0 {
            (
                false,
                condition::POOL_PROGRESSING,
                with_fallback(format!("{progressing} pools being filled or shrunk")),
            )
        } else if let Some(f) = fallback {
            (true, condition::PREFIXES_UNSUPPORTED, f)
        } else {
            (
                true,
                condition::POOL_READY,
                format!("{} pools within their bounds", work.len()),
            )
        }
    });
}

/// Makes one ENI's EC2 calls and applies their answers to the inventory.
async fn act<E: Ec2>(ctx: &Context<E>, w: &Work, plan: PoolPlan) -> Result<(), String> {
    for action in plan.actions {
        let id = w.eni.id.clone();
        match action {
            PoolAction::AssignAddresses(n) | PoolAction::AssignPrefixes(n) => {
                let prefixes = matches!(action, PoolAction::AssignPrefixes(_));
                match ctx.ec2.assign_ips(id.clone(), n, prefixes).await {
                    Ok(got) => {
                        info!(eni = %id, node = %w.node, assigned = ?got, "pod addresses assigned");
                        lock(&ctx.inventory).update(&id, |e| {
                            let list = if prefixes {
                                &mut e.ipv4_prefixes
                            } else {
                                &mut e.secondary_ips
                            };
                            list.extend(got);
                            list.sort();
                            list.dedup();
                        });
                    }
                    Err(e) => {
                        warn!(eni = %id, error = %e, "assigning pod addresses failed");
                        return Err(format!("{id}: {e}"));
                    }
                }
            }
            PoolAction::UnassignAddresses(units) | PoolAction::UnassignPrefixes(units) => {
                let prefixes = units.iter().any(|u| u.contains('/'));
                match ctx
                    .ec2
                    .unassign_ips(id.clone(), units.clone(), prefixes)
                    .await
                {
                    Ok(()) => {
                        info!(eni = %id, node = %w.node, released = ?units, "pod addresses unassigned");
                        lock(&ctx.inventory).update(&id, |e| {
                            e.secondary_ips.retain(|a| !units.contains(a));
                            e.ipv4_prefixes.retain(|p| !units.contains(p));
                        });
                    }
                    Err(e) => {
                        warn!(eni = %id, error = %e, "unassigning pod addresses failed");
                        return Err(format!("{id}: {e}"));
                    }
                }
            }
        }
    }
    Ok(())
}
