//! The pure planning step: desired slots + observed ENIs -> the next EC2 action per ENI.
//!
//! Nothing here does I/O or reads a clock. The reconciler observes (Kubernetes stores,
//! the EC2 inventory), calls [`plan`], and executes the actions; after each action it
//! plans the affected slot again ([`plan_slot`]) so one ENI goes create -> attach ->
//! modify without waiting for the others.

use std::collections::{BTreeMap, BTreeSet};

use eni_api::{AttachmentStatus, tags};

use crate::ec2::{AttachedEni, AttachmentState, Eni, Holder};

/// One ENI the spec asks for: a (Node, subnet) pair at a device index.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Slot {
    /// Node name.
    pub node: String,
    /// The Node's EC2 instance.
    pub instance_id: String,
    /// Subnet to create the ENI in.
    pub subnet_id: String,
    /// Device index to attach it at.
    pub device_index: i32,
    /// Network card to attach it to.
    pub network_card_index: i32,
}

/// ENI settings every slot of a NodeENI shares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Security groups, sorted and deduplicated.
    pub security_groups: Vec<String>,
    /// Description.
    pub description: String,
    /// `DeleteOnTermination` of the attachment.
    pub delete_on_termination: bool,
}

/// What the planner knows of an instance besides the ENIs of this NodeENI.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InstanceView {
    /// Instance type, for messages.
    pub instance_type: String,
    /// Every ENI attached to the instance, by anyone.
    pub attached: Vec<AttachedEni>,
    /// Most ENIs the instance type takes on the slot's network card, if known.
    pub max_enis: Option<i32>,
}

/// An EC2 mutation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Create the slot's ENI.
    Create,
    /// Attach the ENI at the slot's index.
    Attach {
        /// The ENI.
        eni_id: String,
    },
    /// Set `DeleteOnTermination`.
    SetDeleteOnTermination {
        /// The ENI.
        eni_id: String,
        /// Its attachment.
        attachment_id: String,
        /// Desired value.
        delete: bool,
    },
    /// Replace the security groups.
    SetSecurityGroups {
        /// The ENI.
        eni_id: String,
        /// Desired groups.
        groups: Vec<String>,
    },
    /// Replace the description.
    SetDescription {
        /// The ENI.
        eni_id: String,
        /// Desired description.
        description: String,
    },
    /// Detach the ENI.
    Detach {
        /// The ENI.
        eni_id: String,
        /// Its attachment.
        attachment_id: String,
        /// Force (the graceful detach did not finish in time).
        force: bool,
    },
    /// Delete the (detached) ENI.
    Delete {
        /// The ENI.
        eni_id: String,
    },
}

impl Action {
    /// The EC2 action name.
    pub fn operation(&self) -> &'static str {
        match self {
            Self::Create => "CreateNetworkInterface",
            Self::Attach { .. } => "AttachNetworkInterface",
            Self::SetDeleteOnTermination { .. }
            | Self::SetSecurityGroups { .. }
            | Self::SetDescription { .. } => "ModifyNetworkInterfaceAttribute",
            Self::Detach { .. } => "DetachNetworkInterface",
            Self::Delete { .. } => "DeleteNetworkInterface",
        }
    }
}

/// Why a slot cannot make progress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Blocked {
    /// Another ENI occupies the device index.
    DeviceIndexInUse {
        /// The occupant.
        eni_id: String,
        /// Who holds it.
        holder: Holder,
    },
    /// The instance cannot take another ENI.
    InstanceLimit {
        /// Its type.
        instance_type: String,
        /// Its limit.
        max_enis: i32,
    },
}

/// The next step for one ENI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Do this now.
    Act(Action),
    /// EC2 is busy with it (attaching or detaching); look again later.
    Wait,
    /// Cannot proceed until something outside changes.
    Blocked(Blocked),
    /// Nothing to do.
    Done,
}

/// The plan for one slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotPlan {
    /// The ENI serving the slot, if there is one.
    pub eni_id: Option<String>,
    /// Its next step.
    pub step: Step,
    /// Status to report for the slot.
    pub status: AttachmentStatus,
    /// Extra ENIs that also claim the slot (duplicates), to remove.
    pub duplicates: Vec<String>,
}

