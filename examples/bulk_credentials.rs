//! Creates or reads many credentials through the daemon's Unix socket, over a few persistent
//! keep-alive connections, for the memory bench (`scripts/bench.sh memory`).
//!
//!   bulk_credentials SOCKET create N CONNECTIONS IDS_FILE   # writes one id per line
//!   bulk_credentials SOCKET read IDS_FILE CONNECTIONS       # reads each id once
//!
//! Each credential has the shape of the issue: two 40-byte tokens (`access_token`,
//! `refresh_token`), metadata `{"account": "acme-<i>"}`, environment "Production".
//! Exits non-zero unless every request is answered 201 / 200.

#[path = "support/keepalive.rs"]
mod keepalive;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hyper::Method;
use keepalive::{Conn, Error};

fn token(prefix: &str) -> String {
    // 4 + 32 + 4 = 40 bytes, distinct per credential.
    format!(
        "{prefix}{:032x}{:04x}",
        rand::random::<u128>(),
        rand::random::<u16>()
    )
}

async fn create(socket: PathBuf, n: usize, connections: usize) -> Result<Vec<String>, Error> {
    let next = Arc::new(AtomicUsize::new(0));
    let ids = Arc::new(Mutex::new(vec![String::new(); n]));
    let mut workers = Vec::new();
    for _ in 0..connections {
        let (socket, next, ids) = (socket.clone(), Arc::clone(&next), Arc::clone(&ids));
        workers.push(tokio::spawn(async move {
            let mut conn = Conn::connect(&socket).await?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<(), Error>(());
                }
                let body = serde_json::json!({
                    "environment": "Production",
                    "integration_type": "github",
                    "metadata": {"account": format!("acme-{i}")},
                    "secrets": {"access_token": token("gho_"), "refresh_token": token("ghr_")},
                });
                let r = conn
                    .send(
                        Method::POST,
                        "/v1/credentials",
                        Some(body.to_string().into_bytes()),
                    )
                    .await?;
                if r.status != hyper::StatusCode::CREATED {
                    return Err(format!(
                        "create #{i}: {} {}",
                        r.status,
                        String::from_utf8_lossy(&r.body)
                    )
                    .into());
                }
                let v: serde_json::Value = serde_json::from_slice(&r.body)?;
                let id = v["id"].as_str().ok_or("no id in the response")?.to_owned();
                ids.lock().unwrap()[i] = id;
            }
        }));
    }
    for w in workers {
        w.await??;
    }
    let ids = std::mem::take(&mut *ids.lock().unwrap());
    Ok(ids)
}

/// Reads every id once; returns the count of each `cache-status` value.
async fn read(socket: PathBuf, ids: Vec<String>, connections: usize) -> Result<[usize; 3], Error> {
    let ids = Arc::new(ids);
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..connections {
        let (socket, next, ids) = (socket.clone(), Arc::clone(&next), Arc::clone(&ids));
        workers.push(tokio::spawn(async move {
            let mut conn = Conn::connect(&socket).await?;
            let mut counts = [0usize; 3];
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(id) = ids.get(i) else {
                    return Ok::<_, Error>(counts);
                };
                let r = conn
                    .send(Method::GET, &format!("/v1/credentials/{id}"), None)
                    .await?;
                if r.status != hyper::StatusCode::OK {
                    return Err(format!("read {id}: {}", r.status).into());
                }
                match r.headers.get("cache-status").and_then(|v| v.to_str().ok()) {
                    Some("hit") => counts[0] += 1,
                    Some("miss") => counts[1] += 1,
                    _ => counts[2] += 1,
                }
            }
        }));
    }
    let mut total = [0usize; 3];
    for w in workers {
        let c = w.await??;
        for (t, v) in total.iter_mut().zip(c) {
            *t += v;
        }
    }
    Ok(total)
}

fn usage() -> ! {
    eprintln!(
        "usage: bulk_credentials SOCKET create N CONNECTIONS IDS_FILE\n       bulk_credentials SOCKET read IDS_FILE CONNECTIONS"
    );
    std::process::exit(2)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 4 && args.len() != 5 {
        usage();
    }
    let socket = PathBuf::from(&args[0]);
    let t = Instant::now();
    match args[1].as_str() {
        "create" if args.len() == 5 => {
            let n: usize = args[2].parse()?;
            let connections: usize = args[3].parse()?;
            let ids = create(socket, n, connections).await?;
            let secs = t.elapsed().as_secs_f64();
            std::fs::write(Path::new(&args[4]), ids.join("\n") + "\n")?;
            println!(
                "created {n} credentials over {connections} connections in {secs:.1} s ({:.0}/s)",
                n as f64 / secs
            );
        }
        "read" if args.len() == 4 => {
            let ids: Vec<String> = std::fs::read_to_string(&args[2])?
                .lines()
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect();
            let n = ids.len();
            let connections: usize = args[3].parse()?;
            let [hit, miss, other] = read(socket, ids, connections).await?;
            let secs = t.elapsed().as_secs_f64();
            println!(
                "read {n} credentials over {connections} connections in {secs:.1} s ({:.0}/s): cache-status hit {hit}, miss {miss}, other {other}",
                n as f64 / secs
            );
        }
        _ => usage(),
    }
    Ok(())
}
