//! The configuration read in one pass without a tree of the whole file: the document's sections
//! become the small tree the rest of loading works on, and the `mappings:` list is read one entry
//! at a time: each entry becomes a small tree of YAML values, is expanded, then typed from that
//! tree exactly as the reference types it. `serde_yaml::from_str::<Value>` built a value per node
//! of the file first (at 100 000 mappings: 1.4 s and 330 MB at the peak; docs/configuration.md
//! "Large mapping lists").
//!
//! Entries are not typed straight from the parser's events: serde_yaml's event reader is looser
//! than its value reader (any scalar read as text, tags ignored, the last of duplicate keys kept),
//! so a file the reference refuses would load.
//!
//! Any failure here returns `None` and the file is read again the reference way (`load::parse`):
//! its errors, with their field paths and lines, are the ones users see.

use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_yaml::{Mapping, Value};

use super::MappingEntry;
use super::load::{Environment, expand};

/// The document's sections other than `mappings`, and the declared mappings when it has them.
pub(super) struct Read {
    pub rest: Mapping,
    pub mappings: Option<Vec<MappingEntry>>,
}

/// Reads `text`; `None` when anything in it is not what this pass reads (the reference reader
/// then reports it).
pub(super) fn read(text: &str, env: &dyn Environment) -> Option<Read> {
    Document { env }
        .deserialize(serde_yaml::Deserializer::from_str(text))
        .ok()
}

#[derive(Clone, Copy)]
struct Document<'a> {
    env: &'a dyn Environment,
}

impl<'de> DeserializeSeed<'de> for Document<'_> {
    type Value = Read;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Read, D::Error> {
        // Any: an empty document is a null, which a map request refuses.
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Document<'_> {
    type Value = Read;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a configuration mapping")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Read, E> {
        Ok(Read {
            rest: Mapping::new(),
            mappings: None,
        })
    }
    fn visit_none<E: de::Error>(self) -> Result<Read, E> {
        self.visit_unit()
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Read, A::Error> {
        let mut rest = Mapping::new();
        let mut mappings = None;
        while let Some(key) = map.next_key::<Value>()? {
            if key.as_str() == Some("mappings") {
                let entries = map.next_value_seed(Entries(self))?;
                if mappings.replace(entries).is_some() {
                    return Err(de::Error::custom("duplicate key"));
                }
            } else if rest.insert(key, map.next_value()?).is_some() {
                return Err(de::Error::custom("duplicate key"));
            }
        }
        Ok(Read { rest, mappings })
    }
}

/// The `mappings:` list, one entry at a time.
struct Entries<'a>(Document<'a>);

