//! TLS 1.3 for libp2p's QUIC (the libp2p TLS spec): each side presents one self-signed
//! certificate carrying the libp2p extension (its identity key signs the certificate's
//! key), ALPN `libp2p`, and the peer ID is read from that extension, so no CA is
//! involved. Unlike libp2p-tls's configs, the server picks the cipher suite itself, in
//! the order [`CipherOrder`] chooses for the CPU.

use std::sync::Arc;

use libp2p::identity::Keypair;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
    SupportedCipherSuite,
    client::ResolvesClientCert,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{
        CryptoProvider,
        ring::{
            self,
            cipher_suite::{
                TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
            },
        },
    },
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        ClientHello, ResolvesServerCert,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};

use super::certificate::{Certificate as PeerCertificate, HANDSHAKE_SCHEMES};

/// The ALPN protocol of libp2p's TLS handshake.
const ALPN: &[u8] = b"libp2p";

/// Which AEAD the relay prefers, chosen once from the CPU it runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherOrder {
    /// AES-128-GCM first: the CPU has AES and carry-less multiply instructions
    /// (x86_64 `aes` + `pclmulqdq`, aarch64 `aes` + `pmull`), where AES-GCM is several
    /// times faster than ChaCha20-Poly1305.
    AesFirst,
    /// ChaCha20-Poly1305 first: without those instructions (Raspberry Pi 3 and 4, whose
    /// Cortex-A53/A72 lack the crypto extensions) AES runs in software and ChaCha20 wins.
    ChaChaFirst,
}

impl CipherOrder {
    /// The order for this CPU.
    pub fn detect() -> Self {
        if cpu_has_aes_and_clmul() {
            Self::AesFirst
        } else {
            Self::ChaChaFirst
        }
    }

    fn suites(self) -> Vec<SupportedCipherSuite> {
        match self {
            Self::AesFirst => vec![
                TLS13_AES_128_GCM_SHA256,
                TLS13_AES_256_GCM_SHA384,
                TLS13_CHACHA20_POLY1305_SHA256,
            ],
            Self::ChaChaFirst => vec![
                TLS13_CHACHA20_POLY1305_SHA256,
                TLS13_AES_128_GCM_SHA256,
                TLS13_AES_256_GCM_SHA384,
            ],
        }
    }

    /// What the relay logs at start and prints in `--version`'s long output.
    pub fn describe(self) -> &'static str {
        match self {
            Self::AesFirst => "AES-128-GCM first (CPU has AES and carry-less multiply)",
            Self::ChaChaFirst => "ChaCha20-Poly1305 first (CPU lacks AES or carry-less multiply)",
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn cpu_has_aes_and_clmul() -> bool {
    std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("pclmulqdq")
}

#[cfg(target_arch = "aarch64")]
fn cpu_has_aes_and_clmul() -> bool {
    std::arch::is_aarch64_feature_detected!("aes")
        && std::arch::is_aarch64_feature_detected!("pmull")
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn cpu_has_aes_and_clmul() -> bool {
    false
}

fn provider(order: CipherOrder) -> Arc<CryptoProvider> {
    let mut provider = ring::default_provider();
    provider.cipher_suites = order.suites();
    Arc::new(provider)
}

/// The relay's certificate: generated once per start (the spec allows reusing one
/// certificate for every connection; only the identity key inside it is long-lived).
/// Handed to rustls through a resolver rather than `with_single_cert`, which would run
/// it through WebPKI's checks, and those reject the libp2p extension (it is critical).
#[derive(Debug)]
pub struct Certificate(Arc<CertifiedKey>);

impl Certificate {
    pub fn generate(key: &Keypair) -> Result<Self, rustls::Error> {
        let (cert, key) = super::certificate::generate(key)
            .map_err(|e| rustls::Error::General(format!("the TLS certificate: {e}")))?;
        let key = ring::default_provider()
            .key_provider
            .load_private_key(key)?;
        Ok(Self(Arc::new(CertifiedKey::new(vec![cert], key))))
    }
}

impl ResolvesServerCert for Certificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl ResolvesClientCert for Certificate {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _schemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The server side: requires the client's certificate, and picks the cipher suite
/// in its own order rather than the client's.
pub fn server_config(
    cert: Arc<Certificate>,
    order: CipherOrder,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider(order))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(Verifier))
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.ignore_client_order = true;
    // 0-RTT is not part of libp2p's QUIC; session tickets would only be memory.
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(config)
}

/// The client side (the relay dialing `--bootstrap` relays and Kademlia peers). The
/// swarm compares the peer ID read from the certificate with the one dialed.
pub fn client_config(
    cert: Arc<Certificate>,
    order: CipherOrder,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider(order))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Verifier))
        .with_client_cert_resolver(cert);
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// The peer ID in a peer's (already verified) certificate chain.
pub fn peer_id(chain: &[CertificateDer<'_>]) -> Option<libp2p::PeerId> {
    let [cert] = chain else { return None };
    PeerCertificate::parse(cert).ok().map(|c| c.peer_id())
}

/// Verifies a libp2p certificate: exactly one, self-signed, within its validity, with
/// the libp2p extension whose signature the identity key made (all checked by
/// [`PeerCertificate::parse`]), and handshake signatures made by its key.
#[derive(Debug)]
struct Verifier;

impl Verifier {
    fn verify_chain(
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(), rustls::Error> {
        if !intermediates.is_empty() {
            return Err(rustls::Error::General(
                "a libp2p peer presents exactly one certificate".into(),
            ));
        }
        PeerCertificate::parse(end_entity).map_err(bad_certificate)?;
        Ok(())
    }

    fn verify_signature(
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
        message: &[u8],
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        PeerCertificate::parse(cert)
            .map_err(bad_certificate)?
            .verify_handshake(dss.scheme, message, dss.signature())
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadSignature))?;
        Ok(HandshakeSignatureValid::assertion())
    }

    fn schemes() -> Vec<SignatureScheme> {
        HANDSHAKE_SCHEMES.to_vec()
    }
}

