//! The audit trail: one line per credential access, written without a system call on the
//! request's path. A request formats its line and appends it to a bounded in-memory buffer;
//! a thread of its own writes the buffer out when it passes a size or an interval has gone by,
//! and on shutdown. A full buffer drops the line and counts it (or, with `blocking`, makes the
//! request wait for room) — it never grows without bound and never loses a line silently.
//!
//! The sink is stderr (with the rest of the log, as journald or a container runtime collects
//! it) or a file of its own, reopened on SIGUSR1 for log rotation.

use std::fmt::Write as _;
use std::fs::File;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

/// Once this much is buffered the writer is woken without waiting for the interval.
const WRITE_AT: usize = 64 * 1024;
/// At most one warning about dropped lines per this period.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// How lines are laid out: as the text or the JSON log lines beside them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub format: Format,
    /// `None`: stderr.
    pub file: Option<PathBuf>,
    pub flush_interval: Duration,
    /// Bytes buffered at most while the writer catches up.
    pub buffer: usize,
    /// Wait for room instead of dropping a line when the buffer is full.
    pub blocking: bool,
}

/// Who called, as the audit line names them.
#[derive(Debug, Clone, Copy)]
pub enum Who {
    Unix {
        uid: u32,
        gid: u32,
        pid: Option<i32>,
    },
    Tcp,
}

/// One access: everything but values.
pub struct Access<'a, I> {
    pub route: &'static str,
    pub who: Who,
    pub credential: &'a str,
    /// The secret field names handed out, if any were.
    pub fields: Option<I>,
    /// A call through the egress proxy: its method and the upstream's host (never its path or
    /// query, which may hold data).
    pub upstream: Option<(&'a str, &'a str)>,
    pub status: u16,
}

pub struct AuditLog {
    shared: Arc<Shared>,
    /// Answers when the writer has written its last line and ended.
    finished: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

/// How long `close` waits for the last write (a stalled sink must not hold the exit).
const CLOSE_WAIT: Duration = Duration::from_secs(5);

struct Shared {
    settings: Settings,
    state: Mutex<State>,
    /// Wakes the writer: a full chunk, a reopen, or closing.
    wake: Condvar,
    /// Wakes requests waiting for room (blocking mode).
    room: tokio::sync::Notify,
    dropped: AtomicU64,
    dropped_metric: Option<prometheus::IntCounter>,
    /// Milliseconds since `started` of the last warning about dropped lines, plus one.
    warned_at: AtomicU64,
    started: Instant,
}

#[derive(Default)]
struct State {
    buffer: Vec<u8>,
    closed: bool,
    reopen: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot open the audit file {path}: {source}")]
pub struct OpenError {
    pub path: String,
    pub source: std::io::Error,
}

enum Sink {
    Stderr,
    File(File),
}

impl Sink {
    fn open(settings: &Settings) -> Result<Self, OpenError> {
        match &settings.file {
            None => Ok(Sink::Stderr),
            Some(path) => open_file(path).map(Sink::File),
        }
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            // One write under stderr's lock: the log's own lines cannot land inside a line.
            Sink::Stderr => std::io::stderr().lock().write_all(bytes),
            Sink::File(f) => f.write_all(bytes),
        }
    }
}

/// Whether `path` can be opened for appending (it is created if missing): checked before
/// anything else is created at start.
pub fn check_file(path: &std::path::Path) -> Result<(), OpenError> {
    open_file(path).map(drop)
}

fn open_file(path: &std::path::Path) -> Result<File, OpenError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| OpenError {
            path: path.display().to_string(),
            source,
        })
}

