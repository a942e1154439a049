//! What real EC2 does with `AssignPrivateIpAddresses` / `UnassignPrivateIpAddresses` and
//! moto does not (REFERENCE §7). Pure helpers; the proxy in [`super`] fetches the state
//! from moto, decides here, forwards the address part to moto as explicit addresses and
//! keeps the prefixes itself.
//!
//! Modelled rules (each applies when `FaultConfig::emulate_ip_assignment` is on):
//!
//! 1. **Reserved addresses.** The first four addresses of a subnet (network, VPC router,
//!    DNS, reserved) and the last (broadcast) are never handed out, neither as secondary
//!    addresses nor inside a prefix; naming one explicitly is `InvalidParameterValue`.
//!    (moto picks random addresses that may be any of them.)
//! 2. **Addresses by count.** `SecondaryPrivateIpAddressCount` takes the lowest free
//!    addresses of the subnet (free: not a primary or secondary address of any ENI in the
//!    subnet, not inside any prefix, not reserved). Too few: `InsufficientFreeAddressesInSubnet`.
//!    Explicit `PrivateIpAddress.N` outside the subnet is `InvalidParameterValue`, one
//!    already in use is `PrivateIpAddressInUse`.
//! 3. **Prefixes.** `Ipv4PrefixCount` / `Ipv4Prefix.N` assign /28 prefixes: aligned on 16,
//!    inside the subnet, overlapping no reserved or used address and no other prefix;
//!    lowest first. None left: `InsufficientCidrBlocks`. Only on Nitro instance types
//!    (`DescribeInstanceTypes` `hypervisor` = `nitro`), checked when the ENI is attached:
//!    others get `InvalidParameterValue`. Prefixes show in `DescribeNetworkInterfaces` as
//!    `ipv4PrefixSet`. (moto accepts the parameters and assigns nothing.)
//! 4. **Addresses and prefixes do not mix** in one call: `InvalidParameterCombination`.
//! 5. **Per-interface limit.** On an attached ENI, the primary address, every secondary
//!    address and every prefix count one each toward the instance type's
//!    `Ipv4AddressesPerInterface`; a call that would exceed it fails as a whole with
//!    `PrivateIpAddressLimitExceeded`. (An ENI that is not attached is not checked.)
//! 6. **Answer shape.** The answer lists only what this call assigned:
//!    `assignedPrivateIpAddressesSet` (new addresses) and `assignedIpv4PrefixSet` (new
//!    prefixes). (moto lists every address of the ENI, the primary included.)
//! 7. **Unassign.** Every named address must be a secondary address of the ENI and every
//!    named prefix one of its prefixes, else `InvalidParameterValue` and nothing changes;
//!    the primary address can never be unassigned (`InvalidParameterValue`).
//! 8. **Delete.** Deleting an ENI frees its prefixes.
//!
//! Not modelled: the primary address moto picks in `CreateNetworkInterface` (random; it
//! may be a reserved address or fall inside a prefix assigned earlier), and
//! `AllowReassignment`.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

/// An IPv4 CIDR block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    /// First address (host bits zero).
    pub base: u32,
    /// Prefix length.
    pub len: u8,
}

impl Cidr {
    /// Parses `a.b.c.d/n` (host bits are cleared).
    pub fn parse(s: &str) -> Option<Self> {
        let (ip, len) = s.trim().split_once('/')?;
        let ip: Ipv4Addr = ip.parse().ok()?;
        let len: u8 = len.parse().ok()?;
        if len > 32 {
            return None;
        }
        let mask = Self::mask(len);
        Some(Self {
            base: u32::from(ip) & mask,
            len,
        })
    }

    fn mask(len: u8) -> u32 {
        if len == 0 { 0 } else { u32::MAX << (32 - len) }
    }

    /// Number of addresses.
    pub fn size(&self) -> u64 {
        1u64 << (32 - self.len)
    }

    /// Last address.
    pub fn last(&self) -> u32 {
        self.base | !Self::mask(self.len)
    }

    /// Whether `ip` is inside.
    pub fn contains(&self, ip: u32) -> bool {
        ip & Self::mask(self.len) == self.base
    }

    /// Whether `ip` is one of the five addresses AWS reserves in every subnet.
    pub fn is_reserved(&self, ip: u32) -> bool {
        self.contains(ip) && (ip - self.base < 4 || ip == self.last())
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.base), self.len)
    }
}

