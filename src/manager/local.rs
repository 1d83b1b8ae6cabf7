//! The local encrypted store: the last link of the routing chain, kept in the metadata
//! database. Each version is sealed with AES-256-GCM under its own data key; the data key is
//! wrapped by the master key. Both seals carry the record's name (which contains the
//! credential id) and version as associated data, so a row copied onto another credential or
//! version fails to open.

use std::path::Path;
use std::sync::Arc;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use async_trait::async_trait;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::{
    Capabilities, ListRequest, ManagerError, ManagerInfo, Page, PutRequest, SecretSummary,
    SecretsManager, Versioned,
};
use crate::config::LOCAL_MANAGER_ID;
use crate::metadata::{IntoSealedRows, MetadataError, SealedRecord, SealedRows};
use crate::secret::SecretFields;

const NONCE_LEN: usize = 12;
const KEY_LEN: usize = 32;
const RECORD_AAD: &[u8] = b"credproxy-local-v1\0";
const DEK_AAD: &[u8] = b"credproxy-dek-v1\0";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read master key file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error(
        "master key file {path} must hold the base64 of exactly 32 bytes (see `credproxy keygen`)"
    )]
    Format { path: String },
    #[error("master key file {path} is readable by group or others (mode {mode:o}); chmod 600 it")]
    Permissions { path: String, mode: u32 },
    #[error("cannot write master key file {path}: {reason}")]
    Write { path: String, reason: String },
}

/// A 256-bit key-encryption key and its id (a hash prefix, so the id reveals nothing).
pub struct MasterKey {
    id: String,
    key: Zeroizing<[u8; KEY_LEN]>,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl MasterKey {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        let digest = Sha256::new()
            .chain_update(b"credproxy-master-key-id\0")
            .chain_update(bytes)
            .finalize();
        let id = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        Self {
            id,
            key: Zeroizing::new(bytes),
        }
    }

    pub fn generate() -> Self {
        let mut bytes = [0u8; KEY_LEN];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        let key = Self::from_bytes(bytes);
        zeroize::Zeroize::zeroize(&mut bytes);
        key
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let shown = path.display().to_string();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let meta = std::fs::metadata(path).map_err(|e| KeyError::Read {
                path: shown.clone(),
                reason: e.kind().to_string(),
            })?;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(KeyError::Permissions { path: shown, mode });
            }
        }
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| KeyError::Read {
            path: shown.clone(),
            reason: e.kind().to_string(),
        })?);
        let decoded = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .map_err(|_| KeyError::Format {
                    path: shown.clone(),
                })?,
        );
        let bytes: [u8; KEY_LEN] = decoded
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::Format { path: shown })?;
        Ok(Self::from_bytes(bytes))
    }

    /// Writes the key as base64 to a new file with mode 0600; never overwrites.
    pub fn write_new(&self, path: &Path) -> Result<(), KeyError> {
        use std::io::Write;
        #[cfg(unix)]
        use std::os::unix::fs::OpenOptionsExt;
        let fail = |e: std::io::Error| KeyError::Write {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        options.mode(0o600);
        let mut file = options.open(path).map_err(fail)?;
        let encoded = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(*self.key));
        file.write_all(encoded.as_bytes()).map_err(fail)?;
        file.write_all(b"\n").map_err(fail)?;
        file.sync_all().map_err(fail)
    }
}

/// The current master key (which wraps new data keys) and older ones kept for unwrapping
/// until rotation has re-wrapped every row.
#[derive(Debug)]
pub struct Keyring {
    current: MasterKey,
    previous: Vec<MasterKey>,
}

impl Keyring {
    pub fn new(current: MasterKey, previous: Vec<MasterKey>) -> Self {
        Self { current, previous }
    }

    pub fn current_id(&self) -> &str {
        self.current.id()
    }

    fn find(&self, id: &str) -> Option<&MasterKey> {
        std::iter::once(&self.current)
            .chain(self.previous.iter())
            .find(|k| k.id == id)
    }
}

fn record_aad(name: &str, version: i64) -> Vec<u8> {
    let mut aad = Vec::with_capacity(RECORD_AAD.len() + name.len() + 24);
    aad.extend_from_slice(RECORD_AAD);
    aad.extend_from_slice(name.as_bytes());
    aad.push(0);
    aad.extend_from_slice(version.to_string().as_bytes());
    aad
}

fn dek_aad(record_aad: &[u8], key_id: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(DEK_AAD.len() + key_id.len() + 1 + record_aad.len());
    aad.extend_from_slice(DEK_AAD);
    aad.extend_from_slice(key_id.as_bytes());
    aad.push(0);
    aad.extend_from_slice(record_aad);
    aad
}

