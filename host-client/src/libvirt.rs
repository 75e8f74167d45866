//! libvirt helpers: find a domain's agent channel socket, and the `<channel>`
//! XML that gives a domain the agent's port.
//!
//! A platform that holds the domain XML already (from the `virt` crate, or
//! its own libvirt connection) reads the socket from it with
//! [`channel_socket_from_xml`], without running anything;
//! [`channel_socket_for`] asks `virsh` with a given connection URI
//! (`qemu:///system`, `qemu:///session`, a remote one) without blocking the
//! async runtime; [`channel_socket`] is the blocking form used by
//! `kvmmanager-ctl`.
//!
//! ```no_run
//! let path = host_client::libvirt::channel_socket("vm1")?;
//! println!("{}", path.display());
//! # Ok::<(), host_client::libvirt::LibvirtError>(())
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;

use agent_common::DEFAULT_CHANNEL_NAME;

/// Where libvirt puts channel sockets it names itself, one directory per
/// running domain (`domain-<id>-<name>`).
pub const CHANNEL_TARGET_DIR: &str = "/var/lib/libvirt/qemu/channel/target";

/// Why a domain's channel socket could not be found.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LibvirtError {
    /// `virsh dumpxml` failed and no socket was found under [`CHANNEL_TARGET_DIR`].
    #[error("cannot read the definition of domain {domain}: {reason}")]
    Virsh {
        /// The domain name.
        domain: String,
        /// What virsh said (or why it did not run).
        reason: String,
    },
    /// The domain has no `<channel type='unix'>` with the agent's target name.
    #[error("domain {domain} has no unix channel named {DEFAULT_CHANNEL_NAME}")]
    NoChannel {
        /// The domain name.
        domain: String,
    },
    /// The channel has no source path: the domain is probably not running.
    #[error("the {DEFAULT_CHANNEL_NAME} channel of domain {domain} has no socket path (is the domain running?)")]
    NoPath {
        /// The domain name.
        domain: String,
    },
}

/// The `<channel>` element to add to a domain (`virsh edit DOMAIN`, inside
/// `<devices>`) so the guest gets the agent's virtio-serial port.
///
/// ```
/// let xml = host_client::libvirt::channel_xml();
/// assert!(xml.contains("org.kvmmanager.agent.0"));
/// ```
pub fn channel_xml() -> String {
    format!(
        "<channel type='unix'>\n  <source mode='bind'/>\n  <target type='virtio' name='{DEFAULT_CHANNEL_NAME}'/>\n</channel>"
    )
}

/// The host socket of `domain`'s agent channel.
///
/// Runs `virsh dumpxml DOMAIN` (with `-c qemu:///system` unless
/// `LIBVIRT_DEFAULT_URI` is set) and reads the channel's source path; if
/// virsh is missing or fails, looks under [`CHANNEL_TARGET_DIR`].
///
/// ```no_run
/// let p = host_client::libvirt::channel_socket("vm1")?;
/// # Ok::<(), host_client::libvirt::LibvirtError>(())
/// ```
pub fn channel_socket(domain: &str) -> Result<PathBuf, LibvirtError> {
    let mut cmd = Command::new("virsh");
    if std::env::var_os("LIBVIRT_DEFAULT_URI").is_none() {
        cmd.args(["-c", "qemu:///system"]);
    }
    cmd.args(["dumpxml", "--", domain]);
    let reason = match cmd.output() {
        Ok(out) if out.status.success() => {
            return channel_socket_from_xml(domain, &String::from_utf8_lossy(&out.stdout));
        }
        Ok(out) => virsh_reason(&out.stderr),
        Err(e) => format!("cannot run virsh: {e}"),
    };
    find_in_target_dir(Path::new(CHANNEL_TARGET_DIR), domain).ok_or(LibvirtError::Virsh {
        domain: domain.to_owned(),
        reason,
    })
}

/// The agent channel's socket in `domain`'s XML (`virsh dumpxml`,
/// `virDomainGetXMLDesc`): the source path of its `<channel type='unix'>`
/// whose target is named `org.kvmmanager.agent.0`. `domain` names the
/// domain in errors.
///
/// ```
/// use host_client::libvirt::{channel_socket_from_xml, LibvirtError};
/// let xml = "<domain><devices><channel type='unix'>\
///   <source mode='bind' path='/run/vm1.sock'/>\
///   <target type='virtio' name='org.kvmmanager.agent.0'/></channel></devices></domain>";
/// assert_eq!(channel_socket_from_xml("vm1", xml)?, std::path::PathBuf::from("/run/vm1.sock"));
/// assert!(matches!(
///     channel_socket_from_xml("vm2", "<domain/>"),
///     Err(LibvirtError::NoChannel { .. })
/// ));
/// # Ok::<(), LibvirtError>(())
/// ```
pub fn channel_socket_from_xml(domain: &str, xml: &str) -> Result<PathBuf, LibvirtError> {
    let domain = domain.to_owned();
    match socket_from_xml(xml, DEFAULT_CHANNEL_NAME) {
        Ok(Some(p)) => Ok(PathBuf::from(p)),
        Ok(None) => Err(LibvirtError::NoPath { domain }),
        Err(()) => Err(LibvirtError::NoChannel { domain }),
    }
}