/// Parses a dotted IPv4 address.
pub fn ip(s: &str) -> Option<u32> {
    s.trim().parse::<Ipv4Addr>().ok().map(u32::from)
}

/// What is taken in a subnet: every ENI address and every prefix.
#[derive(Clone, Debug, Default)]
pub struct Taken {
    /// Primary and secondary addresses of every ENI in the subnet.
    pub addresses: BTreeSet<u32>,
    /// Prefixes of every ENI in the subnet.
    pub prefixes: BTreeSet<Cidr>,
}

impl Taken {
    /// Whether `ip` is a used address or inside a prefix.
    pub fn covers(&self, ip: u32) -> bool {
        self.addresses.contains(&ip) || self.prefixes.iter().any(|p| p.contains(ip))
    }
}

/// The lowest `count` free addresses of `subnet` (rule 2); `None` when there are fewer.
pub fn free_addresses(subnet: Cidr, taken: &Taken, count: usize) -> Option<Vec<u32>> {
    let mut out = Vec::with_capacity(count);
    if count == 0 {
        return Some(out);
    }
    let mut ip = subnet.base;
    loop {
        if !subnet.is_reserved(ip) && !taken.covers(ip) {
            out.push(ip);
            if out.len() == count {
                return Some(out);
            }
        }
        if ip == subnet.last() {
            return None;
        }
        ip += 1;
    }
}

/// Whether the /28 `prefix` can be assigned in `subnet` (rule 3).
pub fn prefix_is_free(subnet: Cidr, taken: &Taken, prefix: Cidr) -> bool {
    prefix.len == 28
        && subnet.len <= 28
        && subnet.contains(prefix.base)
        && (prefix.base..=prefix.last()).all(|ip| !subnet.is_reserved(ip) && !taken.covers(ip))
}

/// The lowest `count` free /28 prefixes of `subnet`; `None` when there are fewer.
pub fn free_prefixes(subnet: Cidr, taken: &Taken, count: usize) -> Option<Vec<Cidr>> {
    let mut out = Vec::with_capacity(count);
    if count == 0 {
        return Some(out);
    }
    if subnet.len > 28 {
        return None;
    }
    let mut base = subnet.base;
    loop {
        let p = Cidr { base, len: 28 };
        if prefix_is_free(subnet, taken, p) {
            out.push(p);
            if out.len() == count {
                return Some(out);
            }
        }
        if p.last() >= subnet.last() {
            return None;
        }
        base += 16;
    }
}

/// The answer of a successful `AssignPrivateIpAddresses` (rule 6).
pub fn assign_response(
    request_id: &str,
    eni: &str,
    addresses: &[u32],
    prefixes: &[Cidr],
) -> String {
    let mut out = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<AssignPrivateIpAddressesResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>{request_id}</requestId><networkInterfaceId>{}</networkInterfaceId>",
        super::xml::escape(eni)
    );
    if !addresses.is_empty() {
        out.push_str("<assignedPrivateIpAddressesSet>");
        for a in addresses {
            out.push_str(&format!(
                "<item><privateIpAddress>{}</privateIpAddress></item>",
                Ipv4Addr::from(*a)
            ));
        }
        out.push_str("</assignedPrivateIpAddressesSet>");
    }
    if !prefixes.is_empty() {
        out.push_str("<assignedIpv4PrefixSet>");
        for p in prefixes {
            out.push_str(&format!("<item><ipv4Prefix>{p}</ipv4Prefix></item>"));
        }
        out.push_str("</assignedIpv4PrefixSet>");
    }
    out.push_str("<return>true</return></AssignPrivateIpAddressesResponse>");
    out
}

/// The answer of a successful `UnassignPrivateIpAddresses`.
pub fn unassign_response(request_id: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<UnassignPrivateIpAddressesResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>{request_id}</requestId><return>true</return></UnassignPrivateIpAddressesResponse>"
    )
}

/// The `ipv4PrefixSet` element spliced into a described ENI.
pub fn prefix_set_xml(prefixes: &[Cidr]) -> String {
    let mut out = String::from("<ipv4PrefixSet>");
    for p in prefixes {
        out.push_str(&format!("<item><ipv4Prefix>{p}</ipv4Prefix></item>"));
    }
    out.push_str("</ipv4PrefixSet>");
    out
}

