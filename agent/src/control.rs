//! The local control socket: one JSON request per line, one JSON response per line.
//!
//! A Unix socket (mode 0600, in a 0700 directory it creates) rather than TCP, so that only the
//! agent's own user — or root — can stop a tunnel. JSON lines keep it scriptable with `socat`
//! when the CLI is not at hand. A malformed request gets an error response and closes only that
//! connection.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::supervisor::{Request, Response, SupervisorHandle};

/// Longest request line accepted (requests are tiny; this bounds a misbehaving client).
const MAX_LINE: usize = 64 * 1024;

/// Why the control socket could not be served or reached.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Another agent answers on the socket.
    #[error("control socket {0}: another agent is already running there")]
    InUse(PathBuf),
    /// Creating or binding failed.
    #[error("control socket {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// The agent answered something unreadable.
    #[error("control socket {path}: bad response: {reason}")]
    Protocol {
        /// The socket path.
        path: PathBuf,
        /// The parse error of the response line.
        reason: String,
    },
}

/// Binds the socket: creates its directory (0700), removes a stale socket, sets mode 0600.
pub async fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).map_err(io)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        // Only ever remove a stale socket: a control_socket pointing at a real file is a
        // config mistake, and deleting that file would be worse than refusing to start.
        if !meta.file_type().is_socket() {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket; refusing to replace it",
            )));
        }
        if UnixStream::connect(path).await.is_ok() {
            return Err(ControlError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

/// Serves requests until `cancel`; each connection in its own task.
pub async fn serve(listener: UnixListener, sup: SupervisorHandle, cancel: CancellationToken) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let sup = sup.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve_connection(stream, sup).await {
                            tracing::debug!("control connection: {e}");
                        }
                    });
                }
                Err(e) => tracing::warn!("control socket accept: {e}"),
            }
        }
    }
}

async fn serve_connection(stream: UnixStream, sup: SupervisorHandle) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r);
    let mut line = String::new();
    loop {
        line.clear();
        let n = (&mut lines)
            .take(MAX_LINE as u64)
            .read_line(&mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        if !line.ends_with('\n') && n >= MAX_LINE {
            let resp = Response::Error {
                message: format!("request longer than {MAX_LINE} bytes"),
            };
            write_json(&mut w, &resp).await?;
            return Ok(());
        }
        let resp = match serde_json::from_str::<Request>(line.trim()) {
            Ok(req) => sup.call(req).await,
            Err(e) => {
                let resp = Response::Error {
                    message: format!("bad request: {e}"),
                };
                write_json(&mut w, &resp).await?;
                return Ok(());
            }
        };
        write_json(&mut w, &resp).await?;
    }
}

async fn write_json<W: AsyncWriteExt + Unpin>(w: &mut W, resp: &Response) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(resp).map_err(std::io::Error::other)?;
    out.push(b'\n');
    w.write_all(&out).await
}

/// Sends one request to the agent at `path` and reads the response.
pub async fn call(path: &Path, req: &Request) -> Result<Response, ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    let stream = UnixStream::connect(path).await.map_err(io)?;
    let (r, mut w) = stream.into_split();
    let mut out = serde_json::to_vec(req).map_err(|e| io(std::io::Error::other(e)))?;
    out.push(b'\n');
    w.write_all(&out).await.map_err(io)?;
    let mut line = String::new();
    BufReader::new(r)
        .take(64 * 1024 * 1024)
        .read_line(&mut line)
        .await
        .map_err(io)?;
    serde_json::from_str(&line).map_err(|e| ControlError::Protocol {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn never_replaces_a_file_that_is_not_a_socket_but_replaces_a_stale_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        std::fs::write(&path, "precious").unwrap();
        let err = bind(&path).await.unwrap_err().to_string();
        assert!(err.contains("not a socket"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
        std::fs::remove_file(&path).unwrap();
        drop(bind(&path).await.unwrap());
        // The listener is gone but its socket file stays: a stale socket is replaced.
        assert!(path.exists());
        drop(bind(&path).await.unwrap());
    }
}
