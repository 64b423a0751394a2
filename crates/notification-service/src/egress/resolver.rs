//! The webhook client's DNS resolver: looks a name up once, refuses the
//! whole lookup if any address is inward, and otherwise returns exactly the
//! addresses it checked, which reqwest then connects to.

use std::{net::SocketAddr, sync::Arc};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use super::{AllowList, Refusal, classify};

/// Wraps a resolver (the system's, or a test's) with the inward check.
pub struct GuardedResolver {
    inner: Arc<dyn Resolve>,
    allowed: AllowList,
}

impl GuardedResolver {
    pub fn new(inner: Arc<dyn Resolve>, allowed: AllowList) -> Self {
        Self { inner, allowed }
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        let allowed = self.allowed.allows_name(&host);
        let lookup = self.inner.resolve(name);
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = lookup.await?.collect();
            if addrs.is_empty() {
                return Err(Refusal::NoAddress(host).into());
            }
            // One inward address refuses the name: a connection may go to any.
            if !allowed
                && let Some((ip, class)) = addrs
                    .iter()
                    .find_map(|addr| classify(addr.ip()).map(|class| (addr.ip(), class)))
            {
                return Err(Refusal::Address { host, ip, class }.into());
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// The system's resolver (getaddrinfo, through tokio).
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    /// Answers every name with `ips`.
    struct Fixed(Vec<IpAddr>);

    impl Resolve for Fixed {
        fn resolve(&self, _: Name) -> Resolving {
            let addrs: Vec<SocketAddr> = self.0.iter().map(|ip| SocketAddr::new(*ip, 0)).collect();
            Box::pin(async move { Ok(Box::new(addrs.into_iter()) as Addrs) })
        }
    }

    async fn resolve(ips: &[&str], allowed: &str) -> Result<Vec<SocketAddr>, String> {
        let ips = ips.iter().map(|ip| ip.parse().unwrap()).collect();
        let resolver = GuardedResolver::new(Arc::new(Fixed(ips)), allowed.parse().unwrap());
        match resolver.resolve("hooks.test".parse().unwrap()).await {
            Ok(addrs) => Ok(addrs.collect()),
            Err(error) => Err(error.to_string()),
        }
    }

    #[tokio::test]
    async fn one_inward_address_refuses_the_whole_name() {
        assert_eq!(
            resolve(&["93.184.216.34", "10.0.0.1"], "").await,
            Err("refused: hooks.test resolves to 10.0.0.1, which is private network".into())
        );
        assert_eq!(
            resolve(&[], "").await,
            Err("refused: hooks.test resolves to no address".into())
        );
        assert_eq!(
            resolve(&["93.184.216.34", "2606:4700::1"], "")
                .await
                .unwrap()
                .len(),
            2
        );
    }

    #[tokio::test]
    async fn an_allowed_name_may_resolve_inward() {
        assert_eq!(
            resolve(&["127.0.0.1"], "Hooks.Test").await,
            Ok(vec!["127.0.0.1:0".parse().unwrap()])
        );
        assert!(resolve(&["127.0.0.1"], "127.0.0.1").await.is_err());
    }
}
