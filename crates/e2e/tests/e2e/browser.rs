//! The live page in a real browser: Debian's headless Chromium, driven by
//! Playwright (`crates/e2e/browser/live.mjs`) against the whole system.
//! `scripts/test.sh` installs both; run alone, these tests say what is
//! missing.

use std::{path::Path, process::Stdio};

use crate::processes::{Stack, api_key};

/// Start the system with the failures of the demos on and quick retries,
/// and drive the page through `scenario` of `live.mjs`.
async fn drive(scenario: &str, screenshot: Option<&Path>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("browser");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "no Chromium at {chromium}: install Debian's chromium package (scripts/test.sh does), or set CHROMIUM"
    );
    assert!(
        dir.join("node_modules/playwright-core").exists(),
        "playwright-core is not installed: run `npm ci` in {} (scripts/test.sh does)",
        dir.display()
    );
    let stack = Stack::start(&[
        ("DEMO_FAILURES", "true".into()),
        ("RETRY_MAX_ATTEMPTS", "3".into()),
        ("RETRY_INITIAL_DELAY_MS", "200".into()),
        ("RATE_LIMIT_PER_SECOND", "1000".into()),
        ("RATE_LIMIT_BURST", "1000".into()),
    ])
    .await;
    let key = api_key(&stack.database_url, "ops", "admin");
    let mut command = tokio::process::Command::new("node");
    command
        .arg(dir.join("live.mjs"))
        .arg(scenario)
        .env("ORDERFLOW_URL", stack.api.url(""))
        .env("ORDERFLOW_ADMIN_KEY", &key)
        .env("CHROMIUM", &chromium)
        .stdin(Stdio::null());
    if let Some(path) = screenshot {
        command.env("ORDERFLOW_SCREENSHOT", path);
    }
    let status = command
        .status()
        .await
        .expect("running node (install Node.js: Debian's nodejs package)");
    assert!(
        status.success(),
        "the live page did not show what `{scenario}` expects (see its output above); services' logs in {}",
        stack.log_dir.display()
    );
}

#[tokio::test]
async fn an_order_placed_from_the_page_is_seen_reaching_notified() {
    drive("order", None).await;
}

#[tokio::test]
async fn a_burst_from_the_page_rises_on_the_depth_chart_and_drains_to_zero() {
    // ORDERFLOW_SCREENSHOT=docs/live.png keeps a picture of the page under
    // the burst (the one docs/live-page-and-tour.md shows).
    let shot = std::env::var_os("ORDERFLOW_SCREENSHOT").map(std::path::PathBuf::from);
    drive("burst", shot.as_deref()).await;
}

#[tokio::test]
async fn a_dead_letter_is_replayed_from_the_page() {
    drive("replay", None).await;
}