impl AuditLog {
    /// Opens the sink (a file that cannot be opened refuses the start) and starts the writer.
    pub fn start(
        settings: Settings,
        dropped_metric: Option<prometheus::IntCounter>,
    ) -> Result<Self, OpenError> {
        let sink = Sink::open(&settings)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                buffer: Vec::with_capacity(WRITE_AT),
                ..State::default()
            }),
            settings,
            wake: Condvar::new(),
            room: tokio::sync::Notify::new(),
            dropped: AtomicU64::new(0),
            dropped_metric,
            warned_at: AtomicU64::new(0),
            started: Instant::now(),
        });
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("credproxy-audit".into())
            .spawn({
                let shared = Arc::clone(&shared);
                move || {
                    shared.write_forever(sink);
                    let _ = done.send(());
                }
            })
            .map_err(|source| OpenError {
                path: "(audit writer thread)".into(),
                source,
            })?;
        Ok(Self {
            shared,
            finished: Mutex::new(Some(finished)),
        })
    }

    /// One access formatted as its line, to `offer` or `append`.
    pub fn line<'n, I: Iterator<Item = &'n str>>(&self, access: Access<'_, I>) -> String {
        LINE.with_borrow_mut(|line| {
            line.clear();
            format_line(line, self.shared.settings.format, SystemTime::now(), access);
            // Handed out of the thread-local so that a wait in `append` cannot hold it.
            std::mem::take(line)
        })
    }

    /// Appends `line`, waiting for room in blocking mode.
    pub async fn append(&self, line: String) {
        let mut line = line;
        loop {
            let room = self.shared.room.notified();
            match self.offer(line) {
                Ok(()) => return,
                Err(back) => line = back,
            }
            self.shared.wake.notify_one();
            room.await;
        }
    }

    /// Appends `line` if it fits. When the buffer is full it is dropped and counted, except in
    /// blocking mode, where it is handed back to be appended with [`Self::append`] — by a
    /// caller that can wait without a deadline running.
    pub fn offer(&self, line: String) -> Result<(), String> {
        let shared = &*self.shared;
        {
            let mut state = shared.lock();
            let fits = state.buffer.len() + line.len() <= shared.settings.buffer
                // A line longer than the whole buffer still goes, alone.
                || state.buffer.is_empty();
            if fits && !state.closed {
                state.buffer.extend_from_slice(line.as_bytes());
                let write_at = shared.write_at();
                if state.buffer.len() >= write_at && state.buffer.len() - line.len() < write_at {
                    shared.wake.notify_one();
                }
            } else if shared.settings.blocking && !state.closed {
                return Err(line);
            } else {
                drop(state);
                shared.dropped_line();
            }
        }
        LINE.with_borrow_mut(|spare| {
            if spare.capacity() == 0 {
                let mut line = line;
                line.clear();
                *spare = line;
            }
        });
        Ok(())
    }

    /// Asks the writer to reopen the file (after log rotation moved it away).
    pub fn reopen(&self) {
        if self.shared.settings.file.is_some() {
            self.shared.lock().reopen = true;
            self.shared.wake.notify_one();
        }
    }

    /// Lines dropped so far because the buffer was full.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Writes out what is buffered and stops the writer; lines recorded afterwards are
    /// dropped (and counted). Waits for the last write, a few seconds at most.
    pub fn close(&self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
        let finished = self
            .finished
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(finished) = finished {
            if finished.recv_timeout(CLOSE_WAIT).is_err() {
                tracing::error!(
                    "the audit writer did not finish within 5s; its last lines may be lost"
                );
            }
        }
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        // Without waiting: the writer writes out what is left and ends by itself.
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
    }
}

thread_local! {
    /// A line's scratch buffer, reused by the requests a thread serves.
    static LINE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

impl Shared {
    /// How much is buffered before the writer is woken ahead of the interval: early enough
    /// that a small buffer has room left while the writer works.
    fn write_at(&self) -> usize {
        WRITE_AT.min(self.settings.buffer / 2).max(1)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn dropped_line(&self) {
        let total = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(m) = &self.dropped_metric {
            m.inc();
        }
        let now = self.started.elapsed().as_millis() as u64 + 1;
        let last = self.warned_at.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= WARN_EVERY.as_millis() as u64)
            && self
                .warned_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                dropped_total = total,
                buffer_bytes = self.settings.buffer,
                "audit lines dropped: the audit writer cannot keep up (log.audit_buffer; log.audit_blocking = true waits instead)"
            );
        }
    }

    fn write_forever(&self, mut sink: Sink) {
        let mut out: Vec<u8> = Vec::with_capacity(WRITE_AT);
        let mut failing_since: Option<Instant> = None;
        loop {
            let (closed, reopen) = {
                let mut state = self.lock();
                let deadline = Instant::now() + self.settings.flush_interval;
                while !state.closed && !state.reopen && state.buffer.len() < self.write_at() {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    state = self
                        .wake
                        .wait_timeout(state, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                std::mem::swap(&mut state.buffer, &mut out);
                (state.closed, std::mem::take(&mut state.reopen))
            };
            self.room.notify_waiters();
            if !out.is_empty() {
                match sink.write(&out) {
                    Ok(()) => failing_since = None,
                    Err(e) => {
                        let lines = out.iter().filter(|b| **b == b'\n').count() as u64;
                        self.dropped.fetch_add(lines, Ordering::Relaxed);
                        if let Some(m) = &self.dropped_metric {
                            m.inc_by(lines);
                        }
                        if failing_since.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                            failing_since = Some(Instant::now());
                            tracing::error!(error = %e, lines, "cannot write audit lines; they are lost");
                        }
                    }
                }
                // Kept small between bursts: a burst's buffer is not held for the process's life.
                out.clear();
                if out.capacity() > 4 * WRITE_AT {
                    out.shrink_to(WRITE_AT);
                }
            }
            // After the write: what was recorded before the rotation goes to the old file.
            if reopen {
                if let Some(path) = &self.settings.file {
                    match open_file(path) {
                        Ok(f) => sink = Sink::File(f),
                        Err(e) => {
                            tracing::error!(error = %e, "cannot reopen the audit file; writing to the old one")
                        }
                    }
                }
            }
            if closed && self.lock().buffer.is_empty() {
                return;
            }
        }
    }
}

