//! Typed calls of the guest operations (`fs_freeze` onwards in
//! PROTOCOL.md): thin wrappers over [`Client::call`], kept apart from the
//! connection's own calls.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agent_common::methods::{
    Empty, FsFreezeParams, FsFreezeResult, FsFreezeRpc, FsFreezeStatusResult, FsFreezeStatusRpc,
    FsInfo, FsThawResult, FsThawRpc, FsTrimParams, FsTrimResult, FsTrimRpc, GetFsinfoRpc,
    GetStatsRpc, GetTimeRpc, GetUsersRpc, GetVcpusRpc, GuestStats, LoggedInUsers,
    SetPasswordParams, SetPasswordResult, SetTimeParams, SetTimeResult, SetTimeRpc,
    SetUserPasswordRpc, SetVcpusParams, SetVcpusRpc, SshKeysAddRpc, SshKeysGetRpc, SshKeysParams,
    SshKeysRemoveRpc, SshKeysResult, SshKeysSetRpc, SshUserParams, TimeInfo, VcpuState, Vcpus,
};

use agent_common::methods::{BlockDevices, GetBlockDevicesRpc};
use agent_common::methods::{
    GetMemoryBlocksRpc, MemoryBlockState, MemoryBlocks, SetMemoryBlocksParams, SetMemoryBlocksRpc,
};
use agent_common::methods::{PowerResult, SuspendMode, SuspendParams, SuspendRpc};

use super::Client;
use crate::error::ClientError;

/// Extra time given to `fs_freeze` beyond the call timeout: its hooks may
/// take up to 30 s each and it is not bounded by the agent's request limit.
const FREEZE_GRACE: Duration = Duration::from_secs(120);

