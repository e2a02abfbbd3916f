//! An SMTP receiver for the email hook's tests: speaks enough ESMTP for a real client (lettre):
//! EHLO, STARTTLS (with a certificate from a throwaway CA) or TLS from the first byte (as on
//! port 465), AUTH PLAIN, MAIL, RCPT, DATA, QUIT.
//! Records each accepted message with its envelope and whether it came over TLS; answers 451
//! to DATA while `failing`, as a relay with a full queue would.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// One message the sink accepted.
#[derive(Debug, Clone)]
pub struct Mail {
    /// `MAIL FROM` address.
    pub from: String,
    /// `RCPT TO` addresses.
    pub to: Vec<String>,
    /// The message as sent (headers and body, dot-unstuffed).
    pub data: String,
    /// True when it arrived over TLS (after STARTTLS, or on an `smtps` relay).
    pub tls: bool,
    /// The `AUTH PLAIN` login, when the client authenticated.
    pub login: Option<(String, String)>,
}

/// A running SMTP sink on 127.0.0.1. Stops when dropped.
pub struct SmtpSink {
    /// Its port.
    pub port: u16,
    /// Set to answer 451 to DATA.
    pub failing: Arc<AtomicBool>,
    mails: Arc<std::sync::Mutex<Vec<Mail>>>,
    verbs: Verbs,
    stop: CancellationToken,
}

/// Every command verb the sink was sent (`EHLO`, `AUTH`, …), with whether it came over TLS.
type Verbs = Arc<std::sync::Mutex<Vec<(String, bool)>>>;

impl SmtpSink {
    /// Starts a sink; with `tls`, STARTTLS is offered with the coordinator-style PKI in
    /// `pki_dir` (`ca.pem`, `coordinator.pem`/`.key` for the name `localhost`).
    pub async fn start(tls: Option<&Path>) -> std::io::Result<SmtpSink> {
        SmtpSink::start_with(tls, false).await
    }

    /// A relay speaking TLS from the first byte (`smtps://`, port 465) with the PKI in
    /// `pki_dir`; it offers no STARTTLS inside.
    pub async fn start_smtps(pki_dir: &Path) -> std::io::Result<SmtpSink> {
        SmtpSink::start_with(Some(pki_dir), true).await
    }

