//! Fleet mode at scale (issue #18): one PostgreSQL cluster and N real credproxy daemons sharing
//! it and one master key, each with `server.worker_threads = 1` and otherwise the daemon's
//! defaults. Everything reported is measured:
//!
//! - connections held: `pg_stat_activity` (client backends of the daemons' database),
//!   attributed to instances by matching `client_port` with the TCP sockets each daemon's pid
//!   holds (`/proc/PID/fd`, `/proc/net/tcp`); after an idle spell, and the peak of samples
//!   taken every 200 ms while under load;
//! - writes per second while idle: `pg_stat_user_tables` deltas per table and
//!   `pg_stat_statements` call deltas per statement over a window;
//! - invalidation latency: a `PATCH` through one of a few writers, then every instance polled
//!   until a `GET` through it answers the new value;
//! - token requests per lifetime of a rotating OAuth token (the test authorization server's
//!   counters) read by every instance, and whether an expired token was handed out;
//! - resident memory of every daemon (`VmRSS`) and of PostgreSQL (all its processes).
//!
//! `scale_fleet` (ignored; `scripts/fleet-scale.sh`) runs N = `CREDPROXY_SCALE_N` (200) and
//! writes the figures as JSON to `CREDPROXY_SCALE_REPORT` when set. The small test keeps 10
//! instances in the normal suite and asserts the connection bound and invalidation latency.
//! The harness's own connections log in as the role `fleet_scale_probe`, so neither
//! `pg_stat_activity` nor `pg_stat_statements` counts them.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::peers::{self, Postgres};
use common::{base_config, set, Daemon};
use hyper::Method;
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

const PROBE_ROLE: &str = "fleet_scale_probe";
/// How many daemons are started at once.
const START_BATCH: usize = 20;
/// How long one batch may take to become ready (a loaded 2-core machine).
const START_DEADLINE: Duration = Duration::from_secs(300);
/// Requests in flight at once from the harness while polling the fleet.
const POLL_CONCURRENCY: usize = 32;
/// How long an instance may take to see a write before it counts as missed.
const SEEN_DEADLINE: Duration = Duration::from_secs(10);
const OAUTH_LIFETIME_SECS: u64 = 6;

/// What one run does; [`Plan::full`] is the benchmark, [`Plan::small`] the suite's check.
struct Plan {
    n: usize,
    max_connections: usize,
    /// Idle time before the idle connections are counted.
    idle_settle: Duration,
    /// When set, the idle count is polled until every instance holds at most this many (or
    /// `idle_settle` has passed) instead of waiting `idle_settle` out.
    idle_bound: Option<usize>,
    /// The idle window over which writes per second are measured (zero: skipped).
    write_window: Duration,
    credentials: usize,
    rounds: usize,
    /// How long every instance reads the rotating OAuth token (zero: skipped).
    oauth_run: Duration,
}

impl Plan {
    fn full(n: usize) -> Plan {
        Plan {
            n,
            max_connections: env_usize("CREDPROXY_SCALE_MAX_CONNECTIONS").unwrap_or(2500),
            idle_settle: Duration::from_secs(20),
            idle_bound: None,
            write_window: Duration::from_secs(
                env_usize("CREDPROXY_SCALE_IDLE_SECS").unwrap_or(60) as u64
            ),
            credentials: 4,
            rounds: 20,
            oauth_run: Duration::from_secs(30),
        }
    }

    fn small() -> Plan {
        Plan {
            n: 10,
            max_connections: 200,
            idle_settle: Duration::from_secs(25),
            idle_bound: Some(2),
            write_window: Duration::ZERO,
            credentials: 2,
            rounds: 10,
            oauth_run: Duration::ZERO,
        }
    }
}

fn env_usize(name: &str) -> Option<usize> {
    let v = std::env::var(name).ok()?;
    Some(
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v}: not a number")),
    )
}

// --- the fleet --------------------------------------------------------------------------------

struct Fleet {
    /// Dropped after the daemons (fields drop in order): the daemons are killed first.
    daemons: Vec<Daemon>,
    pg: Postgres,
    _key_dir: tempfile::TempDir,
    probe: tokio_postgres::Client,
}

impl Fleet {
    fn pids(&self) -> Vec<i32> {
        self.daemons.iter().map(Daemon::pid).collect()
    }
}

fn probe_url(pg: &Postgres) -> String {
    format!(
        "postgres://{PROBE_ROLE}@127.0.0.1:{}/postgres?sslmode=disable&application_name={PROBE_ROLE}",
        pg.port
    )
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(connection);
    client
}

/// A daemon of the fleet on `pg`, with the shared key, one worker thread, and the defaults for
/// everything else (the harness's `log.level = "debug"` is dropped).
fn spawn_daemon(pg: &Postgres, key: &std::path::Path) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let mut c = base_config(dir.path());
    c.remove("log");
    set(&mut c, "store", "url", pg.url());
    set(
        &mut c,
        "store",
        "master_key_file",
        key.display().to_string(),
    );
    set(&mut c, "store", "generate_master_key", false);
    set(&mut c, "server", "worker_threads", 1i64);
    Daemon::spawn(dir, c, &[])
}

