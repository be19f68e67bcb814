//! Hostname normalisation and validation: the one place that decides what a domain is.
//!
//! Used by the store (keys, claims), the controller (CR validation) and the proxy (`Host`
//! header), so every layer agrees on what `MyApp.Tunnox.NET.:8080` means.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest hostname in presentation form (RFC 1035 §2.3.4 minus the root dot).
pub const MAX_HOSTNAME_LEN: usize = 253;
/// Longest single label (RFC 1035 §2.3.4).
pub const MAX_LABEL_LEN: usize = 63;

/// Why a string is not a hostname. Each variant says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostnameError {
    #[error("hostname is empty")]
    Empty,
    #[error("hostname {0:?} is longer than {MAX_HOSTNAME_LEN} characters")]
    TooLong(String),
    #[error("hostname {host:?} has an empty label")]
    EmptyLabel { host: String },
    #[error("hostname {host:?}: label {label:?} is longer than {MAX_LABEL_LEN} characters")]
    LabelTooLong { host: String, label: String },
    #[error("hostname {host:?}: label {label:?} starts or ends with '-'")]
    HyphenEdge { host: String, label: String },
    #[error("hostname {host:?}: character {ch:?} is not allowed (use a-z, 0-9 and '-')")]
    BadChar { host: String, ch: char },
    #[error("hostname {host:?} is not a valid internationalised name")]
    BadIdn { host: String },
    #[error("host {host:?} has an invalid port")]
    BadPort { host: String },
    #[error("host {host:?} is an IP literal, not a hostname")]
    IpLiteral { host: String },
}

impl HostnameError {
    /// Bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::TooLong(_) => "too_long",
            Self::EmptyLabel { .. } => "empty_label",
            Self::LabelTooLong { .. } => "label_too_long",
            Self::HyphenEdge { .. } => "hyphen_edge",
            Self::BadChar { .. } => "bad_char",
            Self::BadIdn { .. } => "bad_idn",
            Self::BadPort { .. } => "bad_port",
            Self::IpLiteral { .. } => "ip_literal",
        }
    }
}

/// A normalised, validated hostname: lower-case ASCII (A-labels for IDNs), no port, no
/// trailing dot, RFC 1123 labels.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hostname(Box<str>);

impl Hostname {
    /// Normalises and validates a bare hostname (no port).
    pub fn parse(input: &str) -> Result<Self, HostnameError> {
        let trimmed = input.strip_suffix('.').unwrap_or(input);
        if trimmed.is_empty() {
            return Err(HostnameError::Empty);
        }
        if trimmed.is_ascii() {
            let lower = trimmed.to_ascii_lowercase();
            validate_ascii(&lower, input)?;
            return Ok(Self(lower.into_boxed_str()));
        }
        // Invisible characters that UTS #46 would silently drop make look-alike names: refuse.
        if trimmed.chars().any(is_invisible) {
            return Err(HostnameError::BadIdn {
                host: input.to_string(),
            });
        }
        // Non-ASCII: convert to A-labels (UTS #46), then hold the result to the same rules.
        let ascii = idna::domain_to_ascii_strict(trimmed).map_err(|_| HostnameError::BadIdn {
            host: input.to_string(),
        })?;
        validate_ascii(&ascii, input)?;
        Ok(Self(ascii.into_boxed_str()))
    }

    /// Normalises an HTTP `Host` header value (or `:authority`): strips an optional port.
    pub fn from_host_header(value: &str) -> Result<Self, HostnameError> {
        if value.starts_with('[') {
            return Err(HostnameError::IpLiteral {
                host: value.to_string(),
            });
        }
        let host = match value.rsplit_once(':') {
            Some((host, port)) => {
                if !port.bytes().all(|b| b.is_ascii_digit()) || port.parse::<u16>().is_err() {
                    return Err(HostnameError::BadPort {
                        host: value.to_string(),
                    });
                }
                host
            }
            None => value,
        };
        Self::parse(host)
    }