fn seal_with(key: &[u8; KEY_LEN], plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
    let cipher = Aes256Gcm::new(key.into());
    let mut nonce = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    // Encryption with a valid key and a Vec buffer only fails past 64 GiB of plaintext.
    let sealed = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .expect("AES-GCM encryption of a small buffer");
    let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    out
}

fn open_with(key: &[u8; KEY_LEN], sealed: &[u8], aad: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    if sealed.len() < NONCE_LEN {
        return None;
    }
    let (nonce, body) = sealed.split_at(NONCE_LEN);
    Aes256Gcm::new(key.into())
        .decrypt(Nonce::from_slice(nonce), Payload { msg: body, aad })
        .ok()
        .map(Zeroizing::new)
}

impl Keyring {
    fn seal(&self, name: &str, version: i64, plaintext: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let aad = record_aad(name, version);
        let mut dek = Zeroizing::new([0u8; KEY_LEN]);
        rand::rngs::OsRng.fill_bytes(dek.as_mut());
        let ciphertext = seal_with(&dek, plaintext, &aad);
        let wrapped = seal_with(
            &self.current.key,
            dek.as_ref(),
            &dek_aad(&aad, &self.current.id),
        );
        (wrapped, ciphertext)
    }

    fn unwrap_dek(&self, record: &SealedRecord) -> Result<Zeroizing<[u8; KEY_LEN]>, ManagerError> {
        let master = self.find(&record.key_id).ok_or_else(|| {
            ManagerError::Permanent(format!(
                "local record {} v{} is wrapped by unknown master key {}",
                record.name, record.version, record.key_id
            ))
        })?;
        let aad = record_aad(&record.name, record.version);
        let dek = open_with(
            &master.key,
            &record.wrapped_key,
            &dek_aad(&aad, &record.key_id),
        )
        .ok_or_else(|| tampered(record))?;
        let bytes: [u8; KEY_LEN] = dek.as_slice().try_into().map_err(|_| tampered(record))?;
        Ok(Zeroizing::new(bytes))
    }

    fn open(&self, record: &SealedRecord) -> Result<Zeroizing<Vec<u8>>, ManagerError> {
        let dek = self.unwrap_dek(record)?;
        open_with(
            &dek,
            &record.ciphertext,
            &record_aad(&record.name, record.version),
        )
        .ok_or_else(|| tampered(record))
    }

    /// Seals `plaintext` the way local-store versions are sealed, for other records that must
    /// never be stored in the clear (a token response awaiting write-back).
    pub fn seal_record(&self, name: &str, version: i64, plaintext: &[u8]) -> SealedRecord {
        let (wrapped_key, ciphertext) = self.seal(name, version, plaintext);
        SealedRecord {
            name: name.to_owned(),
            version,
            key_id: self.current.id.clone(),
            wrapped_key,
            ciphertext,
            created_at: crate::time::now_unix(),
        }
    }

    pub fn open_record(&self, record: &SealedRecord) -> Result<Zeroizing<Vec<u8>>, ManagerError> {
        self.open(record)
    }

    /// Re-wraps a record's data key under the current master key; the ciphertext is untouched.
    pub fn rewrap(&self, record: &SealedRecord) -> Result<SealedRecord, ManagerError> {
        let dek = self.unwrap_dek(record)?;
        let aad = record_aad(&record.name, record.version);
        Ok(SealedRecord {
            key_id: self.current.id.clone(),
            wrapped_key: seal_with(
                &self.current.key,
                dek.as_ref(),
                &dek_aad(&aad, &self.current.id),
            ),
            ..record.clone()
        })
    }
}

fn tampered(record: &SealedRecord) -> ManagerError {
    ManagerError::Permanent(format!(
        "local record {} v{} failed authentication (tampered, swapped or wrong key)",
        record.name, record.version
    ))
}

fn metadata_error(e: MetadataError) -> ManagerError {
    ManagerError::Transient(e.to_string())
}

pub struct LocalManager {
    keys: Arc<Keyring>,
    metadata: Arc<dyn SealedRows>,
}

impl LocalManager {
    pub fn new(keys: Arc<Keyring>, metadata: impl IntoSealedRows) -> Self {
        Self {
            keys,
            metadata: metadata.into_sealed_rows(),
        }
    }

