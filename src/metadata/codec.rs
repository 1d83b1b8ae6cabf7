//! The row codec both backends share: which columns each record is read from, in what order,
//! how the JSON columns are coded, and how column values become records. A backend supplies
//! only typed access to one of its rows ([`Columns`]) and binds the values in its own SQL.

use super::{
    CredentialRecord, Delivery, EventKind, EventRecord, JournalEntry, JournalKind, Location,
    ManagerRecord, ManagerSource, ManagerState, MetadataError, OAuthDescription, PurgeEntry,
    RoutingRecord, SealedRecord, SealedSummary,
};

/// Typed access to the columns of one result row, by position. A value of the wrong type is
/// the backend's error (the schema is wrong), not the corruption of one record.
pub(super) trait Columns {
    fn text(&self, i: usize) -> Result<String, MetadataError>;
    fn opt_text(&self, i: usize) -> Result<Option<String>, MetadataError>;
    fn int(&self, i: usize) -> Result<i64, MetadataError>;
    fn opt_int(&self, i: usize) -> Result<Option<i64>, MetadataError>;
    fn flag(&self, i: usize) -> Result<bool, MetadataError>;
    fn bytes(&self, i: usize) -> Result<Vec<u8>, MetadataError>;
    fn opt_bytes(&self, i: usize) -> Result<Option<Vec<u8>>, MetadataError>;
}

/// The columns [`credential`] reads, in its order; also the insert order. `workspace` (schema
/// version 4), `expires_at_ms` and `token_at_ms` (version 6) come last so the older columns keep their
/// positions.
pub(super) const CREDENTIAL_COLUMNS: &str = "id, environment, integration_type, metadata, oauth, pinned_manager, \
     store_id, store_name, store_version, expires_at, needs_reauth, row_version, created_at, updated_at, \
     workspace, expires_at_ms, token_at_ms";

/// `expires_at` as stored beside `expires_at_ms`: whole seconds, rounded down.
pub(super) fn expires_at_secs(r: &CredentialRecord) -> Option<i64> {
    r.expires_at_ms.map(|ms| ms.div_euclid(1000))
}

/// The columns [`manager`] reads, in its order; also the insert order.
pub(super) const MANAGER_COLUMNS: &str = "id, workspace, name, kind, prefix, settings, auth_keys, \
     auth_version, auth_key_id, auth_wrapped_key, auth_ciphertext, auth_created_at, \
     source, state, row_version, created_at, updated_at";

/// The columns [`routing_entry`] reads, in its order; also the insert order.
pub(super) const ROUTING_COLUMNS: &str = "workspace, environment, manager_id";

/// The columns [`journal_entry`] reads, in its order.
pub(super) const JOURNAL_COLUMNS: &str = "id, credential_id, store_id, name, created_at, kind";

/// The columns a new journal entry is written to (its id is the database's).
pub(super) const JOURNAL_INSERT_COLUMNS: &str = "credential_id, store_id, name, created_at, kind";

/// The columns [`purge_entry`] reads, in its order; also the insert order.
pub(super) const PURGE_COLUMNS: &str =
    "store_id, name, credential_id, attempts, next_at_ms, last_outcome, created_at_ms";

/// The columns [`event`] reads, in its order; after `seq`, also the insert order.
pub(super) const EVENT_COLUMNS: &str = "seq, id, type, credential_id, workspace, environment, \
     integration_type, reason, at_ms, delivery, attempts, next_at_ms, last_outcome";

/// [`EVENT_COLUMNS`] without `seq` (the database numbers events).
pub(super) const EVENT_INSERT_COLUMNS: &str = "id, type, credential_id, workspace, environment, \
     integration_type, reason, at_ms, delivery, attempts, next_at_ms, last_outcome";

/// The columns [`sealed`] reads, in its order, from `local_secrets` or `oauth_pending`; also
/// the insert order.
pub(super) const SEALED_COLUMNS: &str =
    "name, version, key_id, wrapped_key, ciphertext, created_at";

/// Every master key id something in the database is sealed under, one row each, in order.
pub(super) const SEALED_KEY_IDS: &str = "SELECT key_id FROM local_secrets \
     UNION SELECT key_id FROM oauth_pending \
     UNION SELECT auth_key_id FROM managers WHERE auth_key_id IS NOT NULL \
     ORDER BY 1";

