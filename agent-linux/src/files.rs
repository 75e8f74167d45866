//! TEMPORARY STUB.
use crate::config::Config;
use agent_common::error::ErrorKind;
use agent_common::methods::*;
use std::sync::Arc;
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("stub")]
    Stub,
}
impl crate::error::RpcError for FileError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::NotSupported
    }
}
pub struct FileService {
    _c: Arc<Config>,
}
impl FileService {
    pub fn new(config: Arc<Config>) -> FileService {
        FileService { _c: config }
    }
    pub async fn read(&self, _p: FileReadParams) -> Result<FileReadResult, FileError> {
        Err(FileError::Stub)
    }
    pub async fn write(&self, _s: u64, _p: FileWriteParams) -> Result<FileWriteResult, FileError> {
        Err(FileError::Stub)
    }
    pub fn end_session(&self, _s: u64) {}
    pub fn abort_all(&self) {}
}
pub fn ensure_write_roots(_c: &Config) -> Vec<String> {
    vec![]
}
