//! TEMPORARY STUB.
use crate::config::Config;
use agent_common::error::ErrorKind;
use agent_common::methods::*;
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("stub")]
    Stub,
}
impl crate::error::RpcError for ExecError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::NotSupported
    }
}
pub async fn exec_command(_c: &Config, _p: ExecParams) -> Result<ExecResult, ExecError> {
    Err(ExecError::Stub)
}
