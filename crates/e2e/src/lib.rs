//! Tests only: see `tests/e2e`.
