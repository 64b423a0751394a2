//! `docker-compose.yml` can't be run here (no Docker engine), so check it
//! against what the binaries really read and serve: every environment
//! variable a service sets is one its binary reads, every healthcheck hits a
//! route on the port the binary listens on, and the services wait for
//! healthy dependencies.

use std::collections::{BTreeSet, HashMap};

use clap::CommandFactory;
use serde_norway::Value;

/// What a binary reads: its settings' environment variables and their
/// defaults, plus `RUST_LOG` (the log filter).
struct Binary {
    env: HashMap<String, Option<String>>,
}

fn binary<S: CommandFactory>() -> Binary {
    let command = S::command();
    // A tool's subcommands read variables too (`api-keys create` reads API_KEY).
    let mut env: HashMap<String, Option<String>> = command
        .get_arguments()
        .chain(
            command
                .get_subcommands()
                .flat_map(|sub| sub.get_arguments()),
        )
        .filter_map(|arg| {
            let name = arg.get_env()?.to_string_lossy().into_owned();
            let default = arg
                .get_default_values()
                .first()
                .map(|v| v.to_string_lossy().into_owned());
            Some((name, default))
        })
        .collect();
    env.insert("RUST_LOG".into(), None);
    Binary { env }
}

fn binaries() -> HashMap<&'static str, Binary> {
    HashMap::from([
        ("order-api", binary::<order_api::configuration::Settings>()),
        (
            "order-processor",
            binary::<order_processor::configuration::Settings>(),
        ),
        (
            "notification-service",
            binary::<notification_service::configuration::Settings>(),
        ),
        (
            "logging-service",
            binary::<logging_service::configuration::Settings>(),
        ),
        (
            "order-stats",
            binary::<order_stats::configuration::Settings>(),
        ),
        (
            "payment-provider",
            binary::<payment_provider::configuration::Settings>(),
        ),
        ("api-keys", binary::<order_api::keys_cli::Cli>()),
    ])
}

/// A task that runs once and exits (`restart: "no"`), like the demo key's
/// maker: no port, no healthcheck.
fn one_shot(service: &Value) -> bool {
    service["restart"].as_str() == Some("no")
}

fn yaml(file: &str) -> Value {
    let path = format!("{}/../../{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
    let mut value: Value =
        serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{file} is not YAML: {e}"));
    value.apply_merge().expect("YAML merge keys resolve");
    value
}

fn compose() -> Value {
    yaml("docker-compose.yml")
}

/// `over` laid on `base` as `docker compose -f base -f over` does for what
/// these files use: mappings merge key by key, anything else is replaced.
fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Mapping(base), Value::Mapping(over)) => {
            for (key, value) in over {
                match base.get_mut(&key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, over) => *base = over,
    }
}

/// `docker-compose.yml` with `docker-compose.cluster.yml` over it.
fn cluster_compose() -> Value {
    let mut merged = compose();
    merge(&mut merged, yaml("docker-compose.cluster.yml"));
    merged
}

/// `docker-compose.yml` with `docker-compose.postgres.yml` over it.
fn postgres_compose() -> Value {
    let mut merged = compose();
    merge(&mut merged, yaml("docker-compose.postgres.yml"));
    merged
}

