//! Faithful wire-level fakes of the three managers that have no emulator here, driven by the
//! real SDK crates through the daemon: Azure Key Vault (HTTPS with a test CA, the 401 bearer
//! challenge, an Entra ID token endpoint, and soft delete as Microsoft documents it: deletes and
//! recoveries that take time, `deletedsecrets` read, purge and recover, `409` with
//! `ObjectIsBeingDeleted`, `ObjectIsDeletedButRecoverable` and `ObjectIsBeingRecovered` in
//! `innererror`, `403 ForbiddenByRbac` for a missing permission), Google Secret Manager (REST/JSON, service-account
//! JWTs verified against the key's public half, CRC32C checksums), and Composio's connected
//! accounts API. Each is strict: a request the real service would reject is rejected, so a
//! wrong request fails the test. Faults (throttling) are switched on from the test.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};

type Handler = Arc<dyn Fn(Call) -> Response<Full<Bytes>> + Send + Sync>;

/// One request as the fakes see it.
pub struct Call {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Call {
    fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

fn reply(status: u16, body: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

/// A fake's HTTP(S) server on a free loopback port, stopped when dropped.
pub struct Server {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(handler: Handler, tls: Option<Arc<rustls::ServerConfig>>) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let handler = Arc::clone(&handler);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let handler = Arc::clone(&handler);
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let query = parts
                                .uri
                                .query()
                                .map(|q| {
                                    url::form_urlencoded::parse(q.as_bytes())
                                        .map(|(k, v)| (k.into_owned(), v.into_owned()))
                                        .collect()
                                })
                                .unwrap_or_default();
                            let call = Call {
                                method: parts.method.to_string(),
                                // Servers route on the decoded path.
                                path: percent_encoding::percent_decode_str(parts.uri.path())
                                    .decode_utf8_lossy()
                                    .into_owned(),
                                query,
                                headers: parts.headers,
                                body,
                            };
                            Ok::<_, Infallible>(handler(call))
                        }
                    });
                let builder = hyper::server::conn::http1::Builder::new();
                match acceptor {
                    Some(acceptor) => {
                        if let Ok(tls) = acceptor.accept(stream).await {
                            let _ = builder
                                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                                .await;
                        }
                    }
                    None => {
                        let _ = builder
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    }
                }
            });
        }
    });
    Server { addr, task }
}

/// A test CA and a server certificate for `hosts`, signed by it. Returns the server's TLS
/// config and the CA's PEM (for the client to trust).
pub fn test_tls(hosts: &[&str]) -> (Arc<rustls::ServerConfig>, String) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "credproxy test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>())
            .unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    (Arc::new(config), ca.pem())
}

fn hex32() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn now() -> i64 {
    super::now()
}

// =============================================================================================
// Azure Key Vault
// =============================================================================================

pub const AZURE_TENANT: &str = "00000000-0000-4000-8000-000000000001";
pub const AZURE_CLIENT_ID: &str = "00000000-0000-4000-8000-000000000002";
pub const AZURE_CLIENT_SECRET: &str = "CANARY-azure-client-secret-7c1d";
pub const AZURE_VAULT_HOST: &str = "v1.vault.localhost";
pub const AZURE_LOGIN_HOST: &str = "login.localhost";
const AZURE_API_VERSION: &str = "2025-07-01";

/// One Key Vault secret version: (version id, value, content type, created).
pub type AzureVersion = (String, String, Option<String>, i64);

#[derive(Default)]
pub struct AzureState {
    /// name → versions (oldest first) of (version id, value, content type, created).
    pub secrets: BTreeMap<String, Vec<AzureVersion>>,
    /// Soft-deleted names whose delete has completed: recoverable and purgeable.
    pub deleted: BTreeMap<String, Vec<AzureVersion>>,
    /// Soft deletes still running, and when each completes. Meanwhile the name answers 404 to
    /// reads (live and deleted) and `409 ObjectIsBeingDeleted` to writes, purges and recoveries.
    pub deleting: BTreeMap<String, (Vec<AzureVersion>, Instant)>,
    /// Recoveries still running, and when each secret is readable again; meanwhile a write to
    /// the name answers `409 ObjectIsBeingRecovered`.
    pub recovering: BTreeMap<String, (Vec<AzureVersion>, Instant)>,
    /// How long a soft delete runs (zero: done when the DELETE answers).
    pub delete_delay: Duration,
    /// How long a recovery runs.
    pub recover_delay: Duration,
    /// Secret operations the identity has no permission for (`"purge"`, `"recover"`): 403.
    pub forbidden: BTreeSet<&'static str>,
    /// Every vault request answered: (method, path, status).
    pub log: Vec<(String, String, u16)>,
    pub issued_token: Option<String>,
    pub token_requests: usize,
    pub challenges: usize,
    pub throttle_next: usize,
    pub throttled: usize,
    pub page_size: usize,
}

