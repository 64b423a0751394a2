//! Print order-api's OpenAPI 3.1 description (what `GET /openapi.json`
//! serves), e.g. to validate it or generate a client:
//! `cargo run -p order-api --bin openapi > openapi.json`.

use order_api::{configuration::DEFAULT_MAX_QUANTITY, openapi};

fn main() -> Result<(), serde_json::Error> {
    println!(
        "{}",
        serde_json::to_string_pretty(&openapi::document(DEFAULT_MAX_QUANTITY))?
    );
    Ok(())
}
