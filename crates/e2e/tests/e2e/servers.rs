//! Private RabbitMQ nodes and Postgres clusters for fault injection: each in
//! a temp dir on free ports, never the shared servers on 5672/5432. The
//! recipes are the ones in shared/FIELD-NOTES.md (run as root; Postgres runs
//! as the `postgres` user).
//!
//! A private RabbitMQ node is the host's 3.10, or with
//! `ORDERFLOW_TEST_BROKER=4` a 4.x node inside the Debian trixie chroot that
//! `scripts/rabbitmq4.sh ensure` builds (at `ORDERFLOW_RABBITMQ4_ROOT`,
//! default /var/tmp/orderflow-rabbitmq4). Either kind runs the management
//! plugin, and its own epmd so that it never meets the shared node's.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use tokio::process::Command;

use crate::processes::{free_port, wait_for_port};

const RABBIT_BIN: &str = "/usr/lib/rabbitmq/bin";
const DEFAULT_RABBITMQ4_ROOT: &str = "/var/tmp/orderflow-rabbitmq4";
/// Written by `scripts/rabbitmq4.sh` once the chroot is completely built.
const RABBITMQ4_MARKER: &str = ".orderflow-rabbitmq4-complete";

async fn run(command: &mut Command, what: &str) -> String {
    let output = command
        .output()
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Where private RabbitMQ nodes run: `ORDERFLOW_TEST_BROKER` unset or `3`
/// for the host's 3.10, `4` for the 4.x chroot.
fn rabbitmq4_root() -> Option<PathBuf> {
    match std::env::var("ORDERFLOW_TEST_BROKER").as_deref() {
        Err(_) | Ok("" | "3") => None,
        Ok("4") => {
            let root = PathBuf::from(
                std::env::var("ORDERFLOW_RABBITMQ4_ROOT")
                    .unwrap_or_else(|_| DEFAULT_RABBITMQ4_ROOT.to_owned()),
            );
            assert!(
                root.join(RABBITMQ4_MARKER).exists(),
                "no complete RabbitMQ 4.x chroot at {}: run `scripts/rabbitmq4.sh ensure` first",
                root.display()
            );
            Some(root)
        }
        Ok(other) => panic!("ORDERFLOW_TEST_BROKER={other}: expected 3 or 4"),
    }
}

/// A RabbitMQ node of our own.
pub struct PrivateRabbit {
    /// The 4.x chroot, or `None` for the host's 3.10.
    root: Option<PathBuf>,
    /// The node's files, as the node sees the path.
    dir: PathBuf,
    node: String,
    pub port: u16,
    dist_port: u16,
    epmd_port: u16,
    management_port: u16,
    /// The epmd this node started, which its cluster's other nodes share;
    /// `None` on a node that joined another's.
    epmd: Option<std::process::Child>,
    version: String,
}

impl PrivateRabbit {
    pub async fn start() -> Self {
        Self::start_beside(None).await
    }

    /// `nodes` private nodes formed into one cluster: the first started as
    /// a node of its own, each other one started beside it (its epmd, its
    /// cookie) and joined to it with `rabbitmqctl join_cluster`.
    pub async fn cluster(nodes: usize) -> Vec<Self> {
        let first = Self::start().await;
        let mut cluster = Vec::with_capacity(nodes);
        for _ in 1..nodes {
            let node = Self::start_beside(Some(&first)).await;
            node.rabbitmqctl(&["stop_app"]).await;
            node.rabbitmqctl(&["join_cluster", &first.node]).await;
            node.rabbitmqctl(&["start_app"]).await;
            node.wait_serving().await;
            cluster.push(node);
        }
        first
            .rabbitmqctl(&["await_online_nodes", &nodes.to_string()])
            .await;
        cluster.insert(0, first);
        cluster
    }

    /// A node of its own, or with `peer`, one that can join `peer`'s
    /// cluster: the same kind of broker, epmd and Erlang cookie.
    async fn start_beside(peer: Option<&PrivateRabbit>) -> Self {
        let root = match peer {
            Some(peer) => peer.root.clone(),
            None => rabbitmq4_root(),
        };
        let unique = format!("orderflow-rabbit-{}", uuid::Uuid::new_v4().simple());
        let dir = match root {
            Some(_) => Path::new("/var/tmp").join(unique),
            None => std::env::temp_dir().join(unique),
        };
        let management_port = free_port();
        let host_dir = host_path(root.as_deref(), &dir);
        std::fs::create_dir_all(&host_dir).unwrap();
        std::fs::write(host_dir.join("enabled_plugins"), "[rabbitmq_management].").unwrap();
        std::fs::write(
            host_dir.join("rabbitmq.conf"),
            format!(
                "loopback_users = none\nmanagement.tcp.port = {management_port}\n\
                 management.tcp.ip = 127.0.0.1\n"
            ),
        )
        .unwrap();
        let cookie = host_dir.join(".erlang.cookie");
        let secret = match peer {
            Some(peer) => {
                std::fs::read_to_string(peer.host_path(&peer.dir.join(".erlang.cookie"))).unwrap()
            }
            None => format!("cookie-{}", uuid::Uuid::new_v4().simple()),
        };
        std::fs::write(&cookie, secret).unwrap();
        run(
            Command::new("chmod").arg("400").arg(&cookie),
            "chmod cookie",
        )
        .await;
        if let (Some(root), None) = (&root, peer) {
            run(
                Command::new(rabbitmq4_script())
                    .arg("mount")
                    .env("ORDERFLOW_RABBITMQ4_ROOT", root),
                "scripts/rabbitmq4.sh mount",
            )
            .await;
        }
        let (epmd_port, epmd) = match peer {
            Some(peer) => (peer.epmd_port, None),
            None => {
                let port = free_port();
                let epmd = start_epmd(root.as_deref(), port);
                wait_for_port(port, Duration::from_secs(30)).await;
                (port, Some(epmd))
            }
        };
        let mut rabbit = Self {
            node: format!("chaos{}@localhost", free_port()),
            port: free_port(),
            dist_port: free_port(),
            epmd_port,
            management_port,
            epmd,
            root,
            dir,
            version: String::new(),
        };
        rabbit.start_again().await;
        rabbit.version = rabbit.rabbitmqctl(&["version"]).await.trim().to_owned();
        rabbit
    }

    fn host_path(&self, path: &Path) -> PathBuf {
        host_path(self.root.as_deref(), path)
    }

    fn command(&self, program: &str) -> Command {
        let program = format!("{RABBIT_BIN}/{program}");
        let mut command = match &self.root {
            None => Command::new(program),
            Some(root) => {
                let mut command = Command::new("chroot");
                command.arg(root).arg(program);
                command
            }
        };
        let d = &self.dir;
        command
            .env("HOME", d)
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq"))
            .env("RABBITMQ_PID_FILE", d.join("pid"));
        command
    }

    /// The AMQP URL of the node.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// The node's management API, with guest's credentials in it.
    pub fn management_url(&self) -> String {
        format!("http://guest:guest@127.0.0.1:{}", self.management_port)
    }

    /// The RabbitMQ version the node reported, e.g. "3.10.8" or "4.0.5".
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Run `rabbitmqctl <args>` against the node; its standard output.
    pub async fn rabbitmqctl(&self, args: &[&str]) -> String {
        run(
            self.command("rabbitmqctl")
                .args(["-n", &self.node])
                .args(args),
            &format!("rabbitmqctl {}", args.join(" ")),
        )
        .await
    }

    /// Whether `program <args>` (a RabbitMQ CLI tool) succeeds against the
    /// node: for the checks that answer with their exit status.
    pub async fn check(&self, program: &str, args: &[&str]) -> bool {
        self.command(program)
            .args(["-n", &self.node])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .is_ok_and(|s| s.success())
    }

    /// Start the node (again, keeping its data) and wait until it accepts
    /// AMQP connections and its management API answers. `rabbitmqctl wait`
    /// alone returns before the AMQP listener takes connections.
    pub async fn start_again(&self) {
        // A pid file left by a killed node would make `rabbitmqctl wait`
        // watch the dead process.
        let _ = std::fs::remove_file(self.host_path(&self.dir.join("pid")));
        run(
            self.command("rabbitmq-server").arg("-detached"),
            "rabbitmq-server -detached",
        )
        .await;
        run(
            self.command("rabbitmqctl")
                .args(["-n", &self.node, "wait", "--timeout", "120"])
                .arg(self.dir.join("pid")),
            "rabbitmqctl wait",
        )
        .await;
        self.wait_serving().await;
    }

    /// Wait until the running node accepts AMQP connections and its
    /// management API answers.
    pub async fn wait_serving(&self) {
        let url = self.url();
        test_support::eventually(
            Duration::from_secs(60),
            &format!("RabbitMQ {} to accept AMQP connections", self.node),
            || async {
                let connecting = lapin::Connection::connect(&url, Default::default());
                let connection = tokio::time::timeout(Duration::from_secs(5), connecting)
                    .await
                    .ok()?
                    .ok()?;
                let _ = connection.close(200, "ready".into()).await;
                Some(())
            },
        )
        .await;
        let overview = format!("{}/api/overview", self.management_url());
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        test_support::eventually(
            Duration::from_secs(60),
            &format!("the management API of {}", self.node),
            || async {
                let response = client.get(&overview).send().await.ok()?;
                response.status().is_success().then_some(())
            },
        )
        .await;
    }

    /// Stop the node cleanly (its queues survive); returns once its process
    /// has exited.
    pub async fn stop(&self) {
        let pid_file = self.dir.join("pid");
        run(
            self.command("rabbitmqctl")
                .args(["-n", &self.node, "stop"])
                .arg(&pid_file),
            "rabbitmqctl stop",
        )
        .await;
    }

    /// Kill the node's Erlang VM outright (SIGKILL): a crash. Returns once
    /// the process is gone.
    pub fn kill(&self) {
        let Some(pid) = self.pid() else {
            return;
        };
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
        for _ in 0..200 {
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Gone, or a zombie that no one has reaped yet.
            if state.is_empty()
                || state
                    .rsplit(')')
                    .next()
                    .is_some_and(|s| s.trim_start().starts_with('Z'))
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("RabbitMQ {} (pid {pid}) survived kill -9", self.node);
    }

    /// Delete the stopped node's data, so that its next start is a blank
    /// broker with the same name: a broker that forgot everything.
    pub async fn wipe_data(&self) {
        let data = self.host_path(&self.dir.join("mnesia"));
        tokio::fs::remove_dir_all(&data)
            .await
            .unwrap_or_else(|e| panic!("deleting {}: {e}", data.display()));
    }

    /// Freeze the node's Erlang VM (SIGSTOP): it holds its connections
    /// and answers nothing, as a node in a long GC pause or a hung VM.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Let a frozen node run again (SIGCONT).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.pid().expect("the node is running");
        let status = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// The node's name, e.g. `chaos41235@localhost`.
    pub fn name(&self) -> &str {
        &self.node
    }

    fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.host_path(&self.dir.join("pid")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        }
        if let Some(epmd) = &mut self.epmd {
            let _ = epmd.kill();
            let _ = epmd.wait();
        }
        let _ = std::fs::remove_dir_all(self.host_path(&self.dir));
    }
}

/// `path` as the host sees it: inside the chroot for a 4.x node.
fn host_path(root: Option<&Path>, path: &Path) -> PathBuf {
    match root {
        None => path.to_owned(),
        Some(root) => root.join(path.strip_prefix("/").unwrap_or(path)),
    }
}

fn rabbitmq4_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/rabbitmq4.sh")
}

