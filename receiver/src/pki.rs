//! A small certificate authority for one Rewind deployment: a CA, the receiver's server
//! certificate and one client certificate per agent, whose common name is the agent's identity.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use thiserror::Error;
use time::{Duration, OffsetDateTime};

/// CA certificate file name inside a PKI folder.
pub const CA_CERT: &str = "ca.pem";
/// CA private key file name.
pub const CA_KEY: &str = "ca.key";
/// The receiver's certificate.
pub const RECEIVER_CERT: &str = "receiver.pem";
/// The receiver's private key.
pub const RECEIVER_KEY: &str = "receiver.key";
/// The revocation list `pki revoke` keeps and `serve` loads at start and on SIGHUP.
pub const CRL: &str = "crl.pem";

/// How long issued certificates stay valid: ten years for the CA, five for leaves. Rotation is
/// by issuing anew; a DR tool must not stop on an expired test certificate.
const CA_DAYS: i64 = 3650;
const LEAF_DAYS: i64 = 1825;

#[derive(Debug, Error)]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Certificate generation or parsing failed.
    #[error("certificate error: {0}")]
    Cert(#[from] rcgen::Error),
    /// `pki init` would overwrite an existing CA.
    #[error("{0} already exists: refusing to replace an existing CA")]
    Exists(PathBuf),
    /// The agent name is not a valid identity.
    #[error(transparent)]
    Name(#[from] rewind_proto::names::BadName),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                PkiError::Exists(path.to_owned())
            } else {
                PkiError::Io {
                    path: path.to_owned(),
                    source: e,
                }
            }
        })?;
    f.write_all(contents.as_bytes()).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(days);
}

fn ca_params() -> Result<CertificateParams, PkiError> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, "Rewind CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut p, CA_DAYS);
    Ok(p)
}

/// Creates `ca.pem`, `ca.key`, `receiver.pem` and `receiver.key` in `dir`. The receiver's
/// certificate names localhost, 127.0.0.1 and ::1 plus `extra_sans`. Refuses to overwrite.
pub fn init(dir: &Path, extra_sans: &[String]) -> Result<(), PkiError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let ca_key_path = dir.join(CA_KEY);
    if ca_key_path.exists() {
        return Err(PkiError::Exists(ca_key_path));
    }
    let ca_key = KeyPair::generate()?;
    let params = ca_params()?;
    let ca_cert = params.self_signed(&ca_key)?;
    let issuer = Issuer::new(params, &ca_key);

    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    names.extend(extra_sans.iter().cloned());
    let mut p = CertificateParams::new(names)?;
    p.distinguished_name
        .push(DnType::CommonName, "rewind-receiver");
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut p, LEAF_DAYS);
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;

    write_new(&ca_key_path, &ca_key.serialize_pem(), 0o600)?;
    write_new(&dir.join(CA_CERT), &ca_cert.pem(), 0o644)?;
    write_new(&dir.join(RECEIVER_KEY), &key.serialize_pem(), 0o600)?;
    write_new(&dir.join(RECEIVER_CERT), &cert.pem(), 0o644)?;
    Ok(())
}

/// Issues `NAME.pem` and `NAME.key` in `dir`, a client certificate whose common name (and DNS
/// name) is the agent's identity, signed by the folder's CA.
pub fn issue(dir: &Path, agent: &str) -> Result<(PathBuf, PathBuf), PkiError> {
    rewind_proto::names::vm(agent).map_err(|e| rewind_proto::names::BadName {
        kind: "agent",
        name: e.name,
    })?;
    let ca_key_path = dir.join(CA_KEY);
    let ca_cert_path = dir.join(CA_CERT);
    let ca_key = KeyPair::from_pem(&fs::read_to_string(&ca_key_path).map_err(io(&ca_key_path))?)?;
    let ca_pem = fs::read_to_string(&ca_cert_path).map_err(io(&ca_cert_path))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, &ca_key)?;

    let mut p = CertificateParams::new(vec![agent.to_owned()])?;
    p.distinguished_name.push(DnType::CommonName, agent);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.subject_alt_names = vec![SanType::DnsName(agent.try_into()?)];
    validity(&mut p, LEAF_DAYS);
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;
    let cert_path = dir.join(format!("{agent}.pem"));
    let key_path = dir.join(format!("{agent}.key"));
    write_new(&key_path, &key.serialize_pem(), 0o600)?;
    write_new(&cert_path, &cert.pem(), 0o644)?;
    Ok((cert_path, key_path))
}

/// The PEM files `serve` needs.
pub struct ServerPki {
    pub ca: Vec<u8>,
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    /// The revocation list, if any agent was ever revoked.
    pub crl: Option<Vec<u8>>,
}

/// Reads the CA and the receiver's pair from a PKI folder.
pub fn load_server(dir: &Path) -> Result<ServerPki, PkiError> {
    let read = |name: &str| {
        let p = dir.join(name);
        fs::read(&p).map_err(io(&p))
    };
    let crl_path = dir.join(CRL);
    let crl = match fs::read(&crl_path) {
        Ok(c) => Some(c),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(PkiError::Io {
                path: crl_path,
                source,
            })
        }
    };
    Ok(ServerPki {
        ca: read(CA_CERT)?,
        cert: read(RECEIVER_CERT)?,
        key: read(RECEIVER_KEY)?,
        crl,
    })
}

/// The agent identity in a client certificate: its common name.
pub fn identity_of(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_owned();
    rewind_proto::names::vm(&cn).ok()?;
    Some(cn)
}
