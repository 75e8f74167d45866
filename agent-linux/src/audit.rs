//! The audit trail: one structured line per request that changes the
//! guest (the method table's `changes_guest`), written to the log (the
//! journal under systemd) and, if `audit_file` is set, to that file.
//!
//! A line is a JSON object after the word `audit`:
//! `{"time":"2026-11-27T17:48:01.123Z","session":3,"id":"7","method":"file_write",
//! "target":{"path":"/tmp/kvmmanager/a","mode":"truncate"},"outcome":"ok",
//! "bytes_in":5,"bytes_out":71,"duration_ms":2,"result":"bytes_written=5 ..."}`.
//!
//! The target is built from an allowlist of params members ([`TARGET_KEYS`]):
//! anything else a request carries is left out, so a secret in a member
//! added later never reaches the trail by default. Secrets are never
//! written: a password is dropped, file contents and `stdin` appear as
//! their size, `env` as its names without values, key lines as their
//! count. The result is summarised by its small members (never `stdout`,
//! `stderr`, `content` or keys).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agent_common::error::ErrorObject;
use agent_common::methods::Method;
use serde_json::{json, Map, Value};

use crate::ops::time::civil_from_days;

/// Params members recorded as they are: names of things (paths, commands,
/// users, mount points, processes) and small settings, never data.
pub const TARGET_KEYS: &[&str] = &[
    "path",
    "mode",
    "permissions",
    "offset",
    "upload_id",
    "more",
    "command",
    "args",
    "cwd",
    "timeout_seconds",
    "delay_seconds",
    "mount_points",
    "minimum_bytes",
    "time_ns",
    "username",
    "crypted",
    "cpus",
    "blocks",
    "pid",
    "signal",
    "start_time",
    "id",
];

/// Most bytes of an error message recorded.
const MAX_MESSAGE: usize = 256;

/// One audited request.
pub struct Record<'a> {
    /// The session (connection) it came on.
    pub session: u64,
    /// Its JSON-RPC id, as sent (`None` for a notification).
    pub id: Option<String>,
    /// The method.
    pub method: Method,
    /// Its params, as sent.
    pub params: Option<&'a str>,
    /// Bytes of the request's attachment.
    pub attachment_in: u64,
    /// The result (JSON) or the error.
    pub outcome: Result<&'a str, &'a ErrorObject>,
    /// Bytes of the reply's attachment.
    pub attachment_out: u64,
    /// How long it took.
    pub duration: Duration,
    /// When it ended.
    pub at: SystemTime,
}

/// Writes the audit line of `r` to the log and the audit file.
pub fn record(r: &Record<'_>) {
    let line = line(r);
    tracing::info!("audit {line}");
    crate::logging::write_audit(&line);
}

/// The audit line of `r` (one line of JSON).
pub fn line(r: &Record<'_>) -> String {
    let params: Option<Map<String, Value>> = r.params.and_then(|p| serde_json::from_str(p).ok());
    let (target, data_in) = target(params.as_ref());
    let mut o = Map::new();
    o.insert("time".into(), json!(rfc3339(r.at)));
    o.insert("session".into(), json!(r.session));
    if let Some(id) = &r.id {
        o.insert("id".into(), json!(id));
    }
    o.insert("method".into(), json!(r.method.as_str()));
    o.insert("target".into(), Value::Object(target));
    match r.outcome {
        Ok(result) => {
            o.insert("outcome".into(), json!("ok"));
            o.insert("bytes_in".into(), json!(data_in + r.attachment_in));
            o.insert(
                "bytes_out".into(),
                json!(result.len() as u64 + r.attachment_out),
            );
            o.insert("duration_ms".into(), json!(r.duration.as_millis() as u64));
            o.insert("result".into(), json!(summarize(result)));
        }
        Err(e) => {
            o.insert(
                "outcome".into(),
                json!(e.kind().map_or("error", |k| k.as_str())),
            );
            o.insert("bytes_in".into(), json!(data_in + r.attachment_in));
            o.insert("bytes_out".into(), json!(0));
            o.insert("duration_ms".into(), json!(r.duration.as_millis() as u64));
            let mut msg = e.message.clone();
            if msg.len() > MAX_MESSAGE {
                let mut end = MAX_MESSAGE;
                while !msg.is_char_boundary(end) {
                    end -= 1;
                }
                msg.truncate(end);
            }
            o.insert("error".into(), json!(msg));
        }
    }
    Value::Object(o).to_string()
}

/// The target members of `params`, and the bytes of data it carried
/// (`content`, `stdin`), which are counted, never recorded.
fn target(params: Option<&Map<String, Value>>) -> (Map<String, Value>, u64) {
    let mut t = Map::new();
    let mut data = 0u64;
    let Some(params) = params else {
        return (t, 0);
    };
    for (k, v) in params {
        match k.as_str() {
            k if TARGET_KEYS.contains(&k) => {
                t.insert(k.to_owned(), v.clone());
            }
            "env" => {
                let names: Vec<Value> = v
                    .as_object()
                    .map(|m| m.keys().map(|n| json!(n)).collect())
                    .unwrap_or_default();
                t.insert("env_names".into(), Value::Array(names));
            }
            "keys" => {
                let n = v.as_array().map_or(0, Vec::len);
                t.insert("key_count".into(), json!(n));
            }
            "content" | "stdin" => {
                data += v.as_str().map_or(0, |s| s.len() as u64);
            }
            // Everything else (a password, members added later) is left out.
            _ => {}
        }
    }
    (t, data)
}

