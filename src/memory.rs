//! Memory checks before large allocations, so that a size too large for the
//! machine returns [`KeelError::Memory`] instead of aborting the process
//! (Rust aborts on a failed allocation; Linux may instead kill the process
//! later, when the pages are first touched).
//!
//! Two layers: the library's constructors (optimizer state, the GPT's
//! activations) ask the allocator first and turn a refusal, or a size that
//! overflows, into an error; [`ensure_fits`] compares the total a whole run
//! will hold with [`available_memory`], which catches many allocations that
//! each succeed but together exceed memory. The command line's runs (`keel
//! train`, `bench`, `bench-gpt`) use both, since they know everything they
//! will allocate.

use std::path::{Path, PathBuf};

use crate::error::{KeelError, Result};

/// Bytes the machine can still give this process: available RAM plus free
/// swap (`/proc/meminfo`), or less where the process's memory cgroup (v1 or
/// v2, and its ancestors) leaves less room under its limit. `None` where
/// `/proc/meminfo` is not readable, e.g. off Linux.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let machine = parse_meminfo(&text)?;
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|text| cgroup_headroom(&text));
    Some(cgroup.map_or(machine, |room| room.min(machine)))
}

/// `MemAvailable + SwapFree` of a `/proc/meminfo` text, in bytes.
fn parse_meminfo(text: &str) -> Option<u64> {
    let ram = kib_field(text, "MemAvailable:")?;
    Some(ram.saturating_add(kib_field(text, "SwapFree:").unwrap_or(0)))
}

/// A `Name:   123 kB` line of `/proc/meminfo`, in bytes.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kib: u64 = line[name.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

/// The two memory-cgroup hierarchies: where they are mounted and the files
/// of a group's limit, usage and statistics.
struct CgroupFiles {
    mount: &'static str,
    limit: &'static str,
    usage: &'static str,
    stat: &'static str,
}

const CGROUP_V2: CgroupFiles = CgroupFiles {
    mount: "/sys/fs/cgroup",
    limit: "memory.max",
    usage: "memory.current",
    stat: "memory.stat",
};

const CGROUP_V1: CgroupFiles = CgroupFiles {
    mount: "/sys/fs/cgroup/memory",
    limit: "memory.limit_in_bytes",
    usage: "memory.usage_in_bytes",
    stat: "memory.stat",
};

/// The smallest room left under a limit along the process's memory cgroup
/// and its ancestors, given `/proc/self/cgroup`; `None` when no group has a
/// limit (or none can be read).
fn cgroup_headroom(proc_self_cgroup: &str) -> Option<u64> {
    let mut room: Option<u64> = None;
    for (files, path) in cgroup_paths(proc_self_cgroup) {
        let mut dir = PathBuf::from(files.mount).join(path.trim_start_matches('/'));
        loop {
            if let Some(r) = group_headroom(&dir, &files) {
                room = Some(room.map_or(r, |x| x.min(r)));
            }
            if dir == Path::new(files.mount) || !dir.pop() {
                break;
            }
        }
    }
    room
}

/// The memory cgroups of the process: the v2 group (`0::/path`) and the v1
/// `memory` controller's group (`N:...memory...:/path`).
fn cgroup_paths(proc_self_cgroup: &str) -> Vec<(CgroupFiles, String)> {
    let mut out = Vec::new();
    for line in proc_self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            out.push((CGROUP_V2, path.to_string()));
        } else if controllers.split(',').any(|c| c == "memory") {
            out.push((CGROUP_V1, path.to_string()));
        }
    }
    out
}

/// `limit - usage + inactive file cache` of one group (the cache is
/// reclaimed before the limit is enforced); `None` without a limit.
fn group_headroom(dir: &Path, files: &CgroupFiles) -> Option<u64> {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    let limit: u64 = read(files.limit)?.trim().parse().ok()?; // "max": no limit
                                                              // v1 writes "no limit" as a page-rounded i64::MAX.
    if limit >= 1 << 62 {
        return None;
    }
    let usage: u64 = read(files.usage)?.trim().parse().ok()?;
    let cache = read(files.stat).and_then(|s| stat_field(&s, "inactive_file"));
    Some(
        limit
            .saturating_sub(usage)
            .saturating_add(cache.unwrap_or(0)),
    )
}

