//! Certificates and TLS settings, shared by gRPC over TLS and by QUIC.
//!
//! Owns: the development CA (made with rcgen on a server's first start and
//! kept under `DATA/state/tls/`, private keys mode 0600), loading PEM files,
//! and turning them into the rustls and tonic configurations both transports
//! use. Crypto is rustls with the *ring* provider, named explicitly so that
//! no process-wide default has to be installed. Must not: open sockets.
//!
//! A client certificate (mutual TLS, `--client-ca`) **admits** a client: the
//! handshake fails without one that the given CA signed. It does not name a
//! client id: an admitted client presents its id in every request, exactly as
//! over plain text, so any admitted client may act as any id. Give separate
//! groups of clients separate deployments (or CAs) if they must not share ids.

use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

/// Subdirectory of the server's state directory that holds the development
/// certificates.
pub const TLS_DIR: &str = "tls";

/// Why certificates could not be made, read or used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read or written. Check the
    /// path and its permissions.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: io::Error,
    },
    /// A PEM file holds no certificate or no usable private key. Give a
    /// PEM file of the right kind.
    #[error("{what}: {reason}")]
    Pem {
        /// Which file or input.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// rcgen could not make a development certificate (a bug, or a server
    /// name that is not a valid DNS name or IP address).
    #[error("making development certificates: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the combination (a key that does not match the
    /// certificate, an unusable CA). Check the files belong together.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The crypto provider every TLS configuration of dlm uses (*ring*).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in a PEM buffer; at least one.
///
/// # Errors
/// [`TlsError::Pem`] when the buffer holds no certificate or bad PEM.
pub fn certs_from_pem(what: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what: what.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what: what.to_owned(),
            reason: "no certificate in it".to_owned(),
        });
    }
    Ok(certs)
}

/// The first private key in a PEM buffer.
///
/// # Errors
/// [`TlsError::Pem`] when the buffer holds no private key.
pub fn key_from_pem(what: &str, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsError::Pem {
        what: what.to_owned(),
        reason: e.to_string(),
    })
}

/// Roots made of every certificate in `pem`.
fn roots(what: &str, pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(what, pem)? {
        roots
            .add(cert)
            .map_err(|e| TlsError::Config(format!("{what}: {e}")))?;
    }
    Ok(roots)
}

/// Reads a whole file, naming it in the error.
fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Io {
        path: path.to_owned(),
        source,
    })
}

/// What a server presents, and whom it admits.
#[derive(Clone)]
pub struct ServerTls {
    /// The server's certificate chain, PEM.
    cert_pem: Vec<u8>,
    /// The server's private key, PEM.
    key_pem: Vec<u8>,
    /// CA whose certificates clients must present (`--client-ca`), PEM;
    /// `None` admits clients without certificates.
    client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the private key.
        f.debug_struct("ServerTls")
            .field(
                "client_certificates_required",
                &self.requires_client_certs(),
            )
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Checks and keeps PEM material: a certificate chain, its key, and an
    /// optional client CA.
    ///
    /// # Errors
    /// [`TlsError`] when a buffer does not hold what it should, or the key
    /// does not fit the certificate.
    pub fn from_pem(
        cert_pem: Vec<u8>,
        key_pem: Vec<u8>,
        client_ca_pem: Option<Vec<u8>>,
    ) -> Result<ServerTls, TlsError> {
        let tls = ServerTls {
            cert_pem,
            key_pem,
            client_ca_pem,
        };
        // Building a configuration checks every part and that they fit.
        tls.rustls_config(&[])?;
        Ok(tls)
    }