impl AzureState {
    /// Completes the soft deletes and recoveries whose time has come.
    fn advance(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .deleting
            .iter()
            .filter(|(_, (_, at))| *at <= now)
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            let (versions, _) = self.deleting.remove(&name).unwrap();
            self.deleted.insert(name, versions);
        }
        let due: Vec<String> = self
            .recovering
            .iter()
            .filter(|(_, (_, at))| *at <= now)
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            let (versions, _) = self.recovering.remove(&name).unwrap();
            self.secrets.insert(name, versions);
        }
    }

    /// Completes every running soft delete now (a test's way to end a long delete).
    pub fn finish_deletes(&mut self) {
        let now = Instant::now();
        for (_, at) in self.deleting.values_mut() {
            *at = now;
        }
        self.advance();
    }

    /// How many answers to `method` on a path starting with `path` had `status`.
    pub fn answered(&self, method: &str, path: &str, status: u16) -> usize {
        self.log
            .iter()
            .filter(|(m, p, s)| m == method && p.starts_with(path) && *s == status)
            .count()
    }
}

pub struct AzureFake {
    pub server: Server,
    pub state: Arc<Mutex<AzureState>>,
    pub ca_file: PathBuf,
}

impl AzureFake {
    pub fn vault_url(&self) -> String {
        format!("https://{AZURE_VAULT_HOST}:{}", self.server.addr.port())
    }
    pub fn authority(&self) -> String {
        format!("https://{AZURE_LOGIN_HOST}:{}", self.server.addr.port())
    }
    pub fn state(&self) -> std::sync::MutexGuard<'_, AzureState> {
        self.state.lock().unwrap()
    }

    /// `[[secrets_manager]]` `kv` on this vault, the client secret in a file under `dir`.
    pub fn manager(&self, dir: &Path, purge_on_delete: bool) -> toml::Value {
        super::table(&[
            ("id", "kv".into()),
            ("type", "azure".into()),
            ("vault_url", self.vault_url().into()),
            ("authority_host", self.authority().into()),
            ("tenant_id", AZURE_TENANT.into()),
            ("client_id", AZURE_CLIENT_ID.into()),
            (
                "client_secret",
                super::file_ref(dir, "azure-secret", AZURE_CLIENT_SECRET),
            ),
            ("ca_file", self.ca_file.display().to_string().into()),
            ("purge_on_delete", purge_on_delete.into()),
        ])
    }
}

/// Key Vault's conflict: the generic `Conflict` code, the specific one in `innererror`.
fn azure_conflict(inner: &str, message: &str) -> Response<Full<Bytes>> {
    reply(
        409,
        json!({"error": {"code": "Conflict", "message": message, "innererror": {"code": inner}}}),
    )
}

/// Key Vault's answer to an identity without the permission (RBAC).
fn azure_forbidden(action: &str) -> Response<Full<Bytes>> {
    reply(
        403,
        json!({"error": {"code": "Forbidden",
            "message": format!("Caller is not authorized to perform action on resource.\r\nAction: 'Microsoft.KeyVault/vaults/secrets/{action}/action'"),
            "innererror": {"code": "ForbiddenByRbac"}}}),
    )
}

fn azure_error(status: u16, code: &str, message: &str) -> Response<Full<Bytes>> {
    reply(status, json!({"error": {"code": code, "message": message}}))
}

fn azure_bundle(host: &str, name: &str, v: &AzureVersion) -> Value {
    json!({
        "value": v.1,
        "id": format!("https://{host}/secrets/{name}/{}", v.0),
        "contentType": v.2,
        "attributes": {"enabled": true, "created": v.3, "updated": v.3,
                       "recoveryLevel": "Recoverable+Purgeable", "recoverableDays": 90},
        "tags": {"managed-by": "credproxy"},
    })
}

/// A deleted secret as Key Vault describes it: the latest version's bundle without its value,
/// with where to recover it and when it will be purged on its own.
fn azure_deleted_bundle(host: &str, name: &str, last: &AzureVersion) -> Value {
    let mut bundle = azure_bundle(host, name, last);
    bundle["recoveryId"] = json!(format!("https://{host}/deletedsecrets/{name}"));
    bundle["deletedDate"] = json!(now());
    bundle["scheduledPurgeDate"] = json!(now() + 90 * 86400);
    bundle.as_object_mut().unwrap().remove("value");
    bundle
}