/// A `name value` line of a cgroup's `memory.stat`.
fn stat_field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (key, value) = l.split_once(' ')?;
        (key == name).then(|| value.trim().parse().ok())?
    })
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
    let mut v = try_with_capacity(n, what)?;
    v.resize(n, value);
    Ok(v)
}

/// An empty buffer with room for `n` elements, or [`KeelError::Memory`]
/// naming `what` when the allocator refuses it.
pub(crate) fn try_with_capacity<T>(n: usize, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| refused::<T>(n, what))?;
    Ok(v)
}

/// `n` zeros, or [`KeelError::Memory`] naming `what` when the allocator
/// refuses them. The allocator is asked once without writing (a refusal
/// returns here), then `vec!` takes zeroed memory, whose pages the OS hands
/// out untouched until first written, as before these checks existed.
pub(crate) fn try_zeros<T: crate::real::Real>(n: usize, what: &str) -> Result<Vec<T>> {
    Vec::<T>::new()
        .try_reserve_exact(n)
        .map_err(|_| refused::<T>(n, what))?;
    Ok(vec![T::zero(); n])
}

fn refused<T>(n: usize, what: &str) -> KeelError {
    KeelError::Memory {
        what: what.to_string(),
        needed: bytes_of(n, std::mem::size_of::<T>()),
        available: available_memory(),
    }
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
        assert_eq!(try_zeros::<f32>(4, "x").unwrap(), [0.0; 4]);
        ensure_fits("a small buffer", 1024).unwrap();
    }

    /// 1 PiB: within `isize::MAX`, so the allocator itself is asked, and it
    /// refuses (more than a 64-bit Linux process can map, 128 TiB).
    #[cfg(all(target_os = "linux", target_pointer_width = "64"))]
    #[test]
    fn refused_allocations_are_errors() {
        for result in [
            try_zeros::<f32>(1 << 48, "zeros"),
            try_filled(1 << 48, 1.0f32, "ones"),
        ] {
            match result.unwrap_err() {
                KeelError::Memory { needed, .. } => assert_eq!(needed, 1 << 50),
                other => panic!("expected a memory error, got {other}"),
            }
        }
    }

    #[test]
    fn cgroup_files_are_found_and_read() {
        let text = "12:memory:/a/b\n4:cpu,cpuacct:/\n0::/user.slice/x\n";
        let paths = cgroup_paths(text);
        let found: Vec<(&str, &str)> = paths.iter().map(|(f, p)| (f.mount, p.as_str())).collect();
        assert_eq!(
            found,
            [
                ("/sys/fs/cgroup/memory", "/a/b"),
                ("/sys/fs/cgroup", "/user.slice/x")
            ]
        );
        let stat = "cache 5\ninactive_file 300\ntotal_inactive_file 900\n";
        assert_eq!(stat_field(stat, "inactive_file"), Some(300));
        assert_eq!(stat_field(stat, "active_file"), None);

        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write("memory.max", "max\n");
        write("memory.current", "1000\n");
        assert_eq!(group_headroom(dir.path(), &CGROUP_V2), None);
        write("memory.max", "5000\n");
        assert_eq!(group_headroom(dir.path(), &CGROUP_V2), Some(4000));
        write("memory.stat", stat);
        assert_eq!(group_headroom(dir.path(), &CGROUP_V2), Some(4300));
        write("memory.limit_in_bytes", "9223372036854771712\n");
        write("memory.usage_in_bytes", "7\n");
        assert_eq!(group_headroom(dir.path(), &CGROUP_V1), None);
        write("memory.limit_in_bytes", "107\n");
        assert_eq!(group_headroom(dir.path(), &CGROUP_V1), Some(400));
    }
}
