//! Port forwarding: [`Client::forward_open`] connects to a TCP port in
//! the guest and returns the connection as a stream pair.

use std::sync::Arc;

use agent_common::methods::{
    FileReadStreamParams, FileReadStreamResult, FollowLogParams, FollowLogResult,
    ForwardOpenParams, ForwardOpenResult, Method, FILE_STREAM_CHUNK,
};

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
        let conn = self.ready().await?;
        let table = self.inner.streams.clone();
        let id = next_stream_id();
        let shared = table.register(id, conn.serial(), HOST_WINDOW);
        let params = ForwardOpenParams {
            host: host.to_owned(),
            port,
            stream: id,
            window: Some(HOST_WINDOW),
        };
        let method = Method::ForwardOpen.as_str();
        let opened = self
            .request_on_conn(&conn, method, &params)
            .await
            .and_then(|raw| decode::<ForwardOpenResult>(method, &raw));
        let opened = match opened {
            Ok(o) => o,
            Err(e) => {
                table.forget(id);
                return Err(e);
            }
        };
        shared.set_credit(opened.window);
        let handle = Arc::new(Handle {
            shared,
            conn,
            table,
        });
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
        let conn = self.ready().await?;
        let table = self.inner.streams.clone();
        let id = next_stream_id();
        let shared = table.register(id, conn.serial(), HOST_WINDOW);
        let params = FollowLogParams {
            path: path.to_owned(),
            lines,
            filter: filter.map(str::to_owned),
            stream: id,
            window: Some(HOST_WINDOW),
        };
        let method = Method::FollowLog.as_str();
        let opened = self
            .request_on_conn(&conn, method, &params)
            .await
            .and_then(|raw| decode::<FollowLogResult>(method, &raw));
        if let Err(e) = opened {
            table.forget(id);
            return Err(e);
        }
        Ok(StreamReader::new(Arc::new(Handle {
            shared,
            conn,
            table,
        })))
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
        let conn = self.ready().await?;
        let table = self.inner.streams.clone();
        let id = next_stream_id();
        let chunks = self.options().max_in_flight_chunks.clamp(1, 64) as u64;
        let window = chunks * FILE_STREAM_CHUNK;
        let shared = table.register(id, conn.serial(), window);
        let params = FileReadStreamParams {
            path: path.to_owned(),
            offset,
            stream: id,
            window: Some(window),
        };
        let method = Method::FileReadStream.as_str();
        let opened = self
            .request_on_conn(&conn, method, &params)
            .await
            .and_then(|raw| decode::<FileReadStreamResult>(method, &raw));
        let size = match opened {
            Ok(r) => r.size,
            Err(e) => {
                table.forget(id);
                return Err(e);
            }
        };
        let reader = StreamReader::new(Arc::new(Handle {
            shared,
            conn,
            table,
        }));
        Ok((reader, size))
    }
}
