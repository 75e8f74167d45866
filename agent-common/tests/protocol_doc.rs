//! Keeps PROTOCOL.md in step with the code (the "drift" test).
//!
//! Every method, every params and result field (found by walking the serde
//! types, so nested structs and enum values are included), every error code
//! with its kind, every config key and the protocol version must appear in
//! PROTOCOL.md, and the document must not name methods or codes the code does
//! not have. The example lines of each method must parse as that method's
//! params and result.

use std::cell::RefCell;
use std::collections::BTreeSet;

use agent_common::error::ErrorKind;
use agent_common::jsonrpc::{parse_message, parse_response, Incoming};
use agent_common::methods::*;
use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, Visitor};

fn doc() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../PROTOCOL.md");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

// ---------------------------------------------------------------------------
// A serde Deserializer that records the field names and enum variants a type
// asks for, producing placeholder values. It visits every struct reachable
// from the type (options are entered, sequences get one element).

#[derive(Default, Debug)]
struct Trace {
    fields: BTreeSet<&'static str>,
    variants: BTreeSet<&'static str>,
}

#[derive(Clone, Copy)]
struct Tracer<'a>(&'a RefCell<Trace>);

type DeError = de::value::Error;

fn trace<T: DeserializeOwned>() -> Trace {
    let cell = RefCell::new(Trace::default());
    T::deserialize(Tracer(&cell)).expect("the tracer can build every wire type");
    cell.into_inner()
}

macro_rules! visit_with {
    ($($method:ident => $visit:ident($($value:expr)?);)*) => {
        $(fn $method<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
            v.$visit($($value)?)
        })*
    };
}

impl<'de> de::Deserializer<'de> for Tracer<'_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, _v: V) -> Result<V::Value, DeError> {
        Err(de::Error::custom(
            "self-describing types are not traceable; give the field a concrete type",
        ))
    }

    visit_with! {
        deserialize_bool => visit_bool(false);
        deserialize_i8 => visit_i64(0);
        deserialize_i16 => visit_i64(0);
        deserialize_i32 => visit_i64(0);
        deserialize_i64 => visit_i64(0);
        deserialize_u8 => visit_u64(0);
        deserialize_u16 => visit_u64(0);
        deserialize_u32 => visit_u64(0);
        deserialize_u64 => visit_u64(0);
        deserialize_f32 => visit_f64(0.0);
        deserialize_f64 => visit_f64(0.0);
        deserialize_char => visit_char('a');
        deserialize_str => visit_str("");
        deserialize_string => visit_str("");
        deserialize_bytes => visit_bytes(b"");
        deserialize_byte_buf => visit_bytes(b"");
        deserialize_unit => visit_unit();
        deserialize_identifier => visit_str("");
        deserialize_ignored_any => visit_unit();
    }

    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        v.visit_some(self)
    }
    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value, DeError> {
        v.visit_unit()
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value, DeError> {
        v.visit_newtype_struct(self)
    }
    fn deserialize_seq<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        v.visit_seq(Elements {
            tracer: self,
            left: 1,
        })
    }
    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, v: V) -> Result<V::Value, DeError> {
        v.visit_seq(Elements {
            tracer: self,
            left: len,
        })
    }
    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        len: usize,
        v: V,
    ) -> Result<V::Value, DeError> {
        v.visit_seq(Elements {
            tracer: self,
            left: len,
        })
    }
    fn deserialize_map<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        v.visit_map(Fields {
            tracer: self,
            fields: &[],
            next: 0,
        })
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, DeError> {
        self.0.borrow_mut().fields.extend(fields.iter().copied());
        v.visit_map(Fields {
            tracer: self,
            fields,
            next: 0,
        })
    }
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, DeError> {
        self.0
            .borrow_mut()
            .variants
            .extend(variants.iter().copied());
        let first = variants
            .first()
            .ok_or_else(|| de::Error::custom("enum without variants"))?;
        v.visit_enum(UnitVariant(first))
    }
}

struct Elements<'a> {
    tracer: Tracer<'a>,
    left: usize,
}