fn azure_handle(state: &Mutex<AzureState>, port: u16, call: Call) -> Response<Full<Bytes>> {
    let mut s = state.lock().unwrap();
    s.advance();
    let (method, path) = (call.method.clone(), call.path.clone());
    let vault = call
        .header("host")
        .is_some_and(|h| h.starts_with(AZURE_VAULT_HOST));
    let response = azure_answer(&mut s, port, call);
    if vault {
        s.log.push((method, path, response.status().as_u16()));
    }
    response
}

fn azure_answer(s: &mut AzureState, port: u16, call: Call) -> Response<Full<Bytes>> {
    let host_header = call.header("host").unwrap_or_default().to_owned();
    // Entra ID token endpoint.
    if host_header.starts_with(AZURE_LOGIN_HOST) {
        let form: BTreeMap<String, String> = url::form_urlencoded::parse(&call.body)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let ok = call.method == "POST"
            && call.path == format!("/{AZURE_TENANT}/oauth2/v2.0/token")
            && form.get("grant_type").map(String::as_str) == Some("client_credentials")
            && form.get("client_id").map(String::as_str) == Some(AZURE_CLIENT_ID)
            && form.get("client_secret").map(String::as_str) == Some(AZURE_CLIENT_SECRET)
            && form.get("scope").map(String::as_str) == Some("https://vault.localhost/.default");
        if !ok {
            return reply(
                400,
                json!({"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret provided."}),
            );
        }
        s.token_requests += 1;
        let token = format!("entra-{}", hex32());
        s.issued_token = Some(token.clone());
        return reply(
            200,
            json!({"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": token}),
        );
    }
    if !host_header.starts_with(AZURE_VAULT_HOST) {
        return azure_error(400, "BadParameter", "unknown host");
    }
    // The bearer challenge: no (or a wrong) token gets 401 with where to get one.
    let bearer = call
        .header("authorization")
        .and_then(|a| a.strip_prefix("Bearer "));
    if bearer.is_none() || bearer != s.issued_token.as_deref() {
        s.challenges += 1;
        let mut r = azure_error(
            401,
            "Unauthorized",
            "AKV10000: Request is missing a Bearer or PoP token.",
        );
        r.headers_mut().insert(
            "www-authenticate",
            format!("Bearer authorization=\"https://{AZURE_LOGIN_HOST}:{port}/{AZURE_TENANT}\", resource=\"https://vault.localhost\"")
                .parse()
                .unwrap(),
        );
        return r;
    }
    if call.query.get("api-version").map(String::as_str) != Some(AZURE_API_VERSION) {
        return azure_error(
            400,
            "BadParameter",
            "The api-version is missing or not supported.",
        );
    }
    if s.throttle_next > 0 {
        s.throttle_next -= 1;
        s.throttled += 1;
        let mut r = azure_error(
            429,
            "Throttled",
            "Operations per second exceeded the vault's limit.",
        );
        r.headers_mut().insert("retry-after", "1".parse().unwrap());
        return r;
    }
    let valid_name = |n: &str| {
        !n.is_empty() && n.len() <= 127 && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    let host = format!("{AZURE_VAULT_HOST}:{port}");
    let segments: Vec<&str> = call.path.trim_start_matches('/').split('/').collect();
    match (call.method.as_str(), segments.as_slice()) {
        ("PUT", ["secrets", name]) => {
            if !valid_name(name) {
                return azure_error(
                    400,
                    "BadParameter",
                    "The request URI contains an invalid name",
                );
            }
            if s.deleting.contains_key(*name) {
                return azure_conflict("ObjectIsBeingDeleted", &format!("Secret {name} is currently being deleted and cannot be re-created; retry later."));
            }
            if s.deleted.contains_key(*name) {
                return azure_conflict("ObjectIsDeletedButRecoverable", &format!("Secret {name} is currently in a deleted but recoverable state, and its name cannot be reused; in this state, the secret can only be recovered or purged."));
            }
            if s.recovering.contains_key(*name) {
                return azure_conflict("ObjectIsBeingRecovered", &format!("Secret {name} is currently being recovered and cannot be re-created; retry later."));
            }
            let Some(body) = call.json() else {
                return azure_error(400, "BadParameter", "The request body is not valid JSON.");
            };
            let Some(value) = body["value"].as_str() else {
                return azure_error(400, "BadParameter", "Property value is required.");
            };
            if body
                .as_object()
                .unwrap()
                .keys()
                .any(|k| !["value", "contentType", "tags", "attributes"].contains(&k.as_str()))
            {
                return azure_error(400, "BadParameter", "Unknown property.");
            }
            let version = (
                hex32(),
                value.to_owned(),
                body["contentType"].as_str().map(str::to_owned),
                now(),
            );
            let bundle = azure_bundle(&host, name, &version);
            s.secrets.entry(name.to_string()).or_default().push(version);
            reply(200, bundle)
        }
        ("GET", ["secrets", name, version]) => {
            let Some(versions) = s.secrets.get(*name) else {
                return azure_error(
                    404,
                    "SecretNotFound",
                    &format!("A secret with (name/id) {name} was not found in this key vault."),
                );
            };
            let found = if version.is_empty() {
                versions.last()
            } else {
                versions.iter().find(|v| v.0 == *version)
            };
            match found {
                Some(v) => reply(200, azure_bundle(&host, name, v)),
                None => azure_error(
                    404,
                    "SecretNotFound",
                    "A secret with (name/id) was not found in this key vault.",
                ),
            }
        }
        ("GET", ["secrets"]) => {
            let size: usize = call
                .query
                .get("maxresults")
                .and_then(|m| m.parse().ok())
                .unwrap_or(s.page_size.max(1))
                .min(25);
            let skip: usize = call
                .query
                .get("$skiptoken")
                .and_then(|t| t.parse().ok())
                .unwrap_or(0);
            let names: Vec<&String> = s.secrets.keys().collect();
            let page: Vec<Value> = names
                .iter()
                .skip(skip)
                .take(size)
                .map(|n| {
                    let last = s.secrets[*n].last().unwrap();
                    json!({"id": format!("https://{host}/secrets/{n}"), "contentType": last.2,
                           "attributes": {"enabled": true, "created": last.3, "updated": last.3}})
                })
                .collect();
            let next = (skip + size < names.len()).then(|| {
                format!("https://{host}/secrets?api-version={AZURE_API_VERSION}&$skiptoken={}&maxresults={size}", skip + size)
            });
            reply(200, json!({"value": page, "nextLink": next}))
        }
        ("DELETE", ["secrets", name]) => {
            if s.deleting.contains_key(*name) {
                return azure_conflict(
                    "ObjectIsBeingDeleted",
                    "Secret is currently being deleted.",
                );
            }
            let Some(versions) = s.secrets.remove(*name) else {
                return azure_error(
                    404,
                    "SecretNotFound",
                    "A secret with (name/id) was not found in this key vault.",
                );
            };
            let bundle = azure_deleted_bundle(&host, name, versions.last().unwrap());
            let done = Instant::now() + s.delete_delay;
            s.deleting.insert(name.to_string(), (versions, done));
            s.advance();
            reply(200, bundle)
        }
        ("GET", ["deletedsecrets", name]) => match s.deleted.get(*name) {
            Some(versions) => reply(
                200,
                azure_deleted_bundle(&host, name, versions.last().unwrap()),
            ),
            None => azure_error(404, "SecretNotFound", "Deleted Secret not found"),
        },
        // Purge.
        ("DELETE", ["deletedsecrets", name]) => {
            if s.forbidden.contains("purge") {
                return azure_forbidden("purge");
            }
            if s.deleting.contains_key(*name) {
                return azure_conflict(
                    "ObjectIsBeingDeleted",
                    "Secret is currently being deleted.",
                );
            }
            match s.deleted.remove(*name) {
                Some(_) => {
                    let mut r = Response::new(Full::new(Bytes::new()));
                    *r.status_mut() = StatusCode::NO_CONTENT;
                    r
                }
                None => azure_error(404, "SecretNotFound", "Deleted Secret not found"),
            }
        }
        ("POST", ["deletedsecrets", name, "recover"]) => {
            if s.forbidden.contains("recover") {
                return azure_forbidden("recover");
            }
            if s.deleting.contains_key(*name) {
                return azure_conflict(
                    "ObjectIsBeingDeleted",
                    "Secret is currently being deleted.",
                );
            }
            let Some(versions) = s.deleted.remove(*name) else {
                return azure_error(404, "SecretNotFound", "Deleted Secret not found");
            };
            let mut bundle = azure_bundle(&host, name, versions.last().unwrap());
            bundle.as_object_mut().unwrap().remove("value");
            let done = Instant::now() + s.recover_delay;
            s.recovering.insert(name.to_string(), (versions, done));
            s.advance();
            reply(200, bundle)
        }
        _ => azure_error(400, "BadParameter", "The request URI is not supported."),
    }
}

/// Starts the Key Vault fake; `dir` receives the test CA's PEM.
pub async fn azure(dir: &Path) -> AzureFake {
    let (tls, ca_pem) = test_tls(&[AZURE_VAULT_HOST, AZURE_LOGIN_HOST]);
    let ca_file = dir.join("azure-test-ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let state = Arc::new(Mutex::new(AzureState {
        page_size: 2,
        ..Default::default()
    }));
    let port_cell = Arc::new(std::sync::OnceLock::<u16>::new());
    let handler: Handler = {
        let (state, port_cell) = (Arc::clone(&state), Arc::clone(&port_cell));
        Arc::new(move |call| azure_handle(&state, *port_cell.get().unwrap(), call))
    };
    let server = serve(handler, Some(tls)).await;
    port_cell.set(server.addr.port()).unwrap();
    AzureFake {
        server,
        state,
        ca_file,
    }
}

