//! Pod address allocations, `<state-dir>/ipam.json`, under the lock `<state-dir>/ipam.lock`.
//!
//! cni-helper (as an IPAM plugin) records here which pod holds which address of an ENI's
//! pool (`enis.json` `pools`); the node daemon reads it to report usage and to release
//! addresses the controller wants back. Every read-modify-write, on either side, happens
//! under an exclusive `flock` of the lock file, held by an open file descriptor: a process
//! killed with SIGKILL drops it with its descriptors, so a crash never leaves the lock
//! held. The file itself is replaced atomically (a temporary file, then a rename), so a
//! crash mid-write leaves the old or the new content.
//!
//! ```json
//! {"version":1,"allocations":[{"eniID":"eni-0123","address":"10.0.1.20",
//!   "containerID":"c1","ifName":"net1","network":"vpc","podNamespace":"default","podName":"p","podUID":"..."}],
//!  "last":{"eni-0123":"10.0.1.20"}}
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, PodPool};

/// Current version of the allocation file.
pub const VERSION: u32 = 1;
/// Allocation file name inside the state directory.
pub const FILE_NAME: &str = "ipam.json";
/// Lock file name inside the state directory.
pub const LOCK_NAME: &str = "ipam.lock";

/// One address held by one container's interface.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Allocation {
    /// The ENI the address belongs to.
    #[serde(rename = "eniID")]
    pub eni_id: String,
    /// The address.
    pub address: String,
    /// `CNI_CONTAINERID`.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// `CNI_IFNAME`.
    #[serde(rename = "ifName", default)]
    pub if_name: String,
    /// The network (`name` of the network config): GC only frees its own.
    #[serde(default)]
    pub network: String,
    /// Pod namespace (`K8S_POD_NAMESPACE`), when known.
    #[serde(rename = "podNamespace", default)]
    pub pod_namespace: String,
    /// Pod name (`K8S_POD_NAME`), when known.
    #[serde(rename = "podName", default)]
    pub pod_name: String,
    /// Pod UID (`K8S_POD_UID`), when known.
    #[serde(rename = "podUID", default)]
    pub pod_uid: String,
}

/// Content of `ipam.json`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Allocations {
    /// Always [`VERSION`].
    pub version: u32,
    /// Every address held.
    #[serde(default)]
    pub allocations: Vec<Allocation>,
    /// The address last handed out per ENI: the next one is searched after it, so a
    /// freed address is reused last (peers' ARP caches and conntrack entries age out).
    #[serde(default)]
    pub last: BTreeMap<String, String>,
}

impl Default for Allocations {
    fn default() -> Self {
        Self {
            version: VERSION,
            allocations: Vec::new(),
            last: BTreeMap::new(),
        }
    }
}

impl Allocations {
    /// Addresses held on `eni_id`.
    pub fn held(&self, eni_id: &str) -> BTreeSet<String> {
        self.allocations
            .iter()
            .filter(|a| a.eni_id == eni_id)
            .map(|a| a.address.clone())
            .collect()
    }

    /// The allocation of (`container_id`, `if_name`).
    pub fn find(&self, container_id: &str, if_name: &str) -> Option<&Allocation> {
        self.allocations
            .iter()
            .find(|a| a.container_id == container_id && a.if_name == if_name)
    }

    /// Picks a free address of `pool` for `eni_id` (the first free one after the last one
    /// handed out, wrapping) and records `alloc` with it; `None` when the pool has no
    /// free address. A container interface that already holds an address gets it again
    /// (a repeated ADD).
    pub fn allocate(&mut self, pool: &PodPool, mut alloc: Allocation) -> Option<String> {
        if let Some(a) = self.find(&alloc.container_id, &alloc.if_name)
            && a.eni_id == alloc.eni_id
        {
            return Some(a.address.clone());
        }
        let held = self.held(&alloc.eni_id);
        let all = pool.expand();
        let last: Option<Ipv4Addr> = self.last.get(&alloc.eni_id).and_then(|a| a.parse().ok());
        let start = last
            .and_then(|l| all.iter().position(|a| *a > l))
            .unwrap_or(0);
        let pick = all[start..]
            .iter()
            .chain(&all[..start])
            .find(|a| !held.contains(&a.to_string()))?
            .to_string();
        alloc.address = pick.clone();
        self.last.insert(alloc.eni_id.clone(), pick.clone());
        self.allocations.push(alloc);
        self.allocations.sort();
        Some(pick)
    }

    /// Frees what (`container_id`, `if_name`) holds; returns it.
    pub fn release(&mut self, container_id: &str, if_name: &str) -> Option<Allocation> {
        let at = self
            .allocations
            .iter()
            .position(|a| a.container_id == container_id && a.if_name == if_name)?;
        Some(self.allocations.remove(at))
    }

    /// Frees every allocation `keep` refuses; returns them.
    pub fn retain(&mut self, mut keep: impl FnMut(&Allocation) -> bool) -> Vec<Allocation> {
        let mut gone = Vec::new();
        self.allocations.retain(|a| {
            let k = keep(a);
            if !k {
                gone.push(a.clone());
            }
            k
        });
        gone
    }
}

/// Path of the allocation file in `state_dir`.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

/// The allocation file, read under the exclusive lock; the lock is held until this is
/// dropped.
#[derive(Debug)]
pub struct Locked {
    _lock: File,
    path: PathBuf,
    /// The allocations as read; change them and [`Locked::save`].
    pub allocations: Allocations,
}