impl<'de> de::SeqAccess<'de> for Elements<'_> {
    type Error = DeError;
    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(self.tracer).map(Some)
    }
}

struct Fields<'a> {
    tracer: Tracer<'a>,
    fields: &'static [&'static str],
    next: usize,
}

impl<'de> de::MapAccess<'de> for Fields<'_> {
    type Error = DeError;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        let Some(name) = self.fields.get(self.next) else {
            return Ok(None);
        };
        self.next += 1;
        let key: de::value::StrDeserializer<'_, DeError> = name.into_deserializer();
        seed.deserialize(key).map(Some)
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        seed.deserialize(self.tracer)
    }
}

struct UnitVariant(&'static str);

impl<'de> de::EnumAccess<'de> for UnitVariant {
    type Error = DeError;
    type Variant = UnitVariant;
    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, UnitVariant), DeError> {
        let name: de::value::StrDeserializer<'_, DeError> = self.0.into_deserializer();
        Ok((seed.deserialize(name)?, self))
    }
}

impl<'de> de::VariantAccess<'de> for UnitVariant {
    type Error = DeError;
    fn unit_variant(self) -> Result<(), DeError> {
        Ok(())
    }
    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, _: T) -> Result<T::Value, DeError> {
        Err(de::Error::custom("only unit variants are traced"))
    }
    fn tuple_variant<V: Visitor<'de>>(self, _: usize, _: V) -> Result<V::Value, DeError> {
        Err(de::Error::custom("only unit variants are traced"))
    }
    fn struct_variant<V: Visitor<'de>>(
        self,
        _: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, DeError> {
        Err(de::Error::custom("only unit variants are traced"))
    }
}

// ---------------------------------------------------------------------------
// Splitting the document.

/// The text from the line `heading` up to the next heading of the same or a
/// higher level.
fn section<'d>(doc: &'d str, heading: &str) -> Option<&'d str> {
    let level = heading.chars().take_while(|&c| c == '#').count();
    let start = doc.lines().position(|l| l.trim_end() == heading)?;
    let lines: Vec<&str> = doc.lines().collect();
    let end = lines[start + 1..]
        .iter()
        .position(|l| {
            let hashes = l.chars().take_while(|&c| c == '#').count();
            hashes > 0 && hashes <= level && l[hashes..].starts_with(' ')
        })
        .map_or(lines.len(), |p| start + 1 + p);
    // Map line indices back to byte offsets.
    let offset_of = |line: usize| -> usize {
        doc.lines()
            .take(line)
            .map(|l| l.len() + 1)
            .sum::<usize>()
            .min(doc.len())
    };
    Some(&doc[offset_of(start)..offset_of(end)])
}

/// The method names of every `### \`name\`` heading, in order.
fn method_headings(doc: &str) -> Vec<&str> {
    doc.lines()
        .filter_map(|l| l.strip_prefix("### `"))
        .filter_map(|l| l.trim_end().strip_suffix('`'))
        .collect()
}

/// Every `-32xxx` number in `text`.
fn error_codes_in(text: &str) -> Vec<i32> {
    let bytes = text.as_bytes();
    let mut codes = Vec::new();
    for (i, _) in text.match_indices("-32") {
        let digits = &bytes[i + 1..];
        let n = digits.iter().take_while(|b| b.is_ascii_digit()).count();
        let before_ok = i == 0 || !bytes[i - 1].is_ascii_alphanumeric();
        if n == 5 && before_ok {
            let code: i32 = text[i..i + 6].parse().expect("six characters of a number");
            codes.push(code);
        }
    }
    codes
}

/// Lines inside ```json fences.
fn json_example_lines(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut in_json = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("```") {
            in_json = !in_json && t == "```json";
            continue;
        }
        if in_json && !t.is_empty() {
            out.push(t);
        }
    }
    out
}

// ---------------------------------------------------------------------------
// The checks.