/// The columns [`sealed_summary`] reads: one row per name of `local_secrets`.
pub(super) const SEALED_SUMMARY_COLUMNS: &str =
    "name, MAX(version), MIN(created_at), MAX(created_at)";

/// A credential's JSON-coded columns, `metadata` and `oauth`, ready to bind.
pub(super) struct CredentialJson {
    pub metadata: String,
    pub oauth: Option<String>,
}

impl CredentialJson {
    pub fn of(record: &CredentialRecord) -> Result<Self, MetadataError> {
        Ok(Self {
            metadata: json_text(&record.metadata)?,
            oauth: record.oauth.as_ref().map(json_text).transpose()?,
        })
    }
}

/// A manager's coded columns, ready to bind in [`MANAGER_COLUMNS`] order after `id, workspace,
/// name, kind, prefix` (the JSON columns, the sealed auth split into its columns, source and
/// state as stored).
pub(super) struct ManagerColumns {
    pub settings: String,
    pub auth_keys: String,
    pub auth_version: Option<i64>,
    pub auth_key_id: Option<String>,
    pub auth_wrapped_key: Option<Vec<u8>>,
    pub auth_ciphertext: Option<Vec<u8>>,
    pub auth_created_at: Option<i64>,
    pub source: &'static str,
    pub state: &'static str,
}

impl ManagerColumns {
    /// Refuses sealed auth under another name than the manager id: the name is not stored
    /// (it is the id), so it would read back as something it was not sealed under and never
    /// open again.
    pub fn of(record: &ManagerRecord) -> Result<Self, MetadataError> {
        if let Some(auth) = &record.auth {
            if auth.name != record.id {
                return Err(MetadataError::Corrupt(format!(
                    "auth of manager {} is sealed under another name",
                    record.id
                )));
            }
        }
        let auth = record.auth.as_ref();
        Ok(Self {
            settings: json_text(&record.settings)?,
            auth_keys: json_text(&record.auth_keys)?,
            auth_version: auth.map(|a| a.version),
            auth_key_id: auth.map(|a| a.key_id.clone()),
            auth_wrapped_key: auth.map(|a| a.wrapped_key.clone()),
            auth_ciphertext: auth.map(|a| a.ciphertext.clone()),
            auth_created_at: auth.map(|a| a.created_at),
            source: record.source.as_str(),
            state: record.state.as_str(),
        })
    }
}

/// The routing rows that store `record`: `(environment, manager_id)`, the default under the
/// empty environment name, which is why an environment may not be named that.
pub(super) fn routing_rows(record: &RoutingRecord) -> Result<Vec<(String, String)>, MetadataError> {
    if record.environments.contains_key("") {
        return Err(MetadataError::Corrupt(format!(
            "routing of workspace {} names an environment with an empty name",
            record.workspace
        )));
    }
    Ok(record
        .default
        .iter()
        .map(|m| (String::new(), m.clone()))
        .chain(record.environments.clone())
        .collect())
}

fn json_text<T: serde::Serialize>(v: &T) -> Result<String, MetadataError> {
    serde_json::to_string(v).map_err(|e| MetadataError::Corrupt(e.to_string()))
}

/// A row of [`CREDENTIAL_COLUMNS`]. Unreadable JSON names the column and the credential, never
/// the text: nothing secret belongs there, but nothing in an error should need that promise.
pub(super) fn credential(row: &dyn Columns) -> Result<CredentialRecord, MetadataError> {
    let id = row.text(0)?;
    let metadata = serde_json::from_str(&row.text(3)?)
        .map_err(|_| MetadataError::Corrupt(format!("metadata of {id}")))?;
    let oauth = row
        .opt_text(4)?
        .map(|o| serde_json::from_str::<OAuthDescription>(&o))
        .transpose()
        .map_err(|_| MetadataError::Corrupt(format!("oauth of {id}")))?;
    Ok(CredentialRecord {
        environment: row.text(1)?,
        integration_type: row.text(2)?,
        metadata,
        oauth,
        pinned_manager: row.opt_text(5)?,
        location: Location {
            manager_id: row.text(6)?,
            name: row.text(7)?,
            version: row.opt_text(8)?,
        },
        // Rows written before version 6 (or by hand) have only the seconds; a millisecond
        // value that does not agree with them is not trusted either.
        expires_at_ms: match (row.opt_int(9)?, row.opt_int(15)?) {
            (Some(secs), Some(ms)) if ms.div_euclid(1000) == secs => {
                Some(crate::time::clamp_unix_ms(ms))
            }
            (Some(secs), _) => Some(crate::time::clamp_unix(secs) * 1000),
            (None, _) => None,
        },
        token_at_ms: row.opt_int(16)?,
        needs_reauth: row.flag(10)?,
        row_version: row.int(11)?,
        created_at: crate::time::clamp_unix(row.int(12)?),
        updated_at: crate::time::clamp_unix(row.int(13)?),
        workspace: row.text(14)?,
        id,
    })
}

