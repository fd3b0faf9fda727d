//! PEM files named by the config: CA bundles for upstreams (and, on the
//! listener, certificate chains and private keys). Read at validation time, so
//! `sluice check` names a bad file before anything starts.

use std::path::Path;

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

/// Every certificate in a PEM file; an empty or unreadable file is an error.
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read certificates from `{}`: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("`{}` holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("cannot read a private key from `{}`: {e}", path.display()))
}

/// A certificate chain and its private key, loaded and checked to belong
/// together (ring provider): what a TLS listener serves.
pub fn certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, String> {
    let chain = read_certificates(cert)?;
    let key = read_private_key(key)?;
    let provider = rustls::crypto::ring::default_provider();
    let certified = CertifiedKey::from_der(chain, key, &provider)
        .map_err(|e| format!("`{}` and its key do not fit together: {e}", cert.display()))?;
    Ok(Arc::new(certified))
}

/// The listener's certificate, swapped in place on reload: connections keep
/// the certificate they shook hands with, new handshakes get the new one.
#[derive(Debug)]
pub struct CertStore {
    current: arc_swap::ArcSwap<CertifiedKey>,
    files: crate::config::TlsConfig,
}

impl CertStore {
    /// Loads the pair named by `tls`.
    pub fn load(tls: &crate::config::TlsConfig) -> Result<Self, String> {
        Ok(Self { current: arc_swap::ArcSwap::new(certified_key(&tls.cert, &tls.key)?), files: tls.clone() })
    }

    /// Reads the files again (after a reload) and swaps the pair in; on any
    /// error the running pair stays.
    pub fn reload(&self) -> Result<(), String> {
        self.current.store(certified_key(&self.files.cert, &self.files.key)?);
        Ok(())
    }

    /// The files this store serves from.
    pub fn files(&self) -> &crate::config::TlsConfig {
        &self.files
    }

    /// A TLS acceptor serving this store's certificate (ring provider, TLS
    /// 1.2 and 1.3, ALPN `h2` then `http/1.1`), asking clients for a
    /// certificate signed by `client_ca` when one is set.
    pub fn acceptor(self: &Arc<Self>) -> Result<tokio_rustls::TlsAcceptor, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup failed: {e}"))?;
        let builder = match &self.files.client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in read_certificates(ca)? {
                    roots.add(cert).map_err(|e| format!("`{}`: {e}", ca.display()))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| format!("`{}`: {e}", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(Arc::clone(self) as Arc<dyn rustls::server::ResolvesServerCert>);
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}

impl rustls::server::ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}
