use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One line with the price it was accepted at.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct PricedLine {
    pub sku: String,
    pub quantity: i32,
    pub unit_price_cents: i64,
}