    /// Re-wraps every data key still wrapped by a previous master key. Returns how many.
    pub async fn rotate(&self) -> Result<usize, ManagerError> {
        let mut done = 0;
        loop {
            let batch = self
                .metadata
                .sealed_with_other_key(self.keys.current_id(), 256)
                .await
                .map_err(metadata_error)?;
            if batch.is_empty() {
                return Ok(done);
            }
            let mut progressed = false;
            for record in &batch {
                match self.keys.rewrap(record) {
                    Ok(rewrapped) => {
                        self.metadata
                            .sealed_rewrap(&rewrapped, &record.key_id)
                            .await
                            .map_err(metadata_error)?;
                        done += 1;
                        progressed = true;
                    }
                    Err(e) => tracing::error!(error = %e, "cannot re-wrap local record"),
                }
            }
            if !progressed {
                return Err(ManagerError::Permanent(
                    "some local records are wrapped by a master key that is not configured".into(),
                ));
            }
        }
    }
}

#[async_trait]
impl SecretsManager for LocalManager {
    fn describe(&self) -> ManagerInfo {
        ManagerInfo {
            id: LOCAL_MANAGER_ID.into(),
            kind: "local",
            capabilities: Capabilities {
                read_only: false,
                compare_and_swap: true,
            },
        }
    }

    async fn get(&self, name: &str, version: Option<&str>) -> Result<Versioned, ManagerError> {
        let record = match version {
            Some(v) => {
                let v: i64 = v.parse().map_err(|_| ManagerError::NotFound)?;
                self.metadata.sealed_get(name, v).await
            }
            None => self.metadata.sealed_latest(name).await,
        }
        .map_err(metadata_error)?
        .ok_or(ManagerError::NotFound)?;
        let plaintext = self.keys.open(&record)?;
        let value = SecretFields::from_json(&plaintext)
            .map_err(|e| ManagerError::Permanent(e.to_string()))?;
        Ok(Versioned {
            value,
            version: record.version.to_string(),
            expires_in: None,
        })
    }

    async fn put(&self, request: PutRequest<'_>) -> Result<String, ManagerError> {
        let plaintext = request.value.to_json();
        // Optimistic: two writers computing the same next version collide on the primary key.
        for _ in 0..8 {
            let latest = self
                .metadata
                .sealed_latest(request.name)
                .await
                .map_err(metadata_error)?
                .map(|r| r.version);
            if let Some(expected) = request.expected_version {
                if latest.map(|v| v.to_string()).as_deref() != Some(expected) {
                    return Err(ManagerError::Conflict);
                }
            }
            let version = latest.unwrap_or(0) + 1;
            let (wrapped_key, ciphertext) = self.keys.seal(request.name, version, &plaintext);
            let record = SealedRecord {
                name: request.name.to_owned(),
                version,
                key_id: self.keys.current_id().to_owned(),
                wrapped_key,
                ciphertext,
                created_at: crate::time::now_unix(),
            };
            match self.metadata.sealed_insert(&record).await {
                Ok(()) => {
                    // Keep the previous version: a reader that resolved it just before may
                    // still ask for it.
                    self.metadata
                        .sealed_prune(request.name, version - 1)
                        .await
                        .map_err(metadata_error)?;
                    return Ok(version.to_string());
                }
                Err(MetadataError::AlreadyExists) if request.expected_version.is_some() => {
                    return Err(ManagerError::Conflict)
                }
                Err(MetadataError::AlreadyExists) => continue,
                Err(e) => return Err(metadata_error(e)),
            }
        }
        Err(ManagerError::Conflict)
    }

    async fn delete(&self, name: &str) -> Result<(), ManagerError> {
        self.metadata
            .sealed_delete(name)
            .await
            .map_err(metadata_error)
    }

