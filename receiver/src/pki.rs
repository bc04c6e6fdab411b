//! A small certificate authority for one Rewind deployment: a CA, the receiver's server
//! certificate and one client certificate per agent, whose common name is the agent's identity.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
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

/// How long issued certificates stay valid: ten years for the CA, whose key stays offline of
/// the agents; one year for the receiver's and the agents' (a stolen agent key is good for at
/// most that long even if nobody revokes it; `pki renew` replaces one, and the receiver's
/// metrics and the agent's log warn ahead of expiry).
const CA_DAYS: i64 = 3650;
/// Default validity of an agent's or the receiver's certificate, in days.
pub const LEAF_DAYS: u32 = 365;
/// Longest validity `--days` may ask for: about five years.
pub const MAX_LEAF_DAYS: u32 = 1826;
/// Copies of every certificate issued, as AGENT.SERIAL.pem, so revoking an agent revokes every
/// certificate it was ever given, renewed ones included.
const ISSUED_DIR: &str = "issued";

#[derive(Debug, Error)]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("{path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Certificate generation or parsing failed.
    #[error("certificate error")]
    Cert(#[from] rcgen::Error),
    /// `pki init` would overwrite an existing CA.
    #[error("{0} already exists: refusing to replace an existing CA")]
    Exists(PathBuf),
    /// The agent name is not a valid identity.
    #[error(transparent)]
    Name(#[from] rewind_proto::names::BadName),
    /// A certificate or revocation list of the folder could not be parsed.
    #[error("{path}: not a valid {what}")]
    Parse { path: PathBuf, what: &'static str },
    /// No certificate was ever issued to this agent here.
    #[error("no certificate of agent {0} in this PKI folder")]
    UnknownAgent(String),
    /// `--days` out of range.
    #[error("validity of {0} days: give 1 to 1826 days")]
    Days(u32),
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

/// What a leaf certificate is for.
enum Leaf<'a> {
    Receiver(&'a [String]),
    Agent(&'a str),
    /// A second receiver's identity: it may read everything through the Copy service and call
    /// nothing else.
    Replica(&'a str),
}

/// The organizational unit that marks a replica identity's certificate.
const REPLICA_UNIT: &str = "rewind-replica";

/// A new key and a certificate for `what`, signed by the CA of `dir`, valid for `days`.
fn new_leaf(dir: &Path, what: &Leaf<'_>, days: u32) -> Result<(String, String), PkiError> {
    if days == 0 || days > MAX_LEAF_DAYS {
        return Err(PkiError::Days(days));
    }
    let ca_key_path = dir.join(CA_KEY);
    let ca_cert_path = dir.join(CA_CERT);
    let ca_key = KeyPair::from_pem(&fs::read_to_string(&ca_key_path).map_err(io(&ca_key_path))?)?;
    let ca_pem = fs::read_to_string(&ca_cert_path).map_err(io(&ca_cert_path))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, &ca_key)?;
    let mut p = match what {
        Leaf::Receiver(extra_sans) => {
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
            p
        }
        Leaf::Agent(agent) | Leaf::Replica(agent) => {
            let mut p = CertificateParams::new(vec![(*agent).to_owned()])?;
            p.distinguished_name.push(DnType::CommonName, *agent);
            if matches!(what, Leaf::Replica(_)) {
                p.distinguished_name
                    .push(DnType::OrganizationalUnitName, REPLICA_UNIT);
            }
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            p.subject_alt_names = vec![SanType::DnsName((*agent).try_into()?)];
            p
        }
    };
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut p, i64::from(days));
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
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
    write_new(&ca_key_path, &ca_key.serialize_pem(), 0o600)?;
    write_new(&dir.join(CA_CERT), &ca_cert.pem(), 0o644)?;
    let (cert, key) = new_leaf(dir, &Leaf::Receiver(extra_sans), LEAF_DAYS)?;
    write_new(&dir.join(RECEIVER_KEY), &key, 0o600)?;
    write_new(&dir.join(RECEIVER_CERT), &cert, 0o644)?;
    Ok(())
}

fn check_agent(agent: &str) -> Result<(), PkiError> {
    rewind_proto::names::vm(agent).map_err(|e| rewind_proto::names::BadName {
        kind: "agent",
        name: e.name,
    })?;
    Ok(())
}

/// The serial number of the first certificate in a PEM file.
fn serial_of(path: &Path) -> Result<Vec<u8>, PkiError> {
    let pem = fs::read(path).map_err(io(path))?;
    let bad = || PkiError::Parse {
        path: path.to_owned(),
        what: "certificate",
    };
    let der = rustls::pki_types::CertificateDer::from_pem_slice(&pem).map_err(|_| bad())?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(|_| bad())?;
    Ok(cert.raw_serial().to_vec())
}

/// Keeps a copy of an agent's new certificate under `issued/` for revocation.
fn record_issued(dir: &Path, agent: &str, cert_path: &Path) -> Result<(), PkiError> {
    let issued = dir.join(ISSUED_DIR);
    fs::create_dir_all(&issued).map_err(io(&issued))?;
    let serial = serial_of(cert_path)?;
    let copy = issued.join(format!("{agent}.{}.pem", hex::encode(serial)));
    let pem = fs::read_to_string(cert_path).map_err(io(cert_path))?;
    write_new(&copy, &pem, 0o644)
}

/// Issues `NAME.pem` and `NAME.key` in `dir`, a client certificate valid for `days` whose
/// common name (and DNS name) is the agent's identity, signed by the folder's CA. With
/// `replica`, the identity of a second receiver that copies from this one: it can read every
/// VM's points through the Copy service and can call nothing that writes.
pub fn issue(
    dir: &Path,
    agent: &str,
    days: u32,
    replica: bool,
) -> Result<(PathBuf, PathBuf), PkiError> {
    check_agent(agent)?;
    let leaf = if replica {
        Leaf::Replica(agent)
    } else {
        Leaf::Agent(agent)
    };
    let (cert, key) = new_leaf(dir, &leaf, days)?;
    let cert_path = dir.join(format!("{agent}.pem"));
    let key_path = dir.join(format!("{agent}.key"));
    write_new(&key_path, &key, 0o600)?;
    write_new(&cert_path, &cert, 0o644)?;
    record_issued(dir, agent, &cert_path)?;
    Ok((cert_path, key_path))
}

/// Writes `contents` to `path` through a synced temporary file and a rename, so a crash leaves
/// the old file or the new one.
fn replace(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    let tmp = path.with_extension("new");
    let _ = fs::remove_file(&tmp);
    write_new(&tmp, contents, mode)?;
    fs::rename(&tmp, path).map_err(io(path))?;
    if let Some(parent) = path.parent() {
        if let Ok(d) = fs::File::open(parent) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Replaces an agent's certificate and key (`agent` = None: the receiver's) with new ones
/// valid for `days`. The old certificate stays valid until it expires unless revoked.
pub fn renew(dir: &Path, agent: Option<&str>, days: u32) -> Result<(PathBuf, PathBuf), PkiError> {
    let (what, cert_path, key_path) = match agent {
        Some(a) => {
            check_agent(a)?;
            let cert_path = dir.join(format!("{a}.pem"));
            if !cert_path.exists() {
                return Err(PkiError::UnknownAgent(a.to_owned()));
            }
            // A replica's certificate stays a replica's.
            let pem = fs::read(&cert_path).map_err(io(&cert_path))?;
            let replica = rustls::pki_types::CertificateDer::from_pem_slice(&pem)
                .is_ok_and(|der| is_replica(der.as_ref()));
            let leaf = if replica {
                Leaf::Replica(a)
            } else {
                Leaf::Agent(a)
            };
            (leaf, cert_path, dir.join(format!("{a}.key")))
        }
        None => {
            // The receiver keeps the names its certificate had.
            let old = dir.join(RECEIVER_CERT);
            let pem = fs::read(&old).map_err(io(&old))?;
            let bad = || PkiError::Parse {
                path: old.clone(),
                what: "certificate",
            };
            let der = rustls::pki_types::CertificateDer::from_pem_slice(&pem).map_err(|_| bad())?;
            let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(|_| bad())?;
            let mut sans = Vec::new();
            if let Ok(Some(ext)) = cert.subject_alternative_name() {
                for n in &ext.value.general_names {
                    match n {
                        x509_parser::extensions::GeneralName::DNSName(d) => {
                            sans.push((*d).to_owned())
                        }
                        x509_parser::extensions::GeneralName::IPAddress(ip) => {
                            let addr = match ip.len() {
                                4 => <[u8; 4]>::try_from(*ip)
                                    .ok()
                                    .map(|b| std::net::IpAddr::from(b).to_string()),
                                16 => <[u8; 16]>::try_from(*ip)
                                    .ok()
                                    .map(|b| std::net::IpAddr::from(b).to_string()),
                                _ => None,
                            };
                            sans.extend(addr);
                        }
                        _ => {}
                    }
                }
            }
            sans.retain(|n| !["localhost", "127.0.0.1", "::1"].contains(&n.as_str()));
            let (cert, key) = new_leaf(dir, &Leaf::Receiver(&sans), days)?;
            let cert_path = dir.join(RECEIVER_CERT);
            let key_path = dir.join(RECEIVER_KEY);
            replace(&key_path, &key, 0o600)?;
            replace(&cert_path, &cert, 0o644)?;
            return Ok((cert_path, key_path));
        }
    };
    let (cert, key) = new_leaf(dir, &what, days)?;
    replace(&key_path, &key, 0o600)?;
    replace(&cert_path, &cert, 0o644)?;
    if let Some(a) = agent {
        record_issued(dir, a, &cert_path)?;
    }
    Ok((cert_path, key_path))
}

/// Adds every certificate ever issued to `agent` here to the folder's revocation list
/// (`crl.pem`, kept with the entries of earlier revocations). `serve` loads it at start and on
/// SIGHUP. Returns how many certificates the list now names for this agent.
pub fn revoke(dir: &Path, agent: &str) -> Result<usize, PkiError> {
    check_agent(agent)?;
    let mut serials: Vec<Vec<u8>> = Vec::new();
    let current = dir.join(format!("{agent}.pem"));
    if current.exists() {
        serials.push(serial_of(&current)?);
    }
    let issued = dir.join(ISSUED_DIR);
    if let Ok(rd) = fs::read_dir(&issued) {
        let prefix = format!("{agent}.");
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(hex_serial) = name
                .strip_prefix(&prefix)
                .and_then(|r| r.strip_suffix(".pem"))
            {
                if let Ok(s) = hex::decode(hex_serial) {
                    serials.push(s);
                }
            }
        }
    }
    if serials.is_empty() {
        return Err(PkiError::UnknownAgent(agent.to_owned()));
    }
    let now = OffsetDateTime::now_utc();
    let crl_path = dir.join(CRL);
    let mut revoked: Vec<rcgen::RevokedCertParams> = Vec::new();
    let mut known: std::collections::HashSet<Vec<u8>> = std::collections::HashSet::new();
    if let Ok(pem) = fs::read(&crl_path) {
        let bad = || PkiError::Parse {
            path: crl_path.clone(),
            what: "revocation list",
        };
        let der = rustls::pki_types::CertificateRevocationListDer::from_pem_slice(&pem)
            .map_err(|_| bad())?;
        let (_, crl) = x509_parser::parse_x509_crl(der.as_ref()).map_err(|_| bad())?;
        for r in crl.iter_revoked_certificates() {
            let serial = r.raw_serial().to_vec();
            let when =
                OffsetDateTime::from_unix_timestamp(r.revocation_date.timestamp()).unwrap_or(now);
            if known.insert(serial.clone()) {
                revoked.push(revoked_entry(serial, when));
            }
        }
    }
    let mut named = 0;
    for s in serials {
        named += 1;
        if known.insert(s.clone()) {
            revoked.push(revoked_entry(s, now));
        }
    }
    let ca_key_path = dir.join(CA_KEY);
    let ca_cert_path = dir.join(CA_CERT);
    let ca_key = KeyPair::from_pem(&fs::read_to_string(&ca_key_path).map_err(io(&ca_key_path))?)?;
    let ca_pem = fs::read_to_string(&ca_cert_path).map_err(io(&ca_cert_path))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, &ca_key)?;
    let params = rcgen::CertificateRevocationListParams {
        this_update: now - Duration::minutes(5),
        // Nothing enforces it here (the receiver reads the list from its own folder); far
        // enough that no reader would call the list stale.
        next_update: now + Duration::days(CA_DAYS),
        crl_number: rcgen::SerialNumber::from(now.unix_timestamp().max(1) as u64),
        issuing_distribution_point: None,
        revoked_certs: revoked,
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(&issuer)?;
    replace(&crl_path, &crl.pem()?, 0o644)?;
    Ok(named)
}

fn revoked_entry(serial: Vec<u8>, when: OffsetDateTime) -> rcgen::RevokedCertParams {
    rcgen::RevokedCertParams {
        serial_number: rcgen::SerialNumber::from_slice(&serial),
        revocation_time: when,
        reason_code: Some(rcgen::RevocationReason::KeyCompromise),
        invalidity_date: None,
    }
}

/// Seconds since the epoch at which the first certificate of a PEM file expires.
pub fn not_after(pem: &[u8]) -> Option<i64> {
    let der = rustls::pki_types::CertificateDer::from_pem_slice(pem).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    Some(cert.validity().not_after.timestamp())
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

/// Whether a client certificate is a replica identity's (see [`issue`]).
pub fn is_replica(der: &[u8]) -> bool {
    x509_parser::parse_x509_certificate(der).is_ok_and(|(_, cert)| {
        cert.subject()
            .iter_organizational_unit()
            .any(|u| u.as_str() == Ok(REPLICA_UNIT))
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
