//! TLS with rustls (ring provider, so the static musl build needs no C toolchain): loading the
//! certificate, key and client CA from PEM files, swapping them in when they rotate, and the
//! facts a script sees of a finished handshake (`req.tls`, SPEC §11).

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Under this much validity left, a certificate is warned about at load and daily.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(7 * 24 * 3600);

/// The files `--tls-cert`, `--tls-key` and `--tls-client-ca` name.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// With it, every client must present a certificate that chains to this bundle (mTLS).
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// Every file whose change means the configuration must be built again.
    pub fn paths(&self) -> Vec<&Path> {
        let mut paths = vec![self.cert.as_path(), self.key.as_path()];
        paths.extend(self.client_ca.as_deref());
        paths
    }
}

/// The TLS configuration new handshakes use, replaced as a whole when the files rotate.
/// Open connections keep the `Arc` they started with, so a rotation never disturbs them.
pub struct TlsServer {
    files: TlsFiles,
    /// `--framing http` offers ALPN `http/1.1`.
    alpn_http: bool,
    current: RwLock<Loaded>,
}

/// One successfully loaded set of files.
#[derive(Clone)]
struct Loaded {
    config: Arc<ServerConfig>,
    /// When the served certificate expires, seconds since the epoch.
    not_after: i64,
}

impl TlsServer {
    /// Loads the files once; an error names the file and is a configuration error at start.
    pub fn load(files: TlsFiles, alpn_http: bool) -> Result<TlsServer, String> {
        let loaded = build(&files, alpn_http)?;
        let server = TlsServer {
            files,
            alpn_http,
            current: RwLock::new(loaded),
        };
        server.report_expiry(true);
        Ok(server)
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The configuration for a new handshake.
    pub fn config(&self) -> Arc<ServerConfig> {
        match self.current.read() {
            Ok(loaded) => loaded.config.clone(),
            Err(poisoned) => poisoned.into_inner().config.clone(),
        }
    }

    /// Reads the files again; on error the old configuration keeps serving.
    pub fn reload(&self) -> Result<(), String> {
        let loaded = build(&self.files, self.alpn_http)?;
        match self.current.write() {
            Ok(mut current) => *current = loaded,
            Err(poisoned) => *poisoned.into_inner() = loaded,
        }
        self.report_expiry(true);
        Ok(())
    }

    /// Sets the expiry gauge; with `warn`, logs a warning when under a week is left.
    pub fn report_expiry(&self, warn: bool) {
        let not_after = match self.current.read() {
            Ok(loaded) => loaded.not_after,
            Err(poisoned) => poisoned.into_inner().not_after,
        };
        let left = not_after - unix_now();
        crate::metrics::metrics().tls_cert_expiry_seconds.set(left);
        if warn && left < EXPIRY_WARNING.as_secs() as i64 {
            log::warn!(
                "TLS certificate {} expires in {} ({}h left); renew it",
                self.files.cert.display(),
                if left <= 0 {
                    "the past"
                } else {
                    "under 7 days"
                },
                left / 3600
            );
        }
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The ring provider: it builds for static musl with no C toolchain beyond `cc`, unlike
/// aws-lc-rs. rustls 0.23.48 deprecates it only for lacking post-quantum key exchange.
///
/// Key exchange prefers X25519, as OpenSSL, curl and browsers do, over ring's default order
/// (P-384 first): ring has assembly for X25519 and P-256 but only portable C for P-384, whose
/// two scalar multiplications made a full handshake cost ~1 ms of CPU on each side (BENCHMARKS.md).
/// The server takes the first group in this order for which the client sent a key share, so a
/// client that offers only P-384 still gets it, without a retry.
#[allow(deprecated)]
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::{default_provider, kx_group};
    Arc::new(CryptoProvider {
        kx_groups: vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1],
        ..default_provider()
    })
}

/// TLS 1.2 and 1.3 only (SPEC §11): rustls has nothing older, and we ask for both explicitly.
pub const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

fn build(files: &TlsFiles, alpn_http: bool) -> Result<Loaded, String> {
    let certs = read_certs(&files.cert, "--tls-cert")?;
    let key = read_key(&files.key, "--tls-key")?;
    let leaf = certs
        .first()
        .ok_or_else(|| format!("--tls-cert {}: no certificate", files.cert.display()))?;
    let not_after = x509_parser::parse_x509_certificate(leaf)
        .map(|(_, cert)| cert.validity().not_after.timestamp())
        .map_err(|e| format!("--tls-cert {}: {e}", files.cert.display()))?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| format!("setting up TLS: {e}"))?;
    let builder = match &files.client_ca {
        Some(path) => {
            let roots = root_store(path, "--tls-client-ca")?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| format!("--tls-client-ca {}: {e}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        format!(
            "--tls-key {} does not go with --tls-cert {}: {e}",
            files.key.display(),
            files.cert.display()
        )
    })?;
    if alpn_http {
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
    }
    // TLS 1.3 session tickets are wasted work here: our clients (`send`, curl, socat, a
    // CronJob) are one-shot processes that never resume, and each ticket costs the server an
    // encryption and a write on every full handshake.
    config.send_tls13_tickets = 0;
    Ok(Loaded {
        config: Arc::new(config),
        not_after,
    })
}

