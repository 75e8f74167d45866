//! `get_users` (utmp), the `ssh_keys_*` methods and `set_user_password`.
//!
//! # `authorized_keys`
//!
//! The agent keeps the keys it adds in a block of its own, between two
//! marker lines, in `~user/.ssh/authorized_keys`:
//!
//! ```text
//! # BEGIN kvmmanager-agent keys (managed by the guest agent; edit outside this block)
//! ssh-ed25519 AAAAC3Nza... admin@host
//! # END kvmmanager-agent keys
//! ```
//!
//! Every other line (keys written by hand or by cloud-init, comments,
//! options) is the user's and is kept byte for byte: `ssh_keys_add` adds to
//! the block (a key already anywhere in the file is not added twice),
//! `ssh_keys_remove` removes from the block only, `ssh_keys_set` replaces
//! the block only. The file is written atomically (a staging file in
//! `~/.ssh`, `fsync`, `rename`) owned by the user, mode 0600; `~/.ssh` is
//! created mode 0700 and owned by the user when missing, and set to 0700
//! when it exists. The home directory comes from the passwd database; below
//! it nothing is followed: `~/.ssh` or `authorized_keys` being a symbolic
//! link (or the file having several hard links) is refused, since as root
//! the agent would otherwise read or replace a file the user does not own.
//!
//! Key lines are `type base64 [comment]`: a known key type, base64 that
//! decodes to a key blob of that type, no options, no control characters.
//! Logs name keys by type and comment only.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use agent_common::encoding::Encoding;
use agent_common::error::ErrorKind;
use agent_common::methods::{
    AuthorizedKey, LoggedInUser, LoggedInUsers, SetPasswordParams, SetPasswordResult,
    SshKeysParams, SshKeysResult,
};
use serde_json::Value;
use tracing::info;

use crate::error::{io_error_kind, RpcError};
use crate::sys;

/// First line of the agent's block.
pub const BEGIN_MARKER: &str =
    "# BEGIN kvmmanager-agent keys (managed by the guest agent; edit outside this block)";
/// Last line of the agent's block.
pub const END_MARKER: &str = "# END kvmmanager-agent keys";
/// Largest `authorized_keys` the agent reads.
pub const MAX_KEYS_FILE: u64 = 1024 * 1024;
/// Longest `chpasswd` may take.
pub const CHPASSWD_TIMEOUT: Duration = Duration::from_secs(30);

/// Key types accepted.
const KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "ssh-dss",
];

/// Why a users or keys request failed.
#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    /// The user name is not acceptable.
    #[error("{0:?} is not a valid user name")]
    BadName(String),
    /// No such user.
    #[error("no user {0:?} in the guest's passwd database")]
    NoUser(String),
    /// A key line is refused.
    #[error("key {index} is refused: {reason}")]
    BadKey {
        /// Its position in `keys` (from 0).
        index: usize,
        /// Why.
        reason: String,
    },
    /// The password is refused.
    #[error("the password is refused: {0}")]
    BadPassword(&'static str),
    /// Something below the home directory is unsafe to touch.
    #[error("{path} is refused: {reason}")]
    Unsafe {
        /// The path.
        path: String,
        /// Why.
        reason: &'static str,
    },
    /// A file operation failed.
    #[error("cannot {what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `chpasswd` failed.
    #[error("chpasswd failed: {0}")]
    Chpasswd(String),
    /// A worker thread failed.
    #[error("the worker thread failed")]
    Worker,
}

impl RpcError for UsersError {
    fn kind(&self) -> ErrorKind {
        match self {
            UsersError::BadName(_) | UsersError::BadKey { .. } | UsersError::BadPassword(_) => {
                ErrorKind::InvalidParams
            }
            UsersError::NoUser(_) => ErrorKind::NotFound,
            UsersError::Unsafe { .. } => ErrorKind::PolicyDenied,
            UsersError::Io { source, .. } => io_error_kind(source),
            UsersError::Chpasswd(_) => ErrorKind::IoError,
            UsersError::Worker => ErrorKind::InternalError,
        }
    }

