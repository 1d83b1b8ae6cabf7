//! Every call into libc the crate makes, behind safe functions: user and group name lookups,
//! the effective ids, the umask, the monotonic clock and free disk space; and what the kernel
//! says about the user namespace the process runs in (`/proc/self/uid_map`).
//!
//! This is the one module allowed to use `unsafe` (the crate denies `unsafe_code` in
//! Cargo.toml), so that an audit of the crate's unsafe code is an audit of this file.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::path::Path;
use std::time::Duration;

/// First buffer sizes for the name lookups. Group entries list their members, so they get more
/// room; either grows on ERANGE.
const USER_BUFFER: usize = 16 * 1024;
const GROUP_BUFFER: usize = 64 * 1024;
/// Beyond this an entry is treated as broken rather than growing the buffer further: even an
/// LDAP group with a hundred thousand members fits well within it.
const BUFFER_CAP: usize = 16 * 1024 * 1024;

/// The uid of the user `name`; `Ok(None)` if there is no such user.
pub fn lookup_user(name: &str) -> io::Result<Option<u32>> {
    lookup_user_with(name, USER_BUFFER, BUFFER_CAP)
}

/// The gid of the group `name`; `Ok(None)` if there is no such group.
pub fn lookup_group(name: &str) -> io::Result<Option<u32>> {
    lookup_group_with(name, GROUP_BUFFER, BUFFER_CAP)
}