// =============================================================================================
// Google Secret Manager
// =============================================================================================

pub const GCP_PROJECT: &str = "credproxy-test";
const GCP_CLIENT_EMAIL: &str = "credproxy-test@credproxy-test.iam.gserviceaccount.com";

#[derive(Default)]
pub struct GcpVersion {
    pub data: Vec<u8>,
    pub destroyed: bool,
}

#[derive(Default)]
pub struct GcpState {
    pub secrets: BTreeMap<String, Vec<GcpVersion>>,
    pub throttle_next: usize,
    pub throttled: usize,
    pub authenticated: usize,
    pub page_size: usize,
}

pub struct GcpFake {
    pub server: Server,
    pub state: Arc<Mutex<GcpState>>,
    /// A service-account JSON key made for this run; the fake verifies its signatures.
    pub key_file: PathBuf,
}

impl GcpFake {
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.server.addr.port())
    }
    pub fn state(&self) -> std::sync::MutexGuard<'_, GcpState> {
        self.state.lock().unwrap()
    }
}

fn gcp_error(code: u16, status: &str, message: &str) -> Response<Full<Bytes>> {
    reply(
        code,
        json!({"error": {"code": code, "message": message, "status": status}}),
    )
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Checks a self-signed service-account JWT: RS256 over header.claims by our key, issued by
/// our client email, for Secret Manager's scope, not expired.
fn gcp_token_ok(token: &str, public_key: &[u8]) -> bool {
    let url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let parts: Vec<&str> = token.split('.').collect();
    let [header, claims, signature] = parts.as_slice() else {
        return false;
    };
    let Ok(signature) = url.decode(signature) else {
        return false;
    };
    let key = ring::signature::UnparsedPublicKey::new(
        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        public_key,
    );
    if key
        .verify(format!("{header}.{claims}").as_bytes(), &signature)
        .is_err()
    {
        return false;
    }
    let Some(claims) = url
        .decode(claims)
        .ok()
        .and_then(|c| serde_json::from_slice::<Value>(&c).ok())
    else {
        return false;
    };
    let scoped = claims["scope"]
        .as_str()
        .is_some_and(|s| s.contains("https://www.googleapis.com/auth/cloud-platform"))
        || claims["aud"]
            .as_str()
            .is_some_and(|a| a.contains("secretmanager"));
    claims["iss"] == GCP_CLIENT_EMAIL && scoped && claims["exp"].as_i64().unwrap_or(0) > now()
}

fn gcp_handle(state: &Mutex<GcpState>, public_key: &[u8], call: Call) -> Response<Full<Bytes>> {
    let mut s = state.lock().unwrap();
    let token = call
        .header("authorization")
        .and_then(|a| a.strip_prefix("Bearer "))
        .unwrap_or_default();
    if !gcp_token_ok(token, public_key) {
        return gcp_error(
            401,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials.",
        );
    }
    s.authenticated += 1;
    if s.throttle_next > 0 {
        s.throttle_next -= 1;
        s.throttled += 1;
        return gcp_error(
            429,
            "RESOURCE_EXHAUSTED",
            "Quota exceeded for quota metric 'Access requests'.",
        );
    }
    let prefix = format!("/v1/projects/{GCP_PROJECT}/secrets");
    let Some(rest) = call.path.strip_prefix(&prefix) else {
        return gcp_error(
            404,
            "NOT_FOUND",
            "The requested project was not found or is not accessible.",
        );
    };
    let valid_id = |id: &str| {
        !id.is_empty()
            && id.len() <= 255
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    let secret_name = |id: &str| format!("projects/{GCP_PROJECT}/secrets/{id}");
    match (call.method.as_str(), rest) {
        ("POST", "") => {
            let id = call.query.get("secretId").cloned().unwrap_or_default();
            if !valid_id(&id) {
                return gcp_error(
                    400,
                    "INVALID_ARGUMENT",
                    "Secret id must match [a-zA-Z_0-9-]{1,255}.",
                );
            }
            let Some(body) = call.json() else {
                return gcp_error(400, "INVALID_ARGUMENT", "Invalid JSON payload.");
            };
            if body["replication"].is_null() {
                return gcp_error(400, "INVALID_ARGUMENT", "Secret.replication is required.");
            }
            if s.secrets.contains_key(&id) {
                return gcp_error(
                    409,
                    "ALREADY_EXISTS",
                    &format!("Secret [{}] already exists.", secret_name(&id)),
                );
            }
            s.secrets.insert(id.clone(), Vec::new());
            reply(
                200,
                json!({"name": secret_name(&id), "replication": {"automatic": {}},
                              "createTime": "2026-11-29T00:00:00Z", "etag": "\"1\""}),
            )
        }
        ("GET", "") => {
            let size: usize = call
                .query
                .get("pageSize")
                .and_then(|p| p.parse().ok())
                .unwrap_or(25)
                .min(s.page_size.max(1));
            let skip: usize = call
                .query
                .get("pageToken")
                .and_then(|t| t.parse().ok())
                .unwrap_or(0);
            let ids: Vec<&String> = s.secrets.keys().collect();
            let page: Vec<Value> = ids
                .iter()
                .skip(skip)
                .take(size)
                .map(|id| {
                    json!({"name": secret_name(id), "createTime": "2026-11-29T00:00:00Z",
                                 "replication": {"automatic": {}}})
                })
                .collect();
            let mut out = json!({"secrets": page, "totalSize": ids.len()});
            if skip + size < ids.len() {
                out["nextPageToken"] = json!((skip + size).to_string());
            }
            reply(200, out)
        }
        ("DELETE", id) => {
            let id = id.trim_start_matches('/');
            match s.secrets.remove(id) {
                Some(_) => reply(200, json!({})),
                None => gcp_error(
                    404,
                    "NOT_FOUND",
                    &format!("Secret [{}] not found.", secret_name(id)),
                ),
            }
        }
        ("POST", rest) if rest.ends_with(":addVersion") => {
            let id = rest.trim_start_matches('/').trim_end_matches(":addVersion");
            let Some(body) = call.json() else {
                return gcp_error(400, "INVALID_ARGUMENT", "Invalid JSON payload.");
            };
            let Some(data) = body["payload"]["data"]
                .as_str()
                .and_then(|d| base64::engine::general_purpose::STANDARD.decode(d).ok())
            else {
                return gcp_error(400, "INVALID_ARGUMENT", "Payload data is required.");
            };
            let checksum = match &body["payload"]["dataCrc32c"] {
                Value::String(s) => s.parse::<u64>().ok(),
                Value::Number(n) => n.as_u64(),
                _ => None,
            };
            if let Some(sum) = checksum {
                if sum != crc32c::crc32c(&data) as u64 {
                    return gcp_error(
                        400,
                        "INVALID_ARGUMENT",
                        "Checksum mismatch: data_crc32c does not match the payload.",
                    );
                }
            }
            let Some(versions) = s.secrets.get_mut(id) else {
                return gcp_error(
                    404,
                    "NOT_FOUND",
                    &format!("Secret [{}] not found or has no versions.", secret_name(id)),
                );
            };
            versions.push(GcpVersion {
                data,
                destroyed: false,
            });
            let n = versions.len();
            reply(
                200,
                json!({"name": format!("{}/versions/{n}", secret_name(id)), "state": 1,
                              "createTime": "2026-11-29T00:00:00Z"}),
            )
        }
        (method, rest) if rest.contains("/versions/") => {
            let (id, version) = rest
                .trim_start_matches('/')
                .split_once("/versions/")
                .unwrap();
            let (version, verb) = version.split_once(':').unwrap_or((version, ""));
            let Some(versions) = s.secrets.get_mut(id) else {
                return gcp_error(
                    404,
                    "NOT_FOUND",
                    &format!("Secret [{}] not found or has no versions.", secret_name(id)),
                );
            };
            let index = if version == "latest" {
                versions.iter().rposition(|v| !v.destroyed)
            } else {
                version
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n >= 1 && *n <= versions.len())
                    .map(|n| n - 1)
            };
            let Some(index) = index else {
                return gcp_error(404, "NOT_FOUND", "Secret Version not found.");
            };
            let name = format!("{}/versions/{}", secret_name(id), index + 1);
            match (method, verb) {
                ("GET", "access") => {
                    if versions[index].destroyed {
                        return gcp_error(
                            400,
                            "FAILED_PRECONDITION",
                            &format!("{name} is in DESTROYED state."),
                        );
                    }
                    let data = &versions[index].data;
                    reply(
                        200,
                        json!({"name": name, "payload": {"data": b64(data),
                                      "dataCrc32c": (crc32c::crc32c(data) as u64).to_string()}}),
                    )
                }
                ("POST", "destroy") => {
                    versions[index].destroyed = true;
                    versions[index].data.clear();
                    reply(200, json!({"name": name, "state": 3}))
                }
                _ => gcp_error(404, "NOT_FOUND", "Unknown method."),
            }
        }
        _ => gcp_error(404, "NOT_FOUND", "Unknown method."),
    }
}

/// Starts the Secret Manager fake with a fresh service-account key (written to `dir`).
pub async fn gcp(dir: &Path) -> GcpFake {
    let pem = dir.join("gcp-sa.pem");
    let der = dir.join("gcp-sa.pub.der");
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl is needed to make a test service-account key");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        pem.to_str().unwrap(),
    ]);
    run(&[
        "rsa",
        "-in",
        pem.to_str().unwrap(),
        "-RSAPublicKey_out",
        "-outform",
        "DER",
        "-out",
        der.to_str().unwrap(),
    ]);
    let key_file = dir.join("gcp-sa.json");
    std::fs::write(
        &key_file,
        json!({
            "type": "service_account",
            "project_id": GCP_PROJECT,
            "private_key_id": "0123456789abcdef0123456789abcdef01234567",
            "private_key": std::fs::read_to_string(&pem).unwrap(),
            "client_email": GCP_CLIENT_EMAIL,
            "client_id": "100000000000000000001",
            "token_uri": "https://oauth2.googleapis.com/token",
            "universe_domain": "googleapis.com",
        })
        .to_string(),
    )
    .unwrap();
    let public_key = std::fs::read(&der).unwrap();
    let state = Arc::new(Mutex::new(GcpState {
        page_size: 2,
        ..Default::default()
    }));
    let handler: Handler = {
        let state = Arc::clone(&state);
        Arc::new(move |call| gcp_handle(&state, &public_key, call))
    };
    GcpFake {
        server: serve(handler, None).await,
        state,
        key_file,
    }
}