/// Takes the exclusive lock of `state_dir` (waiting for it) and reads the allocations
/// (none when the file does not exist yet). Creates the directory when needed.
pub fn lock(state_dir: &Path) -> Result<Locked, Error> {
    let io = |path: PathBuf| move |source: std::io::Error| Error::Io { path, source };
    std::fs::create_dir_all(state_dir).map_err(io(state_dir.to_path_buf()))?;
    let lock_path = state_dir.join(LOCK_NAME);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io(lock_path.clone()))?;
    file.lock().map_err(io(lock_path))?;
    let path = path(state_dir);
    let allocations = match std::fs::read(&path) {
        Ok(bytes) => parse(&bytes).map_err(|e| match e {
            crate::ParseError::Json(source) => Error::Parse {
                path: path.clone(),
                source,
            },
            crate::ParseError::Version(version) => Error::Version {
                path: path.clone(),
                version,
            },
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Allocations::default(),
        Err(source) => {
            return Err(Error::Io {
                path: path.clone(),
                source,
            });
        }
    };
    Ok(Locked {
        _lock: file,
        path,
        allocations,
    })
}

/// Parses allocation file bytes (same tolerance rules as `enis.json`).
pub fn parse(bytes: &[u8]) -> Result<Allocations, crate::ParseError> {
    #[derive(Deserialize)]
    struct Probe {
        version: u64,
    }
    let probe: Probe = serde_json::from_slice(bytes)?;
    if probe.version != u64::from(VERSION) {
        return Err(crate::ParseError::Version(probe.version));
    }
    Ok(serde_json::from_slice(bytes)?)
}

impl Locked {
    /// Writes the allocations back atomically (still under the lock).
    pub fn save(&self) -> Result<(), Error> {
        crate::write_atomic(&self.path, &self.allocations)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> PodPool {
        PodPool {
            subnet_cidr: "10.0.1.0/24".into(),
            gateway: "10.0.1.1".into(),
            addresses: vec!["10.0.1.20".into(), "10.0.1.21".into(), "10.0.1.22".into()],
            prefixes: Vec::new(),
        }
    }

    fn who(c: &str) -> Allocation {
        Allocation {
            eni_id: "eni-1".into(),
            container_id: c.into(),
            if_name: "net1".into(),
            ..Allocation::default()
        }
    }

    #[test]
    fn allocate_round_robin_and_release() {
        let mut a = Allocations::default();
        let p = pool();
        assert_eq!(a.allocate(&p, who("c1")).as_deref(), Some("10.0.1.20"));
        assert_eq!(a.allocate(&p, who("c2")).as_deref(), Some("10.0.1.21"));
        // A repeated ADD gets the same address.
        assert_eq!(a.allocate(&p, who("c1")).as_deref(), Some("10.0.1.20"));
        assert!(a.release("c1", "net1").is_some());
        // The freed address is reused last.
        assert_eq!(a.allocate(&p, who("c3")).as_deref(), Some("10.0.1.22"));
        assert_eq!(a.allocate(&p, who("c4")).as_deref(), Some("10.0.1.20"));
        assert_eq!(a.allocate(&p, who("c5")), None, "pool empty");
        assert_eq!(a.held("eni-1").len(), 3);
        assert_eq!(a.held("eni-2").len(), 0);
    }

    #[test]
    fn prefixes_expand_to_sixteen_addresses() {
        let p = PodPool {
            prefixes: vec!["10.0.1.32/28".into()],
            addresses: vec!["10.0.1.5".into()],
            ..PodPool::default()
        };
        let all = p.expand();
        assert_eq!(all.len(), 17);
        assert_eq!(all[0].to_string(), "10.0.1.5");
        assert_eq!(all[16].to_string(), "10.0.1.47");
        assert!(p.holds("10.0.1.32/28") && p.holds("10.0.1.5") && !p.holds("10.0.1.33"));
    }

    #[test]
    fn lock_save_and_read_back() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        {
            let mut l = lock(dir.path())?;
            assert!(l.allocations.allocations.is_empty());
            l.allocations.allocate(&pool(), who("c1"));
            l.save()?;
        }
        let l = lock(dir.path())?;
        assert_eq!(l.allocations.held("eni-1").len(), 1);
        Ok(())
    }

    #[test]
    fn concurrent_allocations_never_share_an_address() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let p = PodPool {
            prefixes: vec![
                "10.0.1.32/28".into(),
                "10.0.1.48/28".into(),
                "10.0.1.64/28".into(),
                "10.0.1.80/28".into(),
            ],
            ..PodPool::default()
        };
        let threads: Vec<_> = (0..50)
            .map(|i| {
                let dir = dir.path().to_path_buf();
                let p = p.clone();
                std::thread::spawn(move || -> Result<Option<String>, Error> {
                    // Each thread opens the lock file itself, like separate processes.
                    let mut l = lock(&dir)?;
                    let got = l.allocations.allocate(&p, who(&format!("c{i}")));
                    l.save()?;
                    Ok(got)
                })
            })
            .collect();
        let mut got = BTreeSet::new();
        for t in threads {
            let a = t.join().map_err(|_| "thread panicked")??;
            assert!(
                got.insert(a.ok_or("pool of 64 ran out")?),
                "handed out twice"
            );
        }
        assert_eq!(got.len(), 50);
        assert_eq!(lock(dir.path())?.allocations.allocations.len(), 50);
        Ok(())
    }
}