/// The host socket of `domain`'s agent channel, asking `virsh -c URI
/// dumpxml DOMAIN` without blocking the runtime; `uri` `None` uses virsh's
/// default (`LIBVIRT_DEFAULT_URI`, else libvirt's own choice: the session
/// for an unprivileged user). If virsh is missing or fails, looks under
/// [`CHANNEL_TARGET_DIR`] (system domains only).
///
/// ```no_run
/// # async fn demo() -> Result<(), host_client::libvirt::LibvirtError> {
/// let p = host_client::libvirt::channel_socket_for(Some("qemu:///session"), "vm1").await?;
/// # Ok(())
/// # }
/// ```
pub async fn channel_socket_for(uri: Option<&str>, domain: &str) -> Result<PathBuf, LibvirtError> {
    let mut cmd = tokio::process::Command::new("virsh");
    if let Some(uri) = uri {
        cmd.args(["-c", uri]);
    }
    cmd.args(["dumpxml", "--", domain]).kill_on_drop(true);
    let reason = match cmd.output().await {
        Ok(out) if out.status.success() => {
            return channel_socket_from_xml(domain, &String::from_utf8_lossy(&out.stdout));
        }
        Ok(out) => virsh_reason(&out.stderr),
        Err(e) => format!("cannot run virsh: {e}"),
    };
    let (dir, name) = (Path::new(CHANNEL_TARGET_DIR), domain.to_owned());
    let found = tokio::task::spawn_blocking(move || find_in_target_dir(dir, &name))
        .await
        .ok()
        .flatten();
    found.ok_or(LibvirtError::Virsh {
        domain: domain.to_owned(),
        reason,
    })
}

/// What virsh said on stderr, on one line.
fn virsh_reason(stderr: &[u8]) -> String {
    String::from_utf8_lossy(stderr)
        .lines()
        .map(|l| l.trim().trim_start_matches("error: "))
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(": ")
}

struct Channel {
    is_unix: bool,
    target_name: Option<String>,
    source_path: Option<String>,
}

/// Every `<channel>` element in a domain XML (a small scan, not a full XML
/// parser: libvirt writes its XML in a regular form).
fn channels(xml: &str) -> impl Iterator<Item = Channel> + '_ {
    let mut rest = xml;
    std::iter::from_fn(move || {
        let start = find_tag(rest, "channel")?;
        let body_start = &rest[start..];
        let end = body_start
            .find("</channel>")
            .map(|e| e + "</channel>".len())
            .or_else(|| body_start.find("/>").map(|e| e + 2))
            .unwrap_or(body_start.len());
        let element = &body_start[..end];
        rest = &body_start[end..];
        let open = &element[..element.find('>').unwrap_or(element.len())];
        let target = find_tag(element, "target").map(|i| tag_text(&element[i..]));
        let source = find_tag(element, "source").map(|i| tag_text(&element[i..]));
        Some(Channel {
            is_unix: attr(open, "type").as_deref() == Some("unix"),
            target_name: target.and_then(|t| attr(t, "name")),
            source_path: source.and_then(|s| attr(s, "path")),
        })
    })
}

/// Index of the next `<name` start tag (followed by whitespace, `/` or `>`).
fn find_tag(s: &str, name: &str) -> Option<usize> {
    let pat = format!("<{name}");
    let mut from = 0;
    while let Some(i) = s[from..].find(&pat) {
        let at = from + i;
        match s[at + pat.len()..].chars().next() {
            Some(c) if c.is_whitespace() || c == '/' || c == '>' => return Some(at),
            _ => from = at + pat.len(),
        }
    }
    None
}

/// The start tag at the beginning of `s`, up to its `>`.
fn tag_text(s: &str) -> &str {
    &s[..s.find('>').map_or(s.len(), |i| i + 1)]
}