    async fn start_with(tls: Option<&Path>, implicit: bool) -> std::io::Result<SmtpSink> {
        let acceptor = match tls {
            Some(dir) => Some(crate::services::tls_acceptor(dir)?),
            None => None,
        };
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let failing = Arc::new(AtomicBool::new(false));
        let mails = Arc::new(std::sync::Mutex::new(Vec::new()));
        let verbs: Verbs = Arc::default();
        let stop = CancellationToken::new();
        let (f, m, v, s) = (failing.clone(), mails.clone(), verbs.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let conn = tokio::select! {
                    _ = s.cancelled() => return,
                    c = listener.accept() => match c { Ok((c, _)) => c, Err(_) => continue },
                };
                let (f, m, v, a) = (f.clone(), m.clone(), v.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let _ = match (a, implicit) {
                        (Some(a), true) => match a.accept(conn).await {
                            Ok(tls) => session(tls, None, true, f, m, v).await,
                            Err(_) => Ok(()),
                        },
                        (a, _) => session(conn, a, false, f, m, v).await,
                    };
                });
            }
        });
        Ok(SmtpSink {
            port,
            failing,
            mails,
            verbs,
            stop,
        })
    }

    /// Every command verb received so far, with whether it came over TLS.
    pub fn verbs(&self) -> Vec<(String, bool)> {
        self.verbs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Messages accepted so far.
    pub fn mails(&self) -> Vec<Mail> {
        self.mails.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// What the plaintext part of a session ended with.
enum Next {
    Done,
    StartTls,
}

async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    conn: S,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    tls: bool,
    failing: Arc<AtomicBool>,
    mails: Arc<std::sync::Mutex<Vec<Mail>>>,
    verbs: Verbs,
) -> std::io::Result<()> {
    let mut plain = BufReader::new(conn);
    plain.get_mut().write_all(b"220 sink ESMTP\r\n").await?;
    let offer_tls = acceptor.is_some();
    match dialogue(&mut plain, offer_tls, tls, &failing, &mails, &verbs).await? {
        Next::Done => Ok(()),
        Next::StartTls => {
            let Some(acceptor) = acceptor else {
                return Ok(());
            };
            let tls = acceptor.accept(plain.into_inner()).await?;
            let mut tls = BufReader::new(tls);
            dialogue(&mut tls, false, true, &failing, &mails, &verbs)
                .await
                .map(|_| ())
        }
    }
}

async fn dialogue<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut BufReader<S>,
    offer_tls: bool,
    tls: bool,
    failing: &AtomicBool,
    mails: &std::sync::Mutex<Vec<Mail>>,
    verbs: &std::sync::Mutex<Vec<(String, bool)>>,
) -> std::io::Result<Next> {
    let mut from = String::new();
    let mut to = Vec::new();
    let mut login = None;
    let mut line = String::new();
    loop {
        line.clear();
        if s.read_line(&mut line).await? == 0 {
            return Ok(Next::Done);
        }
        let cmd = line.trim_end().to_string();
        let upper = cmd.to_ascii_uppercase();
        let verb = upper.split_whitespace().next().unwrap_or("").to_string();
        verbs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((verb, tls));
        let reply: String = if upper.starts_with("EHLO") || upper.starts_with("HELO") {
            let mut r = String::from("250-sink\r\n250-AUTH PLAIN\r\n");
            if offer_tls {
                r.push_str("250-STARTTLS\r\n");
            }
            r.push_str("250 8BITMIME\r\n");
            r
        } else if upper == "STARTTLS" && offer_tls {
            s.get_mut().write_all(b"220 go ahead\r\n").await?;
            return Ok(Next::StartTls);
        } else if let Some(b64) = upper.strip_prefix("AUTH PLAIN ").map(|_| &cmd[11..]) {
            use data_encoding::BASE64;
            let raw = BASE64.decode(b64.trim().as_bytes()).unwrap_or_default();
            let parts: Vec<String> = raw
                .split(|b| *b == 0)
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect();
            if parts.len() == 3 {
                login = Some((parts[1].clone(), parts[2].clone()));
                "235 ok\r\n".into()
            } else {
                "501 bad AUTH PLAIN\r\n".into()
            }
        } else if upper.starts_with("MAIL FROM:") {
            from = address(&cmd[10..]);
            to.clear();
            "250 ok\r\n".into()
        } else if upper.starts_with("RCPT TO:") {
            to.push(address(&cmd[8..]));
            "250 ok\r\n".into()
        } else if upper == "DATA" {
            s.get_mut().write_all(b"354 go on\r\n").await?;
            let mut data = String::new();
            loop {
                line.clear();
                if s.read_line(&mut line).await? == 0 {
                    return Ok(Next::Done);
                }
                if line == ".\r\n" {
                    break;
                }
                data.push_str(line.strip_prefix('.').unwrap_or(&line));
            }
            if failing.load(Ordering::Relaxed) {
                "451 queue full, try later\r\n".into()
            } else {
                mails.lock().unwrap_or_else(|p| p.into_inner()).push(Mail {
                    from: from.clone(),
                    to: to.clone(),
                    data,
                    tls,
                    login: login.clone(),
                });
                "250 queued\r\n".into()
            }
        } else if upper == "RSET" || upper == "NOOP" {
            "250 ok\r\n".into()
        } else if upper == "QUIT" {
            s.get_mut().write_all(b"221 bye\r\n").await?;
            return Ok(Next::Done);
        } else {
            "502 not implemented\r\n".into()
        };
        s.get_mut().write_all(reply.as_bytes()).await?;
    }
}

/// `<a@b> SIZE=…` -> `a@b`.
fn address(arg: &str) -> String {
    let arg = arg.trim();
    match (arg.find('<'), arg.find('>')) {
        (Some(a), Some(b)) if a < b => arg[a + 1..b].to_string(),
        _ => arg.split_whitespace().next().unwrap_or("").to_string(),
    }
}