fn lookup_user_with(name: &str, initial: usize, cap: usize) -> io::Result<Option<u32>> {
    // No user name contains a NUL byte.
    let Ok(c_name) = CString::new(name) else {
        return Ok(None);
    };
    let what = format!("user `{name}`");
    with_growing_buffer(&what, initial, cap, |buf| {
        // SAFETY: `passwd` is a C struct of integers and pointers, for which all-zero bytes are
        // a valid value; getpwnam_r overwrites it before we read it.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer refers to a live local or to `buf`, whose true length is passed,
        // so getpwnam_r writes only within them. It is the re-entrant form: no static storage
        // shared with other threads. The strings it stores in `pwd` point into `buf`; we read
        // only the integer `pw_uid`, while `buf` is still alive.
        let rc = unsafe {
            libc::getpwnam_r(
                c_name.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        match rc {
            0 => Ok((!result.is_null()).then_some(pwd.pw_uid)),
            e => Err(e),
        }
    })
}

fn lookup_group_with(name: &str, initial: usize, cap: usize) -> io::Result<Option<u32>> {
    // No group name contains a NUL byte.
    let Ok(c_name) = CString::new(name) else {
        return Ok(None);
    };
    let what = format!("group `{name}`");
    with_growing_buffer(&what, initial, cap, |buf| {
        // SAFETY: `group` is a C struct of integers and pointers, for which all-zero bytes are
        // a valid value; getgrnam_r overwrites it before we read it.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: as in `lookup_user_with`: live locals and `buf` with its true length, the
        // re-entrant form, and only the integer `gr_gid` is read.
        let rc = unsafe {
            libc::getgrnam_r(
                c_name.as_ptr(),
                &mut grp,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        match rc {
            0 => Ok((!result.is_null()).then_some(grp.gr_gid)),
            e => Err(e),
        }
    })
}

/// Runs a `get*nam_r` call, doubling its buffer while the entry does not fit (ERANGE), up to
/// `cap`. Taking ERANGE for "not found" would hide large groups, so that is never done.
fn with_growing_buffer(
    what: &str,
    initial: usize,
    cap: usize,
    mut call: impl FnMut(&mut [u8]) -> Result<Option<u32>, libc::c_int>,
) -> io::Result<Option<u32>> {
    let mut size = initial.clamp(1, cap.max(1));
    loop {
        let mut buf = vec![0u8; size];
        match call(&mut buf) {
            Ok(found) => return Ok(found),
            Err(libc::ERANGE) if size < cap => size = size.saturating_mul(2).min(cap),
            Err(libc::ERANGE) => {
                return Err(io::Error::other(format!(
                    "the entry for {what} is larger than {cap} bytes"
                )))
            }
            Err(libc::EINTR) => {}
            // Some name services answer "no such entry" with an error number rather than an
            // empty result (getpwnam_r(3)).
            Err(libc::ENOENT | libc::ESRCH) => return Ok(None),
            Err(code) => {
                let e = io::Error::from_raw_os_error(code);
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot look up {what}: {e}"),
                ));
            }
        }
    }
}

/// The process's effective uid and gid.
pub fn effective_ids() -> (u32, u32) {
    // SAFETY: geteuid and getegid take no arguments, touch no memory and cannot fail.
    unsafe { (libc::geteuid(), libc::getegid()) }
}

/// Sets the process's file mode creation mask and returns the previous one. The mask is
/// process-wide: it also applies to files other threads create meanwhile.
pub fn set_umask(mask: libc::mode_t) -> libc::mode_t {
    // SAFETY: umask takes an integer, touches no memory and cannot fail.
    unsafe { libc::umask(mask) }
}

/// CLOCK_MONOTONIC, as an offset from its (unspecified) epoch. `Instant` hides the raw value,
/// which systemd wants in `MONOTONIC_USEC`.
pub fn monotonic_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through the pointer, which refers to the
    // initialised local above. CLOCK_MONOTONIC is always supported on Linux, so it cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Bytes available to an unprivileged writer on the file system holding `path` (statvfs).
pub fn available_bytes(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    // SAFETY: `statvfs` is a C struct of integers, for which all-zero bytes are a valid value;
    // statvfs overwrites it before we read it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is a NUL-terminated string alive for the call and `st` a live local;
    // statvfs writes only within `st`.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Whether this process may write `path`, by access(2): asks without opening the file, which
/// matters for SQLite's files (closing any descriptor of a file drops the process's POSIX
/// locks on it). `EROFS` for a read-only file system, `EPERM` for an immutable file.
pub fn check_writable(path: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    // SAFETY: `c_path` is a NUL-terminated string alive for the call; access only reads it.
    let rc = unsafe { libc::access(c_path.as_ptr(), libc::W_OK) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One line of `/proc/self/uid_map` (or `gid_map`): the ids `inside .. inside + count` of this
/// process's user namespace are the ids `outside ..` of its parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub inside: u32,
    pub outside: u32,
    pub count: u32,
}

/// A user namespace's id map. Ids outside every range do not exist in the namespace: the
/// kernel reports a peer with such an id (SO_PEERCRED, file owners) as the overflow id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdMap(pub Vec<IdRange>);

impl IdMap {
    /// Parses the map file's text; `None` if it is not one.
    pub fn parse(text: &str) -> Option<IdMap> {
        let mut ranges = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let mut fields = line.split_whitespace().map(|f| f.parse::<u32>().ok());
            let (Some(Some(inside)), Some(Some(outside)), Some(Some(count)), None) =
                (fields.next(), fields.next(), fields.next(), fields.next())
            else {
                return None;
            };
            ranges.push(IdRange {
                inside,
                outside,
                count,
            });
        }
        Some(IdMap(ranges))
    }

    /// The initial user namespace's map, `0 0 4294967295`: every id is itself.
    pub fn is_identity(&self) -> bool {
        self.0
            == [IdRange {
                inside: 0,
                outside: 0,
                count: u32::MAX,
            }]
    }

    /// Whether `id` (as seen inside the namespace) is mapped.
    pub fn contains(&self, id: u32) -> bool {
        self.0
            .iter()
            .any(|r| id >= r.inside && u64::from(id) < u64::from(r.inside) + u64::from(r.count))
    }
}

impl std::fmt::Display for IdMap {
    /// `0-0 → 1000-1000, 1-65536 → 100000-165535`, for error messages.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("nothing");
        }
        for (i, r) in self.0.iter().enumerate() {
            let last = |start: u32| u64::from(start) + u64::from(r.count.max(1)) - 1;
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(
                f,
                "{}-{} → {}-{}",
                r.inside,
                last(r.inside),
                r.outside,
                last(r.outside)
            )?;
        }
        Ok(())
    }
}

/// The uid and gid maps of the namespace this process runs in; `None` where `/proc` does not
/// tell (not mounted, or hidden).
pub fn id_maps() -> (Option<IdMap>, Option<IdMap>) {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|t| IdMap::parse(&t))
    };
    (read("/proc/self/uid_map"), read("/proc/self/gid_map"))
}