// =============================================================================================
// Composio
// =============================================================================================

pub const COMPOSIO_API_KEY: &str = "CANARY-composio-api-key-2b9e";

#[derive(Default)]
pub struct ComposioState {
    pub accounts: BTreeMap<String, Value>,
    pub requests: usize,
    pub page_size: usize,
    /// The API versions the requests used (`v3`, `v3.1`), in order.
    pub versions: Vec<String>,
}

pub struct ComposioFake {
    pub server: Server,
    pub state: Arc<Mutex<ComposioState>>,
}

impl ComposioFake {
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.server.addr.port())
    }
    pub fn state(&self) -> std::sync::MutexGuard<'_, ComposioState> {
        self.state.lock().unwrap()
    }
    /// Adds or replaces a connected account.
    pub fn account(&self, id: &str, status: &str, scheme: &str, val: Value) {
        self.state().accounts.insert(
            id.to_owned(),
            json!({
                "id": id,
                "toolkit": {"slug": "github"},
                "auth_config": {"id": "ac_test", "auth_scheme": scheme, "is_composio_managed": false},
                "user_id": "user-1",
                "status": status,
                "created_at": "2026-11-29T00:00:00.000Z",
                "updated_at": format!("2026-11-29T00:00:{:02}.000Z", now() % 60),
                "state": {"authScheme": scheme, "val": val},
                "is_disabled": false,
            }),
        );
    }
}