    /// Reads `cert` (chain) and `key`, and `client_ca` if given, as PEM.
    ///
    /// # Errors
    /// [`TlsError`] when a file cannot be read or does not hold what it should.
    pub fn load(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<ServerTls, TlsError> {
        let client_ca_pem = client_ca.map(read).transpose()?;
        ServerTls::from_pem(read(cert)?, read(key)?, client_ca_pem)
            .map_err(|e| with_paths(e, cert, key, client_ca))
    }

    /// Whether clients must present a certificate.
    pub fn requires_client_certs(&self) -> bool {
        self.client_ca_pem.is_some()
    }

    /// A TLS 1.3 rustls server configuration offering `alpn` (QUIC needs
    /// TLS 1.3). 0-RTT stays off: `max_early_data_size` is 0.
    ///
    /// # Errors
    /// [`TlsError`] when the material is unusable.
    pub fn rustls_config(&self, alpn: &[&[u8]]) -> Result<rustls::ServerConfig, TlsError> {
        self.rustls_config_for(alpn, &[&rustls::version::TLS13])
    }

    /// The configuration for gRPC over TLS (`--tls`): ALPN `h2`, TLS 1.3 or
    /// 1.2, as tonic's own server TLS offered.
    ///
    /// # Errors
    /// [`TlsError`] when the certificates are unusable.
    pub fn grpc_rustls_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        self.rustls_config_for(
            &[b"h2"],
            &[&rustls::version::TLS13, &rustls::version::TLS12],
        )
    }

    fn rustls_config_for(
        &self,
        alpn: &[&[u8]],
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Result<rustls::ServerConfig, TlsError> {
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match &self.client_ca_pem {
            None => builder.with_no_client_auth(),
            Some(pem) => {
                let verifier = WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots("client CA", pem)?),
                    provider(),
                )
                .build()
                .map_err(|e| TlsError::Config(format!("client CA: {e}")))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(
                certs_from_pem("server certificate", &self.cert_pem)?,
                key_from_pem("server key", &self.key_pem)?,
            )
            .map_err(|e| TlsError::Config(e.to_string()))?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config.max_early_data_size = 0;
        Ok(config)
    }
}

/// Names the files in a PEM error that only knew the input's role.
fn with_paths(error: TlsError, cert: &Path, key: &Path, client_ca: Option<&Path>) -> TlsError {
    match error {
        TlsError::Pem { what, reason } => {
            let path = match what.as_str() {
                "server certificate" => cert.display().to_string(),
                "server key" => key.display().to_string(),
                _ => client_ca.map_or(what, |p| p.display().to_string()),
            };
            TlsError::Pem { what: path, reason }
        }
        other => other,
    }
}

/// A rustls client configuration (TLS 1.3) that trusts the CAs in `ca_pem`,
/// presents `identity` (certificate chain and key, PEM) if given, and offers
/// `alpn`. 0-RTT stays off.
///
/// # Errors
/// [`TlsError`] when the material is unusable.
pub fn client_rustls_config(
    ca_pem: &[u8],
    identity: Option<(&[u8], &[u8])>,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots("CA", ca_pem)?);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                certs_from_pem("client certificate", cert)?,
                key_from_pem("client key", key)?,
            )
            .map_err(|e| TlsError::Config(e.to_string()))?,
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.enable_early_data = false;
    Ok(config)
}

/// The development certificates of a server, under `DATA/state/tls/`.
///
/// A CA (`ca.pem`, `ca.key`) signs a server certificate (`server.pem`,
/// `server.key`) for the names in `server.names` and a client certificate
/// (`client.pem`, `client.key`) for trying mutual TLS with
/// `--client-ca DATA/state/tls/ca.pem`. Keys are written mode 0600.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevCerts {
    /// The directory.
    pub dir: PathBuf,
    /// The CA certificate: what clients pass as `--ca`.
    pub ca_cert: PathBuf,
    /// The CA's private key (mode 0600).
    pub ca_key: PathBuf,
    /// The server certificate, signed by the CA.
    pub server_cert: PathBuf,
    /// The server's private key (mode 0600).
    pub server_key: PathBuf,
    /// A client certificate signed by the CA.
    pub client_cert: PathBuf,
    /// The client certificate's private key (mode 0600).
    pub client_key: PathBuf,
    /// The names the server certificate was made for, one a line.
    names_file: PathBuf,
}