/// The plan for one NodeENI.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Every desired slot with its plan.
    pub slots: Vec<(Slot, SlotPlan)>,
    /// ENIs that serve no slot (node unselected or gone, subnet dropped, duplicates), with
    /// their next removal step.
    pub removals: Vec<(String, Step)>,
    /// ENIs serving no slot this pass that are kept as they are ([`Held`]).
    pub held: Vec<String>,
}

/// ENIs that must be neither removed nor changed although no slot claims them: those on
/// a draining Node (deletionTimestamp set, pods still running) and those at an index
/// whose subnet or security groups could not be resolved this pass (whether they are
/// still wanted is unknown).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Held {
    /// Every ENI of these Nodes.
    pub nodes: BTreeSet<String>,
    /// ENIs at these (Node, device index) pairs.
    pub indexes: BTreeSet<(String, i32)>,
}

impl Held {
    /// Whether `eni` is held, read from its tags.
    pub fn holds(&self, eni: &Eni) -> bool {
        let Some(node) = eni.tags.get(tags::NODE) else {
            return false;
        };
        if self.nodes.contains(node) {
            return true;
        }
        eni.tags
            .get(tags::DEVICE_INDEX)
            .and_then(|i| i.parse::<i32>().ok())
            .is_some_and(|i| self.indexes.contains(&(node.clone(), i)))
    }
}

impl Plan {
    /// Whether every slot is attached and nothing is being removed.
    pub fn converged(&self) -> bool {
        self.removals.is_empty()
            && self
                .slots
                .iter()
                .all(|(_, p)| p.status == AttachmentStatus::Attached && p.step == Step::Done)
    }

    /// Actions to execute now.
    pub fn actions(&self) -> impl Iterator<Item = (Option<&Slot>, &Action)> {
        let slot_actions = self.slots.iter().filter_map(|(slot, p)| match &p.step {
            Step::Act(a) => Some((Some(slot), a)),
            _ => None,
        });
        let removal_actions = self.removals.iter().filter_map(|(_, step)| match step {
            Step::Act(a) => Some((None, a)),
            _ => None,
        });
        slot_actions.chain(removal_actions)
    }
}

/// Whether an ENI was created for `slot`, read from its tags (and its subnet).
pub fn claims(eni: &Eni, slot: &Slot) -> bool {
    eni.subnet_id == slot.subnet_id
        && eni.tags.get(tags::NODE) == Some(&slot.node)
        && eni.tags.get(tags::INSTANCE) == Some(&slot.instance_id)
        && eni.tags.get(tags::DEVICE_INDEX) == Some(&slot.device_index.to_string())
}

/// How well an ENI serves a slot: higher is better (attached where wanted first).
fn rank(eni: &Eni, slot: &Slot) -> u8 {
    match &eni.attachment {
        Some(a) if a.instance_id == slot.instance_id && a.device_index == slot.device_index => {
            match a.state {
                AttachmentState::Attached => 4,
                AttachmentState::Attaching => 3,
                _ => 1,
            }
        }
        Some(_) => 0,
        None => 2,
    }
}

/// Plans a NodeENI: `slots` are what the spec wants, `enis` every ENI owned by this
/// NodeENI, `instances` what is known of each slot's instance, `stuck` ENIs whose
/// detach has taken longer than the detachment timeout, `held` ENIs to leave alone.
pub fn plan(
    slots: &[Slot],
    enis: &[Eni],
    settings: &Settings,
    instances: &BTreeMap<String, InstanceView>,
    stuck: &BTreeSet<String>,
    held: &Held,
) -> Plan {
    let mut used: BTreeSet<&str> = BTreeSet::new();
    let mut plan = Plan::default();
    for slot in slots {
        let candidates: Vec<&Eni> = enis.iter().filter(|e| claims(e, slot)).collect();
        used.extend(candidates.iter().map(|e| e.id.as_str()));
        let sp = plan_slot(
            slot,
            &candidates,
            settings,
            instances.get(&slot.instance_id),
            stuck,
        );
        for dup in &sp.duplicates {
            if let Some(eni) = enis.iter().find(|e| &e.id == dup) {
                plan.removals
                    .push((dup.clone(), plan_removal(eni, stuck.contains(dup))));
            }
        }
        plan.slots.push((slot.clone(), sp));
    }
    for eni in enis.iter().filter(|e| !used.contains(e.id.as_str())) {
        if held.holds(eni) {
            plan.held.push(eni.id.clone());
        } else {
            plan.removals
                .push((eni.id.clone(), plan_removal(eni, stuck.contains(&eni.id))));
        }
    }
    plan
}