fn bad_certificate(e: super::certificate::Error) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

fn tls12_refused() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::PeerIncompatible(
        rustls::PeerIncompatible::Tls13RequiredForQuic,
    ))
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Self::verify_chain(end_entity, intermediates)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Self::verify_signature(cert, dss, message)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        Self::schemes()
    }
}

impl ClientCertVerifier for Verifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Self::verify_chain(end_entity, intermediates)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Self::verify_signature(cert, dss, message)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        Self::schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a TLS 1.3 handshake in memory; the first error either side hits.
    fn handshake(
        c: &mut rustls::ClientConnection,
        s: &mut rustls::ServerConnection,
    ) -> Result<(), rustls::Error> {
        for _ in 0..10 {
            let mut wire = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut wire).unwrap();
            }
            s.read_tls(&mut wire.as_slice()).unwrap();
            s.process_new_packets()?;
            let mut wire = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut wire).unwrap();
            }
            c.read_tls(&mut wire.as_slice()).unwrap();
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(());
            }
        }
        panic!("the handshake did not finish");
    }

    fn server(order: CipherOrder) -> (Keypair, rustls::ServerConnection) {
        let relay = Keypair::generate_ed25519();
        let cert = Arc::new(Certificate::generate(&relay).unwrap());
        let config = Arc::new(server_config(cert, order).unwrap());
        (relay, rustls::ServerConnection::new(config).unwrap())
    }

    fn client(config: rustls::ClientConfig) -> rustls::ClientConnection {
        let name = ServerName::try_from("l").unwrap();
        rustls::ClientConnection::new(Arc::new(config), name).unwrap()
    }

    /// The relay's server config against libp2p-tls's client config (what rust-libp2p
    /// peers send: ChaCha20 first).
    fn negotiate(order: CipherOrder) -> SupportedCipherSuite {
        let peer = Keypair::generate_ed25519();
        let (relay, mut s) = server(order);
        let mut c = client(libp2p_tls::make_client_config(&peer, None).unwrap());
        handshake(&mut c, &mut s).unwrap();
        assert_eq!(s.alpn_protocol(), Some(ALPN));
        let peer_seen = peer_id(s.peer_certificates().unwrap());
        let relay_seen = peer_id(c.peer_certificates().unwrap());
        assert_eq!(peer_seen, Some(peer.public().to_peer_id()));
        assert_eq!(relay_seen, Some(relay.public().to_peer_id()));
        s.negotiated_cipher_suite().unwrap()
    }

    #[test]
    fn the_server_picks_the_cipher_suite_in_its_own_order() {
        let suite = negotiate(CipherOrder::AesFirst);
        assert_eq!(suite.suite(), TLS13_AES_128_GCM_SHA256.suite());
        let suite = negotiate(CipherOrder::ChaChaFirst);
        assert_eq!(suite.suite(), TLS13_CHACHA20_POLY1305_SHA256.suite());
    }

    #[test]
    fn a_client_without_a_certificate_is_refused() {
        let (_, mut s) = server(CipherOrder::detect());
        let mut config =
            rustls::ClientConfig::builder_with_provider(provider(CipherOrder::detect()))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Verifier))
                .with_no_client_auth();
        config.alpn_protocols = vec![ALPN.to_vec()];
        let mut c = client(config);
        assert!(handshake(&mut c, &mut s).is_err());
        assert!(s.peer_certificates().is_none());
    }
}