    async fn list(&self, request: ListRequest) -> Result<Page, ManagerError> {
        let (items, more) = self
            .metadata
            .sealed_list(request.query.as_deref(), request.offset, request.limit)
            .await
            .map_err(metadata_error)?;
        Ok(Page {
            items: items
                .into_iter()
                .map(|s| SecretSummary {
                    id: s.name.clone(),
                    name: s.name,
                    description: format!("local encrypted store, version {}", s.latest_version),
                    created_at: Some(crate::time::from_unix(s.created_at)),
                    updated_at: Some(crate::time::from_unix(s.updated_at)),
                })
                .collect(),
            more,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::sqlite::SqliteMetadata;
    use crate::secret::SecretString;

    fn fields(v: &str) -> SecretFields {
        let mut f = SecretFields::new();
        f.insert("token", SecretString::from(v));
        f
    }

    fn setup(dir: &Path) -> (LocalManager, Arc<SqliteMetadata>) {
        let store = Arc::new(SqliteMetadata::open(&dir.join("m.db")).unwrap());
        let keys = Arc::new(Keyring::new(MasterKey::generate(), vec![]));
        (LocalManager::new(keys, store.clone()), store)
    }

    fn put<'a>(
        name: &'a str,
        value: &'a SecretFields,
        expected: Option<&'a str>,
    ) -> PutRequest<'a> {
        PutRequest {
            name,
            value,
            expected_version: expected,
            idempotency_key: "k",
        }
    }

    #[tokio::test]
    async fn versions_advance_and_old_versions_stay_readable_for_one_step() {
        let dir = tempfile::tempdir().unwrap();
        let (local, _) = setup(dir.path());
        assert_eq!(
            local.put(put("P/a", &fields("one"), None)).await.unwrap(),
            "1"
        );
        assert_eq!(
            local
                .put(put("P/a", &fields("two"), Some("1")))
                .await
                .unwrap(),
            "2"
        );
        assert_eq!(
            local
                .get("P/a", None)
                .await
                .unwrap()
                .value
                .get("token")
                .unwrap()
                .expose(),
            "two"
        );
        assert_eq!(
            local
                .get("P/a", Some("1"))
                .await
                .unwrap()
                .value
                .get("token")
                .unwrap()
                .expose(),
            "one"
        );
        let conflict = local
            .put(put("P/a", &fields("x"), Some("1")))
            .await
            .unwrap_err();
        assert!(matches!(conflict, ManagerError::Conflict));
    }

    #[tokio::test]
    async fn swapped_or_tampered_rows_fail_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let (local, store) = setup(dir.path());
        local
            .put(put("P/a", &fields("secret-a"), None))
            .await
            .unwrap();
        local
            .put(put("P/b", &fields("secret-b"), None))
            .await
            .unwrap();
        let a = store.sealed_latest("P/a").await.unwrap().unwrap();

        // Row of `a` copied under `b`'s name as a newer version: the AAD no longer matches.
        let swapped = SealedRecord {
            name: "P/b".into(),
            version: 2,
            ..a.clone()
        };
        store.sealed_insert(&swapped).await.unwrap();
        assert!(matches!(
            local.get("P/b", None).await,
            Err(ManagerError::Permanent(_))
        ));

        // A flipped ciphertext bit.
        let mut flipped = a.clone();
        flipped.version = 2;
        let mut copy = store.sealed_get("P/a", 1).await.unwrap().unwrap();
        let last = copy.ciphertext.len() - 1;
        copy.ciphertext[last] ^= 1;
        flipped.ciphertext = copy.ciphertext;
        store.sealed_insert(&flipped).await.unwrap();
        let err = local.get("P/a", Some("2")).await.unwrap_err().to_string();
        assert!(
            err.contains("failed authentication") && !err.contains("secret-a"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn rotation_rewraps_under_the_new_key_and_keeps_values() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<SqliteMetadata> =
            Arc::new(SqliteMetadata::open(&dir.path().join("m.db")).unwrap());
        let old_bytes = [7u8; 32];
        let old = Arc::new(Keyring::new(MasterKey::from_bytes(old_bytes), vec![]));
        LocalManager::new(old, store.clone())
            .put(put("P/a", &fields("v"), None))
            .await
            .unwrap();

        let rotated = Arc::new(Keyring::new(
            MasterKey::generate(),
            vec![MasterKey::from_bytes(old_bytes)],
        ));
        let new_id = rotated.current_id().to_owned();
        let local = LocalManager::new(rotated, store.clone());
        assert_eq!(local.rotate().await.unwrap(), 1);
        assert_eq!(
            store.sealed_latest("P/a").await.unwrap().unwrap().key_id,
            new_id
        );

        // Only the new key now: still readable.
        let only_new = Arc::new(Keyring::new(
            MasterKey {
                id: new_id.clone(),
                key: Zeroizing::new(*local.keys.current.key),
            },
            vec![],
        ));
        let v = LocalManager::new(only_new, store)
            .get("P/a", None)
            .await
            .unwrap();
        assert_eq!(v.value.get("token").unwrap().expose(), "v");
    }

    #[test]
    fn key_files_are_created_0600_and_loose_modes_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let key = MasterKey::generate();
        key.write_new(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(MasterKey::load(&path).unwrap().id(), key.id());
        assert!(key.write_new(&path).is_err(), "never overwrites");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            MasterKey::load(&path),
            Err(KeyError::Permissions { .. })
        ));
    }
}
