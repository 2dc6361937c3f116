//! A small JSON Schema (draft 2020-12 subset) checker for the schemas in
//! `docs/schemas/`, so tests can prove that real messages match the written
//! protocol without a large dependency.
//!
//! Supported keywords: `type` (string or list), `properties`, `required`,
//! `additionalProperties` (bool or schema), `items`, `enum`, `const`,
//! `minimum`, `minLength`, `anyOf`, `oneOf`, `$ref` (to `#/$defs/NAME`, to
//! another file `NAME.json`, or `NAME.json#/$defs/X` in the same directory),
//! `$defs`. Annotations (`title`, `description`, `format`, `examples`,
//! `$schema`, `$id`, `default`) are ignored. Any other keyword is an error,
//! so a schema cannot silently rely on something this checker skips.
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

const ANNOTATIONS: &[&str] = &["title", "description", "format", "examples", "$schema", "$id", "default", "$comment"];
const KEYWORDS: &[&str] = &[
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "enum",
    "const",
    "minimum",
    "minLength",
    "anyOf",
    "oneOf",
    "$ref",
    "$defs",
];

/// The schemas directory of the workspace.
pub fn schemas_dir() -> PathBuf {
    crate::harness::workspace_root().join("docs/schemas")
}

pub struct Checker {
    dir: PathBuf,
}

impl Checker {
    pub fn new(dir: &Path) -> Checker {
        Checker { dir: dir.to_path_buf() }
    }

    fn load(&self, file: &str) -> Result<Value> {
        let p = self.dir.join(file);
        let t = std::fs::read(&p).with_context(|| format!("cannot read schema {}", p.display()))?;
        serde_json::from_slice(&t).with_context(|| format!("schema {} is not valid JSON", p.display()))
    }

    /// Check `v` against schema file `file`; returns every violation found.
    pub fn check(&self, file: &str, v: &Value) -> Result<Vec<String>> {
        let root = self.load(file)?;
        let mut errs = Vec::new();
        self.walk(file, &root, &root, v, "$", &mut errs)?;
        Ok(errs)
    }

    /// Like [`check`](Self::check) but an error listing the violations.
    pub fn validate(&self, file: &str, v: &Value) -> Result<()> {
        let errs = self.check(file, v)?;
        if !errs.is_empty() {
            bail!("{v} does not match {file}:\n  {}", errs.join("\n  "));
        }
        Ok(())
    }

    fn resolve(&self, file: &str, root: &Value, r: &str) -> Result<(String, Value, Value)> {
        let (f, frag) = match r.split_once('#') {
            Some((f, frag)) => (f, frag),
            None => (r, ""),
        };
        let (file, root) = if f.is_empty() { (file.to_string(), root.clone()) } else { (f.to_string(), self.load(f)?) };
        let mut node = root.clone();
        for part in frag.split('/').filter(|p| !p.is_empty()) {
            node = node.get(part).cloned().with_context(|| format!("$ref {r:?} in {file}: no {part:?}"))?;
        }
        Ok((file, root, node))
    }

    fn walk(&self, file: &str, root: &Value, s: &Value, v: &Value, at: &str, errs: &mut Vec<String>) -> Result<()> {
        let s = match s {
            Value::Bool(true) => return Ok(()),
            Value::Bool(false) => {
                errs.push(format!("{at}: no value is allowed here"));
                return Ok(());
            }
            Value::Object(o) => o,
            _ => bail!("{file}: schema at {at} is not an object"),
        };
        for k in s.keys() {
            if !KEYWORDS.contains(&k.as_str()) && !ANNOTATIONS.contains(&k.as_str()) {
                bail!("{file}: keyword {k:?} (at {at}) is not supported by the test checker");
            }
        }
        if let Some(r) = s.get("$ref").and_then(Value::as_str) {
            let (f, rt, node) = self.resolve(file, root, r)?;
            self.walk(&f, &rt, &node, v, at, errs)?;
        }
        if let Some(t) = s.get("type") {
            let types: Vec<&str> = match t {
                Value::String(x) => vec![x.as_str()],
                Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
                _ => bail!("{file}: bad type at {at}"),
            };
            let ok = types.iter().any(|t| match *t {
                "object" => v.is_object(),
                "array" => v.is_array(),
                "string" => v.is_string(),
                "boolean" => v.is_boolean(),
                "null" => v.is_null(),
                "number" => v.is_number(),
                "integer" => v.is_i64() || v.is_u64(),
                _ => false,
            });
            if !ok {
                errs.push(format!("{at}: expected {}, got {v}", types.join(" or ")));
                return Ok(());
            }
        }
        if let Some(e) = s.get("enum").and_then(Value::as_array) {
            if !e.contains(v) {
                errs.push(format!("{at}: {v} is not one of {}", Value::Array(e.clone())));
            }
        }
        if let Some(c) = s.get("const") {
            if c != v {
                errs.push(format!("{at}: expected {c}, got {v}"));
            }
        }
        if let (Some(m), Some(x)) = (s.get("minimum").and_then(Value::as_f64), v.as_f64()) {
            if x < m {
                errs.push(format!("{at}: {x} is below the minimum {m}"));
            }
        }
        if let (Some(m), Some(x)) = (s.get("minLength").and_then(Value::as_u64), v.as_str()) {
            if (x.chars().count() as u64) < m {
                errs.push(format!("{at}: string shorter than {m}"));
            }
        }
        if let Value::Object(o) = v {
            let props = s.get("properties").and_then(Value::as_object);
            for r in s.get("required").and_then(Value::as_array).into_iter().flatten() {
                let r = r.as_str().unwrap_or("");
                if !o.contains_key(r) {
                    errs.push(format!("{at}: missing required property {r:?}"));
                }
            }
            for (k, x) in o {
                let sub = format!("{at}.{k}");
                if let Some(ps) = props.and_then(|p| p.get(k)) {
                    self.walk(file, root, ps, x, &sub, errs)?;
                } else if let Some(ap) = s.get("additionalProperties") {
                    if ap == &Value::Bool(false) {
                        errs.push(format!("{at}: property {k:?} is not in the schema"));
                    } else {
                        self.walk(file, root, ap, x, &sub, errs)?;
                    }
                }
            }
        }
        if let (Value::Array(a), Some(items)) = (v, s.get("items")) {
            for (i, x) in a.iter().enumerate() {
                self.walk(file, root, items, x, &format!("{at}[{i}]"), errs)?;
            }
        }
        for (kw, exactly_one) in [("anyOf", false), ("oneOf", true)] {
            if let Some(alts) = s.get(kw).and_then(Value::as_array) {
                let mut matching = 0;
                for alt in alts {
                    let mut e = Vec::new();
                    self.walk(file, root, alt, v, at, &mut e)?;
                    if e.is_empty() {
                        matching += 1;
                    }
                }
                if matching == 0 || (exactly_one && matching > 1) {
                    errs.push(format!("{at}: {v} matches {matching} of the {kw} alternatives"));
                }
            }
        }
        Ok(())
    }
}
