//! RabbitMQ's management HTTP API, for what AMQP cannot do: set the
//! policies that carry every tunable queue argument (so they can change on a
//! running broker without redeclaring a queue), read the broker's version
//! (queue semantics differ between 3.x and 4.x) and read a queue's
//! arguments and depth (to explain and migrate a queue declared otherwise).

use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;
use serde_json::Value;
use url::Url;

/// A client of one broker's management API, scoped to one virtual host.
#[derive(Clone)]
pub struct Management {
    base: Url,
    user: String,
    password: String,
    vhost: String,
    client: reqwest::Client,
}

impl std::fmt::Debug for Management {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Management")
            .field("base", &self.base.as_str())
            .field("user", &self.user)
            .field("vhost", &self.vhost)
            .finish()
    }
}

/// What the management API says about one queue.
#[derive(Debug, Clone, Deserialize)]
pub struct QueueInfo {
    /// The arguments the queue was declared with.
    #[serde(default)]
    pub arguments: serde_json::Map<String, Value>,
    /// Messages in the queue, ready and unacknowledged (absent until the
    /// broker's statistics have caught up with a new queue).
    #[serde(default)]
    pub messages: Option<u64>,
}

impl Management {
    /// The API at `url` (`http://user:password@host:port`), for the virtual
    /// host of `amqp_url`.
    pub fn new(url: &str, amqp_url: &str) -> anyhow::Result<Self> {
        let mut base = Url::parse(url).context("RABBITMQ_MANAGEMENT_URL is not a URL")?;
        if base.scheme() != "http" {
            bail!("RABBITMQ_MANAGEMENT_URL must be an http:// URL (no TLS client is built in)");
        }
        let user = percent_decode(base.username());
        let password = percent_decode(base.password().unwrap_or_default());
        let _ = base.set_username("");
        let _ = base.set_password(None);
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .context("building the management API client")?;
        Ok(Self {
            base,
            user,
            password,
            vhost: vhost_of(amqp_url)?,
            client,
        })
    }

    /// The API a broker usually serves next to `amqp_url`: same host and
    /// credentials, port 15672.
    pub fn default_url_for(amqp_url: &str) -> anyhow::Result<String> {
        let amqp = Url::parse(amqp_url).context("AMQP_URL is not a URL")?;
        let host = amqp.host_str().context("AMQP_URL has no host")?;
        let mut url = Url::parse("http://localhost:15672/").expect("a valid URL");
        url.set_host(Some(host))
            .context("AMQP_URL's host is not valid in an http URL")?;
        let _ = url.set_username(amqp.username());
        let _ = url.set_password(amqp.password());
        Ok(url.to_string())
    }

    /// The API's address without credentials, for logs and errors.
    pub fn address(&self) -> &str {
        self.base.as_str()
    }

    fn endpoint(&self, parts: &[&str]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("an http URL has path segments")
            .pop_if_empty()
            .push("api")
            .extend(parts);
        url
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        what: &str,
    ) -> anyhow::Result<reqwest::Response> {
        let response = request
            .basic_auth(&self.user, Some(&self.password))
            .send()
            .await
            .with_context(|| {
                format!(
                    "{what}: the RabbitMQ management API at {} did not answer \
                     (is the rabbitmq_management plugin enabled? set RABBITMQ_MANAGEMENT_URL)",
                    self.address()
                )
            })?;
        Ok(response)
    }

    async fn expect_success(
        response: reqwest::Response,
        what: &str,
    ) -> anyhow::Result<reqwest::Response> {
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.text().await.unwrap_or_default();
        bail!(
            "{what}: the management API answered {status}: {}",
            body.trim()
        )
    }

    /// The broker's version, e.g. `4.0.5`.
    pub async fn version(&self) -> anyhow::Result<String> {
        #[derive(Deserialize)]
        struct Overview {
            rabbitmq_version: String,
        }
        let what = "reading the broker's version";
        let response = self
            .send(self.client.get(self.endpoint(&["overview"])), what)
            .await?;
        let overview: Overview = Self::expect_success(response, what)
            .await?
            .json()
            .await
            .context(what)?;
        Ok(overview.rabbitmq_version)
    }

    /// Create or replace the policy `name`, applying `definition` to the
    /// queues whose whole name is `queue`.
    pub async fn put_queue_policy(
        &self,
        name: &str,
        queue: &str,
        definition: &Value,
    ) -> anyhow::Result<()> {
        let what = format!("setting the policy {name}");
        let body = serde_json::json!({
            "pattern": format!("^{}$", regex_escape(queue)),
            "definition": definition,
            "apply-to": "queues",
            "priority": POLICY_PRIORITY,
        });
        let response = self
            .send(
                self.client
                    .put(self.endpoint(&["policies", &self.vhost, name]))
                    .json(&body),
                &what,
            )
            .await?;
        Self::expect_success(response, &what).await?;
        Ok(())
    }