/// Plans one slot given the ENIs that claim it (`stuck`: ENIs whose detach outlasted
/// the detachment timeout; a wanted ENI hung in `detaching` is forced too, then attached
/// again).
pub fn plan_slot(
    slot: &Slot,
    candidates: &[&Eni],
    settings: &Settings,
    instance: Option<&InstanceView>,
    stuck: &BTreeSet<String>,
) -> SlotPlan {
    // Keep the best candidate; the others are duplicates (a crash between create and
    // tag bookkeeping on an emulator without client tokens, or a manual copy).
    let mut sorted: Vec<&Eni> = candidates.to_vec();
    sorted.sort_by(|a, b| rank(b, slot).cmp(&rank(a, slot)).then(a.id.cmp(&b.id)));
    let duplicates = sorted.iter().skip(1).map(|e| e.id.clone()).collect();
    let Some(eni) = sorted.first() else {
        let step = match admission(slot, None, instance) {
            Some(b) => Step::Blocked(b),
            None => Step::Act(Action::Create),
        };
        let status = match step {
            Step::Blocked(_) => AttachmentStatus::Failed,
            _ => AttachmentStatus::Creating,
        };
        return SlotPlan {
            eni_id: None,
            step,
            status,
            duplicates,
        };
    };
    let (step, status) = match &eni.attachment {
        None => match admission(slot, Some(&eni.id), instance) {
            Some(b) => (Step::Blocked(b), AttachmentStatus::Failed),
            None => (
                Step::Act(Action::Attach {
                    eni_id: eni.id.clone(),
                }),
                AttachmentStatus::Attaching,
            ),
        },
        Some(a) if a.instance_id != slot.instance_id || a.device_index != slot.device_index => {
            // Attached somewhere else: take it back.
            match a.state {
                AttachmentState::Detaching if stuck.contains(&eni.id) => {
                    (forced_detach(eni, a), AttachmentStatus::Detaching)
                }
                AttachmentState::Detaching | AttachmentState::Detached => {
                    (Step::Wait, AttachmentStatus::Detaching)
                }
                _ => (
                    Step::Act(Action::Detach {
                        eni_id: eni.id.clone(),
                        attachment_id: a.id.clone(),
                        force: false,
                    }),
                    AttachmentStatus::Detaching,
                ),
            }
        }
        Some(a) => match a.state {
            AttachmentState::Attaching => (Step::Wait, AttachmentStatus::Attaching),
            // Someone detached it (it comes back once detached); hung: force it.
            AttachmentState::Detaching if stuck.contains(&eni.id) => {
                (forced_detach(eni, a), AttachmentStatus::Detaching)
            }
            AttachmentState::Detaching | AttachmentState::Detached => {
                (Step::Wait, AttachmentStatus::Detaching)
            }
            AttachmentState::Attached => (
                drift(eni, a.id.as_str(), a.delete_on_termination, settings),
                AttachmentStatus::Attached,
            ),
        },
    };
    SlotPlan {
        eni_id: Some(eni.id.clone()),
        step,
        status,
        duplicates,
    }
}

fn forced_detach(eni: &Eni, a: &crate::ec2::Attachment) -> Step {
    Step::Act(Action::Detach {
        eni_id: eni.id.clone(),
        attachment_id: a.id.clone(),
        force: true,
    })
}