/// Indexed values of a query parameter (`Name.1`, `Name.2`, ...; also a bare `Name`), in
/// index order.
pub fn indexed(params: &super::Params, name: &str) -> Vec<String> {
    let prefix = format!("{name}.");
    let mut v: Vec<(u64, String)> = params
        .0
        .iter()
        .filter_map(|(k, val)| {
            if k == name {
                return Some((0, val.clone()));
            }
            k.strip_prefix(&prefix)
                .and_then(|n| n.parse().ok())
                .map(|n| (n, val.clone()))
        })
        .collect();
    v.sort();
    v.into_iter().map(|(_, val)| val).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        Cidr::parse(s).expect("cidr")
    }

    #[test]
    fn reserved_addresses_of_a_subnet() {
        let s = cidr("10.0.1.0/24");
        for a in ["10.0.1.0", "10.0.1.1", "10.0.1.2", "10.0.1.3", "10.0.1.255"] {
            assert!(s.is_reserved(ip(a).expect("ip")), "{a}");
        }
        for a in ["10.0.1.4", "10.0.1.254", "10.0.2.0"] {
            assert!(!s.is_reserved(ip(a).expect("ip")), "{a}");
        }
        assert_eq!(cidr("10.0.1.77/24").to_string(), "10.0.1.0/24");
    }

    #[test]
    fn count_takes_the_lowest_free_never_reserved() {
        let s = cidr("10.0.1.0/28");
        let mut taken = Taken::default();
        taken.addresses.insert(ip("10.0.1.5").expect("ip"));
        let got = free_addresses(s, &taken, 3).expect("room");
        let got: Vec<String> = got.iter().map(|a| Ipv4Addr::from(*a).to_string()).collect();
        assert_eq!(got, ["10.0.1.4", "10.0.1.6", "10.0.1.7"]);
        // 16 - 5 reserved - 1 taken = 10 free.
        assert!(free_addresses(s, &taken, 10).is_some());
        assert!(free_addresses(s, &taken, 11).is_none());
    }

    #[test]
    fn prefixes_are_aligned_and_avoid_reserved_and_used() {
        let s = cidr("10.0.1.0/26");
        let mut taken = Taken::default();
        // The first /28 holds the four reserved addresses; .16/28 has a used address.
        taken.addresses.insert(ip("10.0.1.20").expect("ip"));
        let got = free_prefixes(s, &taken, 1).expect("room");
        assert_eq!(got[0].to_string(), "10.0.1.32/28");
        // The last /28 holds the broadcast address: only one prefix fits.
        assert!(free_prefixes(s, &taken, 2).is_none());
        taken.prefixes.insert(cidr("10.0.1.32/28"));
        assert!(free_prefixes(s, &taken, 1).is_none());
        // Addresses by count skip a prefix's addresses.
        let a = free_addresses(s, &taken, 12).expect("room");
        assert!(a.iter().all(|x| !cidr("10.0.1.32/28").contains(*x)));
        assert!(!prefix_is_free(s, &taken, cidr("10.0.1.40/29")));
    }

    #[test]
    fn answer_lists_only_new_addresses_and_prefixes() {
        let body = assign_response(
            "r-1",
            "eni-1",
            &[ip("10.0.1.4").expect("ip")],
            &[cidr("10.0.1.32/28")],
        );
        let root = super::super::xml::parse(&body).expect("xml");
        let addrs: Vec<&str> = root
            .find_all("privateIpAddress")
            .iter()
            .map(|e| e.text.trim())
            .collect();
        assert_eq!(addrs, ["10.0.1.4"]);
        assert_eq!(root.find_text("ipv4Prefix"), Some("10.0.1.32/28"));
    }

    #[test]
    fn indexed_parameters_in_order() {
        let p = super::super::Params::parse(
            None,
            b"Action=X&PrivateIpAddress.2=b&PrivateIpAddress.1=a&PrivateIpAddress.10=c&Ipv4Prefix.1=p",
        );
        assert_eq!(indexed(&p, "PrivateIpAddress"), ["a", "b", "c"]);
        assert_eq!(indexed(&p, "Ipv4Prefix"), ["p"]);
    }
}
