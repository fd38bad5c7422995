//! The libp2p TLS certificate (libp2p's TLS spec): a self-signed X.509 certificate
//! whose key is made for the occasion, carrying a critical extension
//! (OID 1.3.6.1.4.1.53594.1.1) with the peer's identity public key and that key's
//! signature over `libp2p-tls-handshake:` followed by the certificate's own public key
//! (its DER SubjectPublicKeyInfo). The peer ID is the identity key's.
//!
//! The relay's own rather than libp2p-tls's, whose rustls is built with aws-lc-rs:
//! generation is rcgen's, parsing x509-parser's, and every signature check ring's, so
//! the binary carries one crypto library (BENCHMARKS.md compares the two).

use libp2p::{PeerId, identity};
use ring::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use rustls::SignatureScheme;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::oid_registry::{self, Oid};
use x509_parser::prelude::{FromDer, X509Certificate};

/// The libp2p Public Key Extension's OID, allocated by IANA to libp2p.
const EXTENSION_OID: &[u64] = &[1, 3, 6, 1, 4, 1, 53594, 1, 1];

/// What the identity key signs, followed by the certificate's public key.
const SIGNING_PREFIX: &[u8] = b"libp2p-tls-handshake:";

/// Why a peer's certificate was refused. Each names the rule of the spec it breaks.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("the certificate is not valid DER X.509")]
    BadDer,
    #[error("the certificate is outside its validity period")]
    Expired,
    #[error("the certificate lacks the libp2p public key extension")]
    NoExtension,
    #[error("the certificate carries the libp2p public key extension more than once")]
    TwoExtensions,
    #[error("the libp2p public key extension is malformed")]
    BadExtension,
    #[error("the certificate has a critical extension the relay does not know")]
    UnknownCriticalExtension,
    #[error("the certificate's signature algorithm is not one libp2p allows")]
    UnsupportedAlgorithm,
    #[error("the certificate's self-signature does not verify")]
    BadSelfSignature,
    #[error("the identity key did not sign the certificate's key")]
    BadIdentitySignature,
    #[error("the handshake signature does not verify with the certificate's key")]
    BadHandshakeSignature,
}

/// Makes the relay's certificate and its private key (PKCS#8) for `identity`.
pub fn generate(
    identity: &identity::Keypair,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), String> {
    // ECDSA P-256 with SHA-256: what every libp2p implementation uses and accepts.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| format!("generating the certificate key: {e}"))?;
    let mut message = SIGNING_PREFIX.to_vec();
    message.extend_from_slice(&key.public_key_der());
    let signature = identity
        .sign(&message)
        .map_err(|e| format!("signing the certificate key with the identity key: {e}"))?;
    // SignedKey ::= SEQUENCE { publicKey OCTET STRING, signature OCTET STRING }
    let content = yasna::encode_der(&(identity.public().encode_protobuf(), signature));
    let mut extension = rcgen::CustomExtension::from_oid_content(EXTENSION_OID, content);
    extension.set_criticality(true);

    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.custom_extensions.push(extension);
    let cert = params
        .self_signed(&key)
        .map_err(|e| format!("self-signing the certificate: {e}"))?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok((cert.der().clone(), der))
}

/// A peer's certificate, checked against every rule of the spec.
#[derive(Debug)]
pub struct Certificate<'a> {
    x509: X509Certificate<'a>,
    identity: identity::PublicKey,
}

impl<'a> Certificate<'a> {
    /// Parses and verifies: within its validity, no unknown critical extension, exactly
    /// one libp2p extension, self-signed with an allowed algorithm (SHA-1 and MD5 are
    /// not), and the identity key's signature over the certificate's key.
    pub fn parse(der: &'a CertificateDer<'_>) -> Result<Self, Error> {
        let (_, x509) = X509Certificate::from_der(der.as_ref()).map_err(|_| Error::BadDer)?;
        if !x509.validity().is_valid() {
            return Err(Error::Expired);
        }
        let oid = Oid::from(EXTENSION_OID).expect("a valid OID");
        let mut signed_key = None;
        for ext in x509.extensions() {
            if ext.oid == oid {
                if signed_key.is_some() {
                    return Err(Error::TwoExtensions);
                }
                let (key, signature): (Vec<u8>, Vec<u8>) =
                    yasna::decode_der(ext.value).map_err(|_| Error::BadExtension)?;
                signed_key = Some((key, signature));
            } else if ext.critical {
                return Err(Error::UnknownCriticalExtension);
            }
        }
        let (key, identity_signature) = signed_key.ok_or(Error::NoExtension)?;
        let identity =
            identity::PublicKey::try_decode_protobuf(&key).map_err(|_| Error::BadExtension)?;

        let algorithm = self_signature_algorithm(&x509)?;
        let spki = &x509.tbs_certificate.subject_pki;
        UnparsedPublicKey::new(algorithm, spki.subject_public_key.as_ref())
            .verify(x509.tbs_certificate.as_ref(), x509.signature_value.as_ref())
            .map_err(|_| Error::BadSelfSignature)?;

        let mut message = SIGNING_PREFIX.to_vec();
        message.extend_from_slice(spki.raw);
        if !identity.verify(&message, &identity_signature) {
            return Err(Error::BadIdentitySignature);
        }
        Ok(Self { x509, identity })
    }