/// An epmd of the node's own on `port`, in the foreground so that its pid is
/// ours to end; the node finds it through `ERL_EPMD_PORT`.
fn start_epmd(root: Option<&Path>, port: u16) -> std::process::Child {
    let mut command = match root {
        None => std::process::Command::new("epmd"),
        Some(root) => {
            let mut command = std::process::Command::new("chroot");
            command.arg(root).arg("epmd");
            command
        }
    };
    command
        .args(["-port", &port.to_string(), "-address", "127.0.0.1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting epmd on port {port}: {e}"))
}

/// A Postgres cluster of our own.
pub struct PrivatePostgres {
    dir: PathBuf,
    bin: PathBuf,
    pub port: u16,
}

impl PrivatePostgres {
    pub async fn start() -> Self {
        let dir =
            std::env::temp_dir().join(format!("orderflow-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        run(Command::new("chown").arg("postgres").arg(&dir), "chown").await;
        let version = std::fs::read_dir("/usr/lib/postgresql")
            .expect("Postgres server binaries in /usr/lib/postgresql")
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .max()
            .expect("a Postgres version");
        let postgres = Self {
            bin: PathBuf::from(format!("/usr/lib/postgresql/{version}/bin")),
            port: free_port(),
            dir,
        };
        run(
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(postgres.bin.join("initdb"))
                .arg("-D")
                .arg(postgres.dir.join("data"))
                .args(["-A", "trust", "-U", "postgres"]),
            "initdb",
        )
        .await;
        postgres.start_again().await;
        postgres
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    fn pg_ctl(&self) -> Command {
        let mut command = Command::new("runuser");
        command
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"));
        command
    }

    /// Start the cluster (again, keeping its data) and wait until it is up.
    pub async fn start_again(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off",
            self.port,
            self.dir.display()
        );
        run(
            self.pg_ctl()
                .args(["-o", &options, "-l"])
                .arg(self.dir.join("log"))
                .args(["-w", "start"]),
            "pg_ctl start",
        )
        .await;
    }

    /// Stop the cluster now (clients are cut off).
    pub async fn stop(&self) {
        run(self.pg_ctl().args(["-m", "fast", "stop"]), "pg_ctl stop").await;
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The private broker itself, on whichever RabbitMQ `ORDERFLOW_TEST_BROKER`
/// picks: what the chaos cases rely on.
mod tests {
    use lapin::{
        BasicProperties,
        options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions},
        types::{AMQPValue, FieldTable},
    };

    use super::*;

    /// Messages in `queue` as `rabbitmqctl list_queues` counts them.
    async fn messages(rabbit: &PrivateRabbit, queue: &str) -> Option<u64> {
        let listing = rabbit
            .rabbitmqctl(&[
                "list_queues",
                "--quiet",
                "--no-table-headers",
                "name",
                "messages",
            ])
            .await;
        listing.lines().find_map(|line| {
            let (name, count) = line.split_once('\t')?;
            (name == queue).then(|| count.trim().parse().ok())?
        })
    }

    async fn wait_for_messages(rabbit: &PrivateRabbit, queue: &str, expected: Option<u64>) {
        test_support::eventually(
            Duration::from_secs(60),
            &format!("{queue} to hold {expected:?} messages"),
            || async { (messages(rabbit, queue).await == expected).then_some(()) },
        )
        .await;
    }

    #[tokio::test]
    async fn a_private_broker_keeps_its_queues_through_a_stop_and_a_kill_and_forgets_them_when_wiped()
     {
        let rabbit = PrivateRabbit::start().await;
        let expected = match std::env::var("ORDERFLOW_TEST_BROKER").as_deref() {
            Ok("4") => "4.",
            _ => "3.",
        };
        println!("broker: RabbitMQ {}", rabbit.version());
        assert!(
            rabbit.version().starts_with(expected),
            "{}",
            rabbit.version()
        );

        let connection = lapin::Connection::connect(&rabbit.url(), Default::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        channel
            .queue_declare(
                "kept".into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                arguments,
            )
            .await
            .unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        channel
            .basic_publish(
                "".into(),
                "kept".into(),
                BasicPublishOptions::default(),
                b"kept",
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        let _ = connection.close(200, "published".into()).await;
        wait_for_messages(&rabbit, "kept", Some(1)).await;

        rabbit.stop().await;
        rabbit.start_again().await;
        wait_for_messages(&rabbit, "kept", Some(1)).await;

        rabbit.kill();
        rabbit.start_again().await;
        wait_for_messages(&rabbit, "kept", Some(1)).await;

        rabbit.stop().await;
        rabbit.wipe_data().await;
        rabbit.start_again().await;
        wait_for_messages(&rabbit, "kept", None).await;
        let queue = reqwest::get(format!("{}/api/queues/%2F/kept", rabbit.management_url()))
            .await
            .unwrap();
        assert_eq!(queue.status(), 404, "the wiped broker has no queue `kept`");
    }
}