    /// The definition of the policy `name`, if there is one.
    pub async fn policy(&self, name: &str) -> anyhow::Result<Option<Value>> {
        #[derive(Deserialize)]
        struct Policy {
            definition: Value,
        }
        let what = format!("reading the policy {name}");
        let response = self
            .send(
                self.client
                    .get(self.endpoint(&["policies", &self.vhost, name])),
                &what,
            )
            .await?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let policy: Policy = Self::expect_success(response, &what)
            .await?
            .json()
            .await
            .with_context(|| what.clone())?;
        Ok(Some(policy.definition))
    }

    /// Delete the policy `name`; a policy that does not exist is fine.
    pub async fn delete_policy(&self, name: &str) -> anyhow::Result<()> {
        let what = format!("deleting the policy {name}");
        let response = self
            .send(
                self.client
                    .delete(self.endpoint(&["policies", &self.vhost, name])),
                &what,
            )
            .await?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(());
        }
        Self::expect_success(response, &what).await?;
        Ok(())
    }

    /// The names of the queues whose names start with `prefix` (at most
    /// 500).
    pub async fn queue_names(&self, prefix: &str) -> anyhow::Result<Vec<String>> {
        #[derive(Deserialize)]
        struct Page {
            items: Vec<Named>,
        }
        #[derive(Deserialize)]
        struct Named {
            name: String,
        }
        let what = format!("listing the queues named {prefix}*");
        let mut url = self.endpoint(&["queues", &self.vhost]);
        url.query_pairs_mut()
            .append_pair("name", &format!("^{}", regex_escape(prefix)))
            .append_pair("use_regex", "true")
            .append_pair("page", "1")
            .append_pair("page_size", "500")
            .append_pair("columns", "name");
        let response = self.send(self.client.get(url), &what).await?;
        let page: Page = Self::expect_success(response, &what)
            .await?
            .json()
            .await
            .with_context(|| what.clone())?;
        Ok(page.items.into_iter().map(|q| q.name).collect())
    }

    /// The queue `name`, or `None` if there is no such queue.
    pub async fn queue(&self, name: &str) -> anyhow::Result<Option<QueueInfo>> {
        let what = format!("reading the queue {name}");
        let response = self
            .send(
                self.client
                    .get(self.endpoint(&["queues", &self.vhost, name])),
                &what,
            )
            .await?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let info = Self::expect_success(response, &what)
            .await?
            .json()
            .await
            .with_context(|| what.clone())?;
        Ok(Some(info))
    }
}

/// Above the default 0, so a catch-all policy of the operator's does not
/// replace ours; operator policies still apply on top.
const POLICY_PRIORITY: i32 = 10;

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// The virtual host an AMQP URL names (`/` when it names none).
fn vhost_of(amqp_url: &str) -> anyhow::Result<String> {
    let url = Url::parse(amqp_url).context("AMQP_URL is not a URL")?;
    let path = url.path().strip_prefix('/').unwrap_or_default();
    Ok(if path.is_empty() {
        "/".to_owned()
    } else {
        percent_decode(path)
    })
}

fn regex_escape(name: &str) -> String {
    let mut escaped = String::with_capacity(name.len());
    for c in name.chars() {
        if !c.is_ascii_alphanumeric() && c != '_' && c != '-' {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_api_is_beside_the_broker_with_its_credentials() {
        assert_eq!(
            Management::default_url_for("amqp://orderflow:s3cret@rabbitmq:5672/%2f").unwrap(),
            "http://orderflow:s3cret@rabbitmq:15672/"
        );
    }

    #[test]
    fn the_vhost_comes_from_the_amqp_url() {
        assert_eq!(vhost_of("amqp://g:g@h:5672/%2f").unwrap(), "/");
        assert_eq!(vhost_of("amqp://g:g@h:5672").unwrap(), "/");
        assert_eq!(vhost_of("amqp://g:g@h:5672/shop").unwrap(), "shop");
    }

    #[test]
    fn endpoints_encode_the_vhost_and_keep_credentials_out_of_the_address() {
        let api = Management::new("http://u:p%40ss@127.0.0.1:15672", "amqp://u:p@h/%2f").unwrap();
        assert_eq!(api.address(), "http://127.0.0.1:15672/");
        assert_eq!(api.password, "p@ss");
        assert_eq!(
            api.endpoint(&["queues", &api.vhost, "orders.dead"])
                .as_str(),
            "http://127.0.0.1:15672/api/queues/%2F/orders.dead"
        );
    }

    #[test]
    fn policy_patterns_match_exactly_one_name() {
        assert_eq!(
            regex_escape("t1.orders.retry.1000ms"),
            r"t1\.orders\.retry\.1000ms"
        );
    }
}