/// A row of [`MANAGER_COLUMNS`]. Like [`credential`], errors name the column and the manager,
/// never the stored text.
pub(super) fn manager(row: &dyn Columns) -> Result<ManagerRecord, MetadataError> {
    let id = row.text(0)?;
    let settings = serde_json::from_str(&row.text(5)?)
        .map_err(|_| MetadataError::Corrupt(format!("settings of manager {id}")))?;
    let auth_keys = serde_json::from_str(&row.text(6)?)
        .map_err(|_| MetadataError::Corrupt(format!("auth_keys of manager {id}")))?;
    let auth = match (
        row.opt_int(7)?,
        row.opt_text(8)?,
        row.opt_bytes(9)?,
        row.opt_bytes(10)?,
        row.opt_int(11)?,
    ) {
        (None, None, None, None, None) => None,
        (Some(version), Some(key_id), Some(wrapped_key), Some(ciphertext), Some(created_at)) => {
            Some(SealedRecord {
                name: id.clone(),
                version,
                key_id,
                wrapped_key,
                ciphertext,
                created_at,
            })
        }
        _ => {
            return Err(MetadataError::Corrupt(format!(
                "auth of manager {id} is partly missing"
            )))
        }
    };
    Ok(ManagerRecord {
        workspace: row.text(1)?,
        name: row.text(2)?,
        kind: row.text(3)?,
        prefix: row.text(4)?,
        settings,
        auth_keys,
        auth,
        source: ManagerSource::parse(&row.text(12)?)?,
        state: ManagerState::parse(&row.text(13)?)?,
        row_version: row.int(14)?,
        created_at: row.int(15)?,
        updated_at: row.int(16)?,
        id,
    })
}

/// One routing row of [`ROUTING_COLUMNS`]: `(workspace, environment, manager_id)`.
pub(super) type RoutingEntry = (String, String, String);

/// A row of [`ROUTING_COLUMNS`].
pub(super) fn routing_entry(row: &dyn Columns) -> Result<RoutingEntry, MetadataError> {
    Ok((row.text(0)?, row.text(1)?, row.text(2)?))
}

/// Routing rows in workspace order, one record per workspace.
pub(super) fn routing_records(entries: Vec<RoutingEntry>) -> Vec<RoutingRecord> {
    let mut out: Vec<RoutingRecord> = Vec::new();
    for (workspace, environment, manager_id) in entries {
        if out.last().is_none_or(|r| r.workspace != workspace) {
            out.push(RoutingRecord {
                workspace,
                ..RoutingRecord::default()
            });
        }
        let record = out.last_mut().expect("pushed above");
        if environment.is_empty() {
            record.default = Some(manager_id);
        } else {
            record.environments.insert(environment, manager_id);
        }
    }
    out
}

/// A row of [`JOURNAL_COLUMNS`].
pub(super) fn journal_entry(row: &dyn Columns) -> Result<JournalEntry, MetadataError> {
    Ok(JournalEntry {
        id: row.int(0)?,
        credential_id: row.text(1)?,
        manager_id: row.text(2)?,
        name: row.text(3)?,
        created_at: row.int(4)?,
        kind: JournalKind::parse(&row.text(5)?)?,
    })
}