/// Checks one method's section: fields, enum values, examples.
fn check_method<M: Rpc>(doc: &str) -> Vec<String> {
    let name = M::METHOD.as_str();
    let mut problems = Vec::new();
    let Some(text) = section(doc, &format!("### `{name}`")) else {
        return vec![format!("no `### \\`{name}\\`` heading")];
    };

    let params = trace::<M::Params>();
    let result = trace::<M::Result>();
    for (what, t) in [("params", &params), ("result", &result)] {
        for field in &t.fields {
            if !text.contains(&format!("`{field}`")) {
                problems.push(format!("{name}: {what} field `{field}` is not documented"));
            }
        }
        for variant in &t.variants {
            if !text.contains(&format!("`{variant}`")) {
                problems.push(format!(
                    "{name}: {what} value `{variant}` is not documented"
                ));
            }
        }
    }

    let mut requests = 0;
    let mut replies = 0;
    for line in json_example_lines(text) {
        if let Incoming::Single(Ok(req)) = parse_message(line.as_bytes()) {
            if req.method != name {
                problems.push(format!("{name}: example calls {}: {line}", req.method));
            } else if let Err(e) = req.params::<M::Params>() {
                problems.push(format!("{name}: example params do not parse ({e}): {line}"));
            }
            requests += 1;
        } else {
            match parse_response(line.as_bytes()) {
                Ok(resp) => {
                    if let Err(e) = resp.into_result::<M::Result>() {
                        problems.push(format!(
                            "{name}: example reply is not a result ({e}): {line}"
                        ));
                    }
                    replies += 1;
                }
                Err(e) => problems.push(format!("{name}: example line is neither ({e}): {line}")),
            }
        }
    }
    if requests == 0 || replies == 0 {
        problems.push(format!(
            "{name}: needs an example request line and reply line"
        ));
    }
    problems
}

/// Checks every method of the table (`for_each_rpc`), so no list here can
/// miss one.
struct CheckEvery<'d> {
    doc: &'d str,
    problems: Vec<String>,
    seen: Vec<Method>,
}

impl RpcVisitor for CheckEvery<'_> {
    fn visit<M: Rpc>(&mut self) {
        self.seen.push(M::METHOD);
        self.problems.extend(check_method::<M>(self.doc));
    }
}

