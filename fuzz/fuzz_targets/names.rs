//! The reversible mapping of secret names to the names Azure Key Vault and Google Secret Manager
//! allow (`manager::names`), and the secret names credentials get (`Service::secret_name`).
//!
//! Input: line 1 is a name to map (and the whole input a store name to map back); lines 2-5 a
//! prefix, workspace, environment and credential id; lines 6-8 a second workspace,
//! environment and id.
#![no_main]

use credproxy::fuzzing::{decode_name, encode_name, secret_name};
use libfuzzer_sys::fuzz_target;

/// Azure Key Vault's and Google Secret Manager's name limits.
const LIMITS: [usize; 3] = [127, 255, usize::MAX];

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !s.starts_with('.')
}

/// decode(encode(x)) == x for every x that encode accepts, and the output is letters, digits
/// and dashes within the limit.
fn round_trip(name: &str) {
    let full = encode_name(name, usize::MAX);
    assert_eq!(full.is_none(), name.is_empty(), "{name:?}");
    for max in LIMITS {
        let Some(e) = encode_name(name, max) else {
            assert!(full.as_ref().is_none_or(|f| f.len() > max));
            continue;
        };
        assert_eq!(
            Some(&e),
            full.as_ref(),
            "deterministic and limit-independent"
        );
        assert!(!e.is_empty() && e.len() <= max);
        assert!(
            e.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
            "{e:?}"
        );
        assert_eq!(decode_name(&e).as_deref(), Some(name), "{e:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let lines: Vec<&str> = text.split('\n').collect();
    round_trip(lines[0]);
    round_trip(&text);

    // One-to-one: a store name decodes only if encode makes exactly that name.
    for candidate in [&*text, lines[0]] {
        if let Some(name) = decode_name(candidate) {
            assert_eq!(
                encode_name(&name, usize::MAX).as_deref(),
                Some(candidate),
                "{candidate:?} decodes to {name:?}, which maps to another store name"
            );
        }
    }

    // Secret names: valid parts make a name that maps and maps back, and different
    // credentials of one manager never share a name.
    let part = |i: usize| lines.get(i).copied().unwrap_or("");
    let (prefix, a, b) = (
        part(1),
        (part(2), part(3), part(4)),
        (part(5), part(6), part(7)),
    );
    let valid = |(w, e, i): (&str, &str, &str)| valid_name(w) && valid_name(e) && valid_name(i);
    if valid(a) {
        let name_a = secret_name(prefix, a.0, a.1, a.2);
        assert!(name_a.starts_with(prefix) && name_a.ends_with(a.2));
        round_trip(&name_a);
        if valid(b) && a != b {
            let name_b = secret_name(prefix, b.0, b.1, b.2);
            assert_ne!(name_a, name_b, "{a:?} and {b:?} share a secret name");
        }
    }
});