/// Whether the process `pid` has exited (a zombie waiting for its parent, or gone).
fn exited(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
        Err(_) => true,
    }
}

async fn ready(d: &Daemon) -> bool {
    matches!(
        credproxy::client::send(&d.socket, Method::GET, "/readyz", &[], None).await,
        Ok(r) if r.status == 200
    )
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Starts `n` daemons, `START_BATCH` at a time, each batch waited for together. A daemon that
/// exits during start-up (e.g. its metrics port, picked free, was taken meanwhile) is started
/// once more on a fresh directory and port.
async fn start_daemons(pg: &Postgres, key: &std::path::Path, n: usize) -> Vec<Daemon> {
    let mut out: Vec<Daemon> = Vec::with_capacity(n);
    let started = Instant::now();
    while out.len() < n {
        let batch = START_BATCH.min(n - out.len());
        let mut pending: Vec<(Daemon, bool)> =
            (0..batch).map(|_| (spawn_daemon(pg, key), false)).collect();
        let batch_started = Instant::now();
        loop {
            let mut waiting = 0;
            for (d, retried) in pending.iter_mut() {
                if ready(d).await {
                    continue;
                }
                if exited(d.pid()) {
                    assert!(
                        !*retried,
                        "a daemon exited twice during start-up:\n{}",
                        tail(&d.logs(), 30)
                    );
                    eprintln!(
                        "a daemon exited during start-up; starting it again:\n{}",
                        tail(&d.logs(), 5)
                    );
                    *d = spawn_daemon(pg, key);
                    *retried = true;
                }
                waiting += 1;
            }
            if waiting == 0 {
                break;
            }
            if batch_started.elapsed() > START_DEADLINE {
                let stuck = pending.iter().find(|(d, _)| !exited(d.pid())).unwrap();
                panic!(
                    "{waiting} daemons of a batch not ready after {START_DEADLINE:?} ({} running); one's log:\n{}",
                    out.len(),
                    tail(&stuck.0.logs(), 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        out.extend(pending.into_iter().map(|(d, _)| d));
        eprintln!(
            "  {} of {n} daemons ready ({:.1}s)",
            out.len(),
            started.elapsed().as_secs_f64()
        );
    }
    out
}

async fn start_fleet(plan: &Plan) -> (Fleet, Duration) {
    let max_connections = format!("-c max_connections={}", plan.max_connections);
    let pg = peers::postgres_with(&[
        &max_connections,
        "-c shared_preload_libraries=pg_stat_statements",
    ])
    .await;
    let admin = connect(&pg.url()).await;
    admin
        .batch_execute(&format!(
            "CREATE EXTENSION pg_stat_statements;
             CREATE ROLE {PROBE_ROLE} LOGIN SUPERUSER;"
        ))
        .await
        .unwrap();
    drop(admin);
    let probe = connect(&probe_url(&pg)).await;
    let key_dir = tempfile::tempdir().unwrap();
    let key = key_dir.path().join("master.key");
    assert!(common::run_cli(&["keygen", "--out", key.to_str().unwrap()])
        .status
        .success());
    let started = Instant::now();
    let daemons = start_daemons(&pg, &key, plan.n).await;
    let took = started.elapsed();
    (
        Fleet {
            daemons,
            pg,
            _key_dir: key_dir,
            probe,
        },
        took,
    )
}

// --- connections ------------------------------------------------------------------------------

/// TCP sockets whose remote port is `pg_port`: socket inode -> local port.
fn pg_sockets(pg_port: u16) -> HashMap<u64, u16> {
    let mut out = HashMap::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                continue;
            }
            let port = |addr: &str| {
                addr.rsplit_once(':')
                    .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
            };
            if port(f[2]) == Some(pg_port) {
                if let (Some(local), Ok(inode)) = (port(f[1]), f[9].parse::<u64>()) {
                    out.insert(inode, local);
                }
            }
        }
    }
    out
}

/// Local port of each daemon's connections to PostgreSQL -> the daemon's index.
fn ports_by_instance(pids: &[i32], pg_port: u16) -> HashMap<u16, usize> {
    let sockets = pg_sockets(pg_port);
    let mut out = HashMap::new();
    for (i, pid) in pids.iter().enumerate() {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let target = target.to_string_lossy();
            if let Some(inode) = target
                .strip_prefix("socket:[")
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok())
            {
                if let Some(port) = sockets.get(&inode) {
                    out.insert(*port, i);
                }
            }
        }
    }
    out
}

#[derive(Clone, Debug, Default)]
struct Connections {
    total: usize,
    per_instance: Vec<usize>,
    /// Client backends no daemon's socket could be matched with (e.g. closed meanwhile).
    unattributed: usize,
}