/// A row of [`PURGE_COLUMNS`].
pub(super) fn purge_entry(row: &dyn Columns) -> Result<PurgeEntry, MetadataError> {
    Ok(PurgeEntry {
        manager_id: row.text(0)?,
        name: row.text(1)?,
        credential_id: row.text(2)?,
        attempts: row.int(3)?,
        next_at_ms: row.int(4)?,
        last_outcome: row.opt_text(5)?,
        created_at_ms: row.int(6)?,
    })
}

/// A row of [`EVENT_COLUMNS`].
pub(super) fn event(row: &dyn Columns) -> Result<EventRecord, MetadataError> {
    Ok(EventRecord {
        seq: row.int(0)?,
        id: row.text(1)?,
        kind: EventKind::parse(&row.text(2)?)?,
        credential_id: row.text(3)?,
        workspace: row.text(4)?,
        environment: row.text(5)?,
        integration_type: row.text(6)?,
        reason: row.text(7)?,
        at_ms: row.int(8)?,
        delivery: Delivery::parse(&row.text(9)?)?,
        attempts: row.int(10)?,
        next_at_ms: row.int(11)?,
        last_outcome: row.opt_text(12)?,
    })
}

/// A row of [`SEALED_COLUMNS`].
pub(super) fn sealed(row: &dyn Columns) -> Result<SealedRecord, MetadataError> {
    Ok(SealedRecord {
        name: row.text(0)?,
        version: row.int(1)?,
        key_id: row.text(2)?,
        wrapped_key: row.bytes(3)?,
        ciphertext: row.bytes(4)?,
        created_at: row.int(5)?,
    })
}

/// A row of [`SEALED_SUMMARY_COLUMNS`].
pub(super) fn sealed_summary(row: &dyn Columns) -> Result<SealedSummary, MetadataError> {
    Ok(SealedSummary {
        name: row.text(0)?,
        latest_version: row.int(1)?,
        created_at: row.int(2)?,
        updated_at: row.int(3)?,
    })
}

