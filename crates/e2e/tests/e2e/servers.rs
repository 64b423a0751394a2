//! Private RabbitMQ nodes and Postgres clusters for fault injection: each in
//! a temp dir on free ports, never the shared servers on 5672/5432. The
//! recipes are the ones in shared/FIELD-NOTES.md (run as root; Postgres runs
//! as the `postgres` user).

use std::{path::PathBuf, time::Duration};

use tokio::process::Command;

use crate::processes::free_port;

const RABBIT_BIN: &str = "/usr/lib/rabbitmq/bin";

async fn run(command: &mut Command, what: &str) {
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
}

/// A RabbitMQ node of our own.
pub struct PrivateRabbit {
    dir: PathBuf,
    node: String,
    pub port: u16,
    dist_port: u16,
}

impl PrivateRabbit {
    pub async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "orderflow-rabbit-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("enabled_plugins"), "[].").unwrap();
        std::fs::write(dir.join("rabbitmq.conf"), "loopback_users = none\n").unwrap();
        let cookie = dir.join(".erlang.cookie");
        std::fs::write(&cookie, format!("cookie-{}", uuid::Uuid::new_v4().simple())).unwrap();
        run(
            Command::new("chmod").arg("400").arg(&cookie),
            "chmod cookie",
        )
        .await;
        let rabbit = Self {
            node: format!("chaos{}@localhost", free_port()),
            port: free_port(),
            dist_port: free_port(),
            dir,
        };
        rabbit.start_again().await;
        rabbit
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(format!("{RABBIT_BIN}/{program}"));
        let d = &self.dir;
        command
            .env("HOME", d)
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

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Start the node (again, keeping its data) and wait until it is up.
    pub async fn start_again(&self) {
        run(
            self.command("rabbitmq-server").arg("-detached"),
            "rabbitmq-server -detached",
        )
        .await;
        run(
            self.command("rabbitmqctl")
                .args(["-n", &self.node, "wait", "--timeout", "60"])
                .arg(self.dir.join("pid")),
            "rabbitmqctl wait",
        )
        .await;
        crate::processes::wait_for_port(self.port, Duration::from_secs(30)).await;
    }

    /// Stop the node cleanly (its queues survive).
    pub async fn stop(&self) {
        run(
            self.command("rabbitmqctl").args(["-n", &self.node, "stop"]),
            "rabbitmqctl stop",
        )
        .await;
    }

    /// Run `rabbitmqctl` against this node; its standard output.
    pub async fn rabbitmqctl(&self, args: &[&str]) -> String {
        let output = self
            .command("rabbitmqctl")
            .args(["-n", &self.node])
            .args(args)
            .output()
            .await
            .expect("rabbitmqctl");
        assert!(
            output.status.success(),
            "rabbitmqctl {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Delete the stopped node's data: the next start is a blank broker
    /// with the same node name.
    pub fn wipe_data(&self) {
        std::fs::remove_dir_all(self.dir.join("mnesia")).expect("removing the node's data");
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        let pid = std::fs::read_to_string(self.dir.join("pid")).unwrap_or_default();
        if let Ok(pid) = pid.trim().parse::<u32>() {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        }
        // epmd and any node leftovers are harmless; the data goes.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
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