impl Connections {
    fn max(&self) -> usize {
        self.per_instance.iter().copied().max().unwrap_or(0)
    }
    fn min(&self) -> usize {
        self.per_instance.iter().copied().min().unwrap_or(0)
    }
    fn json(&self) -> Value {
        json!({
            "total": self.total,
            "per_instance_min": self.min(),
            "per_instance_median": median(&self.per_instance),
            "per_instance_max": self.max(),
            "per_instance_mean": self.total as f64 / self.per_instance.len().max(1) as f64,
            "unattributed": self.unattributed,
        })
    }
    fn line(&self) -> String {
        format!(
            "{} client backends ({:.2} per instance; per instance min {} median {} max {}; {} unattributed)",
            self.total,
            self.total as f64 / self.per_instance.len().max(1) as f64,
            self.min(),
            median(&self.per_instance),
            self.max(),
            self.unattributed
        )
    }
}

fn median(values: &[usize]) -> usize {
    let mut v = values.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// Client ports of the daemons' backends (`postgres` database, not the probe's role).
async fn client_ports(probe: &tokio_postgres::Client) -> Vec<u16> {
    probe
        .query(
            "SELECT client_port FROM pg_stat_activity
             WHERE backend_type = 'client backend' AND datname = current_database()
               AND usename <> $1",
            &[&PROBE_ROLE],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, Option<i32>>(0).unwrap_or(-1) as u16)
        .collect()
}

/// Counts connections per instance; `map` caches port -> instance and is rebuilt from /proc
/// when a port is not in it.
async fn count_connections(
    probe: &tokio_postgres::Client,
    pids: &[i32],
    pg_port: u16,
    map: &mut HashMap<u16, usize>,
) -> Connections {
    let ports = client_ports(probe).await;
    if ports.iter().any(|p| !map.contains_key(p)) {
        *map = ports_by_instance(pids, pg_port);
    }
    let mut c = Connections {
        total: ports.len(),
        per_instance: vec![0; pids.len()],
        unattributed: 0,
    };
    for p in ports {
        match map.get(&p) {
            Some(&i) => c.per_instance[i] += 1,
            None => c.unattributed += 1,
        }
    }
    c
}

/// Samples connections every 200 ms until stopped; keeps the peak total and the peak per
/// instance (each instance's own maximum over the samples).
struct Sampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(Connections, Vec<usize>, usize)>,
}

impl Sampler {
    async fn start(fleet: &Fleet) -> Sampler {
        let probe = connect(&probe_url(&fleet.pg)).await;
        let pids = fleet.pids();
        let port = fleet.pg.port;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let mut map = HashMap::new();
            let mut peak = Connections::default();
            let mut per_instance_peak = vec![0; pids.len()];
            let mut samples = 0;
            while !stopped.load(Ordering::Relaxed) {
                let c = count_connections(&probe, &pids, port, &mut map).await;
                for (p, &now) in per_instance_peak.iter_mut().zip(&c.per_instance) {
                    *p = (*p).max(now);
                }
                if c.total >= peak.total {
                    peak = c;
                }
                samples += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            (peak, per_instance_peak, samples)
        });
        Sampler { stop, task }
    }

    async fn finish(self) -> (Connections, Vec<usize>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

// --- writes -----------------------------------------------------------------------------------

struct StatsSnapshot {
    at: Instant,
    tables: BTreeMap<String, [i64; 4]>,
    /// (userid, queryid) -> (query, calls, rows)
    statements: HashMap<(u32, i64), (String, i64, i64)>,
    database: [i64; 2],
}

async fn stats_snapshot(probe: &tokio_postgres::Client) -> StatsSnapshot {
    let tables = probe
        .query(
            "SELECT relname::text, n_tup_ins, n_tup_upd, n_tup_del, n_tup_hot_upd
             FROM pg_stat_user_tables",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                [r.get(1), r.get(2), r.get(3), r.get(4)],
            )
        })
        .collect();
    let statements = probe
        .query(
            "SELECT s.userid::oid::int8, s.queryid, s.query, s.calls, s.rows
             FROM pg_stat_statements s
             WHERE s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
               AND s.userid <> (SELECT oid FROM pg_roles WHERE rolname = $1)",
            &[&PROBE_ROLE],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            (
                (r.get::<_, i64>(0) as u32, r.get::<_, i64>(1)),
                (
                    r.get::<_, String>(2),
                    r.get::<_, i64>(3),
                    r.get::<_, i64>(4),
                ),
            )
        })
        .collect();
    let db = probe
        .query_one(
            "SELECT xact_commit, xact_rollback FROM pg_stat_database
             WHERE datname = current_database()",
            &[],
        )
        .await
        .unwrap();
    StatsSnapshot {
        at: Instant::now(),
        tables,
        statements,
        database: [db.get(0), db.get(1)],
    }
}