    fn data(&self) -> Vec<(&'static str, Value)> {
        match self {
            UsersError::Unsafe { path, .. } | UsersError::Io { path, .. } => {
                vec![("path", path.as_str().into())]
            }
            UsersError::BadKey { index, .. } => vec![("index", (*index as u64).into())],
            _ => Vec::new(),
        }
    }
}

// ---------------------------------------------------------------------------
// utmp

/// Size of glibc's `struct utmp` on 64-bit Linux (and of each record of
/// `/run/utmp`).
const UTMP_RECORD: usize = 384;
/// `ut_type` of a login session.
const USER_PROCESS: i16 = 7;

fn c_string(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

fn i32_at(b: &[u8], at: usize) -> i32 {
    let mut four = [0u8; 4];
    four.copy_from_slice(&b[at..at + 4]);
    i32::from_ne_bytes(four)
}

/// The login sessions of a utmp file's bytes, oldest first.
pub fn parse_utmp(bytes: &[u8]) -> Vec<LoggedInUser> {
    let mut users: Vec<LoggedInUser> = bytes
        .chunks_exact(UTMP_RECORD)
        .filter(|r| i16::from_ne_bytes([r[0], r[1]]) == USER_PROCESS)
        .map(|r| LoggedInUser {
            name: c_string(&r[44..76]),
            terminal: c_string(&r[8..40]),
            host: c_string(&r[76..332]),
            login_time: f64::from(i32_at(r, 340)) + f64::from(i32_at(r, 344)) / 1e6,
        })
        .filter(|u| !u.name.is_empty())
        .collect();
    users.sort_by(|a, b| a.login_time.total_cmp(&b.login_time));
    users
}

/// `get_users`: the sessions in `/run/utmp` (none if there is no utmp).
pub fn get_users() -> Result<LoggedInUsers, UsersError> {
    for path in ["/run/utmp", "/var/run/utmp"] {
        match std::fs::read(path) {
            Ok(b) => {
                return Ok(LoggedInUsers {
                    users: parse_utmp(&b),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(UsersError::Io {
                    what: "read",
                    path: path.into(),
                    source,
                })
            }
        }
    }
    Ok(LoggedInUsers { users: Vec::new() })
}

// ---------------------------------------------------------------------------
// Users

/// A user from the passwd database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserEntry {
    /// Name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory.
    pub home: PathBuf,
}

/// Where users are looked up: the guest's passwd database, or a test's.
pub trait UserDb: Send + Sync {
    /// The user called `name`.
    fn lookup(&self, name: &str) -> Result<UserEntry, UsersError>;
}

/// The guest's passwd database (`getpwnam_r`).
pub struct SystemUsers;

impl UserDb for SystemUsers {
    fn lookup(&self, name: &str) -> Result<UserEntry, UsersError> {
        match nix::unistd::User::from_name(name) {
            Ok(Some(u)) => Ok(UserEntry {
                name: u.name,
                uid: u.uid.as_raw(),
                gid: u.gid.as_raw(),
                home: u.dir,
            }),
            Ok(None) => Err(UsersError::NoUser(name.to_owned())),
            Err(e) => Err(UsersError::Io {
                what: "look up the user",
                path: name.to_owned(),
                source: io::Error::from_raw_os_error(e as i32),
            }),
        }
    }
}

/// A user name as `useradd` accepts them: letters, digits, `.`, `_`, `-`
/// (not first), at most 32 bytes.
pub fn check_username(name: &str) -> Result<(), UsersError> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && name != "."
        && name != "..";
    if ok {
        Ok(())
    } else {
        Err(UsersError::BadName(name.to_owned()))
    }
}

// ---------------------------------------------------------------------------
// Keys

/// A validated public key line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    /// Key type.
    pub key_type: String,
    /// The base64 key blob.
    pub blob: String,
    /// Comment (may be empty).
    pub comment: String,
}

impl PublicKey {
    /// The line written to the file.
    pub fn line(&self) -> String {
        if self.comment.is_empty() {
            format!("{} {}", self.key_type, self.blob)
        } else {
            format!("{} {} {}", self.key_type, self.blob, self.comment)
        }
    }

    fn same_key(&self, other: &PublicKey) -> bool {
        self.key_type == other.key_type && self.blob == other.blob
    }

