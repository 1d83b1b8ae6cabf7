//! Workspaces and the control plane end to end: secrets managers and routing created through
//! the API (probed before they are saved, their access details sealed), each workspace's
//! callers confined to their own managers and credentials, rotation, deletion with a dry run,
//! and restarts — against real moto and OpenBao servers, checked directly in them.

mod common;

use common::wait_for;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::peers::{self, bao, Peer, BAO_ROOT_TOKEN};
use common::{contains_bytes, free_port, set, table, Daemon, DEADLINE};
use http_body_util::{BodyExt, Full};
use hyper::Method;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

const TCP_TOKEN: &str = "tcp-token-for-the-globex-caller";

/// One principal's way into the daemon: the Unix socket (identified by the kernel as this
/// process's uid) or the loopback TCP listener with its token.
#[derive(Clone)]
enum Via {
    Unix(PathBuf),
    Tcp(u16),
}

/// An answer: status, `cache-status` header, JSON body (a string if not JSON) and the raw text.
struct Answer {
    status: u16,
    cache: Option<String>,
    body: Value,
    text: String,
}

impl Via {
    async fn send(&self, method: Method, path: &str, body: Option<Value>) -> Answer {
        let body = body.map(|b| b.to_string().into_bytes());
        let (status, headers, bytes) = match self {
            Via::Unix(socket) => {
                let reply = credproxy::client::send(socket, method, path, &[], body)
                    .await
                    .unwrap_or_else(|e| panic!("{path} over the socket: {e}"));
                (reply.status, reply.headers, reply.body.to_vec())
            }
            Via::Tcp(port) => tcp_send(*port, method, path, body).await,
        };
        let text = String::from_utf8_lossy(&bytes).into_owned();
        Answer {
            status: status.as_u16(),
            cache: headers
                .get("cache-status")
                .map(|v| v.to_str().unwrap().to_owned()),
            body: if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap_or(Value::String(text.clone()))
            },
            text,
        }
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let a = self.send(method, path, body).await;
        (a.status, a.body)
    }

    /// `call` with an owned path, for closures that build the path.
    async fn call_at(&self, method: Method, path: String, body: Option<Value>) -> (u16, Value) {
        self.call(method, &path, body).await
    }
}