/// Every way of running it: one broker, the three-node cluster, and
/// Postgres alone.
fn every_way() -> [(&'static str, Value); 3] {
    [
        ("single node", compose()),
        ("cluster", cluster_compose()),
        ("postgres alone", postgres_compose()),
    ]
}

fn environment(service: &Value) -> HashMap<String, String> {
    match &service["environment"] {
        Value::Mapping(map) => map
            .iter()
            .map(|(k, v)| {
                let value = match v {
                    Value::String(s) => s.clone(),
                    other => serde_norway::to_string(other).unwrap().trim().to_owned(),
                };
                (k.as_str().unwrap().to_owned(), value)
            })
            .collect(),
        Value::Sequence(items) => items
            .iter()
            .map(|item| {
                let (k, v) = item
                    .as_str()
                    .unwrap()
                    .split_once('=')
                    .unwrap_or((item.as_str().unwrap(), ""));
                (k.to_owned(), v.to_owned())
            })
            .collect(),
        _ => HashMap::new(),
    }
}

/// The orderflow binary a service runs, or `None` for third-party services
/// (Postgres, RabbitMQ). Ours are built from this repository's image.
fn command_binary(service: &Value) -> Option<String> {
    let ours = !service["build"].is_null()
        || service["image"]
            .as_str()
            .is_some_and(|i| i.starts_with("orderflow"));
    if !ours {
        return None;
    }
    let binary = match &service["command"] {
        Value::Sequence(parts) => parts.first().and_then(Value::as_str).map(str::to_owned),
        Value::String(line) => line.split_whitespace().next().map(str::to_owned),
        _ => None,
    };
    Some(binary.expect("an orderflow service names its binary in `command`"))
}

fn healthcheck_url(service: &Value) -> String {
    let test = &service["healthcheck"]["test"];
    let parts: Vec<&str> = match test {
        Value::Sequence(parts) => parts.iter().filter_map(Value::as_str).collect(),
        Value::String(line) => line.split_whitespace().collect(),
        _ => panic!("no healthcheck test"),
    };
    parts
        .iter()
        .find(|p| p.starts_with("http://"))
        .unwrap_or_else(|| panic!("healthcheck {parts:?} has no URL"))
        .to_string()
}

#[test]
fn every_service_sets_only_variables_its_binary_reads() {
    for (_, compose) in every_way() {
        let binaries = binaries();
        let mut checked = BTreeSet::new();
        for (name, service) in compose["services"].as_mapping().unwrap() {
            let Some(bin) = command_binary(service) else {
                continue;
            };
            let reads = binaries
                .get(bin.as_str())
                .unwrap_or_else(|| panic!("service {name:?} runs unknown binary {bin}"));
            for variable in environment(service).keys() {
                assert!(
                    reads.env.contains_key(variable),
                    "service {name:?} sets {variable}, which {bin} does not read"
                );
            }
            checked.insert(bin);
        }
        assert_eq!(
            checked.len(),
            7,
            "all five services, the payment provider and the demo key's api-keys run in compose: {checked:?}"
        );
    }
}

#[test]
fn healthchecks_and_ports_match_what_the_binaries_serve() {
    for (_, compose) in every_way() {
        let binaries = binaries();
        for (name, service) in compose["services"].as_mapping().unwrap() {
            let Some(bin) = command_binary(service) else {
                continue;
            };
            if one_shot(service) {
                assert!(service["ports"].is_null(), "{name:?} runs once: no ports");
                continue;
            }
            let env = environment(service);
            let port = env
                .get("HTTP_PORT")
                .cloned()
                .or_else(|| binaries[bin.as_str()].env["HTTP_PORT"].clone())
                .expect("an HTTP port");
            let url = healthcheck_url(service);
            assert!(
                url == format!("http://localhost:{port}/readyz")
                    || url == format!("http://localhost:{port}/healthz"),
                "service {name:?}: healthcheck {url} does not match port {port} and a health route"
            );
            if let Value::Sequence(ports) = &service["ports"] {
                let host = env
                    .get("HTTP_HOST")
                    .map(String::as_str)
                    .unwrap_or("127.0.0.1");
                assert_eq!(
                    host, "0.0.0.0",
                    "service {name:?} publishes a port but listens on {host} only"
                );
                for mapping in ports {
                    let mapping = mapping
                        .as_str()
                        .expect("ports as \"host:container\" strings");
                    let container = mapping.rsplit(':').next().unwrap();
                    assert_eq!(
                        container, port,
                        "service {name:?} publishes {mapping} but listens on {port}"
                    );
                }
            }
        }
    }
}

#[test]
fn services_wait_for_healthy_dependencies_they_can_reach() {
    let binaries = binaries();
    for (_, compose) in every_way() {
        let services = compose["services"].as_mapping().unwrap();
        for (name, service) in services {
            let Some(bin) = command_binary(service) else {
                continue;
            };
            let env = environment(service);
            for (variable, dependency) in [("AMQP_URL", "rabbitmq"), ("DATABASE_URL", "postgres")] {
                // A one-shot task needs only what it uses; the payment
                // provider has no broker.
                let reads = binaries[bin.as_str()].env.contains_key(variable);
                if (one_shot(service) || !reads) && !env.contains_key(variable) {
                    continue;
                }
                let url = env
                    .get(variable)
                    .unwrap_or_else(|| panic!("{name:?} sets no {variable}"));
                assert!(
                    url.contains(&format!("@{dependency}:")),
                    "{name:?}: {variable} does not point at the {dependency} service"
                );
                let postgres_alone = env.get("WORK_QUEUE").map(String::as_str) == Some("postgres")
                    && env.get("EVENT_BUS").map(String::as_str) == Some("postgres");
                if dependency == "rabbitmq" && postgres_alone {
                    assert_eq!(
                        service["depends_on"][dependency]["required"].as_bool(),
                        Some(false),
                        "{name:?} runs on Postgres alone: it must not wait for RabbitMQ"
                    );
                    continue;
                }
                assert_eq!(
                    service["depends_on"][dependency]["condition"].as_str(),
                    Some("service_healthy"),
                    "{name:?} must wait for {dependency} to be healthy"
                );
                assert!(
                    !services[dependency]["healthcheck"].is_null(),
                    "{dependency} needs a healthcheck"
                );
            }
        }
    }
}

/// The `rabbit@host` names listed for classic-config peer discovery.
fn discovery_list(conf: &str) -> BTreeSet<String> {
    let mut backend = None;
    let mut nodes = BTreeSet::new();
    for line in conf.lines().map(str::trim) {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let (key, value) = (key.trim(), value.trim());
        if key == "cluster_formation.peer_discovery_backend" {
            backend = Some(value.to_owned());
        } else if key.starts_with("cluster_formation.classic_config.nodes.") {
            nodes.insert(value.to_owned());
        }
    }
    assert_eq!(
        backend.as_deref(),
        Some("classic_config"),
        "peer discovery backend"
    );
    nodes
}

#[test]
fn the_cluster_file_forms_one_cluster_that_every_service_knows_all_of() {
    let compose = cluster_compose();
    let services = compose["services"].as_mapping().unwrap();
    let nodes: Vec<(&str, &Value)> = services
        .iter()
        .filter(|(_, s)| {
            s["image"]
                .as_str()
                .is_some_and(|i| i.starts_with("rabbitmq:"))
        })
        .map(|(name, s)| (name.as_str().unwrap(), s))
        .collect();
    assert_eq!(nodes.len(), 3, "three RabbitMQ nodes");
    let conf = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/rabbitmq/cluster.conf"
    ))
    .unwrap();
    let mut cookies = BTreeSet::new();
    let mut data = BTreeSet::new();
    let mut names = BTreeSet::new();
    for (name, node) in &nodes {
        let host = node["hostname"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: a fixed hostname names the node and its data"));
        names.insert(format!("rabbit@{host}"));
        let mounts: Vec<&str> = node["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            mounts.contains(
                &"./deploy/rabbitmq/cluster.conf:/etc/rabbitmq/conf.d/20-cluster.conf:ro"
            ),
            "{name} reads the discovery list: {mounts:?}"
        );
        let volume = mounts
            .iter()
            .find_map(|m| m.strip_suffix(":/var/lib/rabbitmq"))
            .unwrap_or_else(|| panic!("{name} keeps its data in a volume"));
        assert!(
            data.insert(volume.to_owned()),
            "{name} shares its data volume"
        );
        cookies.insert(environment(node)["ERLANG_COOKIE"].clone());
        assert!(
            serde_norway::to_string(&node["entrypoint"])
                .unwrap()
                .contains(".erlang.cookie"),
            "{name} writes the shared cookie before booting"
        );
        assert!(!node["healthcheck"].is_null(), "{name} has a healthcheck");
    }
    assert_eq!(cookies.len(), 1, "one Erlang cookie for all nodes");
    assert_eq!(
        discovery_list(&conf),
        names,
        "the discovery list names the compose nodes"
    );

    let hosts: BTreeSet<String> = nodes
        .iter()
        .map(|(_, n)| n["hostname"].as_str().unwrap().to_owned())
        .collect();
    let mut clients = 0;
    for (name, service) in services {
        // The payment provider speaks to no broker.
        if command_binary(service).is_none_or(|bin| bin == "payment-provider") || one_shot(service)
        {
            continue;
        }
        clients += 1;
        let env = environment(service);
        let listed: BTreeSet<String> = env["AMQP_URL"]
            .split(',')
            .map(|url| {
                let after = url.split_once('@').expect("credentials in the URL").1;
                after.split(':').next().unwrap().to_owned()
            })
            .collect();
        assert_eq!(listed, hosts, "{name:?} lists every node in AMQP_URL");
        assert_eq!(
            env["RABBITMQ_MANAGEMENT_URL"].split(',').count(),
            3,
            "{name:?}: one management API per node"
        );
        for (node, _) in &nodes {
            assert_eq!(
                service["depends_on"][*node]["condition"].as_str(),
                Some("service_healthy"),
                "{name:?} waits for {node}: queues declared before a node joins have fewer replicas"
            );
        }
    }
    assert_eq!(
        clients, 5,
        "every long-running service is a client of the cluster"
    );
}

#[test]
fn postgres_alone_leaves_rabbitmq_out_and_tells_every_service() {
    let binaries = binaries();
    let compose = postgres_compose();
    let services = compose["services"].as_mapping().unwrap();
    assert!(
        services["rabbitmq"]["profiles"].as_sequence().is_some(),
        "RabbitMQ is started only when its profile is asked for"
    );
    for (name, service) in services {
        let Some(bin) = command_binary(service) else {
            continue;
        };
        if one_shot(service) || !binaries[bin.as_str()].env.contains_key("WORK_QUEUE") {
            continue;
        }
        let env = environment(service);
        for variable in ["WORK_QUEUE", "EVENT_BUS"] {
            assert_eq!(
                env.get(variable).map(String::as_str),
                Some("postgres"),
                "{name:?} must be told {variable}=postgres"
            );
        }
    }
}