impl<'de> DeserializeSeed<'de> for Entries<'_> {
    type Value = Vec<MappingEntry>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Entries<'_> {
    type Value = Vec<MappingEntry>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of mappings")
    }
    /// `mappings:` with nothing after it: no mappings, as the reference reads it.
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(mut entry) = seq.next_element::<Value>()? {
            let mut path = vec![format!("mappings[{}]", out.len())];
            expand(&mut entry, &mut path, "", self.0.env).map_err(de::Error::custom)?;
            out.push(MappingEntry::deserialize(entry).map_err(de::Error::custom)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::super::load::{reference, streamed};

    /// Each document is read by both readers: what the reference reads, the streaming pass
    /// reads the same (compared as the YAML of the typed result); what the reference refuses,
    /// the streaming pass refuses too (and then the reference's error is what users see).
    #[test]
    fn the_streaming_pass_reads_what_the_reference_reads() {
        let env = vec![
            ("PORT".to_string(), "8081".to_string()),
            ("HOST".to_string(), "up.internal".to_string()),
            ("TUNNOX__PROXY__WORKER_THREADS".to_string(), "3".to_string()),
        ];
        let mapping = |extra: &str| {
            format!(
                "mappings:\n  - {{subdomain: a, base_domain: tunnox.net, target_host: h, target_port: 1{extra}}}\n"
            )
        };
        let mut docs: Vec<(String, bool)> = vec![
            ("".into(), true),
            ("# only a comment\n".into(), true),
            ("~\n".into(), true),
            (mapping(""), true),
            (mapping(", description: yes"), true),
            (mapping(", description: '0080'"), true),
            (mapping(", description: 0080"), true),
            (mapping(", description: 1_000"), true),
            (mapping(", description: '${HOST}'"), true),
            (mapping(", custom_headers: {X-A: '${HOST}-1', X-B: '2'}"), true),
            (mapping(", description: \"\\x24{HOST}\""), true),
            // serde_yaml's event reader would take each of these; its value reader refuses them.
            (mapping(", target_host: ''").replace("target_host: h, ", ""), true),
            (mapping(", target_host: ~").replace("target_host: h, ", ""), false),
            (mapping(", target_host: null").replace("target_host: h, ", ""), false),
            (mapping(", custom_headers: {X-A: a, X-A: b}"), false),
            (mapping(", description: 123"), false),
            (mapping(", description: 1.5"), false),
            (mapping(", description: true"), false),
            (mapping(", description: ~"), false),
            (mapping(", custom_headers: {X-A: 1}"), false),
            (mapping(", custom_headers: {1: a}"), false),
            (mapping(", target_client_id: 5"), false),
            (mapping(", target_tls: {ca_file: 1}"), false),
            (mapping(", target_tls: {insecure_skip_verify: !!str true}"), false),
            (mapping("").replace("target_port: 1", "target_port: !!str 80"), false),
            (mapping("").replace("target_port: 1", "target_port: !!float 80"), false),
            (mapping("").replace("subdomain: a", "subdomain: 1"), false),
            (mapping("").replace("base_domain: tunnox.net", "base_domain: 123"), false),
            ("mappings:\n  - subdomain: a\n    base_domain: tunnox.net\n    target_host:\n    target_port: 1\n".into(), false),
            ("mappings:\n  - {subdomain: a, base_domain: tunnox.net, target_host: h, target_port: 1, target_port: 2}\n".into(), false),
            ("mappings:\n  - subdomain: a\n    base_domain: tunnox.net\n    target_host: ${HOST}\n    target_port: ${PORT}\n".into(), true),
            ("mappings:\n  - &m {subdomain: a, base_domain: tunnox.net, target_host: h, target_port: 1}\n  - *m\n".into(), true),
            ("proxy: &p {worker_threads: 2}\nmappings: []\n".into(), true),
            ("proxy:\n  listen: \"127.0.0.1:${PORT}\"\n  drain: {propagation_delay: 2s}\n".into(), true),
            ("log: {level: debug, format: json}\nhttp_domain: {base_domains: [a.example, b.example]}\n".into(), true),
            ("mappings: ~\n".into(), true),
            ("mappings: {a: 1}\n".into(), false),
            ("mappings:\n  - {subdomain: a, base_domain: tunnox.net, target_host: h, target_port: 1, typo: 1}\n".into(), false),
            ("mappings:\n  - {subdomain: a, base_domain: tunnox.net, target_host: h, target_port: yes}\n".into(), false),
            ("mappings:\n  - {subdomain: a, base_domain: tunnox.net, target_host: '${NOPE}', target_port: 1}\n".into(), false),
            ("mappings:\n  - {subdomain: a, base_domain: tunnox.net, target_host: h, target_port: 1}\nmappings: []\n".into(), false),
            ("base: &b {worker_threads: 2}\nproxy: {<<: *b}\n".into(), false),
            ("proxy: !custom {worker_threads: 2}\n".into(), false),
            ("proxy: {worker_threads: 2, worker_threads: 3}\n".into(), false),
            ("storage:\n  redis: [1, 2\n".into(), false),
            ("- a\n- b\n".into(), false),
        ];
        for file in [
            "single-node.yaml",
            "single-node-tunnel.yaml",
            "cluster-redis.yaml",
        ] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("examples")
                .join(file);
            docs.push((std::fs::read_to_string(path).unwrap(), true));
        }
        for (doc, valid) in &docs {
            let by_reference = reference(doc, "t.yaml", &env);
            assert_eq!(
                by_reference.is_ok(),
                *valid,
                "{doc}: {:?}",
                by_reference.err()
            );
            let fast = streamed(doc, &env);
            match by_reference {
                Ok(config) => {
                    let fast = fast.unwrap_or_else(|| panic!("the streaming pass refused {doc}"));
                    assert_eq!(
                        serde_yaml::to_string(&fast).unwrap(),
                        serde_yaml::to_string(&config).unwrap(),
                        "{doc}"
                    );
                }
                Err(_) => assert!(fast.is_none(), "the streaming pass accepted {doc}"),
            }
        }
    }
}
