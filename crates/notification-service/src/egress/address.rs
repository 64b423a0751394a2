//! Which IP addresses a webhook may never be sent to: anything that reaches
//! inside (loopback, private and link-local networks, cloud metadata), forms
//! that smuggle an IPv4 address inside IPv6, and ranges that are not unicast
//! on the public internet. Pure: no lookups, no packets.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

/// Why an address is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inward {
    Unspecified,
    ThisNetwork,
    Loopback,
    Private,
    SharedCgnat,
    CloudMetadata,
    LinkLocal,
    UniqueLocal,
    SiteLocal,
    Ipv4Mapped,
    Ipv4Compatible,
    Nat64,
    Ipv4Tunnel,
    Multicast,
    Broadcast,
    Documentation,
    Benchmarking,
    ProtocolAssignments,
    Reserved,
}

impl Inward {
    /// The reason, as recorded and logged.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::ThisNetwork => "\"this network\" (0.0.0.0/8)",
            Self::Loopback => "loopback",
            Self::Private => "private network",
            Self::SharedCgnat => "carrier-grade NAT (100.64.0.0/10)",
            Self::CloudMetadata => "cloud metadata endpoint",
            Self::LinkLocal => "link-local",
            Self::UniqueLocal => "unique-local (fc00::/7)",
            Self::SiteLocal => "site-local (fec0::/10)",
            Self::Ipv4Mapped => "IPv4-mapped IPv6 (::ffff:0:0/96)",
            Self::Ipv4Compatible => "IPv4-compatible IPv6 (::/96)",
            Self::Nat64 => "NAT64 (64:ff9b::/96)",
            Self::Ipv4Tunnel => "IPv6 tunnel to an IPv4 address (6to4, Teredo)",
            Self::Multicast => "multicast",
            Self::Broadcast => "broadcast",
            Self::Documentation => "documentation range",
            Self::Benchmarking => "benchmarking range",
            Self::ProtocolAssignments => "IETF protocol assignments (192.0.0.0/24)",
            Self::Reserved => "reserved range",
        }
    }
}

