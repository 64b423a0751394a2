//! Sizes as the report prints them.

/// Bytes in mebibytes.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1024.0 / 1024.0
}

/// A size as people read it: KiB below a MiB, else MiB.
pub fn human_bytes(bytes: i64) -> String {
    let bytes = bytes.max(0) as u64;
    if bytes < 1024 * 1024 {
        format!("{:.0} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", mib(bytes))
    }
}