/// Reads a PEM file's certificates; none at all is an error naming the file.
pub fn read_certs(path: &Path, flag: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{flag} {}: no PEM certificate in it",
            path.display()
        ));
    }
    Ok(certs)
}

/// Reads a PEM private key: PKCS#8, SEC1 or PKCS#1 (RSA).
pub fn read_key(path: &Path, flag: &str) -> Result<PrivateKeyDer<'static>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| format!("{flag} {}: no usable PEM private key ({e})", path.display()))
}

pub fn root_store(path: &Path, flag: &str) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path, flag)? {
        roots
            .add(cert)
            .map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    }
    Ok(roots)
}

/// What the script sees of a TLS connection: `req.tls`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsInfo {
    /// `"TLSv1.2"` or `"TLSv1.3"`.
    pub version: String,
    /// The suite's standard (IANA) name.
    pub cipher: String,
    /// The server name the client asked for; `None` when it sent none (connecting by IP).
    pub sni: Option<String>,
    /// The verified client certificate (mTLS).
    pub client: Option<ClientCert>,
}

/// The identity in a verified client certificate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientCert {
    pub subject: String,
    pub cn: Option<String>,
    /// `dns:NAME`, `uri:URI`, `ip:ADDR`, `email:ADDR`.
    pub sans: Vec<String>,
    /// Hex, lower case, as `openssl x509 -serial` prints it but without colons.
    pub serial: String,
    pub fingerprint_sha256: String,
    /// Seconds since the epoch.
    pub not_after: i64,
}

impl TlsInfo {
    /// The facts of a finished handshake. Built once per connection, not per request.
    pub fn of(tls: &ServerConnection) -> TlsInfo {
        let version = match tls.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
            _ => "unknown",
        };
        let cipher = tls
            .negotiated_cipher_suite()
            .and_then(|s| s.suite().as_str())
            .map(standard_suite_name)
            .unwrap_or_default();
        TlsInfo {
            version: version.into(),
            cipher,
            sni: tls.server_name().map(str::to_owned),
            client: tls
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|leaf| ClientCert::of(leaf)),
        }
    }
}

/// rustls names TLS 1.3 suites `TLS13_...`; their standard names start `TLS_`.
fn standard_suite_name(name: &str) -> String {
    match name.strip_prefix("TLS13_") {
        Some(rest) => format!("TLS_{rest}"),
        None => name.to_owned(),
    }
}

impl ClientCert {
    /// `None` only for a certificate rustls verified but x509-parser cannot read.
    pub fn of(der: &CertificateDer<'_>) -> Option<ClientCert> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        Some(ClientCert {
            subject: cert.subject().to_string(),
            cn,
            sans: sans_of(&cert),
            serial: hex::encode(cert.raw_serial()),
            fingerprint_sha256: hex::encode(Sha256::digest(der.as_ref())),
            not_after: cert.validity().not_after.timestamp(),
        })
    }
}

fn sans_of(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some(format!("dns:{dns}")),
            GeneralName::URI(uri) => Some(format!("uri:{uri}")),
            GeneralName::RFC822Name(email) => Some(format!("email:{email}")),
            GeneralName::IPAddress(bytes) => ip_of(bytes).map(|ip| format!("ip:{ip}")),
            _ => None,
        })
        .collect()
}

fn ip_of(bytes: &[u8]) -> Option<std::net::IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(std::net::IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(std::net::IpAddr::from),
        _ => None,
    }
}

/// Whether a handshake failed because of the client's certificate (counted as an
/// authentication failure for `--auth-failures`), rather than for any other reason.
pub fn is_client_cert_error(error: &rustls::Error) -> bool {
    matches!(
        error,
        rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suite_names_are_the_standard_ones() {
        assert_eq!(
            standard_suite_name("TLS13_AES_128_GCM_SHA256"),
            "TLS_AES_128_GCM_SHA256"
        );
        assert_eq!(
            standard_suite_name("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"),
            "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"
        );
    }

    #[test]
    fn key_exchange_prefers_the_groups_ring_has_assembly_for() {
        use rustls::NamedGroup;
        let groups: Vec<NamedGroup> = provider().kx_groups.iter().map(|g| g.name()).collect();
        let want = [
            NamedGroup::X25519,
            NamedGroup::secp256r1,
            NamedGroup::secp384r1,
        ];
        assert_eq!(groups, want);
    }

    #[test]
    fn ip_sans_read_both_families() {
        assert_eq!(
            ip_of(&[10, 0, 0, 7]).map(|ip| ip.to_string()),
            Some("10.0.0.7".into())
        );
        assert_eq!(ip_of(&[0; 16]).map(|ip| ip.to_string()), Some("::".into()));
        assert_eq!(ip_of(&[1, 2, 3]), None);
    }
}
