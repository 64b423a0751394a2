//! What a valid order is, independent of HTTP and storage.

mod order;
mod priced_line;

pub use order::{
    ItemRequest, OrderRequest, Shipping, VISIBLE_TEXT_FIELDS, VISIBLE_TEXT_PATTERN, ValidOrder,
};
pub use priced_line::PricedLine;