/// Common name of the development CA. The CA is re-created from this and its
/// stored key when the server certificate is re-issued, so it must not change.
const DEV_CA_NAME: &str = "dlm development CA";

impl DevCerts {
    /// The paths of the development certificates in `dir` (nothing is read).
    pub fn in_dir(dir: impl Into<PathBuf>) -> DevCerts {
        let dir = dir.into();
        DevCerts {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
            names_file: dir.join("server.names"),
            dir,
        }
    }

    /// The names a development server certificate always covers: the
    /// loopback names.
    pub fn default_names() -> Vec<String> {
        vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]
    }

    /// Makes the CA and the certificates in `dir` unless they are there;
    /// re-issues the server certificate (same CA) when it does not cover
    /// every name of `names` (DNS names or IP addresses).
    ///
    /// # Errors
    /// [`TlsError`] when files cannot be read or written.
    pub fn ensure(dir: &Path, names: &[String]) -> Result<DevCerts, TlsError> {
        let certs = DevCerts::in_dir(dir);
        fs::create_dir_all(dir).map_err(|source| TlsError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let ca_key = if certs.ca_cert.exists() && certs.ca_key.exists() {
            let pem = read(&certs.ca_key)?;
            let pem = String::from_utf8_lossy(&pem);
            KeyPair::from_pem(&pem).map_err(|e| TlsError::Pem {
                what: certs.ca_key.display().to_string(),
                reason: e.to_string(),
            })?
        } else {
            let key = KeyPair::generate()?;
            let ca = dev_ca_params().self_signed(&key)?;
            write_file(&certs.ca_key, key.serialize_pem().as_bytes(), true)?;
            write_file(&certs.ca_cert, ca.pem().as_bytes(), false)?;
            // A new CA invalidates whatever it signed before.
            for stale in [&certs.server_cert, &certs.client_cert] {
                let _ = fs::remove_file(stale);
            }
            key
        };
        let issuer = Issuer::new(dev_ca_params(), ca_key);

        let mut wanted: Vec<String> = DevCerts::default_names();
        for name in names {
            if !wanted.contains(name) {
                wanted.push(name.clone());
            }
        }
        let have: Vec<String> = fs::read_to_string(&certs.names_file)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect();
        let covered = wanted.iter().all(|n| have.contains(n));
        if !covered || !certs.server_cert.exists() || !certs.server_key.exists() {
            let mut all = have;
            for name in wanted {
                if !all.contains(&name) {
                    all.push(name);
                }
            }
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(all.clone())?;
            params
                .distinguished_name
                .push(DnType::CommonName, "dlm development server");
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            let cert = params.signed_by(&key, &issuer)?;
            write_file(&certs.server_key, key.serialize_pem().as_bytes(), true)?;
            write_file(&certs.server_cert, cert.pem().as_bytes(), false)?;
            write_file(&certs.names_file, (all.join("\n") + "\n").as_bytes(), false)?;
        }
        if !certs.client_cert.exists() || !certs.client_key.exists() {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params
                .distinguished_name
                .push(DnType::CommonName, "dlm development client");
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            let cert = params.signed_by(&key, &issuer)?;
            write_file(&certs.client_key, key.serialize_pem().as_bytes(), true)?;
            write_file(&certs.client_cert, cert.pem().as_bytes(), false)?;
        }
        Ok(certs)
    }
}

