//! From text to a typed [`Config`]: YAML, `${VAR}` expansion, `TUNNOX__…` environment
//! overrides, then typed deserialisation. Every error names the field path (and the line when
//! it comes from the file).

use serde_yaml::{Mapping, Value};

use super::{Config, ConfigError};

/// Environment variables that override file values: `TUNNOX__STORAGE__REDIS__ADDR=…` sets
/// `storage.redis.addr`. (Single-underscore `TUNNOX_*` names are command-line flags.)
pub const ENV_OVERRIDE_PREFIX: &str = "TUNNOX__";

/// Where configuration values come from besides the file.
pub trait Environment {
    fn var(&self, name: &str) -> Option<String>;
    fn vars(&self) -> Vec<(String, String)>;
}

/// The process environment.
pub struct ProcessEnv;

impl Environment for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
    fn vars(&self) -> Vec<(String, String)> {
        // Variables that are not UTF-8 cannot be configuration; skip them rather than panic.
        std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect()
    }
}

/// A fixed environment, for tests.
impl Environment for Vec<(String, String)> {
    fn var(&self, name: &str) -> Option<String> {
        self.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }
    fn vars(&self) -> Vec<(String, String)> {
        self.clone()
    }
}

/// Parses configuration text. `origin` names it in errors (usually the file path).
///
/// A file is read in one pass without a tree of the whole document (`stream`: the mappings
/// entry by entry); when that pass fails for any reason, the reference reader below reads it
/// again and reports what is wrong.
pub fn parse(text: &str, origin: &str, env: &dyn Environment) -> Result<Config, ConfigError> {
    match streamed(text, env) {
        Some(config) => Ok(config),
        None => reference(text, origin, env),
    }
}

/// The one-pass read, then the same expansion, overrides and typed pass as [`reference`] on the
/// sections besides `mappings` (whose entries were expanded and typed one by one). An override
/// of `mappings` itself replaces the file's list, as it does there.
pub(super) fn streamed(text: &str, env: &dyn Environment) -> Option<Config> {
    let read = super::stream::read(text, env)?;
    let mut value = Value::Mapping(read.rest);
    expand(&mut value, &mut Vec::new(), "", env).ok()?;
    apply_overrides(&mut value, "", env).ok()?;
    let overridden = value.get("mappings").is_some();
    let mut config: Config = serde::Deserialize::deserialize(value).ok()?;
    if let (false, Some(mappings)) = (overridden, read.mappings) {
        config.mappings = mappings;
    }
    Some(config)
}

/// Reads the whole file as one tree of YAML values: slower and larger than [`streamed`], but
/// its errors carry the field path and the line.
pub(super) fn reference(
    text: &str,
    origin: &str,
    env: &dyn Environment,
) -> Result<Config, ConfigError> {
    let mut value: Value = serde_yaml::from_str(text).map_err(|e| {
        let (line, column) = e.location().map(|l| (l.line(), l.column())).unzip();
        ConfigError::at(
            origin,
            "",
            format!("invalid YAML: {}", strip_location(&e.to_string())),
            line,
            column,
        )
    })?;
    if value.is_null() {
        value = Value::Mapping(Mapping::new());
    }
    expand(&mut value, &mut Vec::new(), origin, env)?;
    apply_overrides(&mut value, origin, env)?;
    serde_path_to_error::deserialize::<_, Config>(value).map_err(|e| {
        let path = e.path().to_string();
        let message = strip_location(&e.inner().to_string());
        // The typed pass ran on the expanded tree, which has no positions; find the line by
        // running the same pass on the raw text (same path means same culprit).
        let (line, column) =
            serde_path_to_error::deserialize::<_, Config>(serde_yaml::Deserializer::from_str(text))
                .err()
                .filter(|raw| raw.path().to_string() == path)
                .and_then(|raw| raw.inner().location())
                .map(|l| (l.line(), l.column()))
                .unzip();
        ConfigError::at(origin, &path, message, line, column)
    })
}