fn assert_no_problems(problems: Vec<String>) {
    assert!(
        problems.is_empty(),
        "PROTOCOL.md is out of step with agent-common:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn every_method_has_a_section_and_every_section_is_a_method() {
    let doc = doc();
    let headings = method_headings(&doc);
    let names: Vec<&str> = Method::ALL.iter().map(|m| m.as_str()).collect();
    assert_eq!(
        headings, names,
        "the `### \\`method\\`` headings must be exactly Method::ALL, in order"
    );
}

#[test]
fn every_field_value_and_example_of_every_method_is_documented() {
    let doc = doc();
    let mut check = CheckEvery {
        doc: &doc,
        problems: Vec::new(),
        seen: Vec::new(),
    };
    for_each_rpc(&mut check);
    assert_eq!(
        check.seen,
        Method::ALL,
        "for_each_rpc visits every method once"
    );
    assert_no_problems(check.problems);
}

#[test]
fn every_error_code_is_in_a_table_row_with_its_kind() {
    let doc = doc();
    let errors = section(&doc, "## Errors").expect("an `## Errors` section");
    let mut problems = Vec::new();
    for kind in ErrorKind::ALL {
        let cell = format!("| {} |", kind.code());
        let name = format!("`{}`", kind.as_str());
        if !errors
            .lines()
            .any(|l| l.starts_with('|') && l.contains(&cell) && l.contains(&name))
        {
            problems.push(format!(
                "no error table row with {} and {name}",
                kind.code()
            ));
        }
    }
    assert_no_problems(problems);
}

#[test]
fn every_code_the_document_names_exists_and_rows_pair_it_with_its_kind() {
    let doc = doc();
    let mut problems = Vec::new();
    for code in error_codes_in(&doc) {
        if ErrorKind::from_code(code).is_none() {
            problems.push(format!("{code} is not an error code of agent-common"));
        }
    }
    for row in doc.lines().filter(|l| l.starts_with('|')) {
        for code in error_codes_in(row) {
            if let Some(kind) = ErrorKind::from_code(code) {
                if !row.contains(&format!("`{kind}`")) {
                    problems.push(format!("row with {code} lacks `{kind}`: {row}"));
                }
            }
        }
    }
    assert_no_problems(problems);
}

#[test]
fn config_keys_and_defaults_match() {
    const KEYS: &[(&str, &str)] = &[
        ("log_level", "`info`"),
        ("log_file", "`null`"),
        ("audit_file", "`null`"),
        ("channel_name", "`org.kvmmanager.agent.0`"),
        ("qemu_ga_channel_name", "`org.qemu.guest_agent.0`"),
        ("max_message_size_kb", "`64`"),
        ("connection_retry_seconds", "`5`"),
        ("request_timeout_seconds", "`30`"),
        ("max_concurrent_requests", "`10`"),
        ("freeze_timeout_seconds", "`60`"),
        (
            "fsfreeze_hook_dir",
            "`/etc/kvmmanager-agent/fsfreeze-hook.d`",
        ),
        ("shell_command", "`/bin/sh`"),
        (
            "security.allowed_read_paths",
            r#"`["/tmp", "/var/log", "/etc/hostname", "/etc/os-release"]`"#,
        ),
        ("security.allowed_write_paths", r#"`["/tmp/kvmmanager"]`"#),
        ("security.command_whitelist", "`null`"),
        ("security.max_file_size_mb", "`10`"),
        ("security.max_command_timeout_seconds", "`300`"),
        ("security.command_memory_max_mb", "`null`"),
        ("security.command_max_processes", "`null`"),
        ("security.allowed_methods", "`null`"),
        ("security.blocked_methods", "`[]`"),
        ("security.allowed_forwards", "`[]`"),
    ];
    let doc = doc();
    let text = section(&doc, "## Limits and configuration").expect("a limits section");
    let mut documented = BTreeSet::new();
    let mut problems = Vec::new();
    for row in text.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = row.split(" | ").collect();
        let key = cells[0].trim_start_matches("| ").trim_matches('`');
        // Only the config table has a type column; the fixed limits table has two.
        if cells.len() < 4 {
            continue;
        }
        documented.insert(key.to_owned());
        match KEYS.iter().find(|(k, _)| *k == key) {
            Some((_, default)) if cells[2] != *default => {
                problems.push(format!("{key}: default {} != {default}", cells[2]));
            }
            Some(_) => {}
            None => problems.push(format!("{key}: not a config key")),
        }
    }
    for (key, _) in KEYS {
        if !documented.contains(*key) {
            problems.push(format!("config key {key} is not in the table"));
        }
    }
    assert_eq!(
        agent_common::DEFAULT_CHANNEL_NAME,
        "org.kvmmanager.agent.0",
        "update the channel_name default above"
    );
    assert_no_problems(problems);
}

#[test]
fn protocol_version_and_fixed_limits_are_current() {
    let doc = doc();
    let line = format!(
        "Current protocol version: {}",
        agent_common::PROTOCOL_VERSION
    );
    assert!(doc.lines().any(|l| l == line), "missing the line {line:?}");

    // The get_agent_info example shows the default limits and the method list.
    let text = section(&doc, "### `get_agent_info`").expect("get_agent_info section");
    let info: AgentInfo = json_example_lines(text)
        .into_iter()
        .find_map(|l| parse_response(l.as_bytes()).ok())
        .expect("an example reply")
        .into_result()
        .expect("an AgentInfo result");
    assert_eq!(info.protocol_version, agent_common::PROTOCOL_VERSION);
    let names: Vec<&str> = Method::ALL.iter().map(|m| m.as_str()).collect();
    assert_eq!(info.methods, names);
    assert_eq!(
        info.limits.max_response_size,
        agent_common::MAX_RESPONSE_SIZE as u64
    );
    assert_eq!(info.limits.max_read_chunk, agent_common::MAX_READ_CHUNK);
    assert_eq!(info.limits.max_exec_output, agent_common::MAX_EXEC_OUTPUT);
    let fixed = section(&doc, "## Limits and configuration").expect("a limits section");
    for (name, value) in [
        ("max_response_size", agent_common::MAX_RESPONSE_SIZE as u64),
        ("max_read_chunk", agent_common::MAX_READ_CHUNK),
        ("max_exec_output", agent_common::MAX_EXEC_OUTPUT),
    ] {
        let row = format!("| `{name}` |");
        assert!(
            fixed
                .lines()
                .any(|l| l.starts_with(&row) && l.contains(&format!("({value} bytes)"))),
            "the fixed-limits table must give {name} = {value} bytes"
        );
    }
}

#[test]
fn the_tracer_sees_nested_fields_and_enum_values() {
    // Guards the tracer itself, so the checks above cannot pass vacuously.
    let t = trace::<NetworkInfo>();
    for f in ["interfaces", "mac_address", "prefix_len", "rx_dropped"] {
        assert!(t.fields.contains(f), "{f} missing from {t:?}");
    }
    assert!(t.variants.contains("ipv6"));
    let t = trace::<FileWriteParams>();
    assert!(t.fields.contains("upload_id") && t.variants.contains("create_new"));
    assert!(trace::<Empty>().fields.is_empty());
    assert_eq!(error_codes_in("| -32004 | x -320041 a-32001"), vec![-32004]);
}

#[test]
fn every_reply_example_in_the_document_is_a_valid_reply() {
    // Replies in ```json blocks and `< ` lines of the worked session: each
    // parses as a response (or a batch of them), and error examples carry a
    // known code with the matching data.kind.
    let doc = doc();
    let mut candidates: Vec<&str> = json_example_lines(&doc);
    candidates.extend(doc.lines().filter_map(|l| l.strip_prefix("< ")));
    let mut problems = Vec::new();
    let mut checked = 0;
    for line in candidates {
        if !line.contains("\"jsonrpc\"") {
            continue; // e.g. the config file example
        }
        let is_request = matches!(
            parse_message(line.as_bytes()),
            Incoming::Single(Ok(_)) | Incoming::Batch(_)
        ) && line.contains("\"method\"");
        if is_request {
            continue;
        }
        let items: Vec<String> = if line.starts_with('[') {
            match serde_json::from_str::<Vec<serde_json::Value>>(line) {
                Ok(items) => items.iter().map(|v| v.to_string()).collect(),
                Err(e) => {
                    problems.push(format!("batch reply is not JSON ({e}): {line}"));
                    continue;
                }
            }
        } else {
            vec![line.to_owned()]
        };
        for item in items {
            checked += 1;
            match parse_response(item.as_bytes()) {
                Err(e) => problems.push(format!("not a valid reply ({e}): {item}")),
                Ok(resp) => {
                    if let Err(err) = resp.outcome {
                        let by_code = ErrorKind::from_code(err.code);
                        let by_kind = err
                            .data
                            .as_ref()
                            .and_then(|d| d.get("kind"))
                            .and_then(|k| serde_json::from_value::<ErrorKind>(k.clone()).ok());
                        if by_code.is_none() || by_code != by_kind {
                            problems.push(format!("error code and data.kind disagree: {item}"));
                        }
                    }
                }
            }
        }
    }
    assert!(checked >= 20, "only {checked} reply examples found");
    assert_no_problems(problems);
}

#[test]
fn worked_session_replies_to_malformed_lines_are_what_the_codec_answers() {
    // A line of the worked session that agent-common refuses by itself
    // (invalid JSON, not a request) must be followed by exactly the reply
    // agent-common produces, error message included.
    let doc = doc();
    let text = section(&doc, "## Worked session").expect("a worked session");
    let replies: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("< ")).collect();
    let mut checked = 0;
    let mut problems = Vec::new();
    for line in text.lines().filter_map(|l| l.strip_prefix("> ")) {
        let line = line.strip_prefix(r"\xff").unwrap_or(line);
        if let Incoming::Single(Err(resp)) = parse_message(line.as_bytes()) {
            checked += 1;
            let want = serde_json::to_string(&resp).expect("a response serialises");
            if !replies.contains(&want.as_str()) {
                problems.push(format!("the reply to {line} should be {want}"));
            }
        }
    }
    assert!(checked >= 1, "the worked session shows no malformed line");
    assert_no_problems(problems);
}
