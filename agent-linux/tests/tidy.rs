//! Tidy: rules about where code lives that the compiler cannot check, read
//! from the source text (after rust-analyzer's `xtask/src/tidy.rs`).
//!
//! - `unsafe` appears in `src/` only inside the `sys` module (`src/sys.rs`
//!   or `src/sys/`), which holds every `unsafe` system call wrapper;
//! - processes are spawned only by `src/exec.rs`: `Command::new`,
//!   `posix_spawn`, `fork(`, `clone3`, `execve` and `tokio::process` appear
//!   nowhere else in `src/`, except `clone3` and `execve` in the `sys`
//!   module, which holds the raw `clone3(CLONE_INTO_CGROUP)` and the
//!   child's `execve` for `exec.rs`.
//!
//! Comments and the contents of string and character literals are blanked
//! before matching (line numbers are kept), so prose and messages may name
//! these words freely.
//!
//! Two more rules are checked by tests elsewhere, and this file only checks
//! that those tests are still there: `packaging/config.json` parsed as the
//! agent's config equals `Config::default()`
//! (`the_packaged_config_is_the_default` in `src/config.rs`), and every
//! method of `Method::ALL` has a `### \`name\`` section in PROTOCOL.md
//! (`agent-common/tests/protocol_doc.rs`).

use std::path::{Path, PathBuf};

/// Spawning tokens, and whether the `sys` module may hold them.
const SPAWN_TOKENS: &[(&str, bool)] = &[
    ("Command::new", false),
    ("posix_spawn", false),
    ("fork(", false),
    ("clone3", true),
    ("execve", true),
    ("tokio::process", false),
];

/// True for a file of the `sys` module (`path` relative to `src/`, `/`-separated).
fn in_sys(path: &str) -> bool {
    path == "sys.rs" || path.starts_with("sys/")
}

/// `text` with every comment and the contents of every string and character
/// literal replaced by spaces; newlines are kept, so lines stay where they were.
fn blank_comments_and_literals(text: &str) -> String {
    let c: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let blank = |out: &mut String, ch: char| out.push(if ch == '\n' { '\n' } else { ' ' });
    let ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    let mut i = 0;
    while i < c.len() {
        // Line comment (doc comments included).
        if c[i] == '/' && c.get(i + 1) == Some(&'/') {
            while i < c.len() && c[i] != '\n' {
                blank(&mut out, c[i]);
                i += 1;
            }
            continue;
        }
        // Block comment, nested.
        if c[i] == '/' && c.get(i + 1) == Some(&'*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, c[i]);
                    i += 1;
                }
            }
            continue;
        }
        // Raw string: r"..", r#".."#, br#".."#.
        if c[i] == 'r'
            && (i == 0 || !ident(c[i - 1]) || (c[i - 1] == 'b' && (i < 2 || !ident(c[i - 2]))))
        {
            let mut j = i + 1;
            while c.get(j) == Some(&'#') {
                j += 1;
            }
            if c.get(j) == Some(&'"') {
                let hashes = j - i - 1;
                out.extend(&c[i..=j]);
                i = j + 1;
                while i < c.len() {
                    if c[i] == '"' && (1..=hashes).all(|k| c.get(i + k) == Some(&'#')) {
                        out.extend(&c[i..=i + hashes]);
                        i += hashes + 1;
                        break;
                    }
                    blank(&mut out, c[i]);
                    i += 1;
                }
                continue;
            }
        }
        // String (and byte string).
        if c[i] == '"' {
            out.push('"');
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' && i + 1 < c.len() {
                    blank(&mut out, c[i]);
                    i += 1;
                }
                blank(&mut out, c[i]);
                i += 1;
            }
            if i < c.len() {
                out.push('"');
                i += 1;
            }
            continue;
        }
        // Character literal; a lifetime (`'a`) is left as it is.
        if c[i] == '\'' {
            let end = if c.get(i + 1) == Some(&'\\') {
                (i + 3..c.len()).find(|&k| c[k] == '\'')
            } else if c.get(i + 2) == Some(&'\'') {
                Some(i + 2)
            } else {
                None
            };
            if let Some(end) = end {
                out.push('\'');
                for &ch in &c[i + 1..end] {
                    blank(&mut out, ch);
                }
                out.push('\'');
                i = end + 1;
                continue;
            }
        }
        out.push(c[i]);
        i += 1;
    }
    out
}

/// True if `word` occurs in `line` as a whole word (not inside an identifier).
fn has_word(line: &str, word: &str) -> bool {
    let ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    line.match_indices(word).any(|(at, _)| {
        !line[..at].chars().next_back().is_some_and(ident)
            && !line[at + word.len()..].chars().next().is_some_and(ident)
    })
}