fn strip_location(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

fn join(path: &[String]) -> String {
    path.join(".")
}

/// Replaces `${VAR}` and `${VAR:-default}` in every string value. A value that is exactly one
/// reference is re-read as YAML, so `port: ${PORT}` becomes a number.
pub(super) fn expand(
    value: &mut Value,
    path: &mut Vec<String>,
    origin: &str,
    env: &dyn Environment,
) -> Result<(), ConfigError> {
    match value {
        Value::String(s) if s.contains("${") => {
            let whole = s.starts_with("${") && s.ends_with('}') && s.matches("${").count() == 1;
            let expanded = expand_str(s, env)
                .map_err(|m| ConfigError::at(origin, &join(path), m, None, None))?;
            *value = match typed_value(path, &expanded) {
                scalar @ (Value::Bool(_) | Value::Number(_)) if whole => scalar,
                _ => Value::String(expanded),
            };
        }
        Value::Mapping(map) => {
            for (k, v) in map.iter_mut() {
                path.push(k.as_str().unwrap_or("?").to_string());
                expand(v, path, origin, env)?;
                path.pop();
            }
        }
        Value::Sequence(seq) => {
            for (i, v) in seq.iter_mut().enumerate() {
                match path.last_mut() {
                    Some(last) => {
                        let base = last.clone();
                        *last = format!("{base}[{i}]");
                        expand(v, path, origin, env)?;
                        *path.last_mut().expect("non-empty") = base;
                    }
                    None => expand(v, path, origin, env)?,
                }
            }
        }
        _ => {}
    }
    Ok(())
}

pub(crate) fn expand_str(s: &str, env: &dyn Environment) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unterminated ${{ in {s:?}"))?;
        let inner = &after[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(format!("invalid variable reference ${{{inner}}}"));
        }
        match (env.var(name), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => {
                return Err(format!(
                    "environment variable {name} is not set (referenced as ${{{name}}})"
                ));
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn apply_overrides(
    root: &mut Value,
    origin: &str,
    env: &dyn Environment,
) -> Result<(), ConfigError> {
    let mut vars: Vec<(String, String)> = env
        .vars()
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_OVERRIDE_PREFIX))
        .collect();
    vars.sort();
    for (name, raw) in vars {
        let segments: Vec<String> = name[ENV_OVERRIDE_PREFIX.len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        let path = segments.join(".");
        if segments.iter().any(String::is_empty) {
            return Err(ConfigError::at(
                origin,
                &path,
                format!("environment variable {name}: empty path segment"),
                None,
                None,
            ));
        }
        let parsed = typed_value(&segments, &raw);
        let mut node = &mut *root;
        for (i, seg) in segments.iter().enumerate() {
            let Value::Mapping(map) = node else {
                return Err(ConfigError::at(
                    origin,
                    &segments[..i].join("."),
                    format!(
                        "environment variable {name}: {} is not a section",
                        segments[..i].join(".")
                    ),
                    None,
                    None,
                ));
            };
            let key = Value::String(seg.clone());
            if i + 1 == segments.len() {
                map.insert(key, parsed.clone());
                break;
            }
            node = map
                .entry(key)
                .or_insert_with(|| Value::Mapping(Mapping::new()));
        }
    }
    Ok(())
}

/// Reads a value that came from the environment for the field at `path`. Text fields keep the
/// text exactly (`ab #1`, `{tunnox}`, `0x1F` stay as written); other fields read it as YAML.
fn typed_value(path: &[String], raw: &str) -> Value {
    if is_text_field(path) {
        return Value::String(raw.to_string());
    }
    serde_yaml::from_str::<Value>(raw)
        .ok()
        .filter(|v| !matches!(v, Value::Null | Value::Tagged(_)))
        .unwrap_or_else(|| Value::String(raw.to_string()))
}

/// True when the default configuration holds a string (or an unset optional) at `path`.
fn is_text_field(path: &[String]) -> bool {
    static DEFAULTS: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    let defaults =
        DEFAULTS.get_or_init(|| serde_yaml::to_value(Config::default()).unwrap_or(Value::Null));
    let mut node = defaults;
    for seg in path {
        match node.get(seg.as_str()) {
            Some(next) => node = next,
            None => return false,
        }
    }
    matches!(node, Value::String(_) | Value::Null)
}
