//! The fleet's certificate authority: `tunnelfleet pki init` and `pki issue-agent ID`.
//!
//! Agents prove who they are with a certificate the coordinator's CA signed; the coordinator
//! reads the agent id from the certificate (its common name, and a `urn:tunnelfleet:agent:ID`
//! URI SAN) and never from what the agent says. Keys are written 0600 and never logged.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// File names inside a PKI directory.
pub const CA_CERT: &str = "ca.pem";
/// The CA's private key.
pub const CA_KEY: &str = "ca.key";
/// The coordinator's server certificate.
pub const SERVER_CERT: &str = "coordinator.pem";
/// The coordinator's private key.
pub const SERVER_KEY: &str = "coordinator.key";

/// The ledger of ids issued by hand (`pki issue-agent`), one file per id: the coordinator
/// counts them as known, so a join token cannot enroll an impostor under one of them.
pub const ISSUED_DIR: &str = "issued";

/// Whether `agent_id` was issued a certificate by hand from the PKI in `dir`.
pub fn issued_offline(dir: &Path, agent_id: &str) -> bool {
    check_agent_id(agent_id).is_ok() && dir.join(ISSUED_DIR).join(agent_id).exists()
}

/// Why a PKI operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// `init` would overwrite an existing CA.
    #[error(
        "{0} already holds a CA; refusing to replace it (every agent certificate depends on it)"
    )]
    Exists(PathBuf),
    /// Certificate generation failed.
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// An agent id that cannot be a certificate name.
    #[error("agent id {0:?}: use 1-64 letters, digits, '.', '_' or '-'")]
    BadAgentId(String),
    /// The SSH user CA could not be made.
    #[error(transparent)]
    SshCa(#[from] crate::sshca::SshCaError),
}

/// Paths of an issued agent identity.
#[derive(Debug, Clone)]
pub struct AgentFiles {
    /// The agent's certificate.
    pub cert: PathBuf,
    /// The agent's private key (0600).
    pub key: PathBuf,
    /// The CA certificate the agent trusts the coordinator by.
    pub ca: PathBuf,
}

/// Checks an agent id's form.
pub fn check_agent_id(id: &str) -> Result<(), PkiError> {
    if tunnelfleet_protocol::addr::valid_name(id) {
        Ok(())
    } else {
        Err(PkiError::BadAgentId(id.to_string()))
    }
}

