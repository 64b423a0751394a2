//! What a valid order is, independent of HTTP and storage.

mod order;
mod priced_line;

pub use order::{ItemRequest, OrderRequest, Shipping, ValidOrder};
pub use priced_line::PricedLine;
