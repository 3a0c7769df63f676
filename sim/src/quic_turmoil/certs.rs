//! Certificates made from the seed: a CA and a server certificate, both
//! Ed25519, so that two runs of one seed present byte-identical
//! certificates.
//!
//! Ed25519 is chosen for determinism, not taste: its keys come straight
//! from 32 seed bytes and its signatures are deterministic and always 64
//! bytes. An ECDSA key (what `dlm server` makes) signs with a random nonce,
//! and its DER signatures are 70 to 72 bytes long, so the size of the
//! certificate and of the handshake's `CertificateVerify` — and with it how
//! QUIC packs the handshake into packets — would vary from run to run.

use quinn::rustls::pki_types::PrivatePkcs8KeyDer;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ED25519,
};

/// The PKCS#8 (v1) prefix of an Ed25519 private key; the 32-byte seed follows.
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// The TLS material of a simulated deployment, PEM.
#[derive(Clone, Debug)]
pub struct SimCerts {
    /// The CA clients trust.
    pub ca_pem: String,
    /// The server's certificate, signed by the CA.
    pub server_cert_pem: String,
    /// The server's private key.
    pub server_key_pem: String,
}

/// An Ed25519 key pair from 32 bytes of `rng`.
fn key(rng: &mut ChaCha8Rng) -> KeyPair {
    let mut der = ED25519_PKCS8_PREFIX.to_vec();
    let mut seed = [0u8; 32];
    rng.fill_bytes(&mut seed);
    der.extend_from_slice(&seed);
    KeyPair::from_pkcs8_der_and_sign_algo(&PrivatePkcs8KeyDer::from(der), &PKCS_ED25519)
        .expect("an Ed25519 key from 32 bytes")
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("no names");
    params
        .distinguished_name
        .push(DnType::CommonName, "dlm simulation CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

impl SimCerts {
    /// A CA and a certificate for `server_name`, from `seed`. rcgen's
    /// default validity (1975 to 4096) and serial numbers (a hash of the
    /// public key) keep the certificates the same for the same seed.
    pub fn new(seed: u64, server_name: &str) -> SimCerts {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let ca_key = key(&mut rng);
        let ca = ca_params()
            .self_signed(&ca_key)
            .expect("a self-signed simulation CA");
        let issuer = Issuer::new(ca_params(), ca_key);
        let server_key = key(&mut rng);
        let mut params =
            CertificateParams::new(vec![server_name.to_owned()]).expect("a valid server name");
        params
            .distinguished_name
            .push(DnType::CommonName, "dlm simulated server");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server = params
            .signed_by(&server_key, &issuer)
            .expect("a server certificate");
        SimCerts {
            ca_pem: ca.pem(),
            server_cert_pem: server.pem(),
            server_key_pem: server_key.serialize_pem(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_certificates_and_another_seed_others() {
        let a = SimCerts::new(7, "server");
        let b = SimCerts::new(7, "server");
        assert_eq!(a.ca_pem, b.ca_pem);
        assert_eq!(a.server_cert_pem, b.server_cert_pem);
        assert_eq!(a.server_key_pem, b.server_key_pem);
        let c = SimCerts::new(8, "server");
        assert_ne!(a.server_cert_pem, c.server_cert_pem);
        // Same sizes whatever the seed: nothing in a handshake depends on it.
        assert_eq!(a.server_cert_pem.len(), c.server_cert_pem.len());
        assert_eq!(a.ca_pem.len(), c.ca_pem.len());
    }

    #[test]
    fn dlm_accepts_the_material() {
        let certs = SimCerts::new(1, "server");
        dlm::transport::tls::ServerTls::from_pem(
            certs.server_cert_pem.into_bytes(),
            certs.server_key_pem.into_bytes(),
            None,
        )
        .expect("dlm takes an Ed25519 certificate and key");
    }
}