impl fmt::Display for Inward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `Some(why)` when `ip` is no place to send a webhook.
pub fn classify(ip: IpAddr) -> Option<Inward> {
    match ip {
        IpAddr::V4(ip) => classify_v4(ip),
        IpAddr::V6(ip) => classify_v6(ip),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<Inward> {
    // The std methods where stable; the rest (is_shared, is_benchmarking,
    // is_reserved are unstable) as explicit prefixes.
    let class = if ip.is_unspecified() {
        Inward::Unspecified
    } else if in_v4(ip, [0, 0, 0, 0], 8) {
        Inward::ThisNetwork
    } else if ip.is_loopback() {
        Inward::Loopback
    } else if ip.is_private() {
        Inward::Private
    } else if in_v4(ip, [100, 64, 0, 0], 10) {
        Inward::SharedCgnat
    } else if ip == Ipv4Addr::new(169, 254, 169, 254) {
        Inward::CloudMetadata
    } else if ip.is_link_local() {
        Inward::LinkLocal
    } else if ip.is_broadcast() {
        Inward::Broadcast
    } else if ip.is_multicast() {
        Inward::Multicast
    } else if ip.is_documentation() {
        Inward::Documentation
    } else if in_v4(ip, [198, 18, 0, 0], 15) {
        Inward::Benchmarking
    } else if in_v4(ip, [192, 0, 0, 0], 24) {
        Inward::ProtocolAssignments
    } else if in_v4(ip, [240, 0, 0, 0], 4) || in_v4(ip, [192, 88, 99, 0], 24) {
        // 240/4: future use; 192.88.99/24: the retired 6to4 relay anycast.
        Inward::Reserved
    } else {
        return None;
    };
    Some(class)
}

fn classify_v6(ip: Ipv6Addr) -> Option<Inward> {
    let class = if ip.is_unspecified() {
        Inward::Unspecified
    } else if ip.is_loopback() {
        Inward::Loopback
    } else if ip.to_ipv4_mapped().is_some() {
        // Refused whatever the IPv4 address: the socket would reach it over IPv4.
        Inward::Ipv4Mapped
    } else if in_v6(ip, [0, 0, 0, 0, 0, 0, 0, 0], 96) {
        Inward::Ipv4Compatible
    } else if in_v6(ip, [0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96)
        || in_v6(ip, [0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48)
    {
        Inward::Nat64
    } else if in_v6(ip, [0x2002, 0, 0, 0, 0, 0, 0, 0], 16)
        || in_v6(ip, [0x2001, 0, 0, 0, 0, 0, 0, 0], 32)
    {
        Inward::Ipv4Tunnel
    } else if ip.is_unicast_link_local() {
        Inward::LinkLocal
    } else if in_v6(ip, [0xfec0, 0, 0, 0, 0, 0, 0, 0], 10) {
        Inward::SiteLocal
    } else if ip.is_unique_local() {
        Inward::UniqueLocal
    } else if ip.is_multicast() {
        Inward::Multicast
    } else if in_v6(ip, [0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32)
        || in_v6(ip, [0x3fff, 0, 0, 0, 0, 0, 0, 0], 20)
    {
        Inward::Documentation
    } else if in_v6(ip, [0x2001, 2, 0, 0, 0, 0, 0, 0], 48) {
        Inward::Benchmarking
    } else if in_v6(ip, [0x100, 0, 0, 0, 0, 0, 0, 0], 64) {
        // Discard-only (RFC 6666).
        Inward::Reserved
    } else {
        return None;
    };
    Some(class)
}

fn in_v4(ip: Ipv4Addr, network: [u8; 4], prefix: u32) -> bool {
    let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
    u32::from(ip) & mask == u32::from(Ipv4Addr::from(network)) & mask
}

fn in_v6(ip: Ipv6Addr, network: [u16; 8], prefix: u32) -> bool {
    let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
    u128::from(ip) & mask == u128::from(Ipv6Addr::from(network)) & mask
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(ip: &str) -> Option<Inward> {
        classify(ip.parse().unwrap())
    }

    #[test]
    fn every_inward_class_is_refused_with_its_reason() {
        use Inward::*;
        for (ip, expected) in [
            ("0.0.0.0", Unspecified),
            ("::", Unspecified),
            ("0.1.2.3", ThisNetwork),
            ("127.0.0.1", Loopback),
            ("127.255.255.254", Loopback),
            ("::1", Loopback),
            ("10.0.0.1", Private),
            ("172.16.0.1", Private),
            ("172.31.255.255", Private),
            ("192.168.1.1", Private),
            ("100.64.0.1", SharedCgnat),
            ("100.127.255.255", SharedCgnat),
            ("169.254.169.254", CloudMetadata),
            ("169.254.0.1", LinkLocal),
            ("fe80::1", LinkLocal),
            ("febf::1", LinkLocal),
            ("fec0::1", SiteLocal),
            ("fc00::1", UniqueLocal),
            ("fd12:3456::1", UniqueLocal),
            ("::ffff:127.0.0.1", Ipv4Mapped),
            ("::ffff:8.8.8.8", Ipv4Mapped),
            ("::127.0.0.1", Ipv4Compatible),
            ("64:ff9b::a9fe:a9fe", Nat64),
            ("64:ff9b::8.8.8.8", Nat64),
            ("64:ff9b:1::1", Nat64),
            ("2002:7f00:1::", Ipv4Tunnel),
            ("2001:0:4136:e378::1", Ipv4Tunnel),
            ("224.0.0.1", Multicast),
            ("239.255.255.250", Multicast),
            ("ff02::1", Multicast),
            ("255.255.255.255", Broadcast),
            ("192.0.2.1", Documentation),
            ("198.51.100.7", Documentation),
            ("203.0.113.9", Documentation),
            ("2001:db8::1", Documentation),
            ("3fff::1", Documentation),
            ("198.18.0.1", Benchmarking),
            ("198.19.255.255", Benchmarking),
            ("2001:2::1", Benchmarking),
            ("192.0.0.8", ProtocolAssignments),
            ("240.0.0.1", Reserved),
            ("192.88.99.1", Reserved),
            ("100::1", Reserved),
        ] {
            assert_eq!(class(ip), Some(expected), "{ip}");
        }
    }

    #[test]
    fn public_unicast_addresses_pass() {
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "93.184.216.34",
            "172.15.255.255",
            "172.32.0.1",
            "100.63.255.255",
            "100.128.0.1",
            "169.253.255.255",
            "198.17.255.255",
            "198.20.0.1",
            "192.0.1.1",
            "223.255.255.255",
            "2606:4700:4700::1111",
            "2a00:1450:4001:80b::200e",
            "2001:4860:4860::8888",
        ] {
            assert_eq!(class(ip), None, "{ip}");
        }
    }
}