/// Writes `access` as one line ending in `\n`. Strings are written through `Debug` (text) or
/// as JSON strings, so a control character in an id cannot forge a line.
fn format_line<'n>(
    out: &mut String,
    format: Format,
    at: SystemTime,
    access: Access<'_, impl Iterator<Item = &'n str>>,
) {
    let Access {
        route,
        who,
        credential,
        fields,
        upstream,
        status,
    } = access;
    match format {
        Format::Text => {
            timestamp(out, at);
            out.push_str("  INFO credproxy::audit: access route=");
            quoted(out, route);
            out.push(' ');
            match who {
                Who::Unix { uid, gid, pid } => {
                    let _ = write!(out, "transport=\"unix\" uid={uid} gid={gid} ");
                    if let Some(pid) = pid {
                        let _ = write!(out, "pid={pid} ");
                    }
                }
                Who::Tcp => out.push_str("transport=\"tcp\" "),
            }
            out.push_str("credential=");
            quoted(out, credential);
            out.push_str(" fields=");
            match fields {
                None => out.push('-'),
                Some(names) => {
                    out.push('[');
                    for (i, name) in names.enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        quoted(out, name);
                    }
                    out.push(']');
                }
            }
            if let Some((method, host)) = upstream {
                out.push_str(" method=");
                quoted(out, method);
                out.push_str(" host=");
                quoted(out, host);
            }
            let _ = writeln!(out, " status={status}");
        }
        Format::Json => {
            out.push_str(r#"{"timestamp":""#);
            timestamp(out, at);
            let _ = write!(
                out,
                r#"","level":"INFO","target":"credproxy::audit","fields":{{"message":"access","route":"{route}","#
            );
            match who {
                Who::Unix { uid, gid, pid } => {
                    let _ = write!(out, r#""transport":"unix","uid":{uid},"gid":{gid},"#);
                    if let Some(pid) = pid {
                        let _ = write!(out, r#""pid":{pid},"#);
                    }
                }
                Who::Tcp => out.push_str(r#""transport":"tcp","#),
            }
            out.push_str(r#""credential":"#);
            json_string(out, credential);
            out.push_str(r#","fields":"#);
            match fields {
                None => out.push_str("null"),
                Some(names) => {
                    out.push('[');
                    for (i, name) in names.enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        json_string(out, name);
                    }
                    out.push(']');
                }
            }
            if let Some((method, host)) = upstream {
                out.push_str(r#","method":"#);
                json_string(out, method);
                out.push_str(r#","host":"#);
                json_string(out, host);
            }
            let _ = writeln!(out, r#","status":{status}}}}}"#);
        }
    }
}

/// `at` as RFC 3339 with microseconds. The part up to the second is formatted once per second
/// per thread: at a hundred thousand lines a second, formatting every date in full is a cost.
fn timestamp(out: &mut String, at: SystemTime) {
    thread_local! {
        static SECOND: std::cell::RefCell<(u64, String)> = const {
            std::cell::RefCell::new((u64::MAX, String::new()))
        };
    }
    let since = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    SECOND.with_borrow_mut(|(second, text)| {
        if *second != since.as_secs() {
            *second = since.as_secs();
            text.clear();
            let whole = SystemTime::UNIX_EPOCH + Duration::from_secs(since.as_secs());
            let _ = write!(text, "{}", humantime::format_rfc3339_seconds(whole));
            // "…:SSZ": the zone letter goes after the fraction.
            text.pop();
        }
        out.push_str(text);
    });
    let _ = write!(out, ".{:06}Z", since.subsec_micros());
}

/// `s` in double quotes as `Debug` writes it; plain text (the usual id or field name) without
/// going through the formatter.
fn quoted(out: &mut String, s: &str) {
    if s.bytes()
        .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
    {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        let _ = write!(out, "{s:?}");
    }
}

fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(file: Option<PathBuf>, buffer: usize, blocking: bool) -> Settings {
        Settings {
            format: Format::Text,
            file,
            flush_interval: Duration::from_millis(20),
            buffer,
            blocking,
        }
    }

    fn access<'a>(id: &'a str, fields: &'a [&'a str]) -> Access<'a, impl Iterator<Item = &'a str>> {
        Access {
            route: "credential_get",
            who: Who::Unix {
                uid: 1000,
                gid: 1001,
                pid: Some(42),
            },
            credential: id,
            fields: Some(fields.iter().copied()),
            upstream: None,
            status: 200,
        }
    }

    /// What the server does for one access: format the line, then append it.
    impl AuditLog {
        async fn record<'n, I: Iterator<Item = &'n str>>(&self, access: Access<'_, I>) {
            self.append(self.line(access)).await;
        }
    }

    fn line<'n>(format: Format, access: Access<'_, impl Iterator<Item = &'n str>>) -> String {
        let mut out = String::new();
        format_line(&mut out, format, SystemTime::UNIX_EPOCH, access);
        out
    }

    #[test]
    fn timestamps_and_quoting_match_the_general_formatters() {
        for at in [
            SystemTime::UNIX_EPOCH,
            SystemTime::UNIX_EPOCH + Duration::from_micros(1_764_466_753_123_456),
            SystemTime::UNIX_EPOCH + Duration::from_micros(1_764_466_753_999_999),
            SystemTime::UNIX_EPOCH + Duration::from_micros(1_764_466_754_000_001),
        ] {
            let mut out = String::new();
            timestamp(&mut out, at);
            assert_eq!(out, humantime::format_rfc3339_micros(at).to_string());
        }
        for s in [
            "abc-1",
            "",
            "a\"b",
            "a\\b",
            "line\nbreak",
            "tab\t",
            "é",
            "\u{7f}",
        ] {
            let mut out = String::new();
            quoted(&mut out, s);
            assert_eq!(out, format!("{s:?}"));
        }
    }

    #[test]
    fn text_and_json_lines_name_everything_but_values() {
        let text = line(Format::Text, access("abc", &["a", "b"]));
        assert_eq!(
            text,
            "1970-01-01T00:00:00.000000Z  INFO credproxy::audit: access route=\"credential_get\" \
             transport=\"unix\" uid=1000 gid=1001 pid=42 credential=\"abc\" fields=[\"a\",\"b\"] status=200\n"
        );
        let json = line(Format::Json, access("a\"b\n", &["x"]));
        let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(parsed["target"], "credproxy::audit");
        assert_eq!(parsed["fields"]["credential"], "a\"b\n");
        assert_eq!(parsed["fields"]["fields"], serde_json::json!(["x"]));
        assert_eq!(parsed["fields"]["uid"], 1000);
        assert_eq!(json.matches('\n').count(), 1, "one line: {json}");
        let tcp = line(
            Format::Text,
            Access {
                who: Who::Tcp,
                fields: None,
                status: 404,
                ..access("a\nforged", &[])
            },
        );
        assert!(tcp.contains("transport=\"tcp\" credential=\"a\\nforged\" fields=- status=404"));
        assert_eq!(tcp.matches('\n').count(), 1, "{tcp}");
        let proxied = Access {
            route: "proxy",
            fields: None,
            upstream: Some(("POST", "api.example.com")),
            ..access("c-1", &[])
        };
        let text = line(Format::Text, proxied);
        assert!(
            text.contains("fields=- method=\"POST\" host=\"api.example.com\" status=200"),
            "{text}"
        );
        let proxied = Access {
            route: "proxy",
            fields: None,
            upstream: Some(("GET", "h\"x")),
            ..access("c-1", &[])
        };
        let json: serde_json::Value = serde_json::from_str(&line(Format::Json, proxied)).unwrap();
        assert_eq!(json["fields"]["method"], "GET");
        assert_eq!(json["fields"]["host"], "h\"x");
    }

    #[tokio::test]
    async fn lines_reach_the_file_within_the_interval_and_all_of_them_on_close() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::start(settings(Some(path.clone()), 1 << 20, false), None).unwrap();
        log.record(access("first", &[])).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&path)
            .unwrap_or_default()
            .contains("first")
        {
            assert!(Instant::now() < deadline, "the interval flush never came");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for i in 0..10_000 {
            log.record(access(&format!("c{i}"), &[])).await;
        }
        log.close();
        let written = std::fs::read_to_string(&path).unwrap();
        assert_eq!(written.lines().count(), 10_001);
        assert!(written.contains("credential=\"c9999\""));
        assert_eq!(log.dropped(), 0);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    /// A FIFO whose reader does not read: the writer blocks once the pipe is full, as on a
    /// stalled disk or journald.
    fn stalled_sink(dir: &std::path::Path, name: &str) -> (PathBuf, File) {
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join(name);
        let made = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap();
        assert!(made.success());
        let reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        (path, reader)
    }

    /// Reads the FIFO to its end on a thread while `close` waits for the writer.
    fn drain(reader: File) -> std::thread::JoinHandle<usize> {
        std::thread::spawn(move || {
            use std::io::Read;
            let mut reader = reader;
            let mut all = Vec::new();
            let mut chunk = [0u8; 65536];
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                match reader.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => all.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        assert!(Instant::now() < deadline);
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            all.iter().filter(|b| **b == b'\n').count()
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_buffer_drops_and_counts_or_in_blocking_mode_waits() {
        let dir = tempfile::tempdir().unwrap();
        let (path, reader) = stalled_sink(dir.path(), "audit.fifo");
        let counter = prometheus::IntCounter::new("dropped", "dropped").unwrap();
        let log =
            AuditLog::start(settings(Some(path), 4096, false), Some(counter.clone())).unwrap();
        // About 100 bytes a line: far more than the pipe (64 KiB) and the buffer hold.
        for i in 0..3_000 {
            log.record(access(&format!("c{i}"), &[])).await;
        }
        assert!(log.dropped() > 1_000, "{}", log.dropped());
        assert_eq!(counter.get(), log.dropped());
        let reading = drain(reader);
        log.close();
        let kept = reading.join().unwrap() as u64;
        assert_eq!(kept + log.dropped(), 3_000, "every line written or counted");

        // Blocking: the same stalled sink makes requests wait; nothing is lost.
        let (path, reader) = stalled_sink(dir.path(), "blocking.fifo");
        let log = Arc::new(AuditLog::start(settings(Some(path), 4096, true), None).unwrap());
        let writing = tokio::spawn({
            let log = Arc::clone(&log);
            async move {
                for i in 0..3_000 {
                    log.record(access(&format!("c{i}"), &[])).await;
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!writing.is_finished(), "requests wait for room");
        let reading = drain(reader);
        writing.await.unwrap();
        log.close();
        assert_eq!(log.dropped(), 0);
        assert_eq!(reading.join().unwrap(), 3_000);
    }

    #[tokio::test]
    async fn reopen_starts_a_new_file_after_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::start(settings(Some(path.clone()), 1 << 20, false), None).unwrap();
        log.record(access("before", &[])).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&path)
            .unwrap_or_default()
            .contains("before")
        {
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        std::fs::rename(&path, dir.path().join("audit.log.1")).unwrap();
        log.reopen();
        while !path.exists() {
            assert!(Instant::now() < deadline, "not reopened");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        log.record(access("after", &[])).await;
        log.close();
        let rotated = std::fs::read_to_string(dir.path().join("audit.log.1")).unwrap();
        let fresh = std::fs::read_to_string(&path).unwrap();
        assert!(rotated.contains("before") && !rotated.contains("after"));
        assert!(fresh.contains("after") && !fresh.contains("before"));
    }
}
