//! Subnet and security-group lookups by ID and by name, cached.
//!
//! Subnets and groups named by ID are described once (what the controller reads of them
//! never changes); names are resolved within a VPC and cached for `ttl`. A failed
//! creation that points at a stale entry invalidates the cache.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::ec2::{Ec2, Ec2Error, ErrorKind, LookupQuery, SecurityGroup, Subnet};
use crate::inventory::lock;

/// Why a NodeENI's subnets or security groups could not be resolved.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ResolveError {
    /// Subnets that do not exist.
    #[error("subnet(s) not found: {}", .0.join(", "))]
    SubnetNotFound(Vec<String>),
    /// A subnet name that matches several subnets.
    #[error("subnet name {name:?} matches {} subnets in {vpc}: {}", ids.len(), ids.join(", "))]
    SubnetAmbiguous {
        /// The name.
        name: String,
        /// The VPC.
        vpc: String,
        /// The matches.
        ids: Vec<String>,
    },
    /// Security groups that do not exist.
    /// A subnet given by ID is in another VPC than the Node.
    #[error("subnet {subnet} is in {subnet_vpc}, not in the node's VPC {vpc}")]
    SubnetInOtherVpc {
        /// The subnet.
        subnet: String,
        /// Its VPC.
        subnet_vpc: String,
        /// The Node's VPC.
        vpc: String,
    },
    #[error("security group(s) not found: {}", .0.join(", "))]
    SecurityGroupNotFound(Vec<String>),
    /// A security group name (tag) that matches several groups.
    #[error("security group name {name:?} matches {} groups in {vpc}: {}", ids.len(), ids.join(", "))]
    SecurityGroupAmbiguous {
        /// The name.
        name: String,
        /// The VPC.
        vpc: String,
        /// The matches.
        ids: Vec<String>,
    },
    /// EC2 failed.
    #[error(transparent)]
    Ec2(#[from] Ec2Error),
}

impl ResolveError {
    /// Condition reason for the error.
    pub fn reason(&self) -> &'static str {
        use eni_api::condition::*;
        match self {
            Self::SubnetNotFound(_) => SUBNET_NOT_FOUND,
            Self::SubnetAmbiguous { .. } => SUBNET_AMBIGUOUS,
            Self::SubnetInOtherVpc { .. } => SUBNET_IN_OTHER_VPC,
            Self::SecurityGroupNotFound(_) | Self::SecurityGroupAmbiguous { .. } => {
                SECURITY_GROUP_NOT_FOUND
            }
            Self::Ec2(_) => EC2_ERROR,
        }
    }
}

/// Name lookups cached per (VPC, name).
type NameCache<T> = Mutex<HashMap<(String, String), Cached<Vec<T>>>>;

#[derive(Debug)]
struct Cached<T> {
    value: T,
    at: Instant,
}

/// Lookup caches.
#[derive(Debug)]
pub struct Resolver {
    ttl: Duration,
    subnets: Mutex<HashMap<String, Subnet>>,
    subnet_names: NameCache<Subnet>,
    groups: Mutex<HashMap<String, SecurityGroup>>,
    group_names: NameCache<SecurityGroup>,
}