    /// Joins `subdomain` and `base` into the full domain and validates the result.
    pub fn join(subdomain: &str, base: &str) -> Result<Self, HostnameError> {
        Self::parse(&format!("{subdomain}.{base}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when `self` is `base` or a subdomain of it.
    pub fn is_within(&self, base: &Hostname) -> bool {
        let (me, b) = (self.as_str(), base.as_str());
        me == b
            || (me.len() > b.len()
                && me.ends_with(b)
                && me.as_bytes()[me.len() - b.len() - 1] == b'.')
    }
}

/// Format and variation characters that render as nothing.
fn is_invisible(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
        | '\u{180B}'..='\u{180F}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}' | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}'
        | '\u{FFA0}' | '\u{E0000}'..='\u{E0FFF}')
}

fn validate_ascii(host: &str, original: &str) -> Result<(), HostnameError> {
    if host.len() > MAX_HOSTNAME_LEN {
        return Err(HostnameError::TooLong(original.to_string()));
    }
    for label in host.split('.') {
        if label.is_empty() {
            return Err(HostnameError::EmptyLabel {
                host: original.to_string(),
            });
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(HostnameError::LabelTooLong {
                host: original.to_string(),
                label: label.to_string(),
            });
        }
        if let Some(ch) = label
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(HostnameError::BadChar {
                host: original.to_string(),
                ch,
            });
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(HostnameError::HyphenEdge {
                host: original.to_string(),
                label: label.to_string(),
            });
        }
    }
    Ok(())
}

impl fmt::Display for Hostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Hostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hostname({})", self.0)
    }
}

impl std::str::FromStr for Hostname {
    type Err = HostnameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Hashes and compares as its text, so tables keyed by hostnames can be asked with a `&str`.
impl std::borrow::Borrow<str> for Hostname {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Hostname {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Serialize for Hostname {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Hostname {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        super::deserialize_parsed(d, Hostname::parse)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deserializes_from_text_and_from_bytes() {
        use serde::de::value::{BytesDeserializer, Error, StrDeserializer};
        let text = Hostname::deserialize(StrDeserializer::<Error>::new("A.Tunnox.net")).unwrap();
        let bytes =
            Hostname::deserialize(BytesDeserializer::<Error>::new(b"a.tunnox.net")).unwrap();
        assert_eq!(
            (text.as_str(), bytes.as_str()),
            ("a.tunnox.net", "a.tunnox.net")
        );
        assert!(Hostname::deserialize(BytesDeserializer::<Error>::new(b"\xff.net")).is_err());
        assert!(Hostname::deserialize(StrDeserializer::<Error>::new("a..net")).is_err());
    }

    #[test]
    fn normalises_valid_hostnames() {
        let cases = [
            ("myapp.tunnox.net", "myapp.tunnox.net"),
            ("MyApp.Tunnox.NET", "myapp.tunnox.net"),
            ("myapp.tunnox.net.", "myapp.tunnox.net"),
            ("a-b.c1.io", "a-b.c1.io"),
            ("localhost", "localhost"),
            ("127.0.0.1", "127.0.0.1"),
            ("bücher.example", "xn--bcher-kva.example"),
            ("ÄPFEL.tunnox.net", "xn--pfel-koa.tunnox.net"),
            ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ];
        for (input, want) in cases {
            assert_eq!(
                Hostname::parse(input).unwrap().as_str(),
                want,
                "input {input:?}"
            );
        }
    }

