//! The row codec both backends share: which columns each record is read from, in what order,
//! how the JSON columns are coded, and how column values become records. A backend supplies
//! only typed access to one of its rows ([`Columns`]) and binds the values in its own SQL.

use super::{
    CredentialRecord, JournalEntry, JournalKind, Location, MetadataError, OAuthDescription,
    SealedRecord, SealedSummary,
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
}

/// The columns [`credential`] reads, in its order; also the insert order. `workspace` (schema
/// version 4) comes last so the older columns keep their positions.
pub(super) const CREDENTIAL_COLUMNS: &str = "id, environment, integration_type, metadata, oauth, pinned_manager, \
     store_id, store_name, store_version, expires_at, needs_reauth, row_version, created_at, updated_at, \
     workspace";

/// The columns [`journal_entry`] reads, in its order.
pub(super) const JOURNAL_COLUMNS: &str = "id, credential_id, store_id, name, created_at, kind";

/// The columns a new journal entry is written to (its id is the database's).
pub(super) const JOURNAL_INSERT_COLUMNS: &str = "credential_id, store_id, name, created_at, kind";

/// The columns [`sealed`] reads, in its order, from `local_secrets` or `oauth_pending`; also
/// the insert order.
pub(super) const SEALED_COLUMNS: &str =
    "name, version, key_id, wrapped_key, ciphertext, created_at";

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
        expires_at: row.opt_int(9)?,
        needs_reauth: row.flag(10)?,
        row_version: row.int(11)?,
        created_at: row.int(12)?,
        updated_at: row.int(13)?,
        workspace: row.text(14)?,
        id,
    })
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
        ])
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

    #[test]
    fn like_patterns_match_wildcards_literally() {
        assert_eq!(like_pattern(None), "%%");
        assert_eq!(like_pattern(Some(r"a_b%c\d")), r"%a\_b\%c\\d%");
    }
}
