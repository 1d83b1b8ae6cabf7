//! The egress proxy's upstream URL: whatever path and query a worker sends, the URL a secret
//! goes to keeps the upstream's scheme, host and port, stays under its base path, never holds
//! a `.` or `..` segment, and carries the credential's query parameter exactly once.
//!
//! Input: the path after `/v1/proxy/{id}` on the first line, the query on the second (absent:
//! none); checked against two bases, with and without a path prefix and the `query` kind.
#![no_main]

use credproxy::fuzzing::proxy_target;
use libfuzzer_sys::fuzz_target;

const PARAMETER: &str = "cp_key";
const VALUE: &str = "s3cr&t=/?#";

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.splitn(2, '\n');
    let rest = lines.next().unwrap_or("");
    let query = lines.next();
    for base in [
        "https://api.example.com",
        "https://api.example.com:8443/v2/api",
    ] {
        let base = url::Url::parse(base).unwrap();
        let prefix = base.path().trim_end_matches('/').to_owned();
        for parameter in [None, Some((PARAMETER, VALUE))] {
            let Ok(url) = proxy_target(&base, rest, query, parameter) else {
                continue;
            };
            assert_eq!(url.scheme(), base.scheme(), "{rest:?}");
            assert_eq!(url.host_str(), base.host_str(), "{rest:?}");
            assert_eq!(url.port_or_known_default(), base.port_or_known_default());
            assert!(url.username().is_empty() && url.password().is_none());
            assert!(url.fragment().is_none(), "{url}");
            let path = url.path();
            let after = path
                .strip_prefix(prefix.as_str())
                .unwrap_or_else(|| panic!("{url}"));
            assert!(after.is_empty() || after.starts_with('/'), "{url}");
            for segment in after.split('/') {
                let decoded = percent_encoding::percent_decode_str(segment).collect::<Vec<u8>>();
                let before = decoded.split(|b| *b == b';').next().unwrap_or_default();
                assert!(before != b"." && before != b"..", "{url}");
                assert!(
                    !decoded.contains(&b'/') && !decoded.contains(&b'\\'),
                    "{url}"
                );
            }
            // Parsed again, the URL is the same URL (nothing a second parse would normalise).
            let again = url::Url::parse(url.as_str()).unwrap();
            assert_eq!(again, url);
            if parameter.is_some() {
                let values: Vec<String> = url
                    .query_pairs()
                    .filter(|(k, _)| k == PARAMETER)
                    .map(|(_, v)| v.into_owned())
                    .collect();
                assert_eq!(values, [VALUE], "{url}");
            }
        }
    }
});