    #[test]
    fn rejects_invalid_hostnames() {
        let long_label = "a".repeat(64);
        let long_host = format!(
            "{}.{}.{}.{}.com",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(63)
        );
        let cases: Vec<(&str, &str)> = vec![
            ("", "empty"),
            (".", "empty"),
            ("a..b", "empty_label"),
            (".a.b", "empty_label"),
            ("a.b..", "empty_label"),
            ("my app.tunnox.net", "bad_char"),
            ("my_app.tunnox.net", "bad_char"),
            ("-app.tunnox.net", "hyphen_edge"),
            ("app-.tunnox.net", "hyphen_edge"),
            (long_label.as_str(), "label_too_long"),
            (long_host.as_str(), "too_long"),
            ("app\u{0}.net", "bad_char"),
            ("a\u{200b}b.net", "bad_idn"),
            ("bad\u{00a0}space.net", "bad_idn"),
        ];
        for (input, want) in cases {
            let err = Hostname::parse(input).expect_err(input);
            assert_eq!(err.label(), want, "input {input:?}: {err}");
        }
    }

    #[test]
    fn host_header_strips_port() {
        let ok = [
            ("myapp.tunnox.net:8080", "myapp.tunnox.net"),
            ("MYAPP.tunnox.net", "myapp.tunnox.net"),
            ("myapp.tunnox.net.:443", "myapp.tunnox.net"),
        ];
        for (input, want) in ok {
            assert_eq!(Hostname::from_host_header(input).unwrap().as_str(), want);
        }
        let bad = [
            ("myapp.tunnox.net:", "bad_port"),
            ("myapp.tunnox.net:80a", "bad_port"),
            ("myapp.tunnox.net:123456", "bad_port"),
            ("myapp.tunnox.net:65536", "bad_port"),
            ("myapp.tunnox.net:99999", "bad_port"),
            ("a:b:c", "bad_port"),
            ("[::1]:8080", "ip_literal"),
            (":80", "empty"),
        ];
        for (input, want) in bad {
            let err = Hostname::from_host_header(input).expect_err(input);
            assert_eq!(err.label(), want, "input {input:?}: {err}");
        }
    }

    #[test]
    fn within_base_domain() {
        let base = Hostname::parse("tunnox.net").unwrap();
        assert!(Hostname::parse("a.tunnox.net").unwrap().is_within(&base));
        assert!(Hostname::parse("tunnox.net").unwrap().is_within(&base));
        assert!(!Hostname::parse("eviltunnox.net").unwrap().is_within(&base));
        assert!(!Hostname::parse("tunnox.net.evil").unwrap().is_within(&base));
    }

    #[test]
    fn never_panics_on_arbitrary_input() {
        // Cheap deterministic fuzz: every byte pattern up to length 3 over an interesting alphabet.
        let alphabet = [
            "a", "-", ".", ":", "_", "Z", "9", "ü", "\u{0}", "[", " ", "\u{ffff}",
        ];
        for a in alphabet {
            for b in alphabet {
                for c in alphabet {
                    let s = format!("{a}{b}{c}");
                    let _ = Hostname::parse(&s);
                    let _ = Hostname::from_host_header(&s);
                }
            }
        }
    }

    mod fuzz {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(20_000))]

            /// Any input: no panic; an accepted name is canonical and parses to itself.
            #[test]
            fn arbitrary_input_never_panics_and_output_is_canonical(input in ".{0,300}") {
                if let Ok(h) = Hostname::parse(&input) {
                    let s = h.as_str();
                    prop_assert!(!s.is_empty() && s.len() <= MAX_HOSTNAME_LEN);
                    prop_assert!(s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'));
                    prop_assert_eq!(Hostname::parse(s).unwrap(), h.clone());
                }
                let _ = Hostname::from_host_header(&input);
            }

            /// Host-header shaped input: a valid port never changes which host is meant; a port
            /// beyond 65535 is refused.
            #[test]
            fn port_is_stripped_consistently(host in "[a-zA-Z0-9_.-]{1,70}", port in 0u32..70000) {
                let with_port = Hostname::from_host_header(&format!("{host}:{port}"));
                let want = if port <= 65535 { Hostname::parse(&host).ok() } else { None };
                prop_assert_eq!(with_port.ok(), want);
            }
        }
    }
}