/// The value of attribute `name` in a start tag, quotes of either kind,
/// with the five predefined XML entities decoded.
fn attr(tag: &str, name: &str) -> Option<String> {
    let mut from = 0;
    while let Some(i) = tag[from..].find(name) {
        let at = from + i;
        from = at + name.len();
        let before_ok = tag[..at].chars().last().is_some_and(char::is_whitespace);
        let after = tag[from..].trim_start();
        if !before_ok || !after.starts_with('=') {
            continue;
        }
        let value = after[1..].trim_start();
        let quote = value.chars().next()?;
        if quote != '\'' && quote != '"' {
            return None;
        }
        let end = value[1..].find(quote)?;
        let raw = &value[1..1 + end];
        return Some(
            raw.replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&quot;", "\"")
                .replace("&apos;", "'")
                .replace("&amp;", "&"),
        );
    }
    None
}

/// The source path of the unix channel named `name`: `Err` if there is no
/// such channel, `Ok(None)` if it has no path.
fn socket_from_xml(xml: &str, name: &str) -> Result<Option<String>, ()> {
    channels(xml)
        .find(|c| c.is_unix && c.target_name.as_deref() == Some(name))
        .map(|c| c.source_path)
        .ok_or(())
}

/// `DIR/domain-<id>-<domain>/org.kvmmanager.agent.0`, if it exists. libvirt
/// shortens long domain names in these directory names to 20 characters.
fn find_in_target_dir(dir: &Path, domain: &str) -> Option<PathBuf> {
    let short: String = domain.chars().take(20).collect();
    let entries = std::fs::read_dir(dir).ok()?;
    entries.flatten().find_map(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        let rest = name.strip_prefix("domain-")?;
        let (_id, dom) = rest.split_once('-')?;
        if dom != domain && dom != short {
            return None;
        }
        let sock = e.path().join(DEFAULT_CHANNEL_NAME);
        sock.exists().then_some(sock)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOMAIN: &str = r#"<domain type='kvm' id='3'>
  <name>vm1</name>
  <devices>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-3-vm1/org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>
      <alias name='channel0'/>
    </channel>
    <channel type="pty">
      <target type="virtio" name="org.kvmmanager.agent.0"/>
    </channel>
    <channel type="unix">
      <source mode="bind" path="/run/a&amp;b/agent.sock"/>
      <target type="virtio" name="org.kvmmanager.agent.0" state="disconnected"/>
    </channel>
  </devices>
</domain>"#;

    #[test]
    fn finds_the_agent_channel_among_others() {
        let cases: &[(&str, Result<Option<&str>, ()>)] = &[
            (DOMAIN, Ok(Some("/run/a&b/agent.sock"))),
            (
                "<channel type='unix'><source mode='bind'/><target type='virtio' name='org.kvmmanager.agent.0'/></channel>",
                Ok(None),
            ),
            ("<domain><devices></devices></domain>", Err(())),
            (
                "<channels/><channel type='unix'><target name='org.kvmmanager.agent.0x'/></channel>",
                Err(()),
            ),
        ];
        for (xml, want) in cases {
            let got = socket_from_xml(xml, DEFAULT_CHANNEL_NAME);
            assert_eq!(got, want.map(|o| o.map(str::to_owned)), "{xml}");
        }
    }

    #[test]
    fn channel_xml_is_found_by_the_scanner() {
        let xml = channel_xml();
        assert_eq!(socket_from_xml(&xml, DEFAULT_CHANNEL_NAME), Ok(None));
    }

    #[test]
    fn attributes_need_a_whole_name() {
        assert_eq!(
            attr("<source mode='bind' xpath='/a' path='/b'/>", "path").as_deref(),
            Some("/b")
        );
        assert_eq!(attr("<source mode=\"x\"/>", "path"), None);
    }

    #[test]
    fn target_dir_fallback_matches_full_and_shortened_names() {
        let dir = tempfile::tempdir().unwrap();
        let long = "a-very-long-domain-name-indeed";
        for d in [
            "domain-7-vm1",
            "domain-8-a-very-long-domain-n",
            "domain-9-other",
        ] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
            std::fs::write(dir.path().join(d).join(DEFAULT_CHANNEL_NAME), "").unwrap();
        }
        assert_eq!(
            find_in_target_dir(dir.path(), "vm1"),
            Some(dir.path().join("domain-7-vm1").join(DEFAULT_CHANNEL_NAME))
        );
        assert_eq!(
            find_in_target_dir(dir.path(), long),
            Some(
                dir.path()
                    .join("domain-8-a-very-long-domain-n")
                    .join(DEFAULT_CHANNEL_NAME)
            )
        );
        assert_eq!(find_in_target_dir(dir.path(), "vm2"), None);
    }
}