fn statement_kind(query: &str) -> &'static str {
    let q = query.trim_start().to_ascii_uppercase();
    let first = q.split_whitespace().next().unwrap_or("");
    match first {
        "BEGIN" | "COMMIT" | "ROLLBACK" | "START" | "SET" | "RESET" | "DISCARD" => "session",
        "LISTEN" | "UNLISTEN" => "listen",
        "NOTIFY" => "notify",
        _ => {
            let writes = [" INSERT ", " UPDATE ", " DELETE ", " MERGE "];
            let padded = format!(" {} ", q.replace(['(', ')', '\n', '\t'], " "));
            if writes.iter().any(|w| padded.contains(w)) && !padded.contains(" FOR UPDATE ")
                || ["INSERT", "UPDATE", "DELETE", "MERGE"].contains(&first)
            {
                "write"
            } else if q.contains("PG_NOTIFY") {
                "notify"
            } else if q.contains("PG_TRY_ADVISORY") || q.contains("PG_ADVISORY") {
                "lock"
            } else {
                "read"
            }
        }
    }
}

fn one_line(query: &str, max: usize) -> String {
    let flat = query.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > max {
        format!("{}…", flat.chars().take(max).collect::<String>())
    } else {
        flat
    }
}

/// Writes per second over the window between two snapshots, per table and per statement.
fn writes_report(n: usize, a: &StatsSnapshot, b: &StatsSnapshot) -> (Value, String) {
    let secs = b.at.duration_since(a.at).as_secs_f64();
    let mut text = format!("writes while idle, over {secs:.1}s:\n");
    let mut tables = Vec::new();
    let mut total = 0.0;
    for (name, after) in &b.tables {
        let before = a.tables.get(name).copied().unwrap_or([0; 4]);
        let d: Vec<f64> = (0..4)
            .map(|i| (after[i] - before[i]) as f64 / secs)
            .collect();
        let sum = d[0] + d[1] + d[2];
        total += sum;
        if sum > 0.0 {
            tables.push(
                json!({"table": name, "writes_per_s": sum, "ins_per_s": d[0],
                "upd_per_s": d[1], "del_per_s": d[2], "hot_upd_per_s": d[3]}),
            );
            text += &format!(
                "  table {name:<28} {sum:9.2} tuples/s (ins {:.2}, upd {:.2} of which HOT {:.2}, del {:.2})\n",
                d[0], d[1], d[3], d[2]
            );
        }
    }
    text += &format!(
        "  all tables: {total:.2} tuple writes/s = {:.2} per 100 instances\n",
        total / n as f64 * 100.0
    );
    let xacts = (b.database[0] - a.database[0]) as f64 / secs;
    text += &format!(
        "  transactions: {xacts:.1} commits/s ({:.1} per 100 instances), {:.2} rollbacks/s\n",
        xacts / n as f64 * 100.0,
        (b.database[1] - a.database[1]) as f64 / secs
    );
    let mut statements: Vec<(f64, f64, &'static str, &str)> = b
        .statements
        .iter()
        .filter_map(|(k, (query, calls, rows))| {
            let (c0, r0) = a
                .statements
                .get(k)
                .map(|(_, c, r)| (*c, *r))
                .unwrap_or((0, 0));
            let calls = (calls - c0) as f64 / secs;
            (calls > 0.0).then(|| {
                (
                    calls,
                    (rows - r0) as f64 / secs,
                    statement_kind(query),
                    query.as_str(),
                )
            })
        })
        .collect();
    statements.sort_by(|x, y| y.0.total_cmp(&x.0));
    let mut by_kind: BTreeMap<&str, f64> = BTreeMap::new();
    for s in &statements {
        *by_kind.entry(s.2).or_default() += s.0;
    }
    let all_calls: f64 = statements.iter().map(|s| s.0).sum();
    text += &format!(
        "  statements (pg_stat_statements): {all_calls:.1} calls/s ({:.1} per instance per minute): {}\n",
        all_calls / n as f64 * 60.0,
        by_kind
            .iter()
            .map(|(k, v)| format!("{k} {v:.1}/s"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    text += "  top statements by calls/s:\n";
    text += "     calls/s    rows/s  kind     query\n";
    for (calls, rows, kind, query) in statements.iter().take(20) {
        text += &format!(
            "  {calls:10.2} {rows:9.2}  {kind:<8} {}\n",
            one_line(query, 100)
        );
    }
    let json = json!({
        "window_s": secs,
        "tables": tables,
        "tuple_writes_per_s": total,
        "tuple_writes_per_s_per_100_instances": total / n as f64 * 100.0,
        "commits_per_s": xacts,
        "statement_calls_per_s": all_calls,
        "statement_calls_per_s_by_kind": by_kind,
        "statements": statements.iter().map(|(calls, rows, kind, query)| json!({
            "calls_per_s": calls, "rows_per_s": rows, "kind": kind, "query": one_line(query, 300),
        })).collect::<Vec<_>>(),
    });
    (json, text)
}

// --- invalidation -----------------------------------------------------------------------------

async fn get_json(socket: &std::path::Path, path: &str) -> Option<(u16, Value)> {
    let reply = credproxy::client::send(socket, Method::GET, path, &[], None)
        .await
        .ok()?;
    Some((
        reply.status.as_u16(),
        serde_json::from_slice(&reply.body).unwrap_or(Value::Null),
    ))
}

/// Reads every credential once through every instance, so each has it cached.
async fn warm(fleet: &Fleet, ids: &[String]) {
    let sem = Arc::new(Semaphore::new(POLL_CONCURRENCY));
    let mut set = JoinSet::new();
    for d in &fleet.daemons {
        for id in ids {
            let (socket, path, sem) = (
                d.socket.clone(),
                format!("/v1/credentials/{id}"),
                sem.clone(),
            );
            set.spawn(async move {
                let _permit = sem.acquire().await.unwrap();
                let got = get_json(&socket, &path).await;
                assert!(matches!(got, Some((200, _))), "{path}: {got:?}");
            });
        }
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
}

struct Invalidation {
    /// Milliseconds from the write's answer to the first fresh read's answer, per (instance,
    /// round); `None`: not seen within `SEEN_DEADLINE`. An upper bound: it includes the wait
    /// for the harness's next poll.
    samples: Vec<Option<f64>>,
    /// Milliseconds from the write's answer to when the last stale read was sent (0 when the
    /// first read was fresh): the instance saw the write no earlier. A lower bound.
    stale_until: Vec<f64>,
    errors: usize,
    rounds: usize,
    writers: Vec<usize>,
}

impl Invalidation {
    fn percentile(&self, q: f64) -> f64 {
        let mut v: Vec<f64> = self
            .samples
            .iter()
            .map(|s| s.unwrap_or(f64::INFINITY))
            .collect();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return f64::NAN;
        }
        let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
        v[rank - 1]
    }
    fn lower(&self, q: f64) -> f64 {
        let mut v = self.stale_until.clone();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return f64::NAN;
        }
        let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
        v[rank - 1]
    }
    fn fresh_at_first_read(&self) -> usize {
        self.stale_until.iter().filter(|&&s| s == 0.0).count()
    }
    fn missed(&self) -> usize {
        self.samples.iter().filter(|s| s.is_none()).count()
    }
    fn line(&self) -> String {
        format!(
            "invalidation: {} samples ({} rounds x {} instances, writers {:?}), from the PATCH's answer to a fresh GET's answer: \
             p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; {} never saw the write within {}s; {} failed polls. \
             Lower bound (last stale GET sent): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; {} of {} fresh at the first GET",
            self.samples.len(),
            self.rounds,
            self.samples.len() / self.rounds.max(1),
            self.writers,
            self.percentile(0.5),
            self.percentile(0.99),
            self.percentile(1.0),
            self.missed(),
            SEEN_DEADLINE.as_secs(),
            self.errors,
            self.lower(0.5),
            self.lower(0.99),
            self.lower(1.0),
            self.fresh_at_first_read(),
            self.stale_until.len()
        )
    }
    fn json(&self) -> Value {
        let finite = |v: f64| if v.is_finite() { json!(v) } else { Value::Null };
        json!({
            "samples": self.samples.len(),
            "rounds": self.rounds,
            "writers": self.writers,
            "p50_ms": finite(self.percentile(0.5)),
            "p99_ms": finite(self.percentile(0.99)),
            "max_ms": finite(self.percentile(1.0)),
            "missed_within_10s": self.missed(),
            "lower_bound_p50_ms": self.lower(0.5),
            "lower_bound_p99_ms": self.lower(0.99),
            "lower_bound_max_ms": self.lower(1.0),
            "fresh_at_first_read": self.fresh_at_first_read(),
            "failed_polls": self.errors,
        })
    }
}

async fn invalidation(fleet: &Fleet, credentials: usize, rounds: usize) -> Invalidation {
    let ds = &fleet.daemons;
    let n = ds.len();
    let mut ids = Vec::new();
    for _ in 0..credentials {
        ids.push(ds[0].create("Production", json!({"api_key": "v1"})).await);
    }
    warm(fleet, &ids).await;
    let w = n.min(3);
    let writers: Vec<usize> = (0..w).map(|k| k * n / w).collect();
    let (mut samples, mut stale_until) = (Vec::new(), Vec::new());
    let errors = Arc::new(Mutex::new(0usize));
    for round in 0..rounds {
        let id = &ids[round % ids.len()];
        let value = format!("round-{round}");
        let path = format!("/v1/credentials/{id}");
        let (status, body) = ds[writers[round % w]]
            .call(
                Method::PATCH,
                &path,
                Some(json!({"secrets": {"api_key": value}})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let written = Instant::now();
        let sem = Arc::new(Semaphore::new(POLL_CONCURRENCY));
        let mut set = JoinSet::new();
        for d in ds {
            let (socket, path, sem, value, errors) = (
                d.socket.clone(),
                path.clone(),
                sem.clone(),
                value.clone(),
                errors.clone(),
            );
            set.spawn(async move {
                let mut stale_until = 0.0;
                loop {
                    let (sent, got) = {
                        let _permit = sem.acquire().await.unwrap();
                        (written.elapsed(), get_json(&socket, &path).await)
                    };
                    let elapsed = written.elapsed();
                    match got {
                        Some((200, body)) if body["secrets"]["api_key"] == value.as_str() => {
                            return (Some(elapsed.as_secs_f64() * 1000.0), stale_until)
                        }
                        Some((200, _)) => stale_until = sent.as_secs_f64() * 1000.0,
                        _ => *errors.lock().unwrap() += 1,
                    }
                    if elapsed > SEEN_DEADLINE {
                        return (None, stale_until);
                    }
                    tokio::time::sleep(Duration::from_millis(15)).await;
                }
            });
        }
        while let Some(r) = set.join_next().await {
            let (seen, stale) = r.unwrap();
            samples.push(seen);
            stale_until.push(stale);
        }
    }
    let errors = *errors.lock().unwrap();
    Invalidation {
        samples,
        stale_until,
        errors,
        rounds,
        writers,
    }
}

// --- OAuth ------------------------------------------------------------------------------------

async fn oauth(fleet: &Fleet, run: Duration) -> (Value, String) {
    let server = peers::oauth_server(OAUTH_LIFETIME_SECS).await;
    let tokens = peers::oauth_grant(
        &server,
        peers::CLIENT_ID,
        peers::CLIENT_SECRET,
        OAUTH_LIFETIME_SECS,
    )
    .await;
    let created = Instant::now();
    let (status, body) = fleet.daemons[0]
        .call(
            Method::POST,
            "/v1/credentials",
            Some(peers::oauth_credential(
                &server,
                "Production",
                &tokens,
                OAUTH_LIFETIME_SECS as i64,
            )),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let path = format!("/v1/credentials/{}", body["id"].as_str().unwrap());
    // token -> the send times (Unix ms) of the reads that got it; other answers by status.
    let handed: Arc<Mutex<HashMap<String, Vec<i64>>>> = Default::default();
    let statuses: Arc<Mutex<BTreeMap<u16, usize>>> = Default::default();
    let sem = Arc::new(Semaphore::new(POLL_CONCURRENCY));
    let started = Instant::now();
    let mut set = JoinSet::new();
    for d in &fleet.daemons {
        let (socket, path, sem, handed, statuses) = (
            d.socket.clone(),
            path.clone(),
            sem.clone(),
            handed.clone(),
            statuses.clone(),
        );
        set.spawn(async move {
            while started.elapsed() < run {
                let sent = credproxy::time::now_unix_ms();
                let got = {
                    let _permit = sem.acquire().await.unwrap();
                    get_json(&socket, &path).await
                };
                match got {
                    Some((200, body)) => {
                        let token = body["secrets"]["access_token"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned();
                        handed.lock().unwrap().entry(token).or_default().push(sent);
                    }
                    Some((status, _)) => *statuses.lock().unwrap().entry(status).or_default() += 1,
                    None => *statuses.lock().unwrap().entry(0).or_default() += 1,
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    let elapsed = created.elapsed().as_secs_f64();
    let stats = peers::oauth_stats(&server).await;
    let handed = std::mem::take(&mut *handed.lock().unwrap());
    let (mut reads, mut expired) = (0, 0);
    // reqwest is built without a default crypto provider (one TLS stack: ring).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    for (token, sends) in &handed {
        reads += sends.len();
        let answer = http
            .get(format!("{}/admin/token", server.url()))
            .query(&[("access_token", token)])
            .send()
            .await
            .unwrap();
        let expires_at_ms = if answer.status().is_success() {
            answer.json::<Value>().await.unwrap()["expires_at_ms"].as_i64()
        } else {
            None
        };
        expired += sends
            .iter()
            .filter(|&&sent| expires_at_ms.is_none_or(|e| e <= sent))
            .count();
    }
    let requests = stats["token_requests"].as_u64().unwrap_or(0);
    let lifetimes = elapsed / OAUTH_LIFETIME_SECS as f64;
    let remaining: Vec<f64> = stats["remaining_at_refresh"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    let min_left = remaining.iter().copied().fold(f64::INFINITY, f64::min);
    let max_left = remaining.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let statuses = statuses.lock().unwrap().clone();
    let text = format!(
        "rotating OAuth token ({OAUTH_LIFETIME_SECS}s), read by all {} instances for {:.1}s: {reads} reads \
         ({} distinct tokens), other answers {statuses:?}; {requests} token requests over {elapsed:.1}s \
         = {:.2} per token lifetime ({lifetimes:.1} lifetimes); issued {}, invalid_grant {}, \
         reuse_detected {}, family_revocations {}; each token replaced with {min_left:.2}–{max_left:.2}s left; \
         expired or revoked tokens handed out: {expired}",
        fleet.daemons.len(),
        started.elapsed().as_secs_f64(),
        handed.len(),
        requests as f64 / lifetimes,
        stats["issued"],
        stats["invalid_grant"],
        stats["reuse_detected"],
        stats["family_revocations"],
    );
    let json = json!({
        "lifetime_s": OAUTH_LIFETIME_SECS,
        "read_s": started.elapsed().as_secs_f64(),
        "reads": reads,
        "distinct_tokens": handed.len(),
        "other_answers": statuses,
        "token_requests": requests,
        "token_requests_per_lifetime": requests as f64 / lifetimes,
        "issued": stats["issued"],
        "invalid_grant": stats["invalid_grant"],
        "reuse_detected": stats["reuse_detected"],
        "family_revocations": stats["family_revocations"],
        "remaining_at_refresh_min_s": min_left,
        "remaining_at_refresh_max_s": max_left,
        "expired_tokens_handed_out": expired,
    });
    (json, text)
}

// --- memory -----------------------------------------------------------------------------------

/// A `kB` field of /proc/PID/status (or of smaps_rollup), in KiB.
fn proc_kib(pid: i32, file: &str, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .ok()?
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
}

fn ppid(pid: i32) -> Option<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("PPid:")?.trim().parse().ok())
}

async fn memory(fleet: &Fleet) -> (Value, String) {
    let mut rss: Vec<u64> = fleet
        .pids()
        .iter()
        .filter_map(|&p| proc_kib(p, "status", "VmRSS:"))
        .collect();
    rss.sort_unstable();
    let mib = |k: u64| k as f64 / 1024.0;
    let (min, med, max) = (
        rss.first().copied().unwrap_or(0),
        rss.get(rss.len() / 2).copied().unwrap_or(0),
        rss.last().copied().unwrap_or(0),
    );
    let sum: u64 = rss.iter().sum();
    // PostgreSQL: the postmaster (the probe backend's parent) and all its children.
    let backend: i32 = fleet
        .probe
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let postmaster = ppid(backend).unwrap();
    let mut pg_pids = vec![postmaster];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() {
            if ppid(pid) == Some(postmaster) {
                pg_pids.push(pid);
            }
        }
    }
    let pg_rss: u64 = pg_pids
        .iter()
        .filter_map(|&p| proc_kib(p, "status", "VmRSS:"))
        .sum();
    let pg_pss: u64 = pg_pids
        .iter()
        .filter_map(|&p| proc_kib(p, "smaps_rollup", "Pss:"))
        .sum();
    let text = format!(
        "RSS per instance (VmRSS of {} daemons): min {:.1} MiB, median {:.1} MiB, max {:.1} MiB, sum {:.0} MiB; \
         PostgreSQL: {} processes, RSS sum {:.0} MiB (PSS sum {:.0} MiB)",
        rss.len(),
        mib(min),
        mib(med),
        mib(max),
        mib(sum),
        pg_pids.len(),
        mib(pg_rss),
        mib(pg_pss)
    );
    let json = json!({
        "instances": rss.len(),
        "instance_rss_min_mib": mib(min),
        "instance_rss_median_mib": mib(med),
        "instance_rss_max_mib": mib(max),
        "instance_rss_sum_mib": mib(sum),
        "postgres_processes": pg_pids.len(),
        "postgres_rss_sum_mib": mib(pg_rss),
        "postgres_pss_sum_mib": mib(pg_pss),
    });
    (json, text)
}

// --- the run ----------------------------------------------------------------------------------

/// Prints a line of the report and keeps it.
fn say(text: &mut String, line: String) {
    eprintln!("{line}");
    text.push_str(&line);
    text.push('\n');
}

struct Report {
    idle: Connections,
    invalidation: Invalidation,
    json: Value,
    text: String,
}

/// The benchmark: N instances, every figure of issue #18.
async fn run(n: usize) -> Report {
    run_with(Plan::full(n)).await
}

async fn run_with(plan: Plan) -> Report {
    let mut text = String::new();
    let mut json = serde_json::Map::new();
    say(
        &mut text,
        format!(
            "== fleet scale: {} instances (server.worker_threads = 1, defaults otherwise), PostgreSQL max_connections = {}",
            plan.n, plan.max_connections
        ),
    );
    let (fleet, took) = start_fleet(&plan).await;
    let version: String = fleet
        .probe
        .query_one("SHOW server_version", &[])
        .await
        .unwrap()
        .get(0);
    say(
        &mut text,
        format!(
            "started {} daemons in {:.1}s (batches of {START_BATCH}); PostgreSQL {version}",
            plan.n,
            took.as_secs_f64()
        ),
    );
    json.insert("instances".into(), json!(plan.n));
    json.insert("start_s".into(), json!(took.as_secs_f64()));
    json.insert("postgres_version".into(), json!(version));
    let pids = fleet.pids();
    let mut map = HashMap::new();

    // Idle: connections after a quiet spell, then writes per second over a window.
    let idle_started = Instant::now();
    let idle = loop {
        let c = count_connections(&fleet.probe, &pids, fleet.pg.port, &mut map).await;
        let bound_holds = plan.idle_bound.is_some_and(|b| c.max() <= b);
        if bound_holds || idle_started.elapsed() >= plan.idle_settle {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    say(
        &mut text,
        format!(
            "connections after {:.1}s idle: {}",
            idle_started.elapsed().as_secs_f64(),
            idle.line()
        ),
    );
    json.insert("connections_idle".into(), idle.json());
    json.insert(
        "connections_idle_after_s".into(),
        json!(idle_started.elapsed().as_secs_f64()),
    );
    if !plan.write_window.is_zero() {
        let (mem_json, mem_text) = memory(&fleet).await;
        say(&mut text, format!("idle {mem_text}"));
        json.insert("memory_idle".into(), mem_json);
        let before = stats_snapshot(&fleet.probe).await;
        tokio::time::sleep(plan.write_window).await;
        let after = stats_snapshot(&fleet.probe).await;
        let (w_json, w_text) = writes_report(plan.n, &before, &after);
        say(&mut text, w_text.trim_end().to_owned());
        json.insert("writes_idle".into(), w_json);
        let c = count_connections(&fleet.probe, &pids, fleet.pg.port, &mut map).await;
        say(
            &mut text,
            format!(
                "connections after {:.1}s idle: {}",
                idle_started.elapsed().as_secs_f64(),
                c.line()
            ),
        );
        json.insert("connections_idle_end".into(), c.json());
    }

    // Load: invalidation rounds, then the OAuth token read by all, with connections sampled.
    let sampler = Sampler::start(&fleet).await;
    let inv = invalidation(&fleet, plan.credentials, plan.rounds).await;
    say(&mut text, inv.line());
    json.insert("invalidation".into(), inv.json());
    if !plan.oauth_run.is_zero() {
        let (o_json, o_text) = oauth(&fleet, plan.oauth_run).await;
        say(&mut text, o_text);
        json.insert("oauth".into(), o_json);
    }
    let (peak, per_instance_peak, samples) = sampler.finish().await;
    say(
        &mut text,
        format!(
            "connections under load (peak of {samples} samples, 200 ms apart): {}; highest per-instance peak {}, median per-instance peak {}",
            peak.line(),
            per_instance_peak.iter().max().unwrap_or(&0),
            median(&per_instance_peak)
        ),
    );
    let mut peak_json = peak.json();
    peak_json["samples"] = json!(samples);
    peak_json["per_instance_peak_max"] = json!(per_instance_peak.iter().max().unwrap_or(&0));
    peak_json["per_instance_peak_median"] = json!(median(&per_instance_peak));
    json.insert("connections_peak".into(), peak_json);
    if !plan.write_window.is_zero() {
        let (mem_json, mem_text) = memory(&fleet).await;
        say(&mut text, format!("after load {mem_text}"));
        json.insert("memory_after_load".into(), mem_json);
    }
    let exited: Vec<usize> = pids
        .iter()
        .enumerate()
        .filter(|(_, &p)| exited(p))
        .map(|(i, _)| i)
        .collect();
    assert!(
        exited.is_empty(),
        "instances {exited:?} exited during the run:\n{}",
        tail(&fleet.daemons[exited[0]].logs(), 30)
    );
    if let Ok(path) = std::env::var("CREDPROXY_SCALE_REPORT") {
        let path = PathBuf::from(path);
        std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
        eprintln!("figures written to {}", path.display());
    }
    Report {
        idle,
        invalidation: inv,
        json: Value::Object(json),
        text,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long and hundreds of processes: scripts/fleet-scale.sh"]
async fn scale_fleet() {
    let n = env_usize("CREDPROXY_SCALE_N").unwrap_or(200);
    let report = run(n).await;
    assert_eq!(report.json["instances"], n);
    eprintln!("\n== report ==\n{}", report.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_instances_hold_the_connection_bound_and_see_writes_within_a_second() {
    let report = run_with(Plan::small()).await;
    let p99 = report.invalidation.percentile(0.99);
    assert!(
        report.idle.max() <= 2 && report.idle.unattributed == 0,
        "an idle instance holds more than 2 PostgreSQL connections: {}",
        report.idle.line()
    );
    assert!(
        p99 < 1000.0,
        "invalidation p99 is {p99:.0} ms: {}",
        report.invalidation.line()
    );
}