impl Client {
    /// `fs_freeze`: freezes every local filesystem, or `mount_points`.
    ///
    /// ```no_run
    /// # async fn demo(client: host_client::Client) -> Result<(), host_client::ClientError> {
    /// let r = client.fs_freeze(Some(vec!["/srv/data".into()])).await?;
    /// println!("frozen {:?}, thawed by itself after {} s", r.frozen, r.timeout_seconds);
    /// client.fs_thaw().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn fs_freeze(
        &self,
        mount_points: Option<Vec<String>>,
    ) -> Result<FsFreezeResult, ClientError> {
        let timeout = self.options().call_timeout + FREEZE_GRACE;
        self.call_with_timeout::<FsFreezeRpc>(&FsFreezeParams { mount_points }, timeout)
            .await
    }

    /// `fs_thaw`: thaws what `fs_freeze` froze.
    pub async fn fs_thaw(&self) -> Result<FsThawResult, ClientError> {
        let timeout = self.options().call_timeout + FREEZE_GRACE;
        self.call_with_timeout::<FsThawRpc>(&Empty {}, timeout)
            .await
    }

    /// `fs_freeze_status`.
    pub async fn fs_freeze_status(&self) -> Result<FsFreezeStatusResult, ClientError> {
        self.call::<FsFreezeStatusRpc>(&Empty {}).await
    }

    /// `fs_trim` of every local filesystem, or `mount_points`.
    pub async fn fs_trim(
        &self,
        mount_points: Option<Vec<String>>,
        minimum_bytes: u64,
    ) -> Result<FsTrimResult, ClientError> {
        self.call::<FsTrimRpc>(&FsTrimParams {
            mount_points,
            minimum_bytes,
        })
        .await
    }

    /// `get_time`.
    pub async fn time(&self) -> Result<TimeInfo, ClientError> {
        self.call::<GetTimeRpc>(&Empty {}).await
    }

    /// `set_time` to `time_ns`, or from the guest's hardware clock (`None`).
    pub async fn set_time(&self, time_ns: Option<u64>) -> Result<SetTimeResult, ClientError> {
        self.call::<SetTimeRpc>(&SetTimeParams { time_ns }).await
    }

    /// `set_time` to this host's clock.
    ///
    /// ```no_run
    /// # async fn demo(client: host_client::Client) -> Result<(), host_client::ClientError> {
    /// let r = client.sync_time().await?;
    /// assert!(r.time_ns > 0);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn sync_time(&self) -> Result<SetTimeResult, ClientError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        self.set_time(Some(now)).await
    }

    /// `get_users`: login sessions.
    pub async fn users(&self) -> Result<LoggedInUsers, ClientError> {
        self.call::<GetUsersRpc>(&Empty {}).await
    }

    /// `ssh_keys_get`.
    pub async fn ssh_keys(&self, username: &str) -> Result<SshKeysResult, ClientError> {
        self.call::<SshKeysGetRpc>(&SshUserParams {
            username: username.to_owned(),
        })
        .await
    }

    /// `ssh_keys_add`.
    pub async fn ssh_keys_add(
        &self,
        username: &str,
        keys: Vec<String>,
    ) -> Result<SshKeysResult, ClientError> {
        self.call::<SshKeysAddRpc>(&keys_params(username, keys))
            .await
    }

    /// `ssh_keys_remove`.
    pub async fn ssh_keys_remove(
        &self,
        username: &str,
        keys: Vec<String>,
    ) -> Result<SshKeysResult, ClientError> {
        self.call::<SshKeysRemoveRpc>(&keys_params(username, keys))
            .await
    }

    /// `ssh_keys_set`: the agent's block becomes exactly `keys`.
    pub async fn ssh_keys_set(
        &self,
        username: &str,
        keys: Vec<String>,
    ) -> Result<SshKeysResult, ClientError> {
        self.call::<SshKeysSetRpc>(&keys_params(username, keys))
            .await
    }

    /// `set_user_password` (`crypted`: `password` is a crypt(3) hash).
    pub async fn set_user_password(
        &self,
        username: &str,
        password: &str,
        crypted: bool,
    ) -> Result<SetPasswordResult, ClientError> {
        self.call::<SetUserPasswordRpc>(&SetPasswordParams {
            username: username.to_owned(),
            password: password.to_owned(),
            crypted,
        })
        .await
    }

    /// `get_vcpus`.
    pub async fn vcpus(&self) -> Result<Vcpus, ClientError> {
        self.call::<GetVcpusRpc>(&Empty {}).await
    }

    /// `set_vcpus`: each CPU online or offline, in order.
    pub async fn set_vcpus(&self, cpus: Vec<VcpuState>) -> Result<Vcpus, ClientError> {
        self.call::<SetVcpusRpc>(&SetVcpusParams { cpus }).await
    }

    /// `get_fsinfo`: filesystems and the disks beneath them.
    pub async fn fsinfo(&self) -> Result<FsInfo, ClientError> {
        self.call::<GetFsinfoRpc>(&Empty {}).await
    }

    /// `get_block_devices`: block devices and how they stack.
    pub async fn block_devices(&self) -> Result<BlockDevices, ClientError> {
        self.call::<GetBlockDevicesRpc>(&Empty {}).await
    }

    /// `get_stats`: load, per-CPU times, per-disk I/O, routes.
    pub async fn stats(&self) -> Result<GuestStats, ClientError> {
        self.call::<GetStatsRpc>(&Empty {}).await
    }

    /// `suspend`: to RAM, to disk or both, after the reply.
    pub async fn suspend(&self, mode: SuspendMode) -> Result<PowerResult, ClientError> {
        self.call::<SuspendRpc>(&SuspendParams { mode }).await
    }

    /// `get_memory_blocks`.
    pub async fn memory_blocks(&self) -> Result<MemoryBlocks, ClientError> {
        self.call::<GetMemoryBlocksRpc>(&Empty {}).await
    }

    /// `set_memory_blocks`: each block online or offline, in order.
    pub async fn set_memory_blocks(
        &self,
        blocks: Vec<MemoryBlockState>,
    ) -> Result<MemoryBlocks, ClientError> {
        self.call::<SetMemoryBlocksRpc>(&SetMemoryBlocksParams { blocks })
            .await
    }
}

fn keys_params(username: &str, keys: Vec<String>) -> SshKeysParams {
    SshKeysParams {
        username: username.to_owned(),
        keys,
    }
}
