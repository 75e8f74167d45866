//! Mapping of every module's errors to JSON-RPC error objects.
//!
//! Each module has its own error enum (`PolicyError`, `FileError`,
//! `ExecError`, ...) that implements [`RpcError`] to name its cause. This
//! module turns any of them into the error object sent to the host, in one
//! place: the code comes from the kind, the message from the error chain.

use std::io;

use agent_common::error::{ErrorKind, ErrorObject};
use serde_json::Value;

/// An error that can be reported to the host.
pub trait RpcError: std::error::Error {
    /// The documented cause, which fixes the error code.
    fn kind(&self) -> ErrorKind;

    /// Extra machine-readable fields for `data` (besides `kind`).
    fn data(&self) -> Vec<(&'static str, Value)> {
        Vec::new()
    }
}

/// Builds the error object for `err`: code and `data.kind` from
/// [`RpcError::kind`], message from the error and its sources.
pub fn to_error_object(err: &dyn RpcError) -> ErrorObject {
    let mut obj = ErrorObject::new(err.kind(), chain(err));
    for (key, value) in err.data() {
        obj = obj.with_data(key, value);
    }
    obj
}

/// The error and its sources as one line, `outer: inner: innermost`.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// The cause an operating-system error stands for.
pub fn io_error_kind(err: &io::Error) -> ErrorKind {
    match err.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENOTDIR) => ErrorKind::NotFound,
        Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => ErrorKind::AccessDenied,
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorKind::NoSpace,
        Some(libc::EEXIST) => ErrorKind::AlreadyExists,
        Some(libc::EISDIR) => ErrorKind::NotARegularFile,
        Some(libc::EFBIG) => ErrorKind::TooLarge,
        Some(libc::ETIMEDOUT) => ErrorKind::Timeout,
        _ => match err.kind() {
            io::ErrorKind::NotFound => ErrorKind::NotFound,
            io::ErrorKind::PermissionDenied => ErrorKind::AccessDenied,
            io::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
            io::ErrorKind::TimedOut => ErrorKind::Timeout,
            _ => ErrorKind::IoError,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("could not open /tmp/x")]
    struct Demo(#[source] io::Error);

    impl RpcError for Demo {
        fn kind(&self) -> ErrorKind {
            io_error_kind(&self.0)
        }
        fn data(&self) -> Vec<(&'static str, Value)> {
            vec![("path", Value::from("/tmp/x"))]
        }
    }

    #[test]
    fn errno_maps_to_kind_and_message_has_the_chain() {
        let cases = [
            (libc::ENOENT, ErrorKind::NotFound),
            (libc::EACCES, ErrorKind::AccessDenied),
            (libc::ENOSPC, ErrorKind::NoSpace),
            (libc::EEXIST, ErrorKind::AlreadyExists),
            (libc::EISDIR, ErrorKind::NotARegularFile),
            (libc::EIO, ErrorKind::IoError),
        ];
        for (errno, kind) in cases {
            let e = Demo(io::Error::from_raw_os_error(errno));
            let obj = to_error_object(&e);
            assert_eq!(obj.kind(), Some(kind), "errno {errno}");
            assert!(obj.message.starts_with("could not open /tmp/x: "));
            assert_eq!(obj.data.as_ref().unwrap()["path"], "/tmp/x");
        }
    }
}