impl Resolver {
    /// Caches names for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            subnets: Mutex::default(),
            subnet_names: Mutex::default(),
            groups: Mutex::default(),
            group_names: Mutex::default(),
        }
    }

    /// Resolves the spec's subnets in order, one answer per entry: `ids` first, then
    /// `names` (by `Name` tag within `vpc`). Each entry fails on its own, so one bad name
    /// holds back only the ENIs that need it. A subnet given by ID must be in `vpc`.
    pub async fn subnet_list<E: Ec2>(
        &self,
        ec2: &E,
        ids: &[String],
        names: &[String],
        vpc: &str,
    ) -> Vec<Result<Subnet, ResolveError>> {
        let mut out = Vec::with_capacity(ids.len() + names.len());
        let by_id = self.subnets_by_id(ec2, ids).await;
        for id in ids {
            out.push(match &by_id {
                Err(e) => Err(ResolveError::Ec2(e.clone())),
                Ok(known) => match known.get(id) {
                    None => Err(ResolveError::SubnetNotFound(vec![id.clone()])),
                    Some(s) if s.vpc_id != vpc => Err(ResolveError::SubnetInOtherVpc {
                        subnet: id.clone(),
                        subnet_vpc: s.vpc_id.clone(),
                        vpc: vpc.to_string(),
                    }),
                    Some(s) => Ok(s.clone()),
                },
            });
        }
        let by_name = self.subnet_names(ec2, names, vpc).await;
        for name in names {
            out.push(match &by_name {
                Err(e) => Err(e.clone()),
                Ok(found) => match found.get(name).map(Vec::as_slice) {
                    None | Some([]) => Err(ResolveError::SubnetNotFound(vec![format!(
                        "{name} (by Name tag in {vpc})"
                    )])),
                    Some([one]) => Ok(one.clone()),
                    Some(many) => Err(ResolveError::SubnetAmbiguous {
                        name: name.clone(),
                        vpc: vpc.to_string(),
                        ids: many.iter().map(|s| s.id.clone()).collect(),
                    }),
                },
            });
        }
        out
    }

    /// Subnets named by ID, described once (an ID that does not exist is simply absent).
    async fn subnets_by_id<E: Ec2>(
        &self,
        ec2: &E,
        ids: &[String],
    ) -> Result<HashMap<String, Subnet>, Ec2Error> {
        let missing: Vec<String> = {
            let known = lock(&self.subnets);
            ids.iter()
                .filter(|id| !known.contains_key(*id))
                .cloned()
                .collect()
        };
        if !missing.is_empty() {
            let found = match ec2
                .describe_subnets(LookupQuery::Ids(missing.clone()))
                .await
            {
                Ok(found) => found,
                // One unknown ID fails the whole call: ask for each alone.
                Err(e) if e.kind == ErrorKind::NotFound && missing.len() > 1 => {
                    let mut found = Vec::new();
                    for id in &missing {
                        match ec2
                            .describe_subnets(LookupQuery::Ids(vec![id.clone()]))
                            .await
                        {
                            Ok(f) => found.extend(f),
                            Err(e) if e.kind == ErrorKind::NotFound => {}
                            Err(e) => return Err(e),
                        }
                    }
                    found
                }
                Err(e) if e.kind == ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(e),
            };
            let mut known = lock(&self.subnets);
            for s in found {
                known.insert(s.id.clone(), s);
            }
        }
        let known = lock(&self.subnets);
        Ok(ids
            .iter()
            .filter_map(|id| known.get(id).map(|s| (id.clone(), s.clone())))
            .collect())
    }

    async fn subnet_names<E: Ec2>(
        &self,
        ec2: &E,
        names: &[String],
        vpc: &str,
    ) -> Result<BTreeMap<String, Vec<Subnet>>, ResolveError> {
        let mut out = BTreeMap::new();
        let mut missing = Vec::new();
        {
            let cache = lock(&self.subnet_names);
            for name in names {
                match cache.get(&(vpc.to_string(), name.clone())) {
                    Some(c) if c.at.elapsed() < self.ttl => {
                        out.insert(name.clone(), c.value.clone());
                    }
                    _ => missing.push(name.clone()),
                }
            }
        }
        if missing.is_empty() {
            return Ok(out);
        }
        let found = ec2
            .describe_subnets(LookupQuery::NameTags {
                vpc_id: vpc.to_string(),
                names: missing.clone(),
            })
            .await?;
        let mut cache = lock(&self.subnet_names);
        for name in missing {
            let matches: Vec<Subnet> = found
                .iter()
                .filter(|s| s.name.as_deref() == Some(name.as_str()))
                .cloned()
                .collect();
            cache.insert(
                (vpc.to_string(), name.clone()),
                Cached {
                    value: matches.clone(),
                    at: Instant::now(),
                },
            );
            out.insert(name, matches);
        }
        Ok(out)
    }

    /// Resolves security group IDs and names (group name first, then `Name` tag, within
    /// `vpc`) to sorted, deduplicated IDs.
    pub async fn security_groups<E: Ec2>(
        &self,
        ec2: &E,
        ids: &[String],
        names: &[String],
        vpc: &str,
    ) -> Result<Vec<String>, ResolveError> {
        let missing: Vec<String> = {
            let known = lock(&self.groups);
            ids.iter()
                .filter(|id| !known.contains_key(*id))
                .cloned()
                .collect()
        };
        if !missing.is_empty() {
            let found = match ec2
                .describe_security_groups(LookupQuery::Ids(missing.clone()))
                .await
            {
                Ok(found) => found,
                Err(e) if e.kind == ErrorKind::NotFound => {
                    return Err(ResolveError::SecurityGroupNotFound(missing));
                }
                Err(e) => return Err(e.into()),
            };
            let mut known = lock(&self.groups);
            for g in found {
                known.insert(g.id.clone(), g);
            }
        }
        let mut out: Vec<String> = Vec::new();
        let mut not_found: Vec<String> = {
            let known = lock(&self.groups);
            ids.iter()
                .filter(|id| !known.contains_key(*id))
                .cloned()
                .collect()
        };
        out.extend(ids.iter().filter(|id| !not_found.contains(id)).cloned());

        let mut uncached = Vec::new();
        {
            let cache = lock(&self.group_names);
            for name in names {
                match cache.get(&(vpc.to_string(), name.clone())) {
                    Some(c) if c.at.elapsed() < self.ttl => {
                        let ids = single_group(name, vpc, &c.value)?;
                        if ids.is_empty() {
                            not_found.push(format!("{name} (in {vpc})"));
                        }
                        out.extend(ids);
                    }
                    _ => uncached.push(name.clone()),
                }
            }
        }
        if !uncached.is_empty() {
            let mut found = ec2
                .describe_security_groups(LookupQuery::GroupNames {
                    vpc_id: vpc.to_string(),
                    names: uncached.clone(),
                })
                .await?;
            let by_tag: Vec<String> = uncached
                .iter()
                .filter(|n| !found.iter().any(|g| &g.name == *n))
                .cloned()
                .collect();
            if !by_tag.is_empty() {
                found.extend(
                    ec2.describe_security_groups(LookupQuery::NameTags {
                        vpc_id: vpc.to_string(),
                        names: by_tag,
                    })
                    .await?,
                );
            }
            let mut cache = lock(&self.group_names);
            for name in uncached {
                let by_group_name: Vec<SecurityGroup> =
                    found.iter().filter(|g| g.name == name).cloned().collect();
                let matches = if by_group_name.is_empty() {
                    found
                        .iter()
                        .filter(|g| g.name_tag.as_deref() == Some(name.as_str()))
                        .cloned()
                        .collect()
                } else {
                    by_group_name
                };
                cache.insert(
                    (vpc.to_string(), name.clone()),
                    Cached {
                        value: matches.clone(),
                        at: Instant::now(),
                    },
                );
                match single_group(&name, vpc, &matches) {
                    Ok(ids) if ids.is_empty() => not_found.push(format!("{name} (in {vpc})")),
                    Ok(ids) => out.extend(ids),
                    Err(e) => return Err(e),
                }
            }
        }
        if !not_found.is_empty() {
            return Err(ResolveError::SecurityGroupNotFound(not_found));
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Forgets every cached name and ID, after EC2 said something cached is gone.
    pub fn invalidate(&self) {
        lock(&self.subnets).clear();
        lock(&self.subnet_names).clear();
        lock(&self.groups).clear();
        lock(&self.group_names).clear();
    }
}

fn single_group(
    name: &str,
    vpc: &str,
    matches: &[SecurityGroup],
) -> Result<Vec<String>, ResolveError> {
    match matches {
        [] => Ok(Vec::new()),
        [one] => Ok(vec![one.id.clone()]),
        many => Err(ResolveError::SecurityGroupAmbiguous {
            name: name.to_string(),
            vpc: vpc.to_string(),
            ids: many.iter().map(|g| g.id.clone()).collect(),
        }),
    }
}