fn composio_error(status: u16, slug: &str, message: &str) -> Response<Full<Bytes>> {
    reply(
        status,
        json!({"error": {"message": message, "code": status, "slug": slug, "status": status}}),
    )
}

fn composio_handle(state: &Mutex<ComposioState>, call: Call) -> Response<Full<Bytes>> {
    let mut s = state.lock().unwrap();
    s.requests += 1;
    if call.header("x-api-key") != Some(COMPOSIO_API_KEY) {
        return composio_error(401, "Unauthorized", "Invalid API key");
    }
    if call.method != "GET" {
        return composio_error(405, "MethodNotAllowed", "Method not allowed");
    }
    // Both the current API (v3.1) and v3 serve connected accounts the same way.
    let (version, rest) = match (
        call.path.strip_prefix("/api/v3.1/"),
        call.path.strip_prefix("/api/v3/"),
    ) {
        (Some(rest), _) => ("v3.1", rest),
        (None, Some(rest)) => ("v3", rest),
        (None, None) => return composio_error(404, "NotFound", "Route not found"),
    };
    s.versions.push(version.to_owned());
    match rest.strip_prefix("connected_accounts") {
        Some("") => {
            let limit: usize = call
                .query
                .get("limit")
                .and_then(|l| l.parse().ok())
                .unwrap_or(20)
                .min(s.page_size.max(1));
            let skip: usize = call
                .query
                .get("cursor")
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let items: Vec<Value> = s
                .accounts
                .values()
                .skip(skip)
                .take(limit)
                .map(|a| {
                    let mut a = a.clone();
                    a.as_object_mut().unwrap().remove("state");
                    a
                })
                .collect();
            let next = (skip + limit < s.accounts.len()).then(|| (skip + limit).to_string());
            reply(
                200,
                json!({"items": items, "next_cursor": next, "total_pages": s.accounts.len().div_ceil(limit)}),
            )
        }
        Some(id) => match s.accounts.get(id.trim_start_matches('/')) {
            Some(a) => reply(200, a.clone()),
            None => composio_error(
                404,
                "ConnectedAccount_NotFound",
                "Connected account not found",
            ),
        },
        None => composio_error(404, "NotFound", "Route not found"),
    }
}

