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
    /// The connection closed (VM rebooted, agent restarted, QEMU gone) while
    /// the call was pending. The next call reconnects.
    #[error("the connection to the agent was lost")]
    ConnectionLost,
    /// No reply arrived in time. The connection is resynchronised before the
    /// next call, so a late reply is never taken for another call's answer.
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
    /// The agent's error kind, for [`ClientError::Agent`].
    ///
    /// ```
    /// # use host_client::ClientError;
    /// assert_eq!(ClientError::ConnectionLost.kind(), None);
    /// ```
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
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
        match self {
            ClientError::Agent { error, .. } => Some(error),
            _ => None,
        }
    }

    /// True when retrying on a fresh connection may help (connection lost,
    /// timeout, I/O error).
    ///
    /// ```
    /// # use host_client::ClientError;
    /// assert!(ClientError::ConnectionLost.is_transient());
    /// ```
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ClientError::ConnectionLost | ClientError::Timeout { .. } | ClientError::Io(_)
        )
    }
}
