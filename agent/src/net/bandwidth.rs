//! `net bandwidth`: an HTTP download through one of a profile's L forwards, and the bytes the
//! agent counted into that forward meanwhile.

use super::*;

/// `net bandwidth`: throughput of an HTTP download through one of a profile's L forwards.
#[derive(Debug, Clone, Serialize)]
pub struct BandwidthReport {
    /// Profile measured.
    pub profile: String,
    /// The L forward the download went through.
    pub forward: String,
    /// What was downloaded.
    pub url: String,
    /// Body bytes received.
    pub bytes: u64,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Throughput, Mbit/s.
    pub mbit_s: f64,
    /// Bytes the agent counted into the forward meanwhile (proof it went through the tunnel).
    pub tunnel_bytes_in: u64,
}

/// Why a bandwidth measurement could not be made; each names the profile, URL or port.
#[derive(Debug, thiserror::Error)]
pub enum BandwidthError {
    /// The agent's control socket did not answer.
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    /// The agent answered something else than its status.
    #[error("unexpected answer from the agent: {0}")]
    Unexpected(String),
    /// No such profile on the agent.
    #[error("no profile named {0:?}")]
    NoProfile(String),
    /// No URL given and none to take from the profile.
    #[error("profile {0} has no HTTP health check; pass --url")]
    NoUrl(String),
    /// The URL cannot be measured through a forward.
    #[error("{url}: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// Why not.
        reason: String,
    },
    /// The download failed.
    #[error("{url}: {error}")]
    Download {
        /// The URL.
        url: String,
        /// The socket's reason.
        error: std::io::Error,
    },
    /// The server answered without success.
    #[error("GET {path}: {status:?}")]
    Status {
        /// The path asked for.
        path: String,
        /// The status line.
        status: String,
    },
    /// Nothing complete in time.
    #[error("{url}: no complete response within {timeout:?}")]
    Timeout {
        /// The URL.
        url: String,
        /// The limit.
        timeout: Duration,
    },
}

/// Downloads `url` (default: the profile's HTTP health URL) through the profile's L forward
/// on that port; refuses a URL that would not go through the tunnel.
pub async fn bandwidth(
    socket: &std::path::Path,
    profile: &str,
    url: Option<&str>,
    timeout: Duration,
) -> Result<BandwidthReport, BandwidthError> {
    use tunnelfleet_protocol::forward::ForwardSpec;
    let p = profile_status(socket, profile).await?;
    let url = match url {
        Some(u) => u.to_string(),
        None => p
            .health
            .as_ref()
            .and_then(|h| h.target.strip_prefix("GET ").map(str::to_string))
            .ok_or_else(|| BandwidthError::NoUrl(profile.to_string()))?,
    };
    let refused = |reason: String| BandwidthError::Url {
        url: url.clone(),
        reason,
    };
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| refused(format!("not a URL: {e}")))?;
    if uri.scheme_str() != Some("http") {
        return Err(refused(
            "only http:// URLs can be measured through a forward".into(),
        ));
    }
    let host = uri
        .host()
        .ok_or_else(|| refused("URL without a host".into()))?
        .to_string();
    let port = uri.port_u16().unwrap_or(80);
    let index = p
        .forwards
        .iter()
        .position(|f| {
            matches!(ForwardSpec::parse(&f.spec), Ok(ForwardSpec::Local { port: lp, .. }) if lp == port)
        })
        .ok_or_else(|| {
            refused(format!("port {port} is not a local forward of profile {profile}; the download would not go through the tunnel"))
        })?;
    let before = p.forwards[index].bytes_in;
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let start = Instant::now();
    let bytes = tokio::time::timeout(timeout, download(&host, port, path))
        .await
        .map_err(|_| BandwidthError::Timeout {
            url: url.clone(),
            timeout,
        })?
        .map_err(|e| match e {
            DownloadError::Io(error) => BandwidthError::Download {
                url: url.clone(),
                error,
            },
            DownloadError::Status(status) => BandwidthError::Status {
                path: path.to_string(),
                status,
            },
        })?;
    let seconds = start.elapsed().as_secs_f64();
    let after = profile_status(socket, profile).await?.forwards[index].bytes_in;
    Ok(BandwidthReport {
        profile: profile.to_string(),
        forward: p.forwards[index].spec.clone(),
        url,
        bytes,
        seconds,
        mbit_s: bytes as f64 * 8.0 / seconds / 1e6,
        tunnel_bytes_in: after.saturating_sub(before),
    })
}

async fn profile_status(
    socket: &std::path::Path,
    name: &str,
) -> Result<crate::status::ProfileStatus, BandwidthError> {
    use crate::control::call;
    use crate::supervisor::{Request, Response};
    match call(socket, &Request::Status).await? {
        Response::Status(s) => s
            .profiles
            .into_iter()
            .find(|p| p.name == name)
            .ok_or_else(|| BandwidthError::NoProfile(name.to_string())),
        other => Err(BandwidthError::Unexpected(format!("{other:?}"))),
    }
}

/// Why a download failed.
enum DownloadError {
    Io(std::io::Error),
    /// The status line of an answer other than 2xx.
    Status(String),
}

impl From<std::io::Error> for DownloadError {
    fn from(e: std::io::Error) -> Self {
        DownloadError::Io(e)
    }
}

/// GET with `Connection: close`; returns the body size after checking for a 2xx status.
async fn download(host: &str, port: u16, path: &str) -> Result<u64, DownloadError> {
    use tokio::io::AsyncWriteExt;
    let mut s = TcpStream::connect((host, port)).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: tunnelfleet-net\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut head = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut body = 0u64;
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        if body == 0 && !head.ends_with(b"\r\n\r\n") {
            head.extend_from_slice(&buf[..n]);
            if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                body = (head.len() - end - 4) as u64;
                head.truncate(end + 4);
            }
            continue;
        }
        body += n as u64;
    }
    let status_line =
        String::from_utf8_lossy(head.split(|&b| b == b'\r').next().unwrap_or_default()).to_string();
    let code: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    if !(200..300).contains(&code) {
        return Err(DownloadError::Status(status_line));
    }
    Ok(body)
}