    pub fn peer_id(&self) -> PeerId {
        self.identity.to_peer_id()
    }

    /// Checks a TLS 1.3 handshake signature (CertificateVerify) made with the
    /// certificate's key.
    pub fn verify_handshake(
        &self,
        scheme: SignatureScheme,
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), Error> {
        let algorithm = handshake_algorithm(scheme).ok_or(Error::UnsupportedAlgorithm)?;
        let spki = &self.x509.tbs_certificate.subject_pki;
        UnparsedPublicKey::new(algorithm, spki.subject_public_key.as_ref())
            .verify(message, signature)
            .map_err(|_| Error::BadHandshakeSignature)
    }
}

/// The handshake signature schemes [`Certificate::verify_handshake`] checks, best first.
pub const HANDSHAKE_SCHEMES: &[SignatureScheme] = &[
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ED25519,
    SignatureScheme::RSA_PSS_SHA256,
    SignatureScheme::RSA_PSS_SHA384,
    SignatureScheme::RSA_PSS_SHA512,
];

fn handshake_algorithm(scheme: SignatureScheme) -> Option<&'static dyn VerificationAlgorithm> {
    Some(match scheme {
        SignatureScheme::ECDSA_NISTP256_SHA256 => &signature::ECDSA_P256_SHA256_ASN1,
        SignatureScheme::ECDSA_NISTP384_SHA384 => &signature::ECDSA_P384_SHA384_ASN1,
        SignatureScheme::ED25519 => &signature::ED25519,
        SignatureScheme::RSA_PSS_SHA256 => &signature::RSA_PSS_2048_8192_SHA256,
        SignatureScheme::RSA_PSS_SHA384 => &signature::RSA_PSS_2048_8192_SHA384,
        SignatureScheme::RSA_PSS_SHA512 => &signature::RSA_PSS_2048_8192_SHA512,
        _ => return None,
    })
}

