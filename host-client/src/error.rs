//! The one error type of the client: [`ClientError`].

use std::path::PathBuf;
use std::time::Duration;

use agent_common::error::{ErrorKind, ErrorObject};

/// Why a call, a connection or a transfer failed.
///
/// Every variant says what failed; the `source` (if any) says why. The
/// `kvmmanager-ctl` command maps each variant to one exit code.
///
/// ```
/// use host_client::ClientError;
/// use agent_common::error::{ErrorKind, ErrorObject};
///
/// let e = ClientError::Agent {
///     method: "file_read".into(),
///     error: ErrorObject::new(ErrorKind::NotFound, "no such file"),
/// };
/// assert_eq!(e.kind(), Some(ErrorKind::NotFound));
/// assert!(e.to_string().contains("no such file"));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The channel socket could not be opened (missing, refused, no permission).
    #[error("cannot connect to the agent socket {}", path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// Connecting took longer than [`crate::ClientOptions::connect_timeout`].
    #[error("connecting to the agent socket {} timed out after {after:?}", path.display())]
    ConnectTimeout {
        /// The socket path.
        path: PathBuf,
        /// How long the client waited.
        after: Duration,
    },
    /// Reading from or writing to the connection failed.
    #[error("I/O error on the agent connection")]
    Io(#[source] std::io::Error),
    /// The connection closed (VM rebooted, agent restarted, QEMU gone), or
    /// the client was closed, before the request was sent: it did not run.
    /// The next call reconnects (unless the client was closed).
    #[error("the connection to the agent was lost")]
    ConnectionLost,
    /// The connection closed after the request was sent and before its
    /// reply: the request may have run on the agent. The next call
    /// reconnects.
    #[error("the connection to the agent was lost after {method} was sent (it may have run)")]
    RequestLost {
        /// The method.
        method: String,
    },
    /// No reply arrived in time (or the handle's deadline passed). The
    /// connection is resynchronised before the next call, so a late reply
    /// is never taken for another call's answer; the agent was asked to
    /// stop the request ([`crate::ClientOptions::cancel_abandoned`]).
    #[error("no reply to {method} within {after:?}")]
    Timeout {
        /// The method that timed out (`sync` while connecting).
        method: String,
        /// The time limit that expired.
        after: Duration,
    },
    /// The agent answered with a JSON-RPC error.
    #[error("the agent refused {method}: {error}")]
    Agent {
        /// The method that failed.
        method: String,
        /// The agent's error object (code, message, `data.kind`).
        error: ErrorObject,
    },
    /// The request is longer than the agent accepts (its
    /// `limits.max_message_size`); it was not sent.
    #[error("the {method} request is {size} bytes, more than the agent accepts ({limit} bytes)")]
    RequestTooLarge {
        /// The method.
        method: String,
        /// Length of the request line.
        size: usize,
        /// The agent's `max_message_size`.
        limit: u64,
    },
    /// The agent broke the protocol (a result of the wrong shape, a chunk of
    /// the wrong size, ...).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// A result could not be decoded into the method's result type.
    #[error("the reply to {method} does not match its result type")]
    BadResult {
        /// The method.
        method: String,
        /// The decoding error.
        #[source]
        source: serde_json::Error,
    },
    /// Params could not be serialised.
    #[error("could not encode the params of {method}")]
    Encode {
        /// The method.
        method: String,
        /// The encoding error.
        #[source]
        source: serde_json::Error,
    },
    /// A local file (source of a push, destination of a pull) failed.
    #[error("local file {}", path.display())]
    LocalFile {
        /// The local path.
        path: PathBuf,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// A push or pull ([`crate::Client::push`], [`crate::Client::pull`],
    /// `push_from`, `read_to`) failed; `source` says why (look through it
    /// with [`ClientError::root`]; the helpers such as
    /// [`ClientError::kind`] and [`ClientError::is_transient`] do).
    #[error("the transfer of {guest_path} stopped after {done} bytes")]
    Transfer {
        /// The guest file.
        guest_path: String,
        /// Bytes done when it failed: acknowledged by the agent for a push,
        /// written locally for a pull (a failed pull leaves no file).
        done: u64,
        /// What failed.
        #[source]
        source: Box<ClientError>,
    },
    /// A [`crate::blocking::Client`] was used from inside a tokio runtime,
    /// where blocking would stall the runtime. Nothing was sent.
    #[error("blocking::Client cannot be used inside a tokio runtime (it would block it); use the async host_client::Client there")]
    InsideRuntime,
    /// A stream ended before its end: the agent reset it (`reason` says
    /// why, such as a read error in the guest).
    #[error("the agent ended the {method} stream early: {reason}")]
    StreamReset {
        /// The method that opened the stream.
        method: String,
        /// The agent's reason.
        reason: String,
    },
    /// The guest file changed size while it was being read.
    #[error("the guest file {path} changed size during the transfer (from {expected} to {actual} bytes)")]
    FileChanged {
        /// The guest path.
        path: String,
        /// The size at the start of the transfer.
        expected: u64,
        /// The size reported later.
        actual: u64,
    },
}

impl ClientError {
    pub(crate) fn in_transfer(guest_path: &str, done: u64, e: ClientError) -> ClientError {
        ClientError::Transfer {
            guest_path: guest_path.to_owned(),
            done,
            source: Box::new(e),
        }
    }

    /// The error behind any [`ClientError::Transfer`] wrapping.
    ///
    /// ```
    /// # use host_client::ClientError;
    /// let e = ClientError::Transfer {
    ///     guest_path: "/tmp/x".into(),
    ///     done: 1 << 20,
    ///     source: Box::new(ClientError::ConnectionLost),
    /// };
    /// assert!(matches!(e.root(), ClientError::ConnectionLost));
    /// ```
    pub fn root(&self) -> &ClientError {
        let mut e = self;
        while let ClientError::Transfer { source, .. } = e {
            e = source;
        }
        e
    }

    /// [`ClientError::root`], by value.
    ///
    /// ```
    /// # use host_client::ClientError;
    /// assert!(matches!(ClientError::ConnectionLost.into_root(), ClientError::ConnectionLost));
    /// ```
    pub fn into_root(self) -> ClientError {
        match self {
            ClientError::Transfer { source, .. } => source.into_root(),
            e => e,
        }
    }

    /// Bytes a failed transfer had done ([`ClientError::Transfer`]).
    ///
    /// ```
    /// # use host_client::ClientError;
    /// assert_eq!(ClientError::ConnectionLost.transfer_done(), None);
    /// ```
    pub fn transfer_done(&self) -> Option<u64> {
        match self {
            ClientError::Transfer { done, .. } => Some(*done),
            _ => None,
        }
    }

    /// The agent's error kind, for [`ClientError::Agent`].
    ///
    /// ```
    /// # use host_client::ClientError;
    /// assert_eq!(ClientError::ConnectionLost.kind(), None);
    /// ```
    pub fn kind(&self) -> Option<ErrorKind> {
        match self.root() {
            ClientError::Agent { error, .. } => error.kind(),
            _ => None,
        }
    }

    /// The agent's error object, for [`ClientError::Agent`].
    ///
    /// ```
    /// # use host_client::ClientError;
    /// assert!(ClientError::ConnectionLost.agent_error().is_none());
    /// ```
    pub fn agent_error(&self) -> Option<&ErrorObject> {
        match self.root() {
            ClientError::Agent { error, .. } => Some(error),
            _ => None,
        }
    }

    /// True when the same call may succeed if made again later: the
    /// connection failed or was lost (the agent restarting, the VM
    /// rebooting), the call timed out, or the agent answered `busy` (it did
    /// nothing) or `shutting_down`. A call that changes the guest may have
    /// run already when [`ClientError::may_have_run`] says so.
    ///
    /// ```
    /// # use host_client::ClientError;
    /// assert!(ClientError::ConnectionLost.is_transient());
    /// assert!(!ClientError::Protocol("bad".into()).is_transient());
    /// ```
    pub fn is_transient(&self) -> bool {
        use std::io::ErrorKind as Io;
        match self.root() {
            ClientError::Connect { source, .. } => matches!(
                source.kind(),
                Io::NotFound
                    | Io::ConnectionRefused
                    | Io::ConnectionReset
                    | Io::TimedOut
                    | Io::Interrupted
                    | Io::WouldBlock
            ),
            ClientError::ConnectTimeout { .. }
            | ClientError::ConnectionLost
            | ClientError::RequestLost { .. }
            | ClientError::Timeout { .. }
            | ClientError::Io(_) => true,
            ClientError::Agent { .. } => matches!(
                self.kind(),
                Some(ErrorKind::Busy | ErrorKind::ShuttingDown | ErrorKind::Timeout)
            ),
            _ => false,
        }
    }

    /// True when the request may have reached the agent and run although
    /// no result says so: the connection was lost after it was sent, the
    /// client gave up waiting, or the agent's own time limit left the
    /// outcome of a `file_write` unknown. Retry a call that changes the
    /// guest only after checking.
    ///
    /// ```
    /// # use host_client::ClientError;
    /// assert!(!ClientError::ConnectionLost.may_have_run());
    /// assert!(ClientError::RequestLost { method: "exec_command".into() }.may_have_run());
    /// ```
    pub fn may_have_run(&self) -> bool {
        match self.root() {
            ClientError::RequestLost { .. } | ClientError::Timeout { .. } => true,
            ClientError::Agent { error, .. } => error
                .data
                .as_ref()
                .and_then(|d| d.get("outcome"))
                .is_some_and(|o| o == "unknown"),
            _ => false,
        }
    }

    /// The agent refused the request under its policy (`policy_denied`).
    ///
    /// ```
    /// # use host_client::ClientError;
    /// assert!(!ClientError::ConnectionLost.is_policy_denied());
    /// ```
    pub fn is_policy_denied(&self) -> bool {
        self.kind() == Some(ErrorKind::PolicyDenied)
    }

    /// The agent cannot serve the method: `not_supported`, or
    /// `method_not_found` (an older agent).
    ///
    /// ```
    /// # use host_client::ClientError;
    /// assert!(!ClientError::ConnectionLost.is_not_supported());
    /// ```
    pub fn is_not_supported(&self) -> bool {
        matches!(
            self.kind(),
            Some(ErrorKind::NotSupported | ErrorKind::MethodNotFound)
        )
    }

    /// The agent answered `busy` (after the client's own retries): nothing
    /// was done.
    ///
    /// ```
    /// # use host_client::ClientError;
    /// use agent_common::error::{ErrorKind, ErrorObject};
    /// let e = ClientError::Agent { method: "exec_command".into(), error: ErrorObject::new(ErrorKind::Busy, "busy") };
    /// assert!(e.is_busy() && e.is_transient());
    /// ```
    pub fn is_busy(&self) -> bool {
        self.kind() == Some(ErrorKind::Busy)
    }

    /// A time limit passed: the client's (no reply in time, connecting too
    /// long) or the agent's (`timeout`).
    ///
    /// ```
    /// # use host_client::ClientError;
    /// let e = ClientError::Timeout { method: "ping".into(), after: std::time::Duration::from_secs(1) };
    /// assert!(e.is_timeout());
    /// ```
    pub fn is_timeout(&self) -> bool {
        matches!(
            self.root(),
            ClientError::Timeout { .. } | ClientError::ConnectTimeout { .. }
        ) || self.kind() == Some(ErrorKind::Timeout)
    }

    /// The request was stopped by a `cancel` (`cancelled`).
    ///
    /// ```
    /// # use host_client::ClientError;
    /// assert!(!ClientError::ConnectionLost.is_cancelled());
    /// ```
    pub fn is_cancelled(&self) -> bool {
        self.kind() == Some(ErrorKind::Cancelled)
    }
}