/// Creates the CA and the coordinator's certificate for `names` (DNS names or IP addresses the
/// agents will dial), and the SSH user CA ([`crate::sshca`]). Returns the CA's SHA-256
/// fingerprint.
pub fn init(dir: &Path, names: &[String]) -> Result<String, PkiError> {
    if dir.join(CA_CERT).exists() {
        return Err(PkiError::Exists(dir.to_path_buf()));
    }
    create_dir(dir)?;
    // The CA key lives here: only the coordinator's user may even list the directory.
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).map_err(
        |source| PkiError::Io {
            path: dir.to_path_buf(),
            source,
        },
    )?;
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name = name("tunnelfleet fleet CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = OffsetDateTime::now_utc();
    ca.not_before = now - Duration::hours(1);
    ca.not_after = now + Duration::days(3650);
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let server_key = KeyPair::generate()?;
    let mut server = CertificateParams::new(names.to_vec())?;
    server.distinguished_name = name("tunnelfleet coordinator");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.not_before = now - Duration::hours(1);
    server.not_after = now + Duration::days(825);
    let server_cert = server.signed_by(&server_key, &issuer)?;

    write(&dir.join(CA_CERT), ca_cert.pem().as_bytes(), 0o644)?;
    write(
        &dir.join(CA_KEY),
        issuer.key().serialize_pem().as_bytes(),
        0o600,
    )?;
    write(&dir.join(SERVER_CERT), server_cert.pem().as_bytes(), 0o644)?;
    write(
        &dir.join(SERVER_KEY),
        server_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    crate::sshca::SshCa::create(dir, crate::sshca::CaKind::User)?;
    crate::sshca::SshCa::create(dir, crate::sshca::CaKind::Host)?;
    Ok(fingerprint(ca_cert.der()))
}

/// Issues a client certificate for `agent_id`, valid for `days`, into `out`.
pub fn issue_agent(
    dir: &Path,
    agent_id: &str,
    days: i64,
    out: &Path,
) -> Result<AgentFiles, PkiError> {
    let now = OffsetDateTime::now_utc();
    issue_agent_valid(
        dir,
        agent_id,
        now - Duration::hours(1),
        now + Duration::days(days),
        out,
    )
}

/// Issues a client certificate with an explicit validity window (tests use past windows).
pub fn issue_agent_valid(
    dir: &Path,
    agent_id: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    out: &Path,
) -> Result<AgentFiles, PkiError> {
    let ca_pem = read(&dir.join(CA_CERT))?;
    let ca_key = KeyPair::from_pem(&read(&dir.join(CA_KEY))?)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    let key = KeyPair::generate()?;
    let cert = agent_params(agent_id, not_before, not_after)?.signed_by(&key, &issuer)?;
    create_dir(&dir.join(ISSUED_DIR))?;
    write(
        &dir.join(ISSUED_DIR).join(agent_id),
        format!("{}\n", not_after.unix_timestamp()).as_bytes(),
        0o644,
    )?;
    create_dir(out)?;
    let files = AgentFiles {
        cert: out.join(format!("{agent_id}.pem")),
        key: out.join(format!("{agent_id}.key")),
        ca: out.join(CA_CERT),
    };
    write(&files.cert, cert.pem().as_bytes(), 0o644)?;
    write(&files.key, key.serialize_pem().as_bytes(), 0o600)?;
    if files.ca != dir.join(CA_CERT) {
        write(&files.ca, ca_pem.as_bytes(), 0o644)?;
    }
    Ok(files)
}

/// What every agent certificate says: the id as common name and as a
/// `urn:tunnelfleet:agent:ID` URI SAN, client authentication only.
fn agent_params(
    agent_id: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, PkiError> {
    check_agent_id(agent_id)?;
    let mut p = CertificateParams::default();
    p.distinguished_name = name(agent_id);
    p.subject_alt_names = vec![SanType::URI(
        format!("urn:tunnelfleet:agent:{agent_id}").try_into()?,
    )];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.not_before = not_before;
    p.not_after = not_after;
    Ok(p)
}

/// The CA's signing half, held by a coordinator that enrolls agents itself.
pub struct Signer {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
    dir: std::path::PathBuf,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Signer").finish_non_exhaustive()
    }
}

impl Signer {
    /// The CA of a PKI directory; `None` when its key is not there (a coordinator may run
    /// with the CA key kept offline; it then cannot enroll).
    pub fn load(dir: &Path) -> Result<Option<Signer>, PkiError> {
        if !dir.join(CA_KEY).exists() {
            return Ok(None);
        }
        let ca_pem = read(&dir.join(CA_CERT))?;
        let ca_key = KeyPair::from_pem(&read(&dir.join(CA_KEY))?)?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
        Ok(Some(Signer {
            issuer,
            ca_pem,
            dir: dir.to_path_buf(),
        }))
    }

    /// Whether `agent_id` was issued a certificate by hand from this CA ([`issued_offline`]).
    pub fn issued_offline(&self, agent_id: &str) -> bool {
        issued_offline(&self.dir, agent_id)
    }

    /// The CA certificate (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Signs the key of a PKCS#10 request (whose self-signature is checked) into a certificate
    /// for `agent_id`, valid for `days`. Nothing of the request but its key is used.
    pub fn sign_request(
        &self,
        csr_pem: &str,
        agent_id: &str,
        days: i64,
    ) -> Result<String, PkiError> {
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)?;
        let now = OffsetDateTime::now_utc();
        csr.params = agent_params(
            agent_id,
            now - Duration::hours(1),
            now + Duration::days(days),
        )?;
        Ok(csr.signed_by(&self.issuer)?.pem())
    }
}

/// `SHA256:` plus the hex SHA-256 of a DER certificate, for pinning the CA.
pub fn fingerprint(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("SHA256:{hex}")
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn create_dir(dir: &Path) -> Result<(), PkiError> {
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    tunnelfleet_runtime::secret::write_atomic(path, bytes, mode).map_err(|source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    })
}
