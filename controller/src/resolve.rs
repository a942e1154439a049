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
#[derive(Debug, thiserror::Error)]
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

    /// Resolves subnet IDs and names (names within `vpc`) to subnets, in order:
    /// IDs first, then names, duplicates dropped.
    pub async fn subnets<E: Ec2>(
        &self,
        ec2: &E,
        ids: &[String],
        names: &[String],
        vpc: &str,
    ) -> Result<Vec<Subnet>, ResolveError> {
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
                Err(e) if e.kind == ErrorKind::NotFound => {
                    return Err(ResolveError::SubnetNotFound(missing));
                }
                Err(e) => return Err(e.into()),
            };
            let mut known = lock(&self.subnets);
            for s in found {
                known.insert(s.id.clone(), s);
            }
        }
        let mut out: Vec<Subnet> = Vec::new();
        let mut not_found = Vec::new();
        {
            let known = lock(&self.subnets);
            for id in ids {
                match known.get(id) {
                    Some(s) => out.push(s.clone()),
                    None => not_found.push(id.clone()),
                }
            }
        }
        let by_name = self.subnet_names(ec2, names, vpc).await?;
        for name in names {
            match by_name.get(name).map(Vec::as_slice) {
                None | Some([]) => not_found.push(format!("{name} (by Name tag in {vpc})")),
                Some([one]) => out.push(one.clone()),
                Some(many) => {
                    return Err(ResolveError::SubnetAmbiguous {
                        name: name.clone(),
                        vpc: vpc.to_string(),
                        ids: many.iter().map(|s| s.id.clone()).collect(),
                    });
                }
            }
        }
        if !not_found.is_empty() {
            return Err(ResolveError::SubnetNotFound(not_found));
        }
        let mut seen = Vec::new();
        out.retain(|s| {
            let new = !seen.contains(&s.id);
            seen.push(s.id.clone());
            new
        });
        Ok(out)
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
