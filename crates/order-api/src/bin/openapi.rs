//! Print order-api's OpenAPI 3.1 description (what `GET /openapi.json`
//! serves), e.g. to validate it or generate a client:
//! `cargo run -p order-api --bin openapi > openapi.json`.

use utoipa::OpenApi;

fn main() -> Result<(), serde_json::Error> {
    println!(
        "{}",
        order_api::openapi::ApiDoc::openapi().to_pretty_json()?
    );
    Ok(())
}
