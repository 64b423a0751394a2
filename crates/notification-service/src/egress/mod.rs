//! Where webhooks may go: only out. A callback URL is checked when it is
//! sent (what order-api checked at POST time was only its text): http(s)
//! only, no credentials, and no address inside (see [`address`]), whether
//! written as an IP or reached through DNS. The resolver checks every
//! address a name resolves to and hands the connection exactly those, so a
//! name cannot be rebound between the check and the connect.

mod address;
mod resolver;

use std::{fmt, net::IpAddr, str::FromStr};

use url::Url;

pub use address::{Inward, classify};
pub use resolver::{GuardedResolver, SystemResolver};

/// Why a webhook is not sent, ever: a terminal outcome, not retried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    Unparseable,
    Scheme(String),
    Credentials,
    NoHost,
    /// `host` is, or resolves to, `ip`, which is `class`.
    Address {
        host: String,
        ip: IpAddr,
        class: Inward,
    },
    NoAddress(String),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unparseable => f.write_str("refused: not a valid URL"),
            Self::Scheme(scheme) => write!(f, "refused: scheme {scheme} is not http or https"),
            Self::Credentials => f.write_str("refused: the URL carries a user name or password"),
            Self::NoHost => f.write_str("refused: the URL names no host"),
            Self::Address { host, ip, class } if host == &ip.to_string() => {
                write!(f, "refused: {ip} is {class}")
            }
            Self::Address { host, ip, class } => {
                write!(f, "refused: {host} resolves to {ip}, which is {class}")
            }
            Self::NoAddress(host) => write!(f, "refused: {host} resolves to no address"),
        }
    }
}

impl std::error::Error for Refusal {}

/// The refusal somewhere in `error`'s chain of causes: how a refusal by
/// [`GuardedResolver`] comes back out of reqwest.
pub fn refusal_in<'e>(error: &'e (dyn std::error::Error + 'static)) -> Option<&'e Refusal> {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if let Some(refusal) = error.downcast_ref::<Refusal>() {
            return Some(refusal);
        }
        cause = error.source();
    }
    None
}

/// Hosts let through the inward-address check (`WEBHOOK_ALLOWED_HOSTS`):
/// for a developer's receiver on localhost. Matched against the URL's host
/// as written: a name entry lets that name through whatever it resolves
/// to, an IP entry that IP literal. Empty by default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList {
    names: Vec<String>,
    ips: Vec<IpAddr>,
}

impl FromStr for AllowList {
    type Err = String;

    /// Comma-separated host names and IPs (IPv6 with or without brackets).
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let mut list = Self::default();
        for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let bare = entry.trim_start_matches('[').trim_end_matches(']');
            if let Ok(ip) = bare.parse::<IpAddr>() {
                list.ips.push(ip);
            } else if entry
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
            {
                list.names.push(normal_name(entry));
            } else {
                return Err(format!(
                    "{entry:?} is neither a host name nor an IP address (no scheme, port or path)"
                ));
            }
        }
        Ok(list)
    }
}

impl AllowList {
    pub fn is_empty(&self) -> bool {
        self.names.is_empty() && self.ips.is_empty()
    }

    /// Whether the host name `name` is let through.
    pub fn allows_name(&self, name: &str) -> bool {
        let name = normal_name(name);
        self.names.contains(&name)
    }

    fn allows_ip(&self, ip: IpAddr) -> bool {
        self.ips.contains(&ip)
    }
}

fn normal_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// The URL to send to, if its scheme, credentials and (for an IP literal,
/// which reqwest connects to without asking the resolver) its address are
/// acceptable. Host names are checked by [`GuardedResolver`] at connect time.
pub fn check_url(raw: &str, allowed: &AllowList) -> Result<Url, Refusal> {
    let url = Url::parse(raw).map_err(|_| Refusal::Unparseable)?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Refusal::Scheme(url.scheme().to_owned()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Refusal::Credentials);
    }
    let ip = match url.host() {
        None => return Err(Refusal::NoHost),
        Some(url::Host::Domain("")) => return Err(Refusal::NoHost),
        Some(url::Host::Domain(_)) => return Ok(url),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip),
    };
    match classify(ip) {
        Some(class) if !allowed.allows_ip(ip) => Err(Refusal::Address {
            host: ip.to_string(),
            ip,
            class,
        }),
        _ => Ok(url),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(list: &str) -> AllowList {
        list.parse().unwrap()
    }

    #[test]
    fn literal_inward_addresses_schemes_and_credentials_are_refused() {
        let none = AllowList::default();
        for (url, reason) in [
            (
                "http://169.254.169.254/latest/meta-data/",
                "refused: 169.254.169.254 is cloud metadata endpoint",
            ),
            (
                "http://[::ffff:127.0.0.1]:8080/orders",
                "refused: ::ffff:127.0.0.1 is IPv4-mapped IPv6 (::ffff:0:0/96)",
            ),
            // WHATWG parsing turns these spellings into 127.0.0.1 first.
            ("http://2130706433/", "refused: 127.0.0.1 is loopback"),
            ("http://0x7f.1/", "refused: 127.0.0.1 is loopback"),
            (
                "http://[fd00::1]/",
                "refused: fd00::1 is unique-local (fc00::/7)",
            ),
            (
                "https://user:pw@example.com/hook",
                "refused: the URL carries a user name or password",
            ),
            (
                "http://token@example.com/",
                "refused: the URL carries a user name or password",
            ),
            (
                "ftp://example.com/",
                "refused: scheme ftp is not http or https",
            ),
            (
                "file:///etc/passwd",
                "refused: scheme file is not http or https",
            ),
            ("not a url", "refused: not a valid URL"),
        ] {
            assert_eq!(
                check_url(url, &none).unwrap_err().to_string(),
                reason,
                "{url}"
            );
        }
        assert!(check_url("https://shop.example.com/hooks?k=1", &none).is_ok());
        assert!(check_url("http://93.184.216.34/", &none).is_ok());
    }

    #[test]
    fn the_allow_list_lets_its_hosts_through_and_no_others() {
        let list = allow(" 127.0.0.1, [::1], Receiver.Local. ");
        assert!(check_url("http://127.0.0.1:9000/hook", &list).is_ok());
        assert!(check_url("http://[::1]:9000/hook", &list).is_ok());
        assert!(check_url("http://127.0.0.2:9000/hook", &list).is_err());
        assert!(check_url("http://u:p@127.0.0.1:9000/hook", &list).is_err());
        assert!(list.allows_name("receiver.local"));
        assert!(!list.allows_name("localhost"));
        assert!(allow("").is_empty());
        assert!("http://127.0.0.1".parse::<AllowList>().is_err());
        assert!("localhost:3000".parse::<AllowList>().is_err());
    }
}