    fn describe(&self) -> String {
        format!("{} {}", self.key_type, self.comment)
    }
}

/// Validates one key line.
pub fn parse_key(line: &str) -> Result<PublicKey, String> {
    if line.chars().any(char::is_control) {
        return Err("it contains a line break or another control character".into());
    }
    let mut words = line.split_whitespace();
    let Some(key_type) = words.next() else {
        return Err("it is empty".into());
    };
    if !KEY_TYPES.contains(&key_type) {
        return Err(format!(
            "{key_type:?} is not a key type (expected one of {}; options before the key are not accepted)",
            KEY_TYPES.join(", ")
        ));
    }
    let Some(blob) = words.next() else {
        return Err("the base64 key is missing".into());
    };
    let bytes = Encoding::Base64
        .decode(blob)
        .map_err(|_| "the key is not valid base64".to_owned())?;
    // The blob starts with the key type as an SSH string.
    let named = bytes
        .get(..4)
        .map(|l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize)
        .and_then(|n| bytes.get(4..4 + n));
    if named != Some(key_type.as_bytes()) {
        return Err(format!("the base64 key is not a {key_type} key"));
    }
    Ok(PublicKey {
        key_type: key_type.to_owned(),
        blob: blob.to_owned(),
        comment: words.collect::<Vec<_>>().join(" "),
    })
}

/// An `authorized_keys` file split around the agent's block.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeysFile {
    /// Lines before the block (all lines, when there is none).
    pub before: Vec<String>,
    /// The block's lines (keys; anything else in it is dropped on write).
    pub managed: Vec<String>,
    /// Lines after the block.
    pub after: Vec<String>,
    /// The file had a block.
    pub had_block: bool,
}

impl KeysFile {
    /// Splits `text`. A block without its end runs to the end of the file.
    pub fn parse(text: &str) -> KeysFile {
        let mut f = KeysFile::default();
        let mut part = 0;
        for line in text.lines() {
            match (part, line.trim_end()) {
                (0, BEGIN_MARKER) => {
                    part = 1;
                    f.had_block = true;
                }
                (1, END_MARKER) => part = 2,
                (0, _) => f.before.push(line.to_owned()),
                (1, l) => {
                    if !l.trim().is_empty() && !l.trim_start().starts_with('#') {
                        f.managed.push(l.to_owned());
                    }
                }
                _ => f.after.push(line.to_owned()),
            }
        }
        f
    }

    /// The file's text: the user's lines where they were, the block where
    /// it was (at the end for a new one), no block when it is empty.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for l in &self.before {
            out.push_str(l);
            out.push('\n');
        }
        if !self.managed.is_empty() {
            out.push_str(BEGIN_MARKER);
            out.push('\n');
            for l in &self.managed {
                out.push_str(l);
                out.push('\n');
            }
            out.push_str(END_MARKER);
            out.push('\n');
        }
        for l in &self.after {
            out.push_str(l);
            out.push('\n');
        }
        out
    }

    /// Every key line with whether the agent manages it, in file order.
    pub fn keys(&self) -> Vec<AuthorizedKey> {
        let user = |l: &String| {
            let t = l.trim();
            (!t.is_empty() && !t.starts_with('#')).then(|| AuthorizedKey {
                line: l.clone(),
                managed: false,
            })
        };
        self.before
            .iter()
            .filter_map(user)
            .chain(self.managed.iter().map(|l| AuthorizedKey {
                line: l.clone(),
                managed: true,
            }))
            .chain(self.after.iter().filter_map(user))
            .collect()
    }

    fn user_keys(&self) -> Vec<PublicKey> {
        self.before
            .iter()
            .chain(&self.after)
            .filter_map(|l| parse_key(l.trim()).ok())
            .collect()
    }

    fn managed_keys(&self) -> Vec<PublicKey> {
        self.managed
            .iter()
            .filter_map(|l| parse_key(l.trim()).ok())
            .collect()
    }
}

/// What an `ssh_keys_*` call does to the block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeysOp {
    /// `ssh_keys_get`.
    Get,
    /// `ssh_keys_add`.
    Add,
    /// `ssh_keys_remove`.
    Remove,
    /// `ssh_keys_set`.
    Set,
}