/// A 32-byte secret kept in `path` (mode 0600), made from the operating
/// system's randomness on first use. QUIC derives its stateless-reset tokens
/// from it, so that a restarted server can tell clients of its previous run
/// that their connections are gone (they reconnect at once instead of
/// waiting for the idle timeout).
///
/// # Errors
/// [`TlsError`] when the file cannot be read or written, or holds something
/// else than 32 bytes.
pub fn secret(path: &Path) -> Result<[u8; 32], TlsError> {
    match fs::read(path) {
        Ok(bytes) => <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| TlsError::Pem {
            what: path.display().to_string(),
            reason: format!("{} bytes, not a 32-byte secret", bytes.len()),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let mut secret = [0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
                .map_err(|_| TlsError::Config("no randomness from the system".into()))?;
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir).map_err(|source| TlsError::Io {
                    path: dir.to_owned(),
                    source,
                })?;
            }
            write_file(path, &secret, true)?;
            Ok(secret)
        }
        Err(source) => Err(TlsError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The parameters of the development CA; the same every time (see
/// [`DEV_CA_NAME`]).
fn dev_ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, DEV_CA_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// Writes `path` whole through a temporary file and a rename, so a crash
/// never leaves half a certificate; a `secret` is created mode 0600.
fn write_file(path: &Path, content: &[u8], secret: bool) -> Result<(), TlsError> {
    let io_err = |source| TlsError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut file = options.open(&tmp).map_err(io_err)?;
    file.write_all(content).map_err(io_err)?;
    file.sync_all().map_err(io_err)?;
    drop(file);
    fs::rename(&tmp, path).map_err(io_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_certs_are_made_once_with_private_keys_0600_and_verify() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("tls");
        let certs = DevCerts::ensure(&dir, &[]).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            for key in [&certs.ca_key, &certs.server_key, &certs.client_key] {
                let mode = fs::metadata(key).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{}", key.display());
            }
        }
        let ca = fs::read(&certs.ca_cert).unwrap();
        let server = fs::read(&certs.server_cert).unwrap();
        // A second start keeps everything.
        let again = DevCerts::ensure(&dir, &["127.0.0.1".into()]).unwrap();
        assert_eq!(again, certs);
        assert_eq!(fs::read(&certs.ca_cert).unwrap(), ca);
        assert_eq!(fs::read(&certs.server_cert).unwrap(), server);
        // The pieces fit together.
        let tls =
            ServerTls::load(&certs.server_cert, &certs.server_key, Some(&certs.ca_cert)).unwrap();
        assert!(tls.requires_client_certs());
        client_rustls_config(
            &ca,
            Some((
                &fs::read(&certs.client_cert).unwrap(),
                &fs::read(&certs.client_key).unwrap(),
            )),
            &[b"x"],
        )
        .unwrap();
    }

    #[test]
    fn a_new_listen_address_reissues_the_server_certificate_under_the_same_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let certs = DevCerts::ensure(tmp.path(), &[]).unwrap();
        let ca = fs::read(&certs.ca_cert).unwrap();
        let server = fs::read(&certs.server_cert).unwrap();
        DevCerts::ensure(tmp.path(), &["10.1.2.3".into()]).unwrap();
        assert_eq!(fs::read(&certs.ca_cert).unwrap(), ca);
        assert_ne!(fs::read(&certs.server_cert).unwrap(), server);
        let names = fs::read_to_string(tmp.path().join("server.names")).unwrap();
        assert!(names.lines().any(|n| n == "10.1.2.3"), "{names}");
        assert!(names.lines().any(|n| n == "localhost"), "{names}");
    }

    #[test]
    fn the_secret_is_made_once_and_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("tls").join("reset.key");
        let first = secret(&path).unwrap();
        assert_eq!(secret(&path).unwrap(), first);
        fs::write(&path, b"short").unwrap();
        assert!(secret(&path).is_err());
    }

    #[test]
    fn files_without_certificates_or_keys_are_named_in_the_error() {
        let tmp = tempfile::tempdir().unwrap();
        let empty = tmp.path().join("empty.pem");
        fs::write(&empty, "nothing here").unwrap();
        let err = ServerTls::load(&empty, &empty, None).unwrap_err();
        assert!(err.to_string().contains("empty.pem"), "{err}");
        let missing = tmp.path().join("missing.pem");
        let err = ServerTls::load(&missing, &empty, None).unwrap_err();
        assert!(err.to_string().contains("missing.pem"), "{err}");
    }
}