/// The ids the kernel reports for users and groups it cannot map
/// (`/proc/sys/kernel/overflowuid`, `overflowgid`); 65534 where `/proc/sys` is hidden, as
/// under systemd's `ProcSubset=pid`.
pub fn overflow_ids() -> (u32, u32) {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(OVERFLOW_ID)
    };
    (
        read("/proc/sys/kernel/overflowuid"),
        read("/proc/sys/kernel/overflowgid"),
    )
}

/// The kernel's default overflow id (`nobody`, `nogroup`).
pub const OVERFLOW_ID: u32 = 65534;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_resolves_and_nonsense_does_not() {
        assert_eq!(lookup_user("root").unwrap(), Some(0));
        assert_eq!(lookup_group("root").unwrap(), Some(0));
        assert_eq!(lookup_user("no-such-user-credproxy").unwrap(), None);
        assert_eq!(lookup_group("no-such-group-credproxy").unwrap(), None);
        assert_eq!(lookup_user("nul\0byte").unwrap(), None);
    }

    #[test]
    fn an_entry_larger_than_the_buffer_is_retried_not_reported_missing() {
        // One byte cannot hold any entry: the first call answers ERANGE.
        assert_eq!(lookup_user_with("root", 1, BUFFER_CAP).unwrap(), Some(0));
        assert_eq!(lookup_group_with("root", 1, BUFFER_CAP).unwrap(), Some(0));
    }

    #[test]
    fn an_entry_larger_than_the_cap_is_an_error() {
        let e = lookup_group_with("root", 1, 4).unwrap_err();
        assert!(e.to_string().contains("group `root`"), "{e}");
        let e = lookup_user_with("root", 1, 4).unwrap_err();
        assert!(e.to_string().contains("user `root`"), "{e}");
    }

    #[test]
    fn id_maps_parse_and_tell_identity_and_mapped_ids() {
        let host = IdMap::parse("         0          0 4294967295\n").unwrap();
        assert!(host.is_identity());
        assert!(host.contains(0) && host.contains(4242) && host.contains(u32::MAX - 1));
        // `unshare --user --map-root-user`, and systemd's PrivateUsers=yes for a service user.
        let root_only = IdMap::parse("0 0 1\n").unwrap();
        assert!(!root_only.is_identity());
        assert!(root_only.contains(0) && !root_only.contains(1));
        let private = IdMap::parse("0 0 1\n990 990 1\n").unwrap();
        assert!(private.contains(990) && !private.contains(1000));
        assert_eq!(private.to_string(), "0-0 → 0-0, 990-990 → 990-990");
        assert_eq!(IdMap::parse("0 0\n"), None);
        assert_eq!(IdMap::parse("0 0 x\n"), None);
    }

    #[test]
    fn this_process_has_readable_maps_and_overflow_ids() {
        let (uids, gids) = id_maps();
        assert!(uids.is_some() && gids.is_some());
        let (u, g) = overflow_ids();
        assert!(u > 0 && g > 0);
        assert!(available_bytes(Path::new("/")).is_ok());
        assert!(available_bytes(Path::new("/no/such/dir")).is_err());
        let dir = tempfile::tempdir().unwrap();
        assert!(check_writable(dir.path()).is_ok());
        assert!(check_writable(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn the_monotonic_clock_does_not_go_back() {
        let a = monotonic_time();
        let b = monotonic_time();
        assert!(b >= a);
        assert!(a > Duration::ZERO);
    }
}
