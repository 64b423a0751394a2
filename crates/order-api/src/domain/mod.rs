//! What a valid order is, independent of HTTP and storage.

mod order;

pub use order::{ItemRequest, OrderRequest, Shipping, ValidOrder};