pub async fn composio() -> ComposioFake {
    let state = Arc::new(Mutex::new(ComposioState {
        page_size: 2,
        ..Default::default()
    }));
    let handler: Handler = {
        let state = Arc::clone(&state);
        Arc::new(move |call| composio_handle(&state, call))
    };
    ComposioFake {
        server: serve(handler, None).await,
        state,
    }
}

// =============================================================================================
// A webhook receiver
// =============================================================================================

pub const WEBHOOK_SECRET: &str = "CANARY-webhook-secret-7c3d";

/// What a receiver of credproxy's events saw. It checks every delivery's signature the way a
/// platform would (HMAC-SHA256 of `<t>.<body>` under the shared secret, `t` within 5 minutes).
#[derive(Default)]
pub struct ReceiverState {
    /// Attempts per event id, answered or not.
    pub attempts: BTreeMap<String, usize>,
    /// Every document answered 2xx, in arrival order (a redelivered event appears again).
    pub accepted: Vec<Value>,
    /// Deliveries whose signature, timestamp or body did not check out (answered 401).
    pub refused: usize,
    /// Answer 500 to the first this many attempts at each event.
    pub fail_first: usize,
    /// Answer 500 to everything.
    pub down: bool,
    /// Every body received, for leak checks.
    pub bodies: Vec<Bytes>,
}

