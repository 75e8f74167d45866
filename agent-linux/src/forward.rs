//! Port forwarding (`forward_open`; PROTOCOL.md): a TCP connection inside
//! the guest to an address `security.allowed_forwards` lists, its bytes
//! carried by a stream (`crate::streams`) both ways. Nothing listens in
//! the guest: the host listens and opens one stream per connection.
//!
//! The connection's half-closes follow the stream's: the host's
//! `stream_close` shuts the socket's sending side, the socket's end of
//! input closes the agent's side of the stream. A reset of the stream, or
//! the session's end, drops the connection.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use agent_common::error::ErrorKind;
use agent_common::methods::{ForwardOpenParams, ForwardOpenResult, STREAM_WINDOW};
use tokio::net::TcpStream;

use crate::config::Config;
use crate::error::RpcError;
use crate::exec_stream::{pump_in, pump_out};
use crate::session::Session;
use crate::streams::{host_window, Open, StreamError};

/// How long a connection may take to be made.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a forward could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The params are invalid.
    #[error("invalid forward_open request: {reason}")]
    Invalid {
        /// Why.
        reason: String,
    },
    /// The address is not one `security.allowed_forwards` lists.
    #[error("forwarding to {addr} is not allowed (security.allowed_forwards)")]
    NotAllowed {
        /// The address.
        addr: SocketAddr,
    },
    /// The stream could not be opened.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The connection failed (refused, unreachable, timed out).
    #[error("connecting to {addr} in the guest failed ({reason})")]
    Connect {
        /// The address.
        addr: SocketAddr,
        /// `refused`, `unreachable`, `timeout` or `failed`.
        reason: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl RpcError for ForwardError {
    fn kind(&self) -> ErrorKind {
        match self {
            ForwardError::Invalid { .. } => ErrorKind::InvalidParams,
            ForwardError::NotAllowed { .. } => ErrorKind::PolicyDenied,
            ForwardError::Stream(e) => e.kind(),
            ForwardError::Connect {
                reason: "timeout", ..
            } => ErrorKind::Timeout,
            ForwardError::Connect { .. } => ErrorKind::IoError,
        }
    }

    fn data(&self) -> Vec<(&'static str, serde_json::Value)> {
        match self {
            ForwardError::Connect { reason, .. } => vec![("reason", (*reason).into())],
            ForwardError::NotAllowed { addr } => vec![("address", addr.to_string().into())],
            _ => Vec::new(),
        }
    }
}

/// `forward_open`: checks the address, connects, opens the stream and
/// leaves the connection to a task of its own.
pub async fn open(
    config: &Config,
    session: &Session,
    p: ForwardOpenParams,
) -> Result<ForwardOpenResult, ForwardError> {
    let credit = host_window(p.window).map_err(|reason| ForwardError::Invalid { reason })?;
    let host = p
        .host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(&p.host);
    let ip: IpAddr = host.parse().map_err(|_| ForwardError::Invalid {
        reason: format!(
            "host {:?} must be an IP address (names are not resolved)",
            p.host
        ),
    })?;
    let addr = SocketAddr::new(ip, p.port);
    if !config.forward_allowed(addr) {
        return Err(ForwardError::NotAllowed { addr });
    }
    let connect_error = |source: std::io::Error| {
        let reason = match source.kind() {
            std::io::ErrorKind::ConnectionRefused => "refused",
            std::io::ErrorKind::TimedOut => "timeout",
            _ if matches!(
                source.raw_os_error(),
                Some(libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EADDRNOTAVAIL)
            ) =>
            {
                "unreachable"
            }
            _ => "failed",
        };
        ForwardError::Connect {
            addr,
            reason,
            source,
        }
    };
    let socket = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(r) => r.map_err(connect_error)?,
        Err(_) => {
            return Err(connect_error(std::io::Error::from(
                std::io::ErrorKind::TimedOut,
            )))
        }
    };
    let _ = socket.set_nodelay(true);
    let stream = session.streams().open(
        Open {
            id: p.stream,
            credit,
            window: STREAM_WINDOW,
        },
        session.notifier(),
    )?;
    let ended = session.ended().clone();
    tokio::spawn(async move {
        let (read, write) = socket.into_split();
        let inbound = pump_in(stream.clone(), Some(Box::new(write)), false);
        let outbound = async {
            pump_out(stream.clone(), Box::new(read)).await;
            let _ = stream.close().await;
        };
        tokio::select! {
            _ = async { tokio::join!(inbound, outbound) } => {}
            () = stream.was_reset() => {}
            () = ended.cancelled() => {}
        }
        tracing::debug!(stream = stream.id(), %addr, "forwarded connection ended");
    });
    tracing::debug!(stream = p.stream, %addr, "forwarded connection opened");
    Ok(ForwardOpenResult {
        stream: p.stream,
        window: STREAM_WINDOW,
    })
}