/// In-place corrections for an attached ENI whose settings differ from the spec.
fn drift(eni: &Eni, attachment_id: &str, dot: bool, settings: &Settings) -> Step {
    if dot != settings.delete_on_termination {
        return Step::Act(Action::SetDeleteOnTermination {
            eni_id: eni.id.clone(),
            attachment_id: attachment_id.to_string(),
            delete: settings.delete_on_termination,
        });
    }
    if eni.security_groups != settings.security_groups {
        return Step::Act(Action::SetSecurityGroups {
            eni_id: eni.id.clone(),
            groups: settings.security_groups.clone(),
        });
    }
    if eni.description != settings.description {
        return Step::Act(Action::SetDescription {
            eni_id: eni.id.clone(),
            description: settings.description.clone(),
        });
    }
    Step::Done
}

/// Whether a new attachment at the slot's index may go ahead (`own`: the ENI that will
/// be attached, if it exists already).
fn admission(slot: &Slot, own: Option<&str>, instance: Option<&InstanceView>) -> Option<Blocked> {
    let instance = instance?;
    let others: Vec<&AttachedEni> = instance
        .attached
        .iter()
        .filter(|a| Some(a.eni_id.as_str()) != own)
        .collect();
    if let Some(occupant) = others.iter().find(|a| {
        a.device_index == slot.device_index && a.network_card_index == slot.network_card_index
    }) {
        return Some(Blocked::DeviceIndexInUse {
            eni_id: occupant.eni_id.clone(),
            holder: occupant.holder(),
        });
    }
    let max = instance.max_enis?;
    let on_card = others
        .iter()
        .filter(|a| a.network_card_index == slot.network_card_index)
        .count();
    (on_card as i64 >= i64::from(max)).then(|| Blocked::InstanceLimit {
        instance_type: instance.instance_type.clone(),
        max_enis: max,
    })
}

/// The next step to get rid of an ENI.
pub fn plan_removal(eni: &Eni, stuck: bool) -> Step {
    match &eni.attachment {
        Some(a) => match a.state {
            AttachmentState::Attached | AttachmentState::Attaching => Step::Act(Action::Detach {
                eni_id: eni.id.clone(),
                attachment_id: a.id.clone(),
                force: false,
            }),
            AttachmentState::Detaching if stuck => Step::Act(Action::Detach {
                eni_id: eni.id.clone(),
                attachment_id: a.id.clone(),
                force: true,
            }),
            AttachmentState::Detaching | AttachmentState::Detached => Step::Wait,
        },
        None => Step::Act(Action::Delete {
            eni_id: eni.id.clone(),
        }),
    }
}

/// Status to report for a held ENI: what EC2 says of it.
pub fn observed_status(eni: &Eni) -> AttachmentStatus {
    match eni.attachment.as_ref().map(|a| a.state) {
        Some(AttachmentState::Attached) => AttachmentStatus::Attached,
        Some(AttachmentState::Attaching) => AttachmentStatus::Attaching,
        Some(_) => AttachmentStatus::Detaching,
        None => AttachmentStatus::Attaching,
    }
}

