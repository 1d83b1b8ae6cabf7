//! Maps credproxy's secret names (`{prefix}{environment}/{id}`, which may hold `/`, `.`, `_`)
//! to stores whose names allow only letters, digits and dashes (Azure Key Vault; Google
//! Secret Manager also allows `_`, but one mapping serves both). Deterministic and
//! reversible: letters and digits stay, `-` becomes `--`, any other byte `-hh` (two lowercase
//! hex digits). `credproxy/Production/6f1c-…` → `credproxy-2fProduction-2f6f1c--…`.

/// The store name for `name`, or `None` if it would be longer than `max` characters.
pub fn encode(name: &str, max: usize) -> Option<String> {
    let mut out = String::with_capacity(name.len() + 8);
    for b in name.bytes() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' => out.push(b as char),
            b'-' => out.push_str("--"),
            other => out.push_str(&format!("-{other:02x}")),
        }
    }
    (!out.is_empty() && out.len() <= max).then_some(out)
}

/// The credproxy name for a store name made by `encode`; `None` for names it did not make.
pub fn decode(encoded: &str) -> Option<String> {
    if encoded.is_empty() {
        return None; // `encode` never makes the empty name
    }
    let bytes = encoded.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                out.push(b'-');
                i += 2;
            }
            b'-' => {
                let hex = encoded.get(i + 1..i + 3)?;
                // Exactly two lowercase hex digits, as `encode` writes them (`from_str_radix`
                // alone would also take `+b` or `B0`).
                if !hex.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
                    return None;
                }
                let byte = u8::from_str_radix(hex, 16).ok()?;
                if byte.is_ascii_alphanumeric() || byte == b'-' {
                    return None; // never produced by `encode`: keeps the mapping one-to-one
                }
                out.push(byte);
                i += 3;
            }
            b if b.is_ascii_alphanumeric() => {
                out.push(b);
                i += 1;
            }
            _ => return None,
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_uses_only_letters_digits_and_dashes() {
        for name in [
            "credproxy/Production/6f1c0a2e-1b2c-4d5e-8f90-0123456789ab",
            "p.x_y/Env-1/a",
            "--/..//__",
            "ünïcode/é",
            "a",
        ] {
            let e = encode(name, 255).unwrap();
            assert!(
                e.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
                "{e}"
            );
            assert_eq!(decode(&e).as_deref(), Some(name), "{e}");
            assert_eq!(encode(name, 255).unwrap(), e, "deterministic");
        }
        assert_eq!(
            encode("credproxy/Production/ab-c", 127).unwrap(),
            "credproxy-2fProduction-2fab--c"
        );
        assert_eq!(encode(&"x".repeat(128), 127), None);
        assert_eq!(encode("", 127), None);
    }

    #[test]
    fn names_it_did_not_make_do_not_decode() {
        for foreign in ["a-2F", "a-41", "a-2d", "a-", "a-z9", "a_b"] {
            assert_eq!(decode(foreign), None, "{foreign}");
        }
    }
}