/// The pattern that makes `LIKE` match `query` anywhere in a name, literally: `\` escapes.
pub(super) fn like_pattern(query: Option<&str>) -> String {
    format!(
        "%{}%",
        query
            .unwrap_or("")
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row as plain values, for decoding without a database.
    #[derive(Clone)]
    enum Value {
        Text(String),
        Int(i64),
        Null,
    }

    fn t(s: &str) -> Value {
        Value::Text(s.to_owned())
    }

    struct Row(Vec<Value>);

    impl Columns for Row {
        fn text(&self, i: usize) -> Result<String, MetadataError> {
            match &self.0[i] {
                Value::Text(t) => Ok(t.clone()),
                _ => Err(MetadataError::Database(format!("column {i} is not text"))),
            }
        }
        fn opt_text(&self, i: usize) -> Result<Option<String>, MetadataError> {
            match self.0[i] {
                Value::Null => Ok(None),
                _ => self.text(i).map(Some),
            }
        }
        fn int(&self, i: usize) -> Result<i64, MetadataError> {
            match self.0[i] {
                Value::Int(n) => Ok(n),
                _ => Err(MetadataError::Database(format!("column {i} is not int"))),
            }
        }
        fn opt_int(&self, i: usize) -> Result<Option<i64>, MetadataError> {
            match self.0[i] {
                Value::Null => Ok(None),
                _ => self.int(i).map(Some),
            }
        }
        fn flag(&self, i: usize) -> Result<bool, MetadataError> {
            self.int(i).map(|n| n != 0)
        }
        fn bytes(&self, i: usize) -> Result<Vec<u8>, MetadataError> {
            self.text(i).map(String::into_bytes)
        }
        fn opt_bytes(&self, i: usize) -> Result<Option<Vec<u8>>, MetadataError> {
            match self.0[i] {
                Value::Null => Ok(None),
                _ => self.bytes(i).map(Some),
            }
        }
    }

    fn credential_row(metadata: Value, oauth: Value) -> Row {
        use Value::{Int, Null};
        Row(vec![
            t("c1"),
            t("Production"),
            t("github"),
            metadata,
            oauth,
            Null,
            t("local"),
            t("Production/c1"),
            t("1"),
            Null,
            Int(0),
            Int(2),
            Int(10),
            Int(11),
            t("team-a"),
            Null,
            Null,
        ])
    }

    #[test]
    fn the_expiry_is_read_to_the_millisecond_when_both_columns_agree() {
        let expiry = |secs: Value, ms: Value| {
            let mut row = credential_row(t("{}"), Value::Null);
            row.0[9] = secs;
            row.0[15] = ms;
            credential(&row).unwrap().expires_at_ms
        };
        use Value::{Int, Null};
        assert_eq!(expiry(Int(100), Int(100_250)), Some(100_250));
        // A row from before schema version 6: whole seconds.
        assert_eq!(expiry(Int(100), Null), Some(100_000));
        // Milliseconds that disagree with the seconds (the seconds written by something that
        // did not know the new column): the seconds win.
        assert_eq!(expiry(Int(200), Int(100_250)), Some(200_000));
        assert_eq!(expiry(Null, Int(100_250)), None);
    }

    #[test]
    fn a_credential_round_trips_through_its_json_columns() {
        let row = credential_row(
            t(r#"{"team":"core"}"#),
            t(r#"{"token_url":"https://t","client_id":"c"}"#),
        );
        let record = credential(&row).unwrap();
        assert_eq!(record.metadata["team"], "core");
        assert_eq!(record.oauth.as_ref().unwrap().client_id, "c");
        assert_eq!((record.row_version, record.updated_at), (2, 11));
        assert_eq!(record.workspace, "team-a");
        let json = CredentialJson::of(&record).unwrap();
        assert_eq!(json.metadata, r#"{"team":"core"}"#);
        let again = credential(&credential_row(
            Value::Text(json.metadata),
            Value::Text(json.oauth.unwrap()),
        ))
        .unwrap();
        assert_eq!(again, record);
    }

    #[test]
    fn unreadable_json_names_the_column_and_not_the_text() {
        let err = credential(&credential_row(t("canary-secret"), Value::Null)).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, MetadataError::Corrupt(_)));
        assert!(
            text.contains("metadata of c1") && !text.contains("canary"),
            "{text}"
        );
        let err = credential(&credential_row(t("{}"), t("canary"))).unwrap_err();
        assert!(err.to_string().contains("oauth of c1"), "{err}");
    }

    #[test]
    fn sealed_rows_decode_in_column_order() {
        let row = Row(vec![
            t("n"),
            Value::Int(3),
            t("k"),
            t("w"),
            t("c"),
            Value::Int(9),
        ]);
        let r = sealed(&row).unwrap();
        assert_eq!(
            (r.name.as_str(), r.version, r.key_id.as_str(), r.created_at),
            ("n", 3, "k", 9)
        );
        assert_eq!(
            (r.wrapped_key, r.ciphertext),
            (b"w".to_vec(), b"c".to_vec())
        );
    }

    #[test]
    fn a_journal_entry_of_unknown_kind_is_corrupt_not_a_copy_to_delete() {
        let row = |kind: &str| {
            Row(vec![
                Value::Int(7),
                t("c1"),
                t("local"),
                t("n"),
                Value::Int(1),
                t(kind),
            ])
        };
        let entry = journal_entry(&row("version")).unwrap();
        assert_eq!((entry.id, entry.kind), (7, JournalKind::Version));
        assert_eq!(journal_entry(&row("copy")).unwrap().kind, JournalKind::Copy);
        let err = journal_entry(&row("moved")).unwrap_err();
        assert!(matches!(err, MetadataError::Corrupt(_)), "{err}");
    }

    fn manager_record(auth: Option<SealedRecord>) -> ManagerRecord {
        ManagerRecord {
            id: "m1".into(),
            workspace: "team-a".into(),
            name: "vault".into(),
            kind: "hashicorp".into(),
            prefix: "credproxy/".into(),
            settings: serde_json::Map::from_iter([(
                "address".to_owned(),
                serde_json::json!("https://v"),
            )]),
            auth_keys: vec!["token".into()],
            auth,
            source: ManagerSource::Api,
            state: ManagerState::Retiring,
            row_version: 3,
            created_at: 5,
            updated_at: 6,
        }
    }

    /// The row a backend would store for `record`, from the codec's own columns.
    fn manager_row(record: &ManagerRecord) -> Row {
        let c = ManagerColumns::of(record).unwrap();
        let opt_t = |v: Option<String>| v.map_or(Value::Null, Value::Text);
        let opt_i = |v: Option<i64>| v.map_or(Value::Null, Value::Int);
        let opt_b = |v: Option<Vec<u8>>| {
            v.map_or(Value::Null, |b| Value::Text(String::from_utf8(b).unwrap()))
        };
        Row(vec![
            t(&record.id),
            t(&record.workspace),
            t(&record.name),
            t(&record.kind),
            t(&record.prefix),
            Value::Text(c.settings),
            Value::Text(c.auth_keys),
            opt_i(c.auth_version),
            opt_t(c.auth_key_id),
            opt_b(c.auth_wrapped_key),
            opt_b(c.auth_ciphertext),
            opt_i(c.auth_created_at),
            t(c.source),
            t(c.state),
            Value::Int(record.row_version),
            Value::Int(record.created_at),
            Value::Int(record.updated_at),
        ])
    }

    #[test]
    fn a_manager_round_trips_with_and_without_sealed_auth() {
        let sealed = SealedRecord {
            name: "m1".into(),
            version: 2,
            key_id: "k".into(),
            wrapped_key: b"wrapped".to_vec(),
            ciphertext: b"sealed".to_vec(),
            created_at: 4,
        };
        for record in [manager_record(None), manager_record(Some(sealed))] {
            assert_eq!(manager(&manager_row(&record)).unwrap(), record);
        }
    }

    #[test]
    fn sealed_auth_under_another_name_is_refused() {
        let record = manager_record(Some(SealedRecord {
            name: "other".into(),
            version: 1,
            key_id: "k".into(),
            wrapped_key: vec![],
            ciphertext: vec![],
            created_at: 1,
        }));
        let err = ManagerColumns::of(&record).err().unwrap();
        assert!(
            matches!(err, MetadataError::Corrupt(ref m) if m.contains("m1")),
            "{err}"
        );
    }

    #[test]
    fn unreadable_manager_columns_are_corrupt_and_name_the_column_only() {
        let good = manager_row(&manager_record(None));
        let with = |i: usize, v: Value| {
            let mut row = Row(good.0.clone());
            row.0[i] = v;
            row
        };
        for (i, value, column) in [
            (5, t("canary-secret"), "settings of manager m1"),
            (6, t("canary-secret"), "auth_keys of manager m1"),
            (7, Value::Int(1), "auth of manager m1 is partly missing"),
            (12, t("canary-secret"), "managers.source"),
            (13, t("canary-secret"), "managers.state"),
        ] {
            let err = manager(&with(i, value)).unwrap_err();
            let text = err.to_string();
            assert!(matches!(err, MetadataError::Corrupt(_)), "{text}");
            assert!(text.contains(column) && !text.contains("canary"), "{text}");
        }
    }

    #[test]
    fn routing_rows_group_into_one_record_per_workspace() {
        let record = RoutingRecord {
            workspace: "w1".into(),
            default: Some("local".into()),
            environments: [("Production".to_owned(), "vault".to_owned())].into(),
        };
        let rows = routing_rows(&record).unwrap();
        assert_eq!(
            rows,
            [
                (String::new(), "local".to_owned()),
                ("Production".to_owned(), "vault".to_owned())
            ]
        );
        let mut entries: Vec<RoutingEntry> = rows
            .into_iter()
            .map(|(e, m)| ("w1".to_owned(), e, m))
            .collect();
        entries.push(("w2".into(), "Staging".into(), "aws".into()));
        let records = routing_records(entries);
        assert_eq!(records.len(), 2);
        assert_eq!(records[0], record);
        assert_eq!(
            (records[1].default.as_deref(), records[1].environments.len()),
            (None, 1)
        );
        let mut bad = record;
        bad.environments.insert(String::new(), "x".into());
        assert!(matches!(routing_rows(&bad), Err(MetadataError::Corrupt(_))));
    }

    #[test]
    fn like_patterns_match_wildcards_literally() {
        assert_eq!(like_pattern(None), "%%");
        assert_eq!(like_pattern(Some(r"a_b%c\d")), r"%a\_b\%c\\d%");
    }
}