/// The small members of a result, `key=value` separated by spaces: never
/// command output, file contents or key lines.
pub fn summarize(result: &str) -> String {
    match serde_json::from_str::<Map<String, Value>>(result) {
        Ok(map) => map
            .into_iter()
            .filter(|(k, _)| !matches!(k.as_str(), "stdout" | "stderr" | "content" | "keys"))
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" "),
        Err(_) => String::new(),
    }
}

/// `t` as an RFC 3339 UTC time with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (y, m, day) = civil_from_days(secs.div_euclid(86400));
    let s = secs.rem_euclid(86400);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        s / 3600,
        s / 60 % 60,
        s % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_common::error::ErrorKind;

    const SECRET: &str = "s3cr3t-Value_42";

    fn rec<'a>(
        method: Method,
        params: &'a str,
        outcome: Result<&'a str, &'a ErrorObject>,
    ) -> Record<'a> {
        Record {
            session: 3,
            id: Some("7".into()),
            method,
            params: Some(params),
            attachment_in: 0,
            outcome,
            attachment_out: 0,
            duration: Duration::from_millis(12),
            at: UNIX_EPOCH + Duration::from_millis(1_795_801_681_123),
        }
    }

    fn parsed(r: &Record<'_>) -> Value {
        let l = line(r);
        assert!(!l.contains('\n'), "one line: {l}");
        assert!(!l.contains(SECRET), "the secret leaked: {l}");
        serde_json::from_str(&l).unwrap()
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_millis(1_795_801_681_123)),
            "2026-11-27T17:48:01.123Z"
        );
    }

    #[test]
    fn a_password_never_appears_whatever_the_outcome() {
        let params = format!(r#"{{"username":"alice","password":"{SECRET}","crypted":false}}"#);
        let ok = parsed(&rec(
            Method::SetUserPassword,
            &params,
            Ok(r#"{"username":"alice"}"#),
        ));
        assert_eq!(ok["target"], json!({"username": "alice", "crypted": false}));
        assert_eq!(ok["outcome"], "ok");
        assert_eq!(ok["method"], "set_user_password");
        assert_eq!(ok["session"], 3);
        assert_eq!(ok["time"], "2026-11-27T17:48:01.123Z");
        let e = ErrorObject::new(ErrorKind::IoError, "chpasswd failed: exit status 1");
        let failed = parsed(&rec(Method::SetUserPassword, &params, Err(&e)));
        assert_eq!(failed["outcome"], "io_error");
        assert_eq!(failed["error"], "chpasswd failed: exit status 1");
    }

    #[test]
    fn file_contents_stdin_and_env_values_are_counted_not_recorded() {
        let params =
            format!(r#"{{"path":"/tmp/kvmmanager/a","content":"{SECRET}","mode":"truncate"}}"#);
        let w = parsed(&rec(
            Method::FileWrite,
            &params,
            Ok(r#"{"bytes_written":15,"size":15,"committed":true}"#),
        ));
        assert_eq!(
            w["target"],
            json!({"path": "/tmp/kvmmanager/a", "mode": "truncate"})
        );
        assert_eq!(w["bytes_in"], SECRET.len());
        assert!(w["result"].as_str().unwrap().contains("bytes_written=15"));
        let params = format!(
            r#"{{"command":"sh","args":["-c","read x"],"stdin":"{SECRET}","env":{{"TOKEN":"{SECRET}"}}}}"#
        );
        let out = format!(r#"{{"exit_code":0,"stdout":"{SECRET}","stderr":"{SECRET}"}}"#);
        let x = parsed(&rec(Method::ExecCommand, &params, Ok(&out)));
        assert_eq!(x["target"]["command"], "sh");
        assert_eq!(x["target"]["args"], json!(["-c", "read x"]));
        assert_eq!(x["target"]["env_names"], json!(["TOKEN"]));
        assert_eq!(x["bytes_in"], SECRET.len());
        assert_eq!(x["bytes_out"], out.len());
        assert!(x["result"].as_str().unwrap().contains("exit_code=0"));
    }

    #[test]
    fn key_lines_are_counted_and_unknown_members_left_out() {
        let params = format!(r#"{{"username":"bob","keys":["ssh-ed25519 AAAA {SECRET}"]}}"#);
        let k = parsed(&rec(
            Method::SshKeysAdd,
            &params,
            Ok(&format!(
                r#"{{"username":"bob","keys":[{{"line":"{SECRET}","managed":true}}]}}"#
            )),
        ));
        assert_eq!(k["target"], json!({"username": "bob", "key_count": 1}));
        let params = format!(r#"{{"pid":812,"signal":"KILL","future_member":"{SECRET}"}}"#);
        let s = parsed(&rec(
            Method::KillProcess,
            &params,
            Ok(r#"{"pid":812,"signal":"KILL"}"#),
        ));
        assert_eq!(s["target"], json!({"pid": 812, "signal": "KILL"}));
    }

    #[test]
    fn long_error_messages_are_cut_and_attachments_counted() {
        let e = ErrorObject::new(ErrorKind::PolicyDenied, "é".repeat(1000));
        let mut r = rec(Method::FileWrite, r#"{"path":"/x"}"#, Err(&e));
        r.attachment_in = 4096;
        let v = parsed(&r);
        assert!(v["error"].as_str().unwrap().len() <= MAX_MESSAGE);
        assert_eq!(v["outcome"], "policy_denied");
        assert_eq!(v["bytes_in"], 4096);
        assert_eq!(v["bytes_out"], 0);
        let r = Record {
            params: None,
            id: None,
            ..rec(Method::FsThaw, "", Ok(r#"{"thawed":[]}"#))
        };
        let v = parsed(&r);
        assert_eq!(v["target"], json!({}));
        assert!(v.get("id").is_none());
    }
}
