//! Certificates made at test time: an authority and a certificate for
//! 127.0.0.1 it signed, as PEM files. The TLS mock upstream and the TLS
//! listener tests serve them; clients trust the authority.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// An authority and one certificate it signed, with their files.
pub struct Issued {
    /// Keeps the files alive.
    _dir: tempfile::TempDir,
    /// The authority, PEM.
    pub ca_file: PathBuf,
    /// The leaf then the authority, PEM.
    pub cert_file: PathBuf,
    /// The leaf's private key, PEM.
    pub key_file: PathBuf,
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key_pem: String,
}

impl Issued {
    /// A fresh authority, and a certificate from it for 127.0.0.1 and
    /// localhost (usable by a server and, for mutual TLS, a client).
    pub fn new(name: &str) -> Self {
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca.distinguished_name.push(rcgen::DnType::CommonName, format!("{name} CA"));
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        leaf.distinguished_name.push(rcgen::DnType::CommonName, name);
        let leaf = leaf.signed_by(&leaf_key, &ca).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (ca_file, cert_file, key_file) =
            (dir.path().join("ca.pem"), dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&ca_file, ca.pem()).unwrap();
        std::fs::write(&cert_file, format!("{}{}", leaf.pem(), ca.pem())).unwrap();
        std::fs::write(&key_file, leaf_key.serialize_pem()).unwrap();
        Self {
            _dir: dir,
            ca_file,
            cert_file,
            key_file,
            ca: ca.der().clone(),
            chain: vec![leaf.der().clone(), ca.der().clone()],
            key_pem: leaf_key.serialize_pem(),
        }
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).unwrap()
    }

    /// A TLS server config serving this certificate, offering `alpn`.
    pub fn server_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key())
            .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// A TLS client config that trusts this authority only, offering `alpn`,
    /// presenting `identity`'s certificate when given.
    pub fn client_config(&self, alpn: &[&[u8]], identity: Option<&Issued>) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone()).unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let mut config = match identity {
            Some(id) => builder.with_client_auth_cert(id.chain.clone(), id.key()).unwrap(),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The pair the TLS mock upstream serves, made once per test process.
pub fn upstream() -> &'static Issued {
    static UPSTREAM: OnceLock<Issued> = OnceLock::new();
    UPSTREAM.get_or_init(|| Issued::new("sluice test upstream"))
}

/// The PEM file of the TLS mock's authority.
pub fn ca_file() -> PathBuf {
    upstream().ca_file.clone()
}

/// A TLS server config for the mock, offering `alpn`.
pub fn server_config(alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
    upstream().server_config(alpn)
}