/// Applies `op` with `keys` to `file`; what changed, for the audit log.
pub fn apply(file: &mut KeysFile, op: KeysOp, keys: &[PublicKey]) -> Vec<String> {
    let mut changed = Vec::new();
    match op {
        KeysOp::Get => {}
        KeysOp::Add => {
            let mut have: Vec<PublicKey> = file.user_keys();
            have.extend(file.managed_keys());
            for k in keys {
                if !have.iter().any(|h| h.same_key(k)) {
                    file.managed.push(k.line());
                    changed.push(format!("added {}", k.describe()));
                    have.push(k.clone());
                }
            }
        }
        KeysOp::Remove => {
            file.managed.retain(|l| match parse_key(l.trim()) {
                Ok(m) if keys.iter().any(|k| k.same_key(&m)) => {
                    changed.push(format!("removed {}", m.describe()));
                    false
                }
                _ => true,
            });
        }
        KeysOp::Set => {
            let old = file.managed_keys();
            let mut new: Vec<PublicKey> = Vec::new();
            for k in keys {
                if !new.iter().any(|n| n.same_key(k)) {
                    new.push(k.clone());
                }
            }
            for o in &old {
                if !new.iter().any(|n| n.same_key(o)) {
                    changed.push(format!("removed {}", o.describe()));
                }
            }
            for n in &new {
                if !old.iter().any(|o| o.same_key(n)) {
                    changed.push(format!("added {}", n.describe()));
                }
            }
            file.managed = new.iter().map(PublicKey::line).collect();
        }
    }
    changed
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> UsersError + 'a {
    move |source| UsersError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

fn refused(path: &Path, reason: &'static str) -> UsersError {
    UsersError::Unsafe {
        path: path.display().to_string(),
        reason,
    }
}

/// Opens `~/.ssh` (creating it if asked), never following a link.
fn open_ssh_dir(home: &File, user: &UserEntry, create: bool) -> Result<Option<File>, UsersError> {
    let path = user.home.join(".ssh");
    let open = || {
        sys::openat2(
            home.as_fd(),
            OsStr::new(".ssh"),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
            sys::BENEATH | libc::RESOLVE_NO_SYMLINKS,
        )
    };
    let fd: OwnedFd = match open() {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            if !create {
                return Ok(None);
            }
            sys::mkdirat(home.as_fd(), OsStr::new(".ssh"), 0o700)
                .map_err(io_err("create", &path))?;
            let fd = open().map_err(io_err("open", &path))?;
            std::os::unix::fs::fchown(&fd, Some(user.uid), Some(user.gid))
                .map_err(io_err("set the owner of", &path))?;
            fd
        }
        Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)) => {
            return Err(refused(&path, "it is a symbolic link or not a directory"))
        }
        Err(e) => return Err(io_err("open", &path)(e)),
    };
    let dir = File::from(fd);
    let meta = dir.metadata().map_err(io_err("inspect", &path))?;
    if meta.uid() != user.uid && meta.uid() != 0 {
        return Err(refused(&path, "it belongs to another user"));
    }
    if create && meta.permissions().mode() & 0o7777 != 0o700 {
        dir.set_permissions(std::fs::Permissions::from_mode(0o700))
            .map_err(io_err("set the mode of", &path))?;
    }
    Ok(Some(dir))
}

/// Reads `authorized_keys` beneath `ssh` (empty when missing).
fn read_keys_file(ssh: &File, path: &Path) -> Result<String, UsersError> {
    let fd = match sys::openat2(
        ssh.as_fd(),
        OsStr::new("authorized_keys"),
        libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK,
        0,
        sys::BENEATH | libc::RESOLVE_NO_SYMLINKS,
    ) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(String::new()),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(refused(path, "it is a symbolic link"))
        }
        Err(e) => return Err(io_err("open", path)(e)),
    };
    let mut f = File::from(fd);
    let meta = f.metadata().map_err(io_err("inspect", path))?;
    if !meta.is_file() {
        return Err(refused(path, "it is not a regular file"));
    }
    if meta.nlink() > 1 {
        return Err(refused(path, "it has several hard links"));
    }
    if meta.len() > MAX_KEYS_FILE {
        return Err(refused(path, "it is larger than 1 MiB"));
    }
    let mut text = String::new();
    f.read_to_string(&mut text).map_err(io_err("read", path))?;
    Ok(text)
}

