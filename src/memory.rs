//! Memory checks before large allocations, so that a size too large for the
//! machine returns [`KeelError::Memory`] instead of aborting the process
//! (Rust aborts on a failed allocation; Linux may instead kill the process
//! later, when the pages are first touched).
//!
//! Two layers: [`try_filled`] asks the allocator and turns a refusal (or a
//! size that overflows) into an error; [`ensure_fits`] compares the total a
//! whole run will hold with what the machine has free, which catches the
//! case of many allocations that each succeed but together exceed memory.
//! The library's constructors use the first; the command line's runs also
//! use the second, since they know everything they will allocate.

use crate::error::{KeelError, Result};

/// Bytes the machine can still give this process: available RAM plus free
/// swap, from `/proc/meminfo` (`None` where that is not readable, e.g. off
/// Linux).
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_meminfo(&text)
}

/// `MemAvailable + SwapFree` of a `/proc/meminfo` text, in bytes.
fn parse_meminfo(text: &str) -> Option<u64> {
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        kib.checked_mul(1024)
    };
    let ram = field("MemAvailable:")?;
    Some(ram.saturating_add(field("SwapFree:").unwrap_or(0)))
}

/// Fails with [`KeelError::Memory`] when `needed` bytes cannot be held: more
/// than any allocation may be (`isize::MAX`), or more than
/// [`available_memory`] where that is known.
pub fn ensure_fits(what: &str, needed: u128) -> Result<()> {
    let available = available_memory();
    let limit = available.map_or(isize::MAX as u128, |a| (a as u128).min(isize::MAX as u128));
    if needed > limit {
        return Err(KeelError::Memory {
            what: what.to_string(),
            needed,
            available,
        });
    }
    Ok(())
}

/// Bytes of `count` elements of `elem_bytes` each, as a u128 that cannot
/// overflow for any `usize` inputs.
pub fn bytes_of(count: usize, elem_bytes: usize) -> u128 {
    count as u128 * elem_bytes as u128
}

/// A buffer of `n` copies of `value`, or [`KeelError::Memory`] naming `what`
/// when the allocator refuses it.
pub(crate) fn try_filled<T: Clone>(n: usize, value: T, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| KeelError::Memory {
        what: what.to_string(),
        needed: bytes_of(n, std::mem::size_of::<T>()),
        available: available_memory(),
    })?;
    v.resize(n, value);
    Ok(v)
}

/// `n` bytes for a person: `1.5 GiB`, `512 B`.
pub(crate) fn human_bytes(n: u128) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n == u128::MAX {
        return "more than can be addressed".to_string();
    }
    let mut x = n as f64;
    let mut unit = 0;
    while x >= 1024.0 && unit + 1 < UNITS.len() {
        x /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{n} B"),
        _ => format!("{x:.1} {}", UNITS[unit]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_sums_available_ram_and_free_swap() {
        let text = "MemTotal:       24000000 kB\nMemFree:         1000 kB\nMemAvailable:   2000000 kB\nSwapTotal: 8 kB\nSwapFree:       3 kB\n";
        assert_eq!(parse_meminfo(text), Some((2_000_000 + 3) * 1024));
        assert_eq!(parse_meminfo("MemAvailable: 7 kB\n"), Some(7 * 1024));
        assert_eq!(parse_meminfo("MemFree: 7 kB\n"), None);
    }

    #[test]
    fn sizes_read_in_binary_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
        assert_eq!(human_bytes(u128::MAX), "more than can be addressed");
    }

    #[test]
    fn impossible_sizes_are_errors_not_aborts() {
        let err = ensure_fits("a test", u128::MAX).unwrap_err();
        assert!(matches!(
            err,
            KeelError::Memory {
                needed: u128::MAX,
                ..
            }
        ));
        assert!(err.to_string().starts_with("not enough memory for a test"));
        // 2^62 f32 elements: the allocator refuses (no address space holds
        // 16 EiB), and the call returns instead of aborting.
        let err = try_filled(1usize << 62, 0.0f32, "a buffer").unwrap_err();
        match err {
            KeelError::Memory { what, needed, .. } => {
                assert_eq!(what, "a buffer");
                assert_eq!(needed, 1u128 << 64);
            }
            other => panic!("expected a memory error, got {other}"),
        }
        assert_eq!(try_filled(3, 1.5f64, "x").unwrap(), [1.5; 3]);
        ensure_fits("a small buffer", 1024).unwrap();
    }
}