pub struct Receiver {
    pub server: Server,
    pub state: Arc<Mutex<ReceiverState>>,
}

impl Receiver {
    pub fn url(&self) -> String {
        format!(
            "http://127.0.0.1:{}/credproxy/events",
            self.server.addr.port()
        )
    }
    pub fn state(&self) -> std::sync::MutexGuard<'_, ReceiverState> {
        self.state.lock().unwrap()
    }
    /// How many times each event id was answered 2xx.
    pub fn accepted_ids(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for doc in &self.state().accepted {
            *out.entry(doc["id"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
        out
    }
    /// The accepted documents of one type, first acceptance of each id.
    pub fn accepted_of(&self, kind: &str) -> Vec<Value> {
        let mut seen = BTreeSet::new();
        self.state()
            .accepted
            .iter()
            .filter(|d| d["type"] == kind && seen.insert(d["id"].as_str().unwrap().to_owned()))
            .cloned()
            .collect()
    }
}

fn signed_correctly(call: &Call, secret: &str) -> bool {
    let Some(header) = call.header("credproxy-signature") else {
        return false;
    };
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => v1 = Some(v.to_owned()),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    if (now() - t).abs() > 300 {
        return false;
    }
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut signed = format!("{t}.").into_bytes();
    signed.extend_from_slice(&call.body);
    let Some(tag) = (0..v1.len())
        .step_by(2)
        .map(|i| {
            v1.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
    else {
        return false;
    };
    ring::hmac::verify(&key, &signed, &tag).is_ok()
}

/// A webhook receiver answering 500 to the first `fail_first` attempts at each event.
pub async fn webhook_receiver(fail_first: usize) -> Receiver {
    let state = Arc::new(Mutex::new(ReceiverState {
        fail_first,
        ..Default::default()
    }));
    let handler: Handler = {
        let state = Arc::clone(&state);
        Arc::new(move |call: Call| {
            let mut s = state.lock().unwrap();
            s.bodies.push(call.body.clone());
            let doc = call.json();
            let id = doc
                .as_ref()
                .and_then(|d| d["id"].as_str().map(str::to_owned));
            let (Some(doc), Some(id)) = (doc, id) else {
                s.refused += 1;
                return reply(400, json!({"error": "not an event"}));
            };
            if call.method != "POST"
                || call.header("credproxy-event-id") != Some(id.as_str())
                || !signed_correctly(&call, WEBHOOK_SECRET)
            {
                s.refused += 1;
                return reply(401, json!({"error": "bad signature"}));
            }
            let n = {
                let n = s.attempts.entry(id).or_default();
                *n += 1;
                *n
            };
            if s.down || n <= s.fail_first {
                return reply(500, json!({"error": "try again"}));
            }
            s.accepted.push(doc);
            reply(200, json!({"ok": true}))
        })
    };
    Receiver {
        server: serve(handler, None).await,
        state,
    }
}
