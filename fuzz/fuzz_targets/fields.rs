//! Secret-field selection on reads (`?fields=a,b`): what the response's `secrets` object holds
//! and what the audit line names.
//!
//! Input: line 1 is the query string; every further line is a secret field, `name=value`.
#![no_main]

use credproxy::fuzzing::{query, select_fields};
use credproxy::secret::{SecretFields, SecretString};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let raw_query = lines.next().unwrap_or("");
    let mut secrets = SecretFields::new();
    for line in lines {
        let (k, v) = line.split_once('=').unwrap_or((line, ""));
        secrets.insert(k, SecretString::from(v));
    }

    let (names, body) = select_fields(&secrets, Some(raw_query));
    let wanted = query(Some(raw_query)).ok().and_then(|q| q.fields);

    // The response is a JSON object of exactly the selected fields, with their values.
    let Ok(Value::Object(out)) = serde_json::from_slice::<Value>(&body) else {
        panic!("the secrets object is not a JSON object");
    };
    let keys: Vec<&String> = out.keys().collect();
    assert_eq!(
        keys,
        names.iter().collect::<Vec<_>>(),
        "the audit line names what was sent"
    );
    for (k, v) in &out {
        assert_eq!(v.as_str(), secrets.get(k).map(|s| s.expose()), "{k:?}");
    }
    // Exactly the stored fields that were asked for; all of them without `fields=`.
    let expected: Vec<&str> = secrets
        .field_names()
        .filter(|k| wanted.as_ref().is_none_or(|w| w.iter().any(|n| n == k)))
        .collect();
    assert_eq!(names, expected);
    if let Some(w) = &wanted {
        assert!(names.iter().all(|n| w.contains(n)));
    }

    // Without a selection the response is the store's own serialisation.
    let (all, body) = select_fields(&secrets, None);
    assert_eq!(all.len(), secrets.len());
    assert_eq!(body, *secrets.to_json());
    let back = SecretFields::from_json(&body).expect("the store's JSON parses");
    assert!(back == secrets);
});
