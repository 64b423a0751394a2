use clap::Parser;
use order_api::{configuration::Settings, startup::Application};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::parse();
    messaging::telemetry::init("order-api", settings.service.log.log_format);
    let shutdown = messaging::shutdown::token_on_signal();
    let application = Application::build(settings).await?;
    application.run_until_stopped(shutdown).await
}