/// One request over the TCP listener with the token, the way `credproxy::client::send` does
/// it over the socket.
async fn tcp_send(
    port: u16,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> (hyper::StatusCode, hyper::HeaderMap, Vec<u8>) {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let driver = tokio::spawn(connection);
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("x-credproxy-token", TCP_TOKEN);
    if body.is_some() {
        request = request.header("content-type", "application/json");
    }
    let request = request
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let (status, headers) = (response.status(), response.headers().clone());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    drop(sender);
    let _ = driver.await;
    (status, headers, bytes.to_vec())
}

/// Turns the loopback TCP listener on, with `TCP_TOKEN`.
fn tcp_listener(c: &mut toml::Table, dir: &Path, port: u16) {
    let token = dir.join("tcp.token");
    std::fs::write(&token, TCP_TOKEN).unwrap();
    // Private to its owner, like a master key: a looser mode refuses the start.
    common::restrict_to_owner(&token);
    let mut tcp = toml::Table::new();
    tcp.insert("listen".into(), format!("127.0.0.1:{port}").into());
    tcp.insert("token_file".into(), token.display().to_string().into());
    set(c, "server", "tcp", tcp);
}

/// An `[[access]]` rule giving `principal` everything within `workspaces`.
fn admin_of(principal: (&str, toml::Value), workspaces: &[&str]) -> toml::Value {
    let list = |items: &[&str]| toml::Value::Array(items.iter().map(|s| (*s).into()).collect());
    table(&[
        principal,
        ("environments", list(&["*"])),
        ("workspaces", list(workspaces)),
        ("write", true.into()),
        ("admin", true.into()),
    ])
}

/// Fast, unthrottled background moves and short-lived cache entries (reads reach the stores).
fn brisk(c: &mut toml::Table) {
    set(c, "migration", "rate", 0);
    set(c, "migration", "retry_min", "100ms");
    set(c, "migration", "retry_max", "1s");
    set(c, "store", "journal_grace", "1s");
    set(c, "store", "journal_sweep_interval", "200ms");
    set(c, "cache", "ttl", "50ms");
}

fn aws_body(workspace: &str, id: &str, prefix: &str, moto: &Peer) -> Value {
    json!({
        "workspace": workspace, "id": id, "name": format!("{id} on moto"), "type": "aws",
        "prefix": prefix,
        "settings": {"region": "us-east-1", "endpoint": moto.url()},
        "auth": {"access_key_id": "testing", "secret_access_key": "testing"},
    })
}

fn vault_body(workspace: &str, id: &str, prefix: &str, openbao: &Peer, token: &str) -> Value {
    json!({
        "workspace": workspace, "id": id, "name": format!("{id} on OpenBao"), "type": "hashicorp",
        "prefix": prefix,
        "settings": {"address": openbao.url()},
        "auth": {"token": token},
    })
}

async fn create_manager(via: &Via, body: Value) -> Value {
    let (status, view) = via
        .call(Method::POST, "/v1/secretsmanagers", Some(body))
        .await;
    assert_eq!(status, 201, "{view}");
    view
}

async fn put_routing(via: &Via, body: Value) -> Value {
    let (status, view) = via.call(Method::PUT, "/v1/routing", Some(body)).await;
    assert_eq!(status, 200, "{view}");
    view
}

/// `POST /v1/credentials` in `workspace`, optionally pinned; the whole answer.
async fn try_create(
    via: &Via,
    workspace: &str,
    environment: &str,
    secrets: Value,
    pin: Option<&str>,
) -> (u16, Value) {
    let mut body = json!({
        "workspace": workspace, "environment": environment, "integration_type": "github",
        "secrets": secrets,
    });
    if let Some(pin) = pin {
        body["secrets_manager_id"] = pin.into();
    }
    via.call(Method::POST, "/v1/credentials", Some(body)).await
}

async fn create(
    via: &Via,
    workspace: &str,
    environment: &str,
    secrets: Value,
    pin: Option<&str>,
) -> Value {
    let (status, body) = try_create(via, workspace, environment, secrets, pin).await;
    assert_eq!(status, 201, "{body}");
    body
}

async fn read(via: &Via, id: &str) -> Value {
    let (status, body) = via
        .call(Method::GET, &format!("/v1/credentials/{id}"), None)
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The ids of the managers `via` is shown by `GET /v1/secretsmanagers{query}`.
async fn manager_ids(via: &Via, query: &str) -> BTreeSet<String> {
    let (status, list) = via
        .call(Method::GET, &format!("/v1/secretsmanagers{query}"), None)
        .await;
    assert_eq!(status, 200, "{list}");
    list.as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect()
}

fn ids(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// A credential-id-shaped id nobody created.
fn random_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A secret's value as moto holds it, `None` if moto has no such secret.
async fn aws_value(aws: &aws_sdk_secretsmanager::Client, name: &str) -> Option<Value> {
    match aws.get_secret_value().secret_id(name).send().await {
        Ok(out) => Some(serde_json::from_str(out.secret_string().unwrap()).unwrap()),
        Err(e) => {
            let e = e.into_service_error();
            assert!(e.is_resource_not_found_exception(), "{name}: {e:?}");
            None
        }
    }
}

/// A secret's current data as OpenBao holds it at `secret/{name}`, `None` if absent.
async fn vault_value(openbao: &Peer, name: &str) -> Option<Value> {
    let (status, body) = bao(
        openbao,
        reqwest::Method::GET,
        &format!("/v1/secret/data/{name}"),
        None,
    )
    .await;
    match status {
        200 => Some(body["data"]["data"].clone()),
        404 => None,
        other => panic!("OpenBao answered {other} for {name}: {body}"),
    }
}

/// The keys OpenBao lists under `secret/{path}` (empty when there is nothing).
async fn vault_list(openbao: &Peer, path: &str) -> Vec<String> {
    let (status, body) = bao(
        openbao,
        reqwest::Method::from_bytes(b"LIST").unwrap(),
        &format!("/v1/secret/metadata/{path}"),
        None,
    )
    .await;
    if status == 404 {
        return Vec::new();
    }
    assert_eq!(status, 200, "{body}");
    body["data"]["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_owned())
        .collect()
}

/// A new OpenBao token (a child of root, so with root's policy), with `id` if given.
async fn vault_token(openbao: &Peer, id: Option<&str>) -> String {
    let mut body = json!({"ttl": "1h"});
    if let Some(id) = id {
        body["id"] = id.into();
    }
    let (status, answer) = bao(
        openbao,
        reqwest::Method::POST,
        "/v1/auth/token/create",
        Some(body),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    answer["auth"]["client_token"].as_str().unwrap().to_owned()
}

/// Whether OpenBao still accepts `token` (a lookup of itself).
async fn vault_token_works(openbao: &Peer, token: &str) -> bool {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
        .get(format!("{}/v1/auth/token/lookup-self", openbao.url()))
        .header("X-Vault-Token", token)
        .send()
        .await
        .unwrap()
        .status()
        .is_success()
}

/// A sample's value, 0 when the series does not exist yet.
async fn sample(d: &Daemon, series: &str) -> f64 {
    let text = d.metrics_text().await;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Whether an error answer is `status` with `code`.
fn is_error(answer: &(u16, Value), status: u16, code: &str) -> bool {
    answer.0 == status && answer.1["error"]["code"] == code
}

/// Two answers that must not tell the caller which of two ids exists: equal once each id is
/// replaced by a placeholder (some details name the id the caller gave).
fn indistinguishable(a: &(u16, Value), a_id: &str, b: &(u16, Value), b_id: &str, what: &str) {
    let blind =
        |(status, body): &(u16, Value), id: &str| (*status, body.to_string().replace(id, "<id>"));
    assert_eq!(
        blind(a, a_id),
        blind(b, b_id),
        "{what}: another workspace's id is answered differently from an id that does not exist"
    );
}

/// Two tenants on one daemon: `acme` on the Unix socket (this uid), `globex` on the TCP
/// listener. Each creates its managers (access details in the body), routes its own
/// environments, and its credentials land in its own store under the workspace's names; neither
/// can see, read, change, delete, route to or pin to anything of the other, and every refusal
/// looks exactly like the answer for an id that does not exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workspaces_on_one_daemon_each_see_and_use_only_their_own_managers_and_credentials() {
    let (moto, openbao) = (peers::moto().await, peers::openbao().await);
    let port = free_port();
    let (uid, _) = credproxy::sys::effective_ids();
    let d = Daemon::start(|c, dir| {
        tcp_listener(c, dir, port);
        c.insert(
            "access".into(),
            toml::Value::Array(vec![
                admin_of(("uid", (uid as i64).into()), &["acme"]),
                admin_of(("tcp", true.into()), &["globex"]),
            ]),
        );
    })
    .await;
    let acme = Via::Unix(d.socket.clone());
    let globex = Via::Tcp(port);

    // Managers: a default and a Production one per workspace, on the tenant's own store.
    let view = create_manager(&acme, aws_body("acme", "acme-main", "credproxy/", &moto)).await;
    assert_eq!(view["workspace"], "acme");
    assert_eq!(view["type"], "aws");
    assert_eq!(view["source"], "api");
    assert_eq!(view["state"], "active");
    assert_eq!(view["loaded"], true);
    assert_eq!(view["read_only"], false);
    assert_eq!(view["credentials"], 0);
    assert_eq!(
        view["settings"],
        json!({"region": "us-east-1", "endpoint": moto.url()})
    );
    let mut keys: Vec<&str> = view["auth_keys_set"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    keys.sort();
    assert_eq!(keys, ["access_key_id", "secret_access_key"]);
    assert!(!view.to_string().contains("testing"), "{view}");
    create_manager(&acme, aws_body("acme", "acme-prod", "acme-prod/", &moto)).await;
    let view = create_manager(
        &globex,
        vault_body(
            "globex",
            "globex-main",
            "credproxy/",
            &openbao,
            BAO_ROOT_TOKEN,
        ),
    )
    .await;
    assert_eq!(
        (&view["workspace"], &view["type"], &view["compare_and_swap"]),
        (&json!("globex"), &json!("hashicorp"), &json!(true)),
        "{view}"
    );
    assert_eq!(view["auth_keys_set"], json!(["token"]));
    assert!(!view.to_string().contains(BAO_ROOT_TOKEN), "{view}");
    create_manager(
        &globex,
        vault_body(
            "globex",
            "globex-prod",
            "globex-prod/",
            &openbao,
            BAO_ROOT_TOKEN,
        ),
    )
    .await;
    // Nobody creates a manager in a workspace they do not administer.
    let refused = globex
        .call(
            Method::POST,
            "/v1/secretsmanagers",
            Some(aws_body("acme", "globex-in-acme", "x/", &moto)),
        )
        .await;
    assert!(is_error(&refused, 403, "forbidden"), "{}", refused.1);

    // Routing: each workspace its own default and Production route.
    let view = put_routing(
        &acme,
        json!({"workspace": "acme", "default": "acme-main", "environments": {"Production": "acme-prod"}}),
    )
    .await;
    assert_eq!(
        view,
        json!({"workspace": "acme", "default": "acme-main",
               "environments": {"Production": "acme-prod"}, "fallback": "local",
               "source": "api", "moves_planned": 0})
    );
    put_routing(
        &globex,
        json!({"workspace": "globex", "default": "globex-main", "environments": {"Production": "globex-prod"}}),
    )
    .await;
    let (status, view) = globex
        .call(Method::GET, "/v1/routing?workspace=globex", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        view,
        json!({"workspace": "globex", "default": "globex-main",
               "environments": {"Production": "globex-prod"}, "fallback": "local",
               "source": "api"})
    );
    // Routing to the other's manager is refused like routing to a manager that does not exist.
    let (foreign, missing) = (
        acme.call(
            Method::PUT,
            "/v1/routing",
            Some(json!({"workspace": "acme", "environments": {"Production": "globex-prod"}})),
        )
        .await,
        acme.call(
            Method::PUT,
            "/v1/routing",
            Some(json!({"workspace": "acme", "environments": {"Production": "no-such-manager"}})),
        )
        .await,
    );
    assert!(is_error(&foreign, 400, "invalid_request"), "{}", foreign.1);
    indistinguishable(
        &foreign,
        "globex-prod",
        &missing,
        "no-such-manager",
        "a routing target",
    );
    // The other's routing is neither shown nor changeable, like a workspace that does not exist.
    for (method, body) in [
        (Method::GET, None),
        (
            Method::PUT,
            Some(json!({"workspace": "WS", "default": "local"})),
        ),
    ] {
        let path = |ws: &str| match method {
            Method::GET => format!("/v1/routing?workspace={ws}"),
            _ => "/v1/routing".to_owned(),
        };
        let with = |ws: &str| {
            body.as_ref()
                .map(|b| serde_json::from_str(&b.to_string().replace("WS", ws)).unwrap())
        };
        let theirs = acme
            .call(method.clone(), &path("globex"), with("globex"))
            .await;
        let nobodys = acme
            .call(method.clone(), &path("initech"), with("initech"))
            .await;
        assert_eq!(theirs.0, 404, "{method} routing of globex: {}", theirs.1);
        indistinguishable(&theirs, "globex", &nobodys, "initech", "routing");
    }

    // Credentials land in the workspace's store, under the workspace's names.
    let prod_a = create(
        &acme,
        "acme",
        "Production",
        json!({"access_token": "acme-prod-value"}),
        None,
    )
    .await;
    let sandbox_a = create(
        &acme,
        "acme",
        "Sandbox",
        json!({"access_token": "acme-sandbox-value"}),
        None,
    )
    .await;
    let prod_g = create(
        &globex,
        "globex",
        "Production",
        json!({"access_token": "globex-prod-value"}),
        None,
    )
    .await;
    let sandbox_g = create(
        &globex,
        "globex",
        "Sandbox",
        json!({"access_token": "globex-sandbox-value"}),
        None,
    )
    .await;
    let id = |v: &Value| v["id"].as_str().unwrap().to_owned();
    let (prod_a, sandbox_a, prod_g, sandbox_g) =
        (id(&prod_a), id(&sandbox_a), id(&prod_g), id(&sandbox_g));
    let aws = peers::aws_client(&moto).await;
    let expected = [
        (
            &prod_a,
            "acme-prod",
            "acme-prod/workspaces/acme/Production",
            "acme-prod-value",
        ),
        (
            &sandbox_a,
            "acme-main",
            "credproxy/workspaces/acme/Sandbox",
            "acme-sandbox-value",
        ),
        (
            &prod_g,
            "globex-prod",
            "globex-prod/workspaces/globex/Production",
            "globex-prod-value",
        ),
        (
            &sandbox_g,
            "globex-main",
            "credproxy/workspaces/globex/Sandbox",
            "globex-sandbox-value",
        ),
    ];
    for (cid, manager, path, value) in expected {
        let name = format!("{path}/{cid}");
        let via = if manager.starts_with("acme") {
            &acme
        } else {
            &globex
        };
        let got = read(via, cid).await;
        assert_eq!(got["secrets_manager_id"], manager, "{got}");
        assert_eq!(
            got["workspace"],
            manager.split('-').next().unwrap(),
            "{got}"
        );
        assert_eq!(got["secrets"]["access_token"], value, "{got}");
        assert_eq!(got["reference"]["name"], name.as_str(), "{got}");
        let stored = if manager.starts_with("acme") {
            aws_value(&aws, &name).await
        } else {
            vault_value(&openbao, &name).await
        };
        assert_eq!(
            stored.as_ref().map(|v| &v["access_token"]),
            Some(&json!(value)),
            "{name} holds {stored:?}"
        );
    }
    // And nowhere else: moto holds exactly acme's two, OpenBao only globex's prefixes.
    let in_moto: BTreeSet<String> = aws
        .list_secrets()
        .send()
        .await
        .unwrap()
        .secret_list()
        .iter()
        .map(|s| s.name().unwrap().to_owned())
        .collect();
    assert_eq!(
        in_moto,
        ids(&[
            &format!("acme-prod/workspaces/acme/Production/{prod_a}"),
            &format!("credproxy/workspaces/acme/Sandbox/{sandbox_a}"),
        ])
    );
    assert_eq!(
        vault_list(&openbao, "").await,
        ["credproxy/", "globex-prod/"]
    );
    assert_eq!(
        vault_list(&openbao, "credproxy/").await,
        ["workspaces/"],
        "nothing under the default workspace's names"
    );

    // Each caller: the other's credentials are answered exactly like ids that do not exist,
    // for every credential call.
    for (via, theirs) in [
        (&acme, [&prod_g, &sandbox_g]),
        (&globex, [&prod_a, &sandbox_a]),
    ] {
        for other in theirs {
            let nobody = random_id();
            for (method, suffix, body) in [
                (Method::GET, "", None),
                (Method::GET, "?fields=access_token", None),
                (
                    Method::PATCH,
                    "",
                    Some(json!({"secrets": {"access_token": "overwritten"}})),
                ),
                (Method::POST, "/refresh", None),
                (Method::DELETE, "", None),
            ] {
                let call = |cid: &str| {
                    via.call_at(
                        method.clone(),
                        format!("/v1/credentials/{cid}{suffix}"),
                        body.clone(),
                    )
                };
                let (a, b) = (call(other).await, call(&nobody).await);
                assert!(is_error(&a, 404, "not_found"), "{method} {suffix}: {}", a.1);
                indistinguishable(
                    &a,
                    other,
                    &b,
                    &nobody,
                    &format!("{method} credential{suffix}"),
                );
            }
        }
    }
    // ... and none of those calls changed anything.
    for (via, cid, value) in [
        (&globex, &prod_g, "globex-prod-value"),
        (&globex, &sandbox_g, "globex-sandbox-value"),
        (&acme, &prod_a, "acme-prod-value"),
        (&acme, &sandbox_a, "acme-sandbox-value"),
    ] {
        assert_eq!(read(via, cid).await["secrets"]["access_token"], value);
    }

    // Managers: each lists only its own (and the local store), whatever workspace it asks for.
    assert_eq!(
        manager_ids(&acme, "").await,
        ids(&["local", "acme-main", "acme-prod"])
    );
    assert_eq!(
        manager_ids(&globex, "").await,
        ids(&["local", "globex-main", "globex-prod"])
    );
    assert_eq!(
        manager_ids(&acme, "?workspace=globex").await,
        ids(&["local"])
    );
    assert_eq!(
        manager_ids(&globex, "?workspace=acme").await,
        ids(&["local"])
    );
    let (_, shown) = acme
        .call(Method::GET, "/v1/secretsmanagers/acme-prod", None)
        .await;
    assert_eq!(shown["credentials"], 1, "{shown}");
    for (via, theirs) in [
        (&acme, ["globex-main", "globex-prod"]),
        (&globex, ["acme-main", "acme-prod"]),
    ] {
        for other in theirs {
            let nobody = "no-such-manager";
            for (method, path, body) in [
                (Method::GET, "/v1/secretsmanagers/ID", None),
                (
                    Method::PATCH,
                    "/v1/secretsmanagers/ID",
                    Some(json!({"name": "hijacked"})),
                ),
                (Method::DELETE, "/v1/secretsmanagers/ID?dry_run=true", None),
                (Method::DELETE, "/v1/secretsmanagers/ID", None),
                (
                    Method::GET,
                    "/v1/secretsmanagers/secrets?secretsmanager_id=ID",
                    None,
                ),
            ] {
                let call =
                    |mid: &str| via.call_at(method.clone(), path.replace("ID", mid), body.clone());
                let (a, b) = (call(other).await, call(nobody).await);
                assert!(
                    matches!(a.0, 400 | 404),
                    "{method} {path} for {other}: {} {}",
                    a.0,
                    a.1
                );
                indistinguishable(&a, other, &b, nobody, &format!("{method} {path}"));
            }
        }
    }
    // Still there, unchanged, still in use.
    let (status, shown) = globex
        .call(Method::GET, "/v1/secretsmanagers/globex-prod", None)
        .await;
    assert_eq!(
        (status, &shown["name"]),
        (200, &json!("globex-prod on OpenBao"))
    );
    assert_eq!(shown["state"], "active");

    // Pins: the other's manager is unknown, exactly like a manager that does not exist ...
    let pinned_there = try_create(
        &acme,
        "acme",
        "Production",
        json!({"k": "v"}),
        Some("globex-main"),
    )
    .await;
    let pinned_nowhere = try_create(
        &acme,
        "acme",
        "Production",
        json!({"k": "v"}),
        Some("no-such-manager"),
    )
    .await;
    assert!(
        is_error(&pinned_there, 400, "unknown_secrets_manager"),
        "{}",
        pinned_there.1
    );
    indistinguishable(
        &pinned_there,
        "globex-main",
        &pinned_nowhere,
        "no-such-manager",
        "a pin",
    );
    let repin = |pin: &'static str| {
        globex.call_at(
            Method::PATCH,
            format!("/v1/credentials/{prod_g}"),
            Some(json!({"secrets_manager_id": pin})),
        )
    };
    let (a, b) = (repin("acme-main").await, repin("no-such-manager").await);
    assert!(is_error(&a, 400, "unknown_secrets_manager"), "{}", a.1);
    indistinguishable(&a, "acme-main", &b, "no-such-manager", "a pin by patch");
    assert_eq!(
        read(&globex, &prod_g).await["secrets_manager_id"],
        "globex-prod"
    );
    // ... and a credential cannot be put in the other's workspace at all.
    let refused = try_create(&acme, "globex", "Production", json!({"k": "v"}), None).await;
    assert!(is_error(&refused, 403, "forbidden"), "{}", refused.1);
    // While a pin to one's own manager works and overrides the environment's route.
    let pinned = create(
        &acme,
        "acme",
        "Production",
        json!({"k": "pinned"}),
        Some("acme-main"),
    )
    .await;
    assert_eq!(pinned["secrets_manager_id"], "acme-main");
    assert_eq!(pinned["pinned_secrets_manager_id"], "acme-main");
    let name = format!("credproxy/workspaces/acme/Production/{}", id(&pinned));
    assert_eq!(aws_value(&aws, &name).await, Some(json!({"k": "pinned"})));
}

/// Every way a create can be wrong leaves nothing stored: a token OpenBao refuses or an address
/// nothing listens on fail the probe (422), keys in the wrong place or unknown are refused
/// before anything is built (400 naming the key). No answer echoes a value that was sent, and
/// neither the list, the database files nor the log hold one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_probe_or_a_misplaced_key_stores_nothing_and_echoes_no_value() {
    let openbao = peers::openbao().await;
    let mut d = Daemon::start(|_, _| {}).await;
    let via = Via::Unix(d.socket.clone());
    let canary = format!("CANARY-probe-{}", random_id());
    let vault = |id: &str, settings: Value, auth: Value| json!({"id": id, "name": id, "type": "hashicorp", "settings": settings, "auth": auth});
    let address = openbao.url();
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let cases: Vec<(&str, Value, u16, &str, &str)> = vec![
        (
            "wrong token",
            vault(
                "wrong-token",
                json!({"address": address}),
                json!({"token": canary}),
            ),
            422,
            "probe_failed",
            "",
        ),
        (
            "unreachable address",
            vault(
                "unreachable",
                json!({"address": nowhere}),
                json!({"token": canary}),
            ),
            422,
            "probe_failed",
            "",
        ),
        (
            "unknown settings key",
            vault(
                "unknown-setting",
                json!({"address": address, "colour": canary}),
                json!({"token": BAO_ROOT_TOKEN}),
            ),
            400,
            "invalid_request",
            "settings.colour",
        ),
        (
            "secret key in settings",
            vault(
                "token-in-settings",
                json!({"address": address, "token": canary}),
                json!({}),
            ),
            400,
            "invalid_request",
            "settings.token",
        ),
        (
            "nested secret key in settings",
            vault(
                "approle-in-settings",
                json!({"address": address, "approle": {"role_id": canary}}),
                json!({}),
            ),
            400,
            "invalid_request",
            "settings.approle.role_id",
        ),
        (
            "non-secret key in auth",
            vault(
                "mount-in-auth",
                json!({"address": address}),
                json!({"token": BAO_ROOT_TOKEN, "mount": canary}),
            ),
            400,
            "invalid_request",
            "auth.mount",
        ),
        (
            "unknown auth key",
            vault(
                "unknown-auth",
                json!({"address": address}),
                json!({"password": canary}),
            ),
            400,
            "invalid_request",
            "auth.password",
        ),
        (
            "auth not an object",
            json!({"id": "auth-string", "name": "n", "type": "hashicorp",
                   "settings": {"address": address}, "auth": canary}),
            400,
            "invalid_json",
            "auth",
        ),
        (
            "half of an AWS key pair",
            json!({"id": "half-aws", "name": "n", "type": "aws",
                   "settings": {"region": "us-east-1", "endpoint": address},
                   "auth": {"access_key_id": canary}}),
            400,
            "invalid_request",
            "access_key_id",
        ),
        (
            "AWS secret key in settings",
            json!({"id": "aws-secret-in-settings", "name": "n", "type": "aws",
                   "settings": {"region": "us-east-1", "secret_access_key": canary}}),
            400,
            "invalid_request",
            "settings.secret_access_key",
        ),
        (
            "unknown top-level field",
            json!({"id": "typo", "name": "n", "type": "hashicorp", "tokn": canary,
                   "settings": {"address": address}}),
            400,
            "invalid_json",
            "tokn",
        ),
    ];
    let mut tried = Vec::new();
    for (what, body, status, code, key) in cases {
        if let Some(id) = body["id"].as_str() {
            tried.push(id.to_owned());
        }
        let a = via
            .send(Method::POST, "/v1/secretsmanagers", Some(body))
            .await;
        assert_eq!(
            (a.status, a.body["error"]["code"].as_str()),
            (status, Some(code)),
            "{what}: {}",
            a.text
        );
        let detail = a.body["error"]["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains(key),
            "{what}: the detail names `{key}`: {}",
            a.text
        );
        assert!(
            !a.text.contains("CANARY"),
            "{what}: the answer echoes the value sent: {}",
            a.text
        );
    }

    assert_eq!(manager_ids(&via, "").await, ids(&["local"]));
    for id in &tried {
        let (status, _) = via
            .call(Method::GET, &format!("/v1/secretsmanagers/{id}"), None)
            .await;
        assert_eq!(status, 404, "{id} was stored");
    }
    let no_canary_on_disk = |d: &Daemon| {
        for file in common::all_files(d.dir.path()) {
            let bytes = std::fs::read(&file).unwrap_or_default();
            assert!(
                !contains_bytes(&bytes, b"CANARY"),
                "{} holds a value that was sent",
                file.display()
            );
        }
    };
    // The log is in the directory too: this covers it, the database and its WAL.
    no_canary_on_disk(&d);

    // The same daemon takes a good definition (the failures above were the request's fault).
    let view = create_manager(
        &via,
        vault_body("default", "good", "credproxy/", &openbao, BAO_ROOT_TOKEN),
    )
    .await;
    assert_eq!(view["loaded"], true);
    assert_eq!(manager_ids(&via, "").await, ids(&["local", "good"]));

    d.stop().await;
    no_canary_on_disk(&d);
    let db = rusqlite::Connection::open_with_flags(
        d.dir.path().join("data/credproxy.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let stored: Vec<String> = db
        .prepare("SELECT id FROM managers ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(stored, ["good"], "only the good definition is stored");
}

/// An OpenBao manager's token is rotated over PATCH while four readers read its credentials
/// from the store (the cache lives 50 ms); the old token is then revoked in OpenBao. Not one
/// read fails or is served stale. A rotation to a dead token is refused (422) and changes
/// nothing; a change of where the secrets are (`settings.mount`, `settings.address`) is 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_a_vault_token_over_patch_while_four_readers_run_fails_no_read() {
    let openbao = peers::openbao().await;
    let (t1, t2) = (
        vault_token(&openbao, None).await,
        vault_token(&openbao, None).await,
    );
    let d = Arc::new(Daemon::start(|c, _| brisk(c)).await);
    let via = Via::Unix(d.socket.clone());
    create_manager(
        &via,
        vault_body("default", "rot", "credproxy/", &openbao, &t1),
    )
    .await;
    put_routing(&via, json!({"default": "rot"})).await;
    let mut creds = Vec::new();
    for i in 0..8 {
        let value = format!("value-{i}");
        let made = create(
            &via,
            "default",
            "Production",
            json!({"api_key": value}),
            None,
        )
        .await;
        assert_eq!(made["secrets_manager_id"], "rot");
        let cid = made["id"].as_str().unwrap().to_owned();
        assert_eq!(
            vault_value(&openbao, &format!("credproxy/Production/{cid}")).await,
            Some(json!({"api_key": value}))
        );
        creds.push((cid, value));
    }
    let creds = Arc::new(creds);

    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let readers: Vec<_> = (0..4)
        .map(|r| {
            let (via, creds, stop) = (via.clone(), Arc::clone(&creds), Arc::clone(&stop));
            let (reads, failures) = (Arc::clone(&reads), Arc::clone(&failures));
            tokio::spawn(async move {
                let mut i = r;
                while !stop.load(Ordering::SeqCst) {
                    let (cid, value) = &creds[i % creds.len()];
                    let a = via
                        .send(Method::GET, &format!("/v1/credentials/{cid}"), None)
                        .await;
                    if a.status != 200
                        || a.body["secrets"]["api_key"] != value.as_str()
                        || a.cache.as_deref() == Some("stale")
                    {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("{} {:?} {}", a.status, a.cache, a.text));
                    }
                    reads.fetch_add(1, Ordering::SeqCst);
                    i += 1;
                }
            })
        })
        .collect();
    let store_reads =
        "credproxy_backend_requests_total{manager=\"api:hashicorp\",operation=\"get\",outcome=\"success\"}";
    let (reads_before, store_before) =
        (reads.load(Ordering::SeqCst), sample(&d, store_reads).await);
    wait_for("readers reading through to OpenBao with T1", || async {
        reads.load(Ordering::SeqCst) >= reads_before + 200
            && sample(&d, store_reads).await >= store_before + 50.0
    })
    .await;

    let (status, view) = via
        .call(
            Method::PATCH,
            "/v1/secretsmanagers/rot",
            Some(json!({"auth": {"token": t2}})),
        )
        .await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["auth_keys_set"], json!(["token"]));
    assert_eq!(view["loaded"], true);
    assert!(!view.to_string().contains(&t2));
    let (status, revoked) = bao(
        &openbao,
        reqwest::Method::POST,
        "/v1/auth/token/revoke",
        Some(json!({"token": t1})),
    )
    .await;
    assert_eq!(status, 204, "{revoked}");
    assert!(!vault_token_works(&openbao, &t1).await, "T1 is revoked");
    assert!(vault_token_works(&openbao, &t2).await);

    let (reads_revoked, store_revoked) =
        (reads.load(Ordering::SeqCst), sample(&d, store_reads).await);
    wait_for("readers reading through to OpenBao with T2", || async {
        // A failure ends the wait at once, to be reported below.
        !failures.lock().unwrap().is_empty()
            || (reads.load(Ordering::SeqCst) >= reads_revoked + 400
                && sample(&d, store_reads).await >= store_revoked + 100.0)
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for r in readers {
        r.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    eprintln!(
        "{} reads, {} through to OpenBao, {} failed",
        reads.load(Ordering::SeqCst),
        sample(&d, store_reads).await,
        failures.len()
    );
    assert!(failures.is_empty(), "failed reads: {failures:#?}");
    let denied =
        "credproxy_backend_requests_total{manager=\"api:hashicorp\",operation=\"get\",outcome=\"denied\"}";
    assert_eq!(
        sample(&d, denied).await,
        0.0,
        "no read used the revoked token"
    );

    // A rotation to a token OpenBao refuses is not saved: the manager keeps T2.
    let (status, refused) = via
        .call(
            Method::PATCH,
            "/v1/secretsmanagers/rot",
            Some(json!({"auth": {"token": t1}})),
        )
        .await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (422, Some("probe_failed")),
        "{refused}"
    );
    assert!(!refused.to_string().contains(&t1), "{refused}");
    let fresh = create(
        &via,
        "default",
        "Production",
        json!({"api_key": "after"}),
        None,
    )
    .await;
    assert_eq!(fresh["secrets_manager_id"], "rot");
    let fresh_id = fresh["id"].as_str().unwrap();
    assert_eq!(
        vault_value(&openbao, &format!("credproxy/Production/{fresh_id}")).await,
        Some(json!({"api_key": "after"})),
        "the manager still writes with T2"
    );

    // Settings that decide where the secrets are cannot change under existing credentials.
    for settings in [
        json!({"mount": "elsewhere"}),
        json!({"address": format!("http://127.0.0.1:{}", free_port())}),
    ] {
        let key = settings.as_object().unwrap().keys().next().unwrap().clone();
        let (status, body) = via
            .call(
                Method::PATCH,
                "/v1/secretsmanagers/rot",
                Some(json!({"settings": settings})),
            )
            .await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("invalid_request")),
            "{body}"
        );
        assert!(
            body["error"]["detail"]
                .as_str()
                .unwrap()
                .contains(&format!("settings.{key}")),
            "{body}"
        );
    }
    let (status, renamed) = via
        .call(
            Method::PATCH,
            "/v1/secretsmanagers/rot",
            Some(json!({"name": "rotated"})),
        )
        .await;
    assert_eq!(
        (status, &renamed["name"]),
        (200, &json!("rotated")),
        "{renamed}"
    );
    assert_eq!(renamed["settings"], json!({"address": openbao.url()}));
    for (cid, value) in creds.iter() {
        assert_eq!(read(&via, cid).await["secrets"]["api_key"], value.as_str());
    }
}

/// Deleting an OpenBao manager: the dry run says where each of its credentials will go (pinned
/// ones fall back along the chain too) and changes nothing; the delete then moves exactly
/// those there, values intact, removes the routes naming it, deletes its copies from OpenBao,
/// and the manager disappears once empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_manager_moves_its_credentials_where_the_dry_run_said_then_it_is_gone() {
    let openbao = peers::openbao().await;
    let d = Daemon::start(|c, _| brisk(c)).await;
    let via = Via::Unix(d.socket.clone());
    let ws = "initech";
    let (m, n) = ("initech-m", "initech-n");
    create_manager(&via, vault_body(ws, m, "m/", &openbao, BAO_ROOT_TOKEN)).await;
    create_manager(&via, vault_body(ws, n, "n/", &openbao, BAO_ROOT_TOKEN)).await;
    put_routing(
        &via,
        json!({"workspace": ws, "default": m, "environments": {"Production": n}}),
    )
    .await;

    // In M: two Production credentials pinned there, two Sandbox ones by the default route,
    // one Sandbox one pinned there. Elsewhere: one in N by its route, one pinned to local.
    let mut in_m = Vec::new();
    for (env, pin, expected_target) in [
        ("Production", Some(m), n),
        ("Production", Some(m), n),
        ("Sandbox", None, "local"),
        ("Sandbox", None, "local"),
        ("Sandbox", Some(m), "local"),
    ] {
        let value = format!("{env}-{}", in_m.len());
        let made = create(&via, ws, env, json!({"api_key": value}), pin).await;
        assert_eq!(made["secrets_manager_id"], m, "{made}");
        let cid = made["id"].as_str().unwrap().to_owned();
        let name = format!("m/workspaces/{ws}/{env}/{cid}");
        assert_eq!(
            vault_value(&openbao, &name).await,
            Some(json!({"api_key": value}))
        );
        in_m.push((cid, env, pin, expected_target, value));
    }
    let in_n = create(
        &via,
        ws,
        "Production",
        json!({"api_key": "stays-in-n"}),
        None,
    )
    .await;
    assert_eq!(in_n["secrets_manager_id"], n);
    let in_local = create(
        &via,
        ws,
        "Staging",
        json!({"api_key": "stays-local"}),
        Some("local"),
    )
    .await;
    assert_eq!(in_local["secrets_manager_id"], "local");

    let expected_plan = json!({
        "id": m, "credentials": 5,
        "moves": [
            {"target": n, "reason": "environment", "count": 2},
            {"target": "local", "reason": "local", "count": 3},
        ],
        "pinned": 3, "cannot_move": 0, "cannot_move_action": "refused",
    });
    let (status, plan) = via
        .call(
            Method::DELETE,
            &format!("/v1/secretsmanagers/{m}?dry_run=true"),
            None,
        )
        .await;
    assert_eq!((status, &plan), (200, &expected_plan));

    // The dry run changed nothing.
    let (_, shown) = via
        .call(Method::GET, &format!("/v1/secretsmanagers/{m}"), None)
        .await;
    assert_eq!(
        (&shown["state"], &shown["credentials"]),
        (&json!("active"), &json!(5)),
        "{shown}"
    );
    let (_, routing) = via
        .call(Method::GET, &format!("/v1/routing?workspace={ws}"), None)
        .await;
    assert_eq!(routing["default"], m, "{routing}");
    let (_, migrations) = via.call(Method::GET, "/v1/migrations", None).await;
    assert_eq!(migrations["pending"], 0, "{migrations}");
    for (cid, ..) in &in_m {
        assert_eq!(read(&via, cid).await["secrets_manager_id"], m);
    }

    let (status, plan) = via
        .call(Method::DELETE, &format!("/v1/secretsmanagers/{m}"), None)
        .await;
    assert_eq!(
        (status, &plan),
        (202, &expected_plan),
        "the delete does what the dry run said"
    );
    // Routing stops naming it at once; it can no longer be a target.
    let (_, routing) = via
        .call(Method::GET, &format!("/v1/routing?workspace={ws}"), None)
        .await;
    assert_eq!(
        (&routing["default"], &routing["environments"]),
        (&json!("local"), &json!({"Production": n})),
        "{routing}"
    );
    let refused = via
        .call(
            Method::PUT,
            "/v1/routing",
            Some(json!({"workspace": ws, "default": m})),
        )
        .await;
    assert!(is_error(&refused, 400, "invalid_request"), "{}", refused.1);

    let started = Instant::now();
    let mut seen_retiring = false;
    loop {
        let (_, list) = via
            .call(
                Method::GET,
                &format!("/v1/secretsmanagers?workspace={ws}"),
                None,
            )
            .await;
        let mine = list
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["id"] == m)
            .cloned();
        let (_, migrations) = via.call(Method::GET, "/v1/migrations", None).await;
        match mine {
            Some(view) => {
                assert_eq!(view["state"], "retiring", "{view}");
                seen_retiring = true;
            }
            None if migrations["pending"] == 0 => break,
            None => {}
        }
        assert!(
            started.elapsed() < DEADLINE,
            "{m} still listed: {list}\n{migrations}\n{}",
            d.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "{m} gone after {:.2}s (seen retiring: {seen_retiring})",
        started.elapsed().as_secs_f64()
    );
    let (status, _) = via
        .call(Method::GET, &format!("/v1/secretsmanagers/{m}"), None)
        .await;
    assert_eq!(status, 404);

    for (cid, env, pin, target, value) in &in_m {
        let got = read(&via, cid).await;
        assert_eq!(got["secrets_manager_id"], *target, "{got}");
        assert_eq!(got["secrets"]["api_key"], value.as_str(), "{got}");
        if pin.is_some() {
            assert_eq!(got["pinned_secrets_manager_id"], m, "{got}");
            assert_eq!(got["pin_unavailable"], true, "{got}");
        }
        let old = format!("m/workspaces/{ws}/{env}/{cid}");
        assert_eq!(
            vault_value(&openbao, &old).await,
            None,
            "{old} left in OpenBao"
        );
        if *target == n {
            let new = format!("n/workspaces/{ws}/{env}/{cid}");
            assert_eq!(got["reference"]["name"], new.as_str());
            assert_eq!(
                vault_value(&openbao, &new).await,
                Some(json!({"api_key": value}))
            );
        }
    }
    assert!(
        vault_list(&openbao, "m/").await.is_empty(),
        "nothing of M left in OpenBao"
    );
    for (cred, manager, value) in [
        (&in_n, n, "stays-in-n"),
        (&in_local, "local", "stays-local"),
    ] {
        let got = read(&via, cred["id"].as_str().unwrap()).await;
        assert_eq!(
            (&got["secrets_manager_id"], &got["secrets"]["api_key"]),
            (&json!(manager), &json!(value)),
            "{got}"
        );
    }
    // Managers created through the API are labelled by type, not id: the label set stays
    // bounded however many there are.
    for (target, count) in [("api:hashicorp", 2.0), ("local", 3.0)] {
        let series = format!(
            "credproxy_migration_moves_total{{outcome=\"moved\",source=\"api:hashicorp\",target=\"{target}\"}}"
        );
        assert_eq!(sample(&d, &series).await, count, "{series}");
    }
    let failed = "credproxy_migration_moves_total{outcome=\"failed\",source=\"api:hashicorp\",target=\"api:hashicorp\"}";
    assert_eq!(sample(&d, failed).await, 0.0);
    let text = d.metrics_text().await;
    assert!(
        !text.contains(&format!("\"{m}\"")),
        "no manager id as a label value"
    );
}

/// Access details given through the API never appear in clear: at TRACE level the log, every
/// answer (create, patch, list, get, errors), `/metrics` and every file under the daemon's
/// directory (the SQLite database and its WAL included) are free of them, and the `managers`
/// table holds them as ciphertext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_access_details_never_reach_trace_logs_answers_metrics_or_files_in_clear() {
    let (moto, openbao) = (peers::moto().await, peers::openbao().await);
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let aws_key_id = format!("CANARYAKID{}", &tag[..10]);
    let aws_secrets = [
        format!("CANARY-aws-secret-1-{tag}"),
        format!("CANARY-aws-secret-2-{tag}"),
    ];
    // Vault tokens must work, so they are real tokens whose ids are canaries.
    let vault_tokens = [
        vault_token(&openbao, Some(&format!("CANARY-vault-1-{tag}"))).await,
        vault_token(&openbao, Some(&format!("CANARY-vault-2-{tag}"))).await,
    ];
    let mut d = Daemon::start(|c, _| set(c, "log", "level", "trace")).await;
    let via = Via::Unix(d.socket.clone());
    let mut answers: Vec<String> = Vec::new();
    let mut note = |a: Answer, status: u16| -> Value {
        assert_eq!(a.status, status, "{}", a.text);
        answers.push(a.text);
        a.body
    };

    let body = json!({
        "workspace": "acme", "id": "aws-canary", "name": "aws", "type": "aws",
        "settings": {"region": "us-east-1", "endpoint": moto.url()},
        "auth": {"access_key_id": aws_key_id, "secret_access_key": aws_secrets[0]},
    });
    note(
        via.send(Method::POST, "/v1/secretsmanagers", Some(body))
            .await,
        201,
    );
    let body = vault_body(
        "default",
        "vault-canary",
        "credproxy/",
        &openbao,
        &vault_tokens[0],
    );
    note(
        via.send(Method::POST, "/v1/secretsmanagers", Some(body))
            .await,
        201,
    );
    put_routing(&via, json!({"workspace": "acme", "default": "aws-canary"})).await;
    put_routing(&via, json!({"default": "vault-canary"})).await;
    // The managers are used with those details: writes, reads from the stores, listings.
    let a = create(&via, "acme", "Production", json!({"k": "in-aws"}), None).await;
    let v = create(
        &via,
        "default",
        "Production",
        json!({"k": "in-vault"}),
        None,
    )
    .await;
    assert_eq!(
        (&a["secrets_manager_id"], &v["secrets_manager_id"]),
        (&json!("aws-canary"), &json!("vault-canary"))
    );

    // Rotations, a refused rotation, a rename.
    let patch = |id: &str, body: Value| {
        let path = format!("/v1/secretsmanagers/{id}");
        let via = via.clone();
        async move { via.send(Method::PATCH, &path, Some(body)).await }
    };
    note(
        patch(
            "aws-canary",
            json!({"auth": {"secret_access_key": aws_secrets[1]}}),
        )
        .await,
        200,
    );
    note(
        patch("vault-canary", json!({"auth": {"token": vault_tokens[1]}})).await,
        200,
    );
    note(
        patch(
            "vault-canary",
            json!({"auth": {"token": format!("CANARY-not-a-token-{tag}")}}),
        )
        .await,
        422,
    );
    note(
        patch(
            "vault-canary",
            json!({"auth": format!("CANARY-auth-string-{tag}")}),
        )
        .await,
        400,
    );
    note(patch("vault-canary", json!({"name": "renamed"})).await, 200);
    // Refused creates carrying canaries.
    let refused = json!({"id": "x", "name": "x", "type": "hashicorp",
                         "settings": {"address": openbao.url(), "token": vault_tokens[1]}});
    note(
        via.send(Method::POST, "/v1/secretsmanagers", Some(refused))
            .await,
        400,
    );
    let refused = vault_body("default", "y", "y/", &openbao, &format!("CANARY-bad-{tag}"));
    note(
        via.send(Method::POST, "/v1/secretsmanagers", Some(refused))
            .await,
        422,
    );

    for path in [
        "/v1/secretsmanagers".to_owned(),
        "/v1/secretsmanagers?workspace=acme".to_owned(),
        "/v1/secretsmanagers/aws-canary".to_owned(),
        "/v1/secretsmanagers/vault-canary".to_owned(),
        "/v1/secretsmanagers/secrets?secretsmanager_id=aws-canary".to_owned(),
        "/v1/secretsmanagers/secrets?secretsmanager_id=vault-canary&query=credproxy".to_owned(),
        "/v1/routing?workspace=acme".to_owned(),
        "/v1/migrations".to_owned(),
        format!("/v1/credentials/{}", a["id"].as_str().unwrap()),
        format!("/v1/credentials/{}", v["id"].as_str().unwrap()),
    ] {
        note(via.send(Method::GET, &path, None).await, 200);
    }
    let (_, shown) = via
        .call(Method::GET, "/v1/secretsmanagers/aws-canary", None)
        .await;
    let mut keys: Vec<&str> = shown["auth_keys_set"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    keys.sort();
    assert_eq!(keys, ["access_key_id", "secret_access_key"], "{shown}");
    let metrics = d.metrics_text().await;

    let logs = d.logs();
    assert!(logs.contains("TRACE"), "trace logging was on");
    assert!(logs.contains("secrets manager created"), "{logs}");
    assert!(
        !logs.contains("CANARY"),
        "an access detail reached the log:\n{logs}"
    );
    assert!(
        !metrics.contains("CANARY"),
        "an access detail reached /metrics"
    );
    for answer in &answers {
        assert!(
            !answer.contains("CANARY"),
            "an answer holds an access detail: {answer}"
        );
    }
    let no_canary_on_disk = |d: &Daemon| {
        let files = common::all_files(d.dir.path());
        assert!(
            files.iter().any(|f| f.ends_with("credproxy.db-wal")),
            "{files:?}"
        );
        for file in files {
            let bytes = std::fs::read(&file).unwrap_or_default();
            assert!(
                !contains_bytes(&bytes, b"CANARY"),
                "{} holds an access detail in clear",
                file.display()
            );
        }
    };
    no_canary_on_disk(&d);
    d.stop().await;
    let db = rusqlite::Connection::open_with_flags(
        d.dir.path().join("data/credproxy.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let rows: Vec<(String, Option<Vec<u8>>, i64)> = db
        .prepare("SELECT id, auth_ciphertext, auth_version FROM managers ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    for (id, ciphertext, version) in rows {
        let ciphertext = ciphertext.unwrap_or_default();
        assert!(!ciphertext.is_empty(), "{id} has no sealed access details");
        assert_eq!(version, 2, "{id}: created, then rotated once");
    }
    if std::path::Path::new(&d.dir.path().join("data/credproxy.db-wal")).exists() {
        no_canary_on_disk(&d);
    }
}

/// Managers and routing created through the API are in the metadata database, not in memory:
/// after a restart they are listed as before, loaded (their access details unsealed), the
/// routing is the same, credentials in them are read from their stores, and new ones are
/// routed by the saved routing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managers_and_routing_created_over_the_api_survive_a_restart() {
    let (moto, openbao) = (peers::moto().await, peers::openbao().await);
    let mut d = Daemon::start(|_, _| {}).await;
    let via = Via::Unix(d.socket.clone());
    create_manager(&via, aws_body("acme", "acme-aws", "credproxy/", &moto)).await;
    create_manager(
        &via,
        vault_body("default", "vault", "credproxy/", &openbao, BAO_ROOT_TOKEN),
    )
    .await;
    put_routing(&via, json!({"workspace": "acme", "default": "acme-aws"})).await;
    put_routing(&via, json!({"environments": {"Production": "vault"}})).await;
    let in_aws = create(&via, "acme", "Sandbox", json!({"k": "aws-value"}), None).await;
    let in_vault = create(
        &via,
        "default",
        "Production",
        json!({"k": "vault-value"}),
        None,
    )
    .await;
    let in_local = create(
        &via,
        "default",
        "Sandbox",
        json!({"k": "local-value"}),
        None,
    )
    .await;
    let expected = [
        (&in_aws, "acme-aws", "aws-value"),
        (&in_vault, "vault", "vault-value"),
        (&in_local, "local", "local-value"),
    ];
    for (cred, manager, _) in expected {
        assert_eq!(cred["secrets_manager_id"], manager, "{cred}");
    }
    let snapshot = |via: Via| async move {
        let (_, managers) = via.call(Method::GET, "/v1/secretsmanagers", None).await;
        let (_, acme) = via
            .call(Method::GET, "/v1/routing?workspace=acme", None)
            .await;
        let (_, default) = via.call(Method::GET, "/v1/routing", None).await;
        (managers, acme, default)
    };
    let before = snapshot(via.clone()).await;
    assert_eq!(
        (&before.1["default"], &before.2["environments"]),
        (&json!("acme-aws"), &json!({"Production": "vault"}))
    );

    d.stop().await;
    let d = d.restart(|_| {}).await;
    let via = Via::Unix(d.socket.clone());
    let after = snapshot(via.clone()).await;
    assert_eq!(after.0, before.0, "the managers are listed as before");
    assert_eq!(
        (&after.1, &after.2),
        (&before.1, &before.2),
        "the routing is the same"
    );
    for view in after.0.as_array().unwrap() {
        assert_eq!(view["loaded"], true, "{view}");
    }
    for (cred, manager, value) in expected {
        let a = via
            .send(
                Method::GET,
                &format!("/v1/credentials/{}", cred["id"].as_str().unwrap()),
                None,
            )
            .await;
        assert_eq!(a.status, 200, "{}", a.text);
        assert_eq!(a.cache.as_deref(), Some("miss"), "read from the store");
        assert_eq!(
            (&a.body["secrets_manager_id"], &a.body["secrets"]["k"]),
            (&json!(manager), &json!(value))
        );
    }
    let new = create(&via, "acme", "Sandbox", json!({"k": "after-restart"}), None).await;
    assert_eq!(new["secrets_manager_id"], "acme-aws");
    let aws = peers::aws_client(&moto).await;
    let name = format!(
        "credproxy/workspaces/acme/Sandbox/{}",
        new["id"].as_str().unwrap()
    );
    assert_eq!(
        aws_value(&aws, &name).await,
        Some(json!({"k": "after-restart"}))
    );
    let new = create(
        &via,
        "default",
        "Production",
        json!({"k": "after-restart"}),
        None,
    )
    .await;
    assert_eq!(new["secrets_manager_id"], "vault");
    let (_, migrations) = via.call(Method::GET, "/v1/migrations", None).await;
    assert_eq!(migrations["pending"], 0, "nothing to move: {migrations}");
    assert!(
        !d.logs().contains("cannot build this secrets manager"),
        "{}",
        d.logs()
    );
}

/// A caller that no `[[access]]` rule names is refused every secrets-manager and routing read,
/// the local store's view included (it belongs to no workspace, so the route's own check is
/// the only one), and cannot tell which manager ids exist.
#[tokio::test]
async fn a_caller_no_rule_names_is_refused_every_manager_and_routing_call() {
    let (uid, _) = credproxy::sys::effective_ids();
    let d = Daemon::start(|c, _| {
        c.insert(
            "access".into(),
            toml::Value::Array(vec![admin_of(
                ("uid", (uid.wrapping_add(1) as i64).into()),
                &["*"],
            )]),
        );
    })
    .await;
    let via = Via::Unix(d.socket.clone());
    for path in [
        "/v1/secretsmanagers",
        "/v1/secretsmanagers/local",
        "/v1/secretsmanagers/no-such-manager",
        "/v1/secretsmanagers/instructions",
        "/v1/routing",
    ] {
        let answer = via.call(Method::GET, path, None).await;
        assert!(
            is_error(&answer, 403, "forbidden"),
            "GET {path}: {}",
            answer.1
        );
    }
    let answer = via
        .call(
            Method::POST,
            "/v1/secretsmanagers",
            Some(json!({"name": "x", "type": "hashicorp",
                        "settings": {"address": "http://127.0.0.1:9"}, "auth": {"token": "t"}})),
        )
        .await;
    assert!(is_error(&answer, 403, "forbidden"), "{}", answer.1);
}

#[tokio::test]
async fn the_cli_adds_lists_routes_and_dry_runs_a_delete_over_the_socket() {
    let openbao = peers::openbao().await;
    let d = Daemon::start(|_, _| {}).await;
    let socket = d.socket.to_str().unwrap().to_owned();
    // The body, access details included, comes from a file: never from the command line.
    let body = d.dir.path().join("manager.json");
    std::fs::write(
        &body,
        vault_body("cli", "cli-vault", "credproxy/", &openbao, BAO_ROOT_TOKEN).to_string(),
    )
    .unwrap();
    let cli = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--socket", &socket]);
        let out = common::run_cli(&all);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !stdout.contains(BAO_ROOT_TOKEN) && !stderr.contains(BAO_ROOT_TOKEN),
            "{stdout}{stderr}"
        );
        (out.status.code(), stdout, stderr)
    };
    let (code, out, err) = cli(&["managers", "add", "--body", body.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}{err}");
    let created: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(created["auth_keys_set"], json!(["token"]), "{created}");

    let (code, out, _) = cli(&["managers", "list", "--workspace", "cli"]);
    assert_eq!(code, Some(0));
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == "cli-vault"),
        "{listed}"
    );

    let (code, out, err) = cli(&[
        "routing",
        "set",
        "--workspace",
        "cli",
        "--default",
        "cli-vault",
        "--env",
        "Sandbox=local",
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    let routing: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(routing["default"], "cli-vault", "{routing}");
    assert_eq!(
        routing["environments"],
        json!({"Sandbox": "local"}),
        "{routing}"
    );

    let via = Via::Unix(d.socket.clone());
    let cred = create(&via, "cli", "Production", json!({"k": "v"}), None).await;
    assert_eq!(cred["secrets_manager_id"], "cli-vault", "{cred}");

    let (code, out, err) = cli(&["managers", "delete", "cli-vault", "--dry-run"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let plan: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(plan["credentials"], 1, "{plan}");
    assert_eq!(
        plan["moves"],
        json!([{"target": "local", "reason": "local", "count": 1}]),
        "{plan}"
    );
    // A dry run changes nothing.
    let (code, out, err) = cli(&["managers", "get", "cli-vault"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["state"],
        "active"
    );

    // Refusals exit non-zero with the API's error.
    let (code, _, err) = cli(&["routing", "set", "--workspace", "cli", "--env", "Prod"]);
    assert_eq!(code, Some(2), "{err}");
    let (code, _, err) = cli(&["managers", "get", "no-such-manager"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("secrets_manager_not_found"), "{err}");
}

#[tokio::test]
async fn a_master_key_rotation_rewraps_managers_access_details_so_the_old_key_can_go() {
    let openbao = peers::openbao().await;
    let mut d = Daemon::start(|_, _| {}).await;
    let via = Via::Unix(d.socket.clone());
    create_manager(
        &via,
        vault_body("acme", "acme-vault", "credproxy/", &openbao, BAO_ROOT_TOKEN),
    )
    .await;
    put_routing(&via, json!({"workspace": "acme", "default": "acme-vault"})).await;
    let cred = create(&via, "acme", "Production", json!({"k": "kept"}), None).await;
    let cid = cred["id"].as_str().unwrap().to_owned();

    let data = d.dir.path().join("data");
    let (old_key, new_key) = (data.join("master.key"), data.join("new.key"));
    let out = common::run_cli(&["keygen", "--out", new_key.to_str().unwrap()]);
    assert!(out.status.success());
    // "wrote master key {id} to {path}"
    let new_id = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(3)
        .unwrap()
        .to_owned();
    let database = data.join("credproxy.db");
    let key_of_manager = move || {
        let db = rusqlite::Connection::open_with_flags(
            &database,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        db.query_row(
            "SELECT auth_key_id FROM managers WHERE id = 'acme-vault'",
            [],
            |r| r.get::<_, String>(0),
        )
        .unwrap()
    };
    assert_ne!(key_of_manager(), new_id);

    // The new key current, the old one previous: the access details are re-wrapped at start.
    let (old, new) = (
        old_key.to_str().unwrap().to_owned(),
        new_key.to_str().unwrap().to_owned(),
    );
    d.stop().await;
    let mut d = d
        .restart(|c| {
            set(c, "store", "master_key_file", new.clone());
            set(c, "store", "previous_master_key_files", vec![old]);
        })
        .await;
    wait_for("the access details re-wrapped under the new key", || {
        let (key, id) = (key_of_manager.clone(), new_id.clone());
        async move { key() == id }
    })
    .await;

    // So the old key can go: without it the manager still builds and its credential reads.
    d.stop().await;
    let d = d
        .restart(|c| {
            set(
                c,
                "store",
                "previous_master_key_files",
                Vec::<String>::new(),
            )
        })
        .await;
    let via = Via::Unix(d.socket.clone());
    let (status, view) = via
        .call(Method::GET, "/v1/secretsmanagers/acme-vault", None)
        .await;
    assert_eq!((status, &view["loaded"]), (200, &json!(true)), "{view}");
    let got = read(&via, &cid).await;
    assert_eq!(got["secrets"]["k"], "kept", "{got}");
}
