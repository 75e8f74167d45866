//! Port forwarding: [`Client::forward_open`] connects to a TCP port in
//! the guest and returns the connection as a stream pair.

use std::sync::Arc;

use agent_common::methods::{
    FileReadStreamParams, FileReadStreamResult, FollowLogParams, FollowLogResult,
    ForwardOpenParams, ForwardOpenResult, Method, FILE_STREAM_CHUNK,
};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::streams::HOST_WINDOW;

use super::exec_stream::next_stream_id;
use super::streams::{Handle, StreamReader, StreamWriter};
use super::{decode, Client};
use crate::error::ClientError;

/// A TCP connection inside the guest, as a stream: what the guest's
/// service sends arrives on `reader`; `writer` sends to it (`shutdown`
/// half-closes the connection). Dropping both closes it.
#[derive(Debug)]
pub struct ForwardStream {
    /// From the guest's service.
    pub reader: StreamReader,
    /// To the guest's service.
    pub writer: StreamWriter,
}

impl Client {
    /// Connects to `host:port` inside the guest (an IP address the agent's
    /// `security.allowed_forwards` lists) through the agent
    /// (`forward_open`). A refused or failed connection is an error whose
    /// `data.reason` says which (`refused`, `unreachable`, `timeout`,
    /// `failed`).
    ///
    /// ```no_run
    /// # async fn demo(client: host_client::Client) -> Result<(), Box<dyn std::error::Error>> {
    /// use tokio::io::{AsyncReadExt, AsyncWriteExt};
    /// let mut web = client.forward_open("127.0.0.1", 80).await?;
    /// web.writer.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
    /// let mut page = Vec::new();
    /// web.reader.read_to_end(&mut page).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn forward_open(&self, host: &str, port: u16) -> Result<ForwardStream, ClientError> {
        let (opened, handle): (ForwardOpenResult, _) = self
            .open_stream(Method::ForwardOpen, HOST_WINDOW, |stream| {
                ForwardOpenParams {
                    host: host.to_owned(),
                    port,
                    stream,
                    window: Some(HOST_WINDOW),
                }
            })
            .await?;
        handle.shared.set_credit(opened.window);
        Ok(ForwardStream {
            reader: StreamReader::new(handle.clone()),
            writer: StreamWriter::new(handle),
        })
    }

    /// Follows a guest file beneath the agent's `allowed_read_paths` as it
    /// grows, across rotation (`tail -F`; `follow_log`): its last `lines`
    /// lines first, then each new line, only those containing `filter` if
    /// given. The reader ends only if the file cannot be read any more;
    /// drop it to stop.
    ///
    /// ```no_run
    /// # async fn demo(client: host_client::Client) -> Result<(), Box<dyn std::error::Error>> {
    /// let mut log = client.follow_log("/var/log/syslog", Some(20), Some("error")).await?;
    /// while let Some(lines) = log.read_chunk().await? {
    ///     print!("{}", String::from_utf8_lossy(&lines));
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn follow_log(
        &self,
        path: &str,
        lines: Option<u32>,
        filter: Option<&str>,
    ) -> Result<StreamReader, ClientError> {
        let (_, handle): (FollowLogResult, _) = self
            .open_stream(Method::FollowLog, HOST_WINDOW, |stream| FollowLogParams {
                path: path.to_owned(),
                lines,
                filter: filter.map(str::to_owned),
                stream,
                window: Some(HOST_WINDOW),
            })
            .await?;
        Ok(StreamReader::new(handle))
    }

    /// A guest file's bytes from `offset` to the size it had when opened,
    /// as a stream (`file_read_stream`): the agent sends them as fast as
    /// this side reads them, with no request per chunk, at most
    /// [`ClientOptions::max_in_flight_chunks`](crate::ClientOptions) chunks
    /// of 1 MiB ahead of the reader. Returns the reader and that size; the
    /// reader ends after the last byte (fewer than `size - offset` only if
    /// the file shrank meanwhile), and fails if the agent resets the stream
    /// (a read error in the guest) or the connection is lost
    /// ([`StreamReader::connection_lost`] tells which).
    ///
    /// ```no_run
    /// # async fn demo(client: host_client::Client) -> Result<(), Box<dyn std::error::Error>> {
    /// let (mut data, size) = client.read_stream("/var/log/syslog", 0).await?;
    /// let mut got = 0;
    /// while let Some(chunk) = data.read_chunk().await? {
    ///     got += chunk.len() as u64;
    /// }
    /// assert!(got <= size);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn read_stream(
        &self,
        path: &str,
        offset: u64,
    ) -> Result<(StreamReader, u64), ClientError> {
        let chunks = self.options().max_in_flight_chunks.clamp(1, 64) as u64;
        let window = chunks * FILE_STREAM_CHUNK;
        let (opened, handle): (FileReadStreamResult, _) = self
            .open_stream(Method::FileReadStream, window, |stream| {
                FileReadStreamParams {
                    path: path.to_owned(),
                    offset,
                    stream,
                    window: Some(window),
                }
            })
            .await?;
        Ok((StreamReader::new(handle), opened.size))
    }

    /// Opens one stream: registers a new id granting the agent `window`,
    /// sends `method` with the params `params` makes for that id, and
    /// forgets the id again if the agent refuses.
    async fn open_stream<P: Serialize, R: DeserializeOwned>(
        &self,
        method: Method,
        window: u64,
        params: impl FnOnce(u64) -> P,
    ) -> Result<(R, Arc<Handle>), ClientError> {
        let conn = self.ready().await?;
        let table = self.inner.streams.clone();
        let id = next_stream_id();
        let shared = table.register(id, conn.serial(), window);
        let method = method.as_str();
        let opened = self
            .request_on_conn(&conn, method, &params(id))
            .await
            .and_then(|raw| decode::<R>(method, &raw));
        match opened {
            Ok(r) => Ok((
                r,
                Arc::new(Handle {
                    shared,
                    conn,
                    table,
                }),
            )),
            Err(e) => {
                table.forget(id);
                Err(e)
            }
        }
    }
}