/// The algorithm of the certificate's self-signature, from its key type (and, for
/// elliptic curves, the named curve) and its signature algorithm. Hashes shorter
/// than 256 bits are refused, as the spec requires.
fn self_signature_algorithm(
    x509: &X509Certificate<'_>,
) -> Result<&'static dyn VerificationAlgorithm, Error> {
    use oid_registry::*;
    let signed_with = &x509.signature_algorithm.algorithm;
    let key = &x509.tbs_certificate.subject_pki.algorithm;
    if key.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = key
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .ok_or(Error::UnsupportedAlgorithm)?;
        if curve == OID_EC_P256 && *signed_with == OID_SIG_ECDSA_WITH_SHA256 {
            return Ok(&signature::ECDSA_P256_SHA256_ASN1);
        }
        if curve == OID_NIST_EC_P384 && *signed_with == OID_SIG_ECDSA_WITH_SHA384 {
            return Ok(&signature::ECDSA_P384_SHA384_ASN1);
        }
    } else if key.algorithm == OID_SIG_ED25519 && *signed_with == OID_SIG_ED25519 {
        return Ok(&signature::ED25519);
    } else if key.algorithm == OID_PKCS1_RSAENCRYPTION {
        if *signed_with == OID_PKCS1_SHA256WITHRSA {
            return Ok(&signature::RSA_PKCS1_2048_8192_SHA256);
        }
        if *signed_with == OID_PKCS1_SHA384WITHRSA {
            return Ok(&signature::RSA_PKCS1_2048_8192_SHA384);
        }
        if *signed_with == OID_PKCS1_SHA512WITHRSA {
            return Ok(&signature::RSA_PKCS1_2048_8192_SHA512);
        }
    }
    Err(Error::UnsupportedAlgorithm)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(der: &CertificateDer<'_>) -> Result<PeerId, Error> {
        Certificate::parse(der).map(|c| c.peer_id())
    }

    /// A certificate with a valid libp2p extension for `identity`, a fresh key of
    /// `alg`, and whatever `tweak` changes (to make the ones the spec refuses).
    fn custom(
        identity: &identity::Keypair,
        alg: &'static rcgen::SignatureAlgorithm,
        tweak: impl FnOnce(&mut rcgen::CertificateParams, &rcgen::KeyPair),
    ) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let mut message = SIGNING_PREFIX.to_vec();
        message.extend_from_slice(&key.public_key_der());
        let signature = identity.sign(&message).unwrap();
        let content = yasna::encode_der(&(identity.public().encode_protobuf(), signature));
        let mut params = rcgen::CertificateParams::default();
        params
            .custom_extensions
            .push(rcgen::CustomExtension::from_oid_content(
                EXTENSION_OID,
                content,
            ));
        tweak(&mut params, &key);
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn a_generated_certificate_names_its_identity() {
        let id = identity::Keypair::generate_ed25519();
        let (cert, _) = generate(&id).unwrap();
        assert_eq!(parse(&cert), Ok(id.public().to_peer_id()));
    }

    #[test]
    fn certificates_interoperate_with_libp2p_tls() {
        // rust-libp2p's own certificates parse here, and the relay's parse there.
        let id = identity::Keypair::generate_ed25519();
        let (theirs, _) = libp2p_tls::certificate::generate(&id).unwrap();
        assert_eq!(parse(&theirs), Ok(id.public().to_peer_id()));
        let (ours, _) = generate(&id).unwrap();
        let parsed = libp2p_tls::certificate::parse(&ours).unwrap();
        assert_eq!(parsed.peer_id(), id.public().to_peer_id());
    }

    #[test]
    fn ed25519_and_p384_certificate_keys_are_accepted() {
        let id = identity::Keypair::generate_ed25519();
        for alg in [&rcgen::PKCS_ED25519, &rcgen::PKCS_ECDSA_P384_SHA384] {
            let cert = custom(&id, alg, |_, _| {});
            assert_eq!(parse(&cert), Ok(id.public().to_peer_id()));
        }
    }

    #[test]
    fn a_certificate_without_the_extension_is_refused() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::default()
            .self_signed(&key)
            .unwrap();
        assert_eq!(parse(cert.der()), Err(Error::NoExtension));
        assert_eq!(
            parse(&CertificateDer::from(vec![0x30, 0x03])),
            Err(Error::BadDer)
        );
    }

    #[test]
    fn an_unknown_critical_extension_is_refused_and_a_plain_one_ignored() {
        let id = identity::Keypair::generate_ed25519();
        let with = |critical: bool| {
            custom(&id, &rcgen::PKCS_ECDSA_P256_SHA256, |p, _| {
                let mut e = rcgen::CustomExtension::from_oid_content(&[1, 2, 3, 4], vec![5, 0]);
                e.set_criticality(critical);
                p.custom_extensions.push(e);
            })
        };
        assert_eq!(parse(&with(true)), Err(Error::UnknownCriticalExtension));
        assert_eq!(parse(&with(false)), Ok(id.public().to_peer_id()));
    }

    #[test]
    fn a_key_the_identity_did_not_sign_is_refused() {
        // The extension's signature is over another certificate key.
        let id = identity::Keypair::generate_ed25519();
        let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = custom(&id, &rcgen::PKCS_ECDSA_P256_SHA256, |p, _| {
            let mut message = SIGNING_PREFIX.to_vec();
            message.extend_from_slice(&other.public_key_der());
            let content =
                yasna::encode_der(&(id.public().encode_protobuf(), id.sign(&message).unwrap()));
            p.custom_extensions[0] =
                rcgen::CustomExtension::from_oid_content(EXTENSION_OID, content);
        });
        assert_eq!(parse(&cert), Err(Error::BadIdentitySignature));
    }

    #[test]
    fn a_tampered_or_expired_certificate_is_refused() {
        let id = identity::Keypair::generate_ed25519();
        let (cert, _) = generate(&id).unwrap();
        // A bit flipped in the to-be-signed part: it no longer parses or verifies.
        let mut bytes = cert.to_vec();
        let at = bytes.len() / 2;
        bytes[at] ^= 0x01;
        assert!(parse(&CertificateDer::from(bytes)).is_err());

        let expired = custom(&id, &rcgen::PKCS_ECDSA_P256_SHA256, |p, _| {
            p.not_before = rcgen::date_time_ymd(2000, 1, 1);
            p.not_after = rcgen::date_time_ymd(2001, 1, 1);
        });
        assert_eq!(parse(&expired), Err(Error::Expired));
        let two = custom(&id, &rcgen::PKCS_ECDSA_P256_SHA256, |p, _| {
            let again = p.custom_extensions[0].clone();
            p.custom_extensions.push(again);
        });
        assert_eq!(parse(&two), Err(Error::TwoExtensions));
    }

    #[test]
    fn a_bad_handshake_signature_or_scheme_is_refused() {
        let (der, _) = generate(&identity::Keypair::generate_ed25519()).unwrap();
        let cert = Certificate::parse(&der).unwrap();
        let scheme = SignatureScheme::ECDSA_NISTP256_SHA256;
        assert_eq!(
            cert.verify_handshake(scheme, b"transcript", &[0x30, 0x00]),
            Err(Error::BadHandshakeSignature)
        );
        assert_eq!(
            cert.verify_handshake(SignatureScheme::RSA_PKCS1_SHA1, b"transcript", &[]),
            Err(Error::UnsupportedAlgorithm)
        );
    }
}