/// Removal status to report for an ENI on its way out.
pub fn removal_status(eni: &Eni) -> AttachmentStatus {
    match &eni.attachment {
        Some(_) => AttachmentStatus::Detaching,
        None => AttachmentStatus::Deleting,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ec2::Attachment;

    fn slot(node: &str, subnet: &str, index: i32) -> Slot {
        Slot {
            node: node.into(),
            instance_id: format!("i-{node}"),
            subnet_id: subnet.into(),
            device_index: index,
            network_card_index: 0,
        }
    }

    fn settings() -> Settings {
        Settings {
            security_groups: vec!["sg-1".into()],
            description: "d".into(),
            delete_on_termination: true,
        }
    }

    fn eni(id: &str, s: &Slot, attach: Option<AttachmentState>) -> Eni {
        Eni {
            id: id.into(),
            subnet_id: s.subnet_id.clone(),
            mac_address: Some("02:00:00:00:00:01".into()),
            private_ip: None,
            status: if attach.is_some() {
                "in-use"
            } else {
                "available"
            }
            .into(),
            security_groups: vec!["sg-1".into()],
            description: "d".into(),
            tags: BTreeMap::from([
                (tags::NODE.to_string(), s.node.clone()),
                (tags::INSTANCE.to_string(), s.instance_id.clone()),
                (tags::DEVICE_INDEX.to_string(), s.device_index.to_string()),
            ]),
            attachment: attach.map(|state| Attachment {
                id: format!("attach-{id}"),
                instance_id: s.instance_id.clone(),
                device_index: s.device_index,
                network_card_index: 0,
                state,
                delete_on_termination: true,
            }),
            secondary_ips: Vec::new(),
            ipv4_prefixes: Vec::new(),
        }
    }

    fn none() -> BTreeMap<String, InstanceView> {
        BTreeMap::new()
    }

    #[test]
    fn missing_eni_is_created() {
        let s = slot("n1", "subnet-a", 1);
        let p = plan(
            std::slice::from_ref(&s),
            &[],
            &settings(),
            &none(),
            &BTreeSet::new(),
            &Held::default(),
        );
        assert_eq!(p.slots[0].1.step, Step::Act(Action::Create));
        assert_eq!(p.slots[0].1.status, AttachmentStatus::Creating);
        assert!(!p.converged());
    }

    #[test]
    fn created_eni_is_attached_then_done() {
        let s = slot("n1", "subnet-a", 1);
        let e = eni("eni-1", &s, None);
        let p = plan(
            std::slice::from_ref(&s),
            &[e],
            &settings(),
            &none(),
            &BTreeSet::new(),
            &Held::default(),
        );
        assert_eq!(
            p.slots[0].1.step,
            Step::Act(Action::Attach {
                eni_id: "eni-1".into()
            })
        );
        let e = eni("eni-1", &s, Some(AttachmentState::Attaching));
        let p = plan(
            std::slice::from_ref(&s),
            &[e],
            &settings(),
            &none(),
            &BTreeSet::new(),
            &Held::default(),
        );
        assert_eq!(p.slots[0].1.step, Step::Wait);
        let e = eni("eni-1", &s, Some(AttachmentState::Attached));
        let p = plan(
            &[s],
            &[e],
            &settings(),
            &none(),
            &BTreeSet::new(),
            &Held::default(),
        );
        assert_eq!(p.slots[0].1.step, Step::Done);
        assert!(p.converged());
    }

    #[test]
    fn delete_on_termination_and_groups_drift_are_corrected_in_place() {
        let s = slot("n1", "subnet-a", 1);
        let mut e = eni("eni-1", &s, Some(AttachmentState::Attached));
        if let Some(a) = e.attachment.as_mut() {
            a.delete_on_termination = false;
        }
        let p = plan(
            std::slice::from_ref(&s),
            &[e.clone()],
            &settings(),
            &none(),
            &BTreeSet::new(),
            &Held::default(),
        );
        assert_eq!(
            p.slots[0].1.step,
            Step::Act(Action::SetDeleteOnTermination {
                eni_id: "eni-1".into(),
                attachment_id: "attach-eni-1".into(),
                delete: true
            })
        );
        if let Some(a) = e.attachment.as_mut() {
            a.delete_on_termination = true;
        }
        e.security_groups = vec!["sg-old".into()];
        let p = plan(
            std::slice::from_ref(&s),
            &[e.clone()],
            &settings(),
            &none(),
            &BTreeSet::new(),
            &Held::default(),
        );
        assert_eq!(
            p.slots[0].1.step,
            Step::Act(Action::SetSecurityGroups {
                eni_id: "eni-1".into(),
                groups: vec!["sg-1".into()]
            })
        );
        e.security_groups = vec!["sg-1".into()];
        e.description = "old".into();
        let p = plan(
            &[s],
            &[e],
            &settings(),
            &none(),
            &BTreeSet::new(),
            &Held::default(),
        );
        assert!(matches!(
            p.slots[0].1.step,
            Step::Act(Action::SetDescription { .. })
        ));
    }

    #[test]
    fn unwanted_enis_are_detached_then_deleted() {
        let s = slot("n1", "subnet-a", 1);
        let attached = eni("eni-1", &s, Some(AttachmentState::Attached));
        let p = plan(
            &[],
            &[attached],
            &settings(),
            &none(),
            &BTreeSet::new(),
            &Held::default(),
        );
        assert_eq!(
            p.removals,
            vec![(
                "eni-1".to_string(),
                Step::Act(Action::Detach {
                    eni_id: "eni-1".into(),
                    attachment_id: "attach-eni-1".into(),
                    force: false
                })
            )]
        );
        let detaching = eni("eni-1", &s, Some(AttachmentState::Detaching));
        let p = plan(
            &[],
            std::slice::from_ref(&detaching),
            &settings(),
            &none(),
            &BTreeSet::new(),
            &Held::default(),
        );
        assert_eq!(p.removals[0].1, Step::Wait);
        let stuck = BTreeSet::from(["eni-1".to_string()]);
        let p = plan(
            &[],
            &[detaching],
            &settings(),
            &none(),
            &stuck,
            &Held::default(),
        );
        assert!(matches!(
            p.removals[0].1,
            Step::Act(Action::Detach { force: true, .. })
        ));
        let available = eni("eni-1", &s, None);
        let p = plan(
            &[],
            &[available],
            &settings(),
            &none(),
            &BTreeSet::new(),
            &Held::default(),
        );
        assert_eq!(
            p.removals[0].1,
            Step::Act(Action::Delete {
                eni_id: "eni-1".into()
            })
        );
    }

    #[test]
    fn changed_device_index_replaces_the_eni() {
        let old = slot("n1", "subnet-a", 1);
        let new = slot("n1", "subnet-a", 2);
        let e = eni("eni-1", &old, Some(AttachmentState::Attached));
        let p = plan(
            &[new],
            &[e],
            &settings(),
            &none(),
            &BTreeSet::new(),
            &Held::default(),
        );
        assert_eq!(p.slots[0].1.step, Step::Act(Action::Create));
        assert!(matches!(p.removals[0].1, Step::Act(Action::Detach { .. })));
    }

    #[test]
    fn duplicates_keep_the_attached_one() {
        let s = slot("n1", "subnet-a", 1);
        let a = eni("eni-b", &s, Some(AttachmentState::Attached));
        let b = eni("eni-a", &s, None);
        let p = plan(
            &[s],
            &[a, b],
            &settings(),
            &none(),
            &BTreeSet::new(),
            &Held::default(),
        );
        assert_eq!(p.slots[0].1.eni_id.as_deref(), Some("eni-b"));
        assert_eq!(p.slots[0].1.duplicates, vec!["eni-a".to_string()]);
        assert_eq!(
            p.removals,
            vec![(
                "eni-a".to_string(),
                Step::Act(Action::Delete {
                    eni_id: "eni-a".into()
                })
            )]
        );
    }

    #[test]
    fn occupied_device_index_blocks_before_creating() {
        let s = slot("n1", "subnet-a", 1);
        let instances = BTreeMap::from([(
            "i-n1".to_string(),
            InstanceView {
                instance_type: "m5.large".into(),
                attached: vec![
                    AttachedEni {
                        eni_id: "eni-primary".into(),
                        device_index: 0,
                        network_card_index: 0,
                        description: String::new(),
                        nodeeni: None,
                    },
                    AttachedEni {
                        eni_id: "eni-other".into(),
                        device_index: 1,
                        network_card_index: 0,
                        description: String::new(),
                        nodeeni: None,
                    },
                ],
                max_enis: Some(3),
            },
        )]);
        let p = plan(
            &[s],
            &[],
            &settings(),
            &instances,
            &BTreeSet::new(),
            &Held::default(),
        );
        assert_eq!(
            p.slots[0].1.step,
            Step::Blocked(Blocked::DeviceIndexInUse {
                eni_id: "eni-other".into(),
                holder: Holder::Unknown,
            })
        );
        assert_eq!(p.slots[0].1.status, AttachmentStatus::Failed);
    }

    #[test]
    fn instance_limit_blocks_without_creating() {
        let s = slot("n1", "subnet-a", 2);
        let instances = BTreeMap::from([(
            "i-n1".to_string(),
            InstanceView {
                instance_type: "t3.nano".into(),
                attached: vec![
                    AttachedEni {
                        eni_id: "eni-primary".into(),
                        device_index: 0,
                        network_card_index: 0,
                        description: String::new(),
                        nodeeni: None,
                    },
                    AttachedEni {
                        eni_id: "eni-x".into(),
                        device_index: 1,
                        network_card_index: 0,
                        description: String::new(),
                        nodeeni: None,
                    },
                ],
                max_enis: Some(2),
            },
        )]);
        let p = plan(
            &[s],
            &[],
            &settings(),
            &instances,
            &BTreeSet::new(),
            &Held::default(),
        );
        assert_eq!(
            p.slots[0].1.step,
            Step::Blocked(Blocked::InstanceLimit {
                instance_type: "t3.nano".into(),
                max_enis: 2
            })
        );
    }

    #[test]
    fn own_eni_does_not_block_its_own_attach() {
        let s = slot("n1", "subnet-a", 1);
        let e = eni("eni-1", &s, None);
        let instances = BTreeMap::from([(
            "i-n1".to_string(),
            InstanceView {
                instance_type: "m5.large".into(),
                attached: vec![AttachedEni {
                    eni_id: "eni-1".into(),
                    device_index: 1,
                    network_card_index: 0,
                    description: String::new(),
                    nodeeni: None,
                }],
                max_enis: Some(3),
            },
        )]);
        let p = plan(
            &[s],
            &[e],
            &settings(),
            &instances,
            &BTreeSet::new(),
            &Held::default(),
        );
        assert!(matches!(
            p.slots[0].1.step,
            Step::Act(Action::Attach { .. })
        ));
    }

    #[test]
    fn wanted_eni_hung_in_detaching_is_forced() {
        let s = slot("n1", "subnet-a", 2);
        let e = eni("eni-1", &s, Some(AttachmentState::Detaching));
        let p = plan_slot(&s, &[&e], &settings(), None, &BTreeSet::new());
        assert_eq!(p.step, Step::Wait);
        let stuck = BTreeSet::from(["eni-1".to_string()]);
        let p = plan_slot(&s, &[&e], &settings(), None, &stuck);
        assert!(matches!(
            p.step,
            Step::Act(Action::Detach { force: true, .. })
        ));
    }

    #[test]
    fn held_enis_are_neither_removed_nor_replaced() {
        let s = slot("n1", "subnet-a", 2);
        let e = eni("eni-1", &s, Some(AttachmentState::Attached));
        // Its subnet could not be resolved this pass: no slot, but the ENI stays.
        let held = Held {
            nodes: BTreeSet::new(),
            indexes: BTreeSet::from([("n1".to_string(), 2)]),
        };
        let p = plan(
            &[],
            std::slice::from_ref(&e),
            &settings(),
            &none(),
            &BTreeSet::new(),
            &held,
        );
        assert!(p.removals.is_empty());
        assert_eq!(p.held, vec!["eni-1".to_string()]);
        // Another index of the same node is not held.
        let other = slot("n1", "subnet-a", 3);
        let e3 = eni("eni-3", &other, Some(AttachmentState::Attached));
        let p = plan(&[], &[e3], &settings(), &none(), &BTreeSet::new(), &held);
        assert_eq!(p.removals.len(), 1);
        // A draining node holds all its ENIs.
        let held = Held {
            nodes: BTreeSet::from(["n1".to_string()]),
            indexes: BTreeSet::new(),
        };
        let p = plan(&[], &[e], &settings(), &none(), &BTreeSet::new(), &held);
        assert!(p.removals.is_empty());
    }

    #[test]
    fn eni_attached_elsewhere_is_taken_back() {
        let s = slot("n1", "subnet-a", 1);
        let mut e = eni("eni-1", &s, Some(AttachmentState::Attached));
        if let Some(a) = e.attachment.as_mut() {
            a.instance_id = "i-other".into();
        }
        let p = plan(
            &[s],
            &[e],
            &settings(),
            &none(),
            &BTreeSet::new(),
            &Held::default(),
        );
        assert!(matches!(
            p.slots[0].1.step,
            Step::Act(Action::Detach { .. })
        ));
    }
}