/// The rule breaks in one file: `path` is relative to `src/`, `/`-separated.
fn check_file(path: &str, text: &str) -> Vec<String> {
    let code = blank_comments_and_literals(text);
    let mut found = Vec::new();
    for (n, line) in code.lines().enumerate() {
        let at = format!("agent-linux/src/{path}:{}", n + 1);
        if !in_sys(path) && has_word(line, "unsafe") {
            found.push(format!(
                "{at}: `unsafe` outside the sys module (put the wrapper in src/sys/)"
            ));
        }
        if path == "exec.rs" {
            continue;
        }
        for &(token, sys_may) in SPAWN_TOKENS {
            if line.contains(token) && !(sys_may && in_sys(path)) {
                found.push(format!(
                    "{at}: `{token}` outside exec.rs (every process is spawned by exec.rs)"
                ));
            }
        }
    }
    found
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn unsafe_only_in_sys_and_spawning_only_in_exec() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    assert!(files.len() > 10, "found only {files:?}");
    let mut found = Vec::new();
    for file in &files {
        let rel = file
            .strip_prefix(&src)
            .unwrap()
            .to_str()
            .unwrap()
            .replace('\\', "/");
        let text = std::fs::read_to_string(file).unwrap();
        found.extend(check_file(&rel, &text));
    }
    assert!(found.is_empty(), "tidy:\n{}", found.join("\n"));
    // The module the rules name exists and holds unsafe code.
    assert!(files
        .iter()
        .any(|f| f.ends_with("sys/mod.rs") || f.ends_with("sys.rs")));
}

#[test]
fn the_rules_checked_elsewhere_still_have_their_tests() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for (file, test) in [
        (
            "agent-linux/src/config.rs",
            "fn the_packaged_config_is_the_default()",
        ),
        (
            "agent-common/tests/protocol_doc.rs",
            "fn every_method_has_a_section_and_every_section_is_a_method()",
        ),
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        assert!(text.contains(test), "{file} lost `{test}`");
    }
}

#[test]
fn the_scan_finds_what_breaks_a_rule_and_nothing_else() {
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "files/mod.rs",
            "fn f() {\n    let x = unsafe { g() };\n}\n",
            &["agent-linux/src/files/mod.rs:2: `unsafe`"],
        ),
        ("sys/fs.rs", "fn f() {\n    let x = unsafe { g() };\n}\n", &[]),
        ("sys.rs", "unsafe fn f() {}\n", &[]),
        ("policy/path.rs", "pub unsafe fn f() {}\nunsafe impl Send for X {}\n", &[
            "agent-linux/src/policy/path.rs:1: `unsafe`",
            "agent-linux/src/policy/path.rs:2: `unsafe`",
        ]),
        (
            "policy/path.rs",
            "// unsafe { x }\n/// unsafe\n//! unsafe\n/* unsafe\n unsafe */ fn warn_if_unsafe() {}\n\
             let s = \"is unsafe: \\\" unsafe {\";\nlet r = r#\"unsafe \" {\"#;\nlet c = '\"'; let l: &'static str = \"\";\n\
             #[error(\"allowed root {root} is unsafe\")]\n",
            &[],
        ),
        (
            "transport.rs",
            "let s = \"a\nmultiline unsafe string\";\nunsafe { x }\n",
            &["agent-linux/src/transport.rs:3: `unsafe`"],
        ),
        (
            "power.rs",
            "let s = tokio::process::Command::new(\"systemctl\").status();\n",
            &[
                "agent-linux/src/power.rs:1: `Command::new`",
                "agent-linux/src/power.rs:1: `tokio::process`",
            ],
        ),
        ("exec.rs", "let c = std::process::Command::new(p); unsafe { x }\n", &[
            "agent-linux/src/exec.rs:1: `unsafe`",
        ]),
        (
            "sys/process.rs",
            "libc::syscall(libc::SYS_clone3, a);\nlibc::execve(p, a, e);\nlibc::fork();\n",
            &["agent-linux/src/sys/process.rs:3: `fork(`"],
        ),
        (
            "cgroup.rs",
            "/// open for `clone3(CLONE_INTO_CGROUP)`\nlet x = \"execve\";\nlibc::SYS_clone3;\nnix::unistd::fork();\nlibc::posix_spawn(a);\n",
            &[
                "agent-linux/src/cgroup.rs:3: `clone3`",
                "agent-linux/src/cgroup.rs:4: `fork(`",
                "agent-linux/src/cgroup.rs:5: `posix_spawn`",
            ],
        ),
    ];
    for (path, text, want) in cases {
        let got = check_file(path, text);
        assert_eq!(got.len(), want.len(), "{path}: {text:?} gave {got:#?}");
        for (g, w) in got.iter().zip(want.iter()) {
            assert!(
                g.starts_with(w),
                "{path}: {text:?}: got {g:?}, want {w:?}..."
            );
        }
    }
}

#[test]
fn blanking_keeps_code_and_lines() {
    let text =
        "let a = \"x\\\"y\"; // c\nlet b = 'q'; let l: &'a u8; /* x\ny */ let r = br#\"z\"#;\n";
    let code = blank_comments_and_literals(text);
    assert_eq!(code.lines().count(), text.lines().count());
    assert_eq!(code.chars().count(), text.chars().count());
    assert!(code.contains("let a = \"    \";"), "{code}");
    assert!(code.contains("let b = ' '; let l: &'a u8;"), "{code}");
    assert!(code.contains("let r = br#\" \"#;"), "{code}");
    assert!(!code.contains("// c") && !code.contains("x\ny"), "{code}");
    let esc = blank_comments_and_literals("let q = '\\''; unsafe");
    assert_eq!(esc, "let q = '  '; unsafe");
}