/// Replaces `authorized_keys` beneath `ssh` with `text`, atomically, owned
/// by the user, mode 0600.
fn write_keys_file(
    ssh: &File,
    user: &UserEntry,
    path: &Path,
    text: &str,
) -> Result<(), UsersError> {
    let tmp = format!(
        ".authorized_keys.kvmtmp-{}",
        sys::random_hex(16).map_err(io_err("name a staging file for", path))?
    );
    let fd = sys::openat2(
        ssh.as_fd(),
        OsStr::new(&tmp),
        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
        0o600,
        sys::BENEATH | libc::RESOLVE_NO_SYMLINKS,
    )
    .map_err(io_err("create a staging file for", path))?;
    let mut f = File::from(fd);
    let written = (|| {
        std::os::unix::fs::fchown(&f, Some(user.uid), Some(user.gid))?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        sys::renameat2(
            ssh.as_fd(),
            OsStr::new(&tmp),
            OsStr::new("authorized_keys"),
            0,
        )
    })();
    if let Err(e) = written {
        let _ = sys::unlinkat(ssh.as_fd(), OsStr::new(&tmp));
        return Err(io_err("write", path)(e));
    }
    // The rename is durable once the directory is flushed.
    let _ = ssh.sync_all();
    Ok(())
}

/// `ssh_keys_get` (`keys` empty) and the changing `ssh_keys_*` methods.
pub fn ssh_keys(
    db: &dyn UserDb,
    op: KeysOp,
    p: SshKeysParams,
) -> Result<SshKeysResult, UsersError> {
    check_username(&p.username)?;
    let keys = p
        .keys
        .iter()
        .enumerate()
        .map(|(index, k)| {
            parse_key(k.trim()).map_err(|reason| UsersError::BadKey { index, reason })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let user = db.lookup(&p.username)?;
    let path = user.home.join(".ssh").join("authorized_keys");
    let home = File::open(&user.home).map_err(io_err("open the home directory", &user.home))?;
    let meta = home.metadata().map_err(io_err("inspect", &user.home))?;
    if !meta.is_dir() {
        return Err(refused(&user.home, "the home directory is not a directory"));
    }
    // A system user whose "home" is a system directory (/, /usr/sbin)
    // gets no ~/.ssh there; sshd would not trust it either.
    if meta.uid() != user.uid && user.uid != 0 {
        return Err(refused(
            &user.home,
            "the home directory does not belong to the user",
        ));
    }
    let ssh = open_ssh_dir(&home, &user, op != KeysOp::Get)?;
    let text = match &ssh {
        Some(dir) => read_keys_file(dir, &path)?,
        None => String::new(),
    };
    let mut file = KeysFile::parse(&text);
    let changed = apply(&mut file, op, &keys);
    if let Some(dir) = &ssh {
        let new = file.render();
        if op != KeysOp::Get && new != text {
            write_keys_file(dir, &user, &path, &new)?;
            info!(user = %user.name, file = %path.display(), changes = ?changed, "authorized_keys updated");
        }
    }
    Ok(SshKeysResult {
        username: user.name,
        path: path.display().to_string(),
        keys: file.keys(),
    })
}

// ---------------------------------------------------------------------------
// Passwords

/// Checks a password (or hash) for `chpasswd`'s one-line input.
pub fn check_password(p: &SetPasswordParams) -> Result<(), UsersError> {
    if p.password.is_empty() {
        return Err(UsersError::BadPassword("it is empty"));
    }
    if p.password
        .chars()
        .any(|c| c == '\n' || c == '\r' || c == '\0')
    {
        return Err(UsersError::BadPassword(
            "it contains a line break or a NUL byte",
        ));
    }
    if p.crypted && (p.password.contains(':') || p.password.contains(char::is_whitespace)) {
        return Err(UsersError::BadPassword(
            "a crypted password (a crypt(3) hash such as $6$...) has no ':' or spaces",
        ));
    }
    Ok(())
}

/// `set_user_password`: `chpasswd` (with `-e` for a crypted one), fed
/// `user:password` on its stdin. Nothing of the password is logged.
pub async fn set_password(
    db: &dyn UserDb,
    chpasswd: Option<&Path>,
    p: SetPasswordParams,
) -> Result<SetPasswordResult, UsersError> {
    check_username(&p.username)?;
    check_password(&p)?;
    let user = db.lookup(&p.username)?;
    let Some(program) = chpasswd else {
        return Err(UsersError::Chpasswd(
            "chpasswd is not installed in the guest (package passwd or shadow)".into(),
        ));
    };
    let args: &[&str] = if p.crypted { &["-e"] } else { &[] };
    let input = format!("{}:{}\n", user.name, p.password).into_bytes();
    let out = crate::exec::run_helper(program, args, Some(input), CHPASSWD_TIMEOUT)
        .await
        .map_err(|e| UsersError::Chpasswd(format!("could not be started: {e}")))?;
    match out.status {
        Some(s) if s.success() => Ok(SetPasswordResult {
            username: user.name,
        }),
        Some(s) => Err(UsersError::Chpasswd(format!(
            "{s}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
        None => Err(UsersError::Chpasswd(format!(
            "did not finish within {} s",
            CHPASSWD_TIMEOUT.as_secs()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ssh-ed25519` with a blob naming its type.
    fn key(n: u8, comment: &str) -> String {
        let mut blob = Vec::new();
        blob.extend_from_slice(&11u32.to_be_bytes());
        blob.extend_from_slice(b"ssh-ed25519");
        blob.extend_from_slice(&32u32.to_be_bytes());
        blob.extend_from_slice(&[n; 32]);
        format!(
            "ssh-ed25519 {} {comment}",
            Encoding::Base64.encode_lossy(&blob)
        )
        .trim_end()
        .to_owned()
    }

    struct Scratch {
        dir: tempfile::TempDir,
        uid: u32,
        gid: u32,
    }

    impl UserDb for Scratch {
        fn lookup(&self, name: &str) -> Result<UserEntry, UsersError> {
            if name != "alice" {
                return Err(UsersError::NoUser(name.into()));
            }
            Ok(UserEntry {
                name: name.into(),
                uid: self.uid,
                gid: self.gid,
                home: self.dir.path().to_owned(),
            })
        }
    }

    fn scratch() -> Scratch {
        let dir = tempfile::tempdir().unwrap();
        // As root, the files go to another user, as they would in a guest.
        let (uid, gid) = if sys::geteuid() == 0 {
            std::os::unix::fs::chown(dir.path(), Some(4321), Some(4321)).unwrap();
            (4321, 4321)
        } else {
            let m = std::fs::metadata(dir.path()).unwrap();
            (m.uid(), m.gid())
        };
        Scratch { dir, uid, gid }
    }

    fn call(db: &Scratch, op: KeysOp, keys: &[String]) -> Result<SshKeysResult, UsersError> {
        ssh_keys(
            db,
            op,
            SshKeysParams {
                username: "alice".into(),
                keys: keys.to_vec(),
            },
        )
    }

    #[test]
    fn key_lines_are_validated() {
        assert!(parse_key(&key(1, "a@b")).is_ok());
        assert_eq!(parse_key(&key(1, "a  b")).unwrap().comment, "a b");
        let good = key(1, "");
        let blob = good.split(' ').nth(1).unwrap();
        let cases = [
            String::new(),
            "ssh-ed25519".into(),
            format!("ssh-rsa {blob}"),
            format!("ssh-ed25519 {blob}\nssh-ed25519 {blob}"),
            "ssh-ed25519 not*base64".into(),
            format!("command=\"/bin/sh\" ssh-ed25519 {blob}"),
            format!("ssh-ed25519 {blob} x\0y"),
        ];
        for c in cases {
            assert!(parse_key(&c).is_err(), "{c:?}");
        }
    }

    #[test]
    fn user_names_are_checked() {
        for ok in ["alice", "a.b_c-d", "u1"] {
            assert!(check_username(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-x", "a:b", "a/b", "..", "a b", &"x".repeat(33)] {
            assert!(check_username(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_round_trip_with_owner_modes_and_hand_written_lines_kept() {
        let db = scratch();
        let ssh = db.dir.path().join(".ssh");
        // Nothing yet: get creates nothing.
        let r = call(&db, KeysOp::Get, &[]).unwrap();
        assert!(r.keys.is_empty());
        assert!(!ssh.exists());
        let r = call(&db, KeysOp::Add, &[key(1, "host-a")]).unwrap();
        assert_eq!(r.keys.len(), 1);
        assert!(r.keys[0].managed && r.keys[0].line == key(1, "host-a"));
        let m = std::fs::metadata(&ssh).unwrap();
        assert_eq!(
            (m.uid(), m.gid(), m.permissions().mode() & 0o7777),
            (db.uid, db.gid, 0o700)
        );
        let file = ssh.join("authorized_keys");
        let m = std::fs::metadata(&file).unwrap();
        assert_eq!(
            (m.uid(), m.gid(), m.permissions().mode() & 0o7777),
            (db.uid, db.gid, 0o600)
        );
        // The user writes lines of their own around the block.
        let text = std::fs::read_to_string(&file).unwrap();
        let hand = format!("# mine\n{}\n", key(9, "by-hand"));
        std::fs::write(&file, format!("{hand}{text}restrict {}\n", key(8, "opt"))).unwrap();
        let r = call(
            &db,
            KeysOp::Add,
            &[key(2, "host-b"), key(9, "dup of by-hand")],
        )
        .unwrap();
        let lines: Vec<(&str, bool)> = r
            .keys
            .iter()
            .map(|k| (k.line.as_str(), k.managed))
            .collect();
        let (k9, k1, k2) = (key(9, "by-hand"), key(1, "host-a"), key(2, "host-b"));
        let k8 = format!("restrict {}", key(8, "opt"));
        assert_eq!(
            lines,
            [
                (k9.as_str(), false),
                (k1.as_str(), true),
                (k2.as_str(), true),
                (k8.as_str(), false)
            ]
        );
        // Remove and set touch the block only.
        let r = call(&db, KeysOp::Remove, &[key(1, ""), key(9, "")]).unwrap();
        assert_eq!(r.keys.iter().filter(|k| k.managed).count(), 1);
        assert!(r.keys.iter().any(|k| k.line == k9 && !k.managed));
        let r = call(&db, KeysOp::Set, &[key(3, "only")]).unwrap();
        let managed: Vec<&str> = r
            .keys
            .iter()
            .filter(|k| k.managed)
            .map(|k| k.line.as_str())
            .collect();
        assert_eq!(managed, [key(3, "only")]);
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.starts_with(&hand), "{text}");
        assert!(text.ends_with(&format!("{k8}\n")), "{text}");
        // An empty set removes the block, and only the block.
        call(&db, KeysOp::Set, &[]).unwrap();
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            format!("{hand}{k8}\n")
        );
        let m = std::fs::metadata(&file).unwrap();
        assert_eq!((m.uid(), m.permissions().mode() & 0o7777), (db.uid, 0o600));
    }

    #[test]
    fn links_bad_keys_and_unknown_users_are_refused_without_writing() {
        let db = scratch();
        let e = call(&db, KeysOp::Add, &[key(1, ""), "ssh-ed25519 AAAA".into()]).unwrap_err();
        assert!(matches!(e, UsersError::BadKey { index: 1, .. }), "{e}");
        assert!(!db.dir.path().join(".ssh").exists());
        let e = ssh_keys(
            &db,
            KeysOp::Get,
            SshKeysParams {
                username: "bob".into(),
                keys: vec![],
            },
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        // A home that is not the user's is refused.
        let foreign = Scratch {
            dir: tempfile::tempdir().unwrap(),
            uid: db.uid + 1,
            gid: db.gid,
        };
        let e = call(&foreign, KeysOp::Add, &[key(1, "")]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PolicyDenied, "{e}");
        assert!(!foreign.dir.path().join(".ssh").exists());
        let elsewhere = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), db.dir.path().join(".ssh")).unwrap();
        let e = call(&db, KeysOp::Add, &[key(1, "")]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PolicyDenied, "{e}");
        std::fs::remove_file(db.dir.path().join(".ssh")).unwrap();
        std::fs::create_dir(db.dir.path().join(".ssh")).unwrap();
        let secret = elsewhere.path().join("secret");
        std::fs::write(&secret, "not yours\n").unwrap();
        std::os::unix::fs::symlink(&secret, db.dir.path().join(".ssh/authorized_keys")).unwrap();
        let e = call(&db, KeysOp::Get, &[]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PolicyDenied, "{e}");
        let e = call(&db, KeysOp::Add, &[key(1, "")]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PolicyDenied, "{e}");
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "not yours\n");
    }

    #[test]
    fn utmp_records_are_read() {
        let mut rec = vec![0u8; UTMP_RECORD];
        rec[..2].copy_from_slice(&USER_PROCESS.to_ne_bytes());
        rec[8..13].copy_from_slice(b"pts/0");
        rec[44..49].copy_from_slice(b"alice");
        rec[76..85].copy_from_slice(b"10.0.0.20");
        rec[340..344].copy_from_slice(&1_763_784_000i32.to_ne_bytes());
        rec[344..348].copy_from_slice(&500_000i32.to_ne_bytes());
        let mut boot = vec![0u8; UTMP_RECORD];
        boot[..2].copy_from_slice(&2i16.to_ne_bytes());
        let mut bytes = boot;
        bytes.extend_from_slice(&rec);
        bytes.extend_from_slice(&[1, 2, 3]); // a torn record at the end
        let users = parse_utmp(&bytes);
        assert_eq!(users.len(), 1);
        assert_eq!(users[0].name, "alice");
        assert_eq!(users[0].terminal, "pts/0");
        assert_eq!(users[0].host, "10.0.0.20");
        assert_eq!(users[0].login_time, 1_763_784_000.5);
        assert!(get_users().is_ok());
    }

    #[test]
    fn passwords_are_checked_before_anything_runs() {
        let p = |password: &str, crypted| SetPasswordParams {
            username: "alice".into(),
            password: password.into(),
            crypted,
        };
        assert!(check_password(&p("s3cret: with colon", false)).is_ok());
        assert!(check_password(&p("$6$salt$hash", true)).is_ok());
        for (pw, crypted) in [
            ("", false),
            ("a\nb", false),
            ("a\0", false),
            ("$6$a:b", true),
            ("$6$a b", true),
        ] {
            assert!(check_password(&p(pw, crypted)).is_err(), "{pw:?}");
        }
    }

    #[tokio::test]
    async fn chpasswd_gets_the_line_on_stdin_and_e_when_crypted() {
        let db = scratch();
        let bin = tempfile::tempdir().unwrap();
        let record = bin.path().join("record");
        let fake = bin.path().join("chpasswd");
        std::fs::write(
            &fake,
            format!(
                "#!/bin/sh\necho \"args:$*\" > {0}\ncat >> {0}\n",
                record.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let r = set_password(
            &db,
            Some(&fake),
            SetPasswordParams {
                username: "alice".into(),
                password: "$6$salt$hash".into(),
                crypted: true,
            },
        )
        .await
        .unwrap();
        assert_eq!(r.username, "alice");
        assert_eq!(
            std::fs::read_to_string(&record).unwrap(),
            "args:-e\nalice:$6$salt$hash\n"
        );
        set_password(
            &db,
            Some(&fake),
            SetPasswordParams {
                username: "alice".into(),
                password: "plain pw".into(),
                crypted: false,
            },
        )
        .await
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(&record).unwrap(),
            "args:\nalice:plain pw\n"
        );
        std::fs::write(
            &fake,
            "#!/bin/sh\necho 'pam_chauthtok() failed' >&2\nexit 1\n",
        )
        .unwrap();
        let e = set_password(
            &db,
            Some(&fake),
            SetPasswordParams {
                username: "alice".into(),
                password: "pw".into(),
                crypted: false,
            },
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("pam_chauthtok"), "{e}");
        assert!(!e.to_string().contains("pw\n"));
    }
}
