//! Reading security files before anything starts: TLS certificates and keys
//! (parsed and checked: a key must match its certificate), the client token
//! file, the agent join token. Every error names the flag and the file, and
//! the caller exits with code 2 having started nothing.
//!
//! Token file (`--tokens FILE`), a YAML list:
//!
//!     - {name: alice, token: 3f9c..., role: user}
//!     - {name: ops, token: 8a1d..., role: admin}

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use gantry_coordinator::auth::{BearerToken, Role};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// Longest token name (it is recorded as the owner of every job it submits).
const MAX_NAME_BYTES: usize = 64;

/// Shortest accepted secret (tokens are compared whole; short ones are guessable).
const MIN_SECRET_CHARS: usize = 16;

fn read(flag: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
}

/// A PEM file of certificates (a CA or a certificate chain), checked.
fn read_certs(flag: &str, path: &Path) -> Result<(Vec<u8>, Vec<CertificateDer<'static>>), String> {
    let pem = read(flag, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{flag} {}: malformed PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{flag} {}: no PEM certificate in the file",
            path.display()
        ));
    }
    Ok((pem, certs))
}

/// A certificate and its private key, checked to belong together.
struct KeyedCert {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn read_keyed_cert(
    cert_flag: &str,
    cert: &Path,
    key_flag: &str,
    key: &Path,
) -> Result<KeyedCert, String> {
    let (cert_pem, chain) = read_certs(cert_flag, cert)?;
    let key_pem = read(key_flag, key)?;
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        format!(
            "{key_flag} {}: no usable PEM private key: {e}",
            key.display()
        )
    })?;
    let certified =
        rustls::sign::CertifiedKey::from_der(chain.clone(), private.clone_key(), &provider())
            .map_err(|e| match e {
                rustls::Error::InconsistentKeys(_) => format!(
                    "{key_flag} {}: the key does not match the certificate {cert_flag} {} ({e})",
                    key.display(),
                    cert.display()
                ),
                _ => format!("{key_flag} {}: unusable key: {e}", key.display()),
            })?;
    certified.keys_match().map_err(|e| {
        format!(
            "{key_flag} {}: the key does not match the certificate {cert_flag} {}: {e}",
            key.display(),
            cert.display()
        )
    })?;
    Ok(KeyedCert {
        cert_pem,
        key_pem,
        chain,
        key: private,
    })
}

fn read_identity(
    cert_flag: &str,
    cert: &Path,
    key_flag: &str,
    key: &Path,
) -> Result<Identity, String> {
    let keyed = read_keyed_cert(cert_flag, cert, key_flag, key)?;
    Ok(Identity::from_pem(keyed.cert_pem, keyed.key_pem))
}

fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

fn pair<'a>(
    cert: &'a Option<PathBuf>,
    key: &'a Option<PathBuf>,
    cert_flag: &str,
    key_flag: &str,
) -> Result<Option<(&'a Path, &'a Path)>, String> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some((cert, key))),
        (None, None) => Ok(None),
        (Some(_), None) => Err(format!("{cert_flag} needs {key_flag}")),
        (None, Some(_)) => Err(format!("{key_flag} needs {cert_flag}")),
    }
}

/// TLS files of a client: the CA that signed the servers' certificates and,
/// for mutual TLS, the client's own certificate and key.
#[derive(Debug, Clone, Default)]
pub struct ClientTlsFiles {
    /// `--tls-ca`.
    pub ca: Option<PathBuf>,
    /// `--tls-cert`.
    pub cert: Option<PathBuf>,
    /// `--tls-key`.
    pub key: Option<PathBuf>,
}

impl ClientTlsFiles {
    /// The tonic configuration (`None` = plaintext), every file checked.
    pub fn load(&self) -> Result<Option<ClientTlsConfig>, String> {
        let identity = pair(&self.cert, &self.key, "--tls-cert", "--tls-key")?;
        let Some(ca) = &self.ca else {
            if identity.is_some() {
                return Err(
                    "--tls-cert needs --tls-ca (the CA that signed the coordinators' certificates)"
                        .into(),
                );
            }
            return Ok(None);
        };
        let (ca_pem, _) = read_certs("--tls-ca", ca)?;
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
        if let Some((cert, key)) = identity {
            config = config.identity(read_identity("--tls-cert", cert, "--tls-key", key)?);
        }
        Ok(Some(config))
    }
}

/// Checks that `url` agrees with the TLS setting: `https://` needs a CA,
/// and with a CA, a plaintext `http://` address is a mistake.
pub fn check_scheme(flag: &str, url: &str, tls: bool) -> Result<(), String> {
    if url.starts_with("https://") && !tls {
        return Err(format!(
            "{flag}: {url} is an https:// address but no --tls-ca was given"
        ));
    }
    if url.starts_with("http://") && tls {
        return Err(format!(
            "{flag}: {url} is a plaintext http:// address but TLS is configured (--tls-ca); use https://"
        ));
    }
    Ok(())
}

/// A coordinator's TLS files.
#[derive(Debug, Clone, Default)]
pub struct ServerTlsFiles {
    /// `--tls-cert`: served to clients, agents and peers (and presented to
    /// peers as a client certificate).
    pub cert: Option<PathBuf>,
    /// `--tls-key`.
    pub key: Option<PathBuf>,
    /// `--tls-client-ca`: require client certificates signed by this CA.
    pub client_ca: Option<PathBuf>,
    /// `--tls-ca`: the CA of the peers' certificates, for dialing them.
    pub ca: Option<PathBuf>,
}

/// A coordinator's loaded TLS settings.
pub struct ServerTls {
    /// What the listener serves (`None` = plaintext).
    pub server: Option<Arc<rustls::ServerConfig>>,
    /// Whether client certificates are required.
    pub mtls: bool,
    /// The client CA's certificates (Raft peers' certificates must chain to them).
    pub client_roots: Vec<CertificateDer<'static>>,
    /// What the Raft transport dials peers with (`None` = plaintext).
    pub peers: Option<ClientTlsConfig>,
    /// What the HTTP listener serves: the same identity, no client
    /// certificates (browsers and Prometheus authenticate with tokens, if at
    /// all), HTTP/1.1.
    pub http: Option<Arc<rustls::ServerConfig>>,
}

impl ServerTlsFiles {
    /// Loads and checks every file.
    pub fn load(&self) -> Result<ServerTls, String> {
        let identity = pair(&self.cert, &self.key, "--tls-cert", "--tls-key")?;
        let Some((cert, key)) = identity else {
            if self.client_ca.is_some() {
                return Err("--tls-client-ca needs --tls-cert and --tls-key".into());
            }
            if self.ca.is_some() {
                return Err(
                    "--tls-ca needs --tls-cert and --tls-key (the coordinator's own identity)"
                        .into(),
                );
            }
            return Ok(ServerTls {
                server: None,
                mtls: false,
                client_roots: Vec::new(),
                peers: None,
                http: None,
            });
        };
        let keyed = read_keyed_cert("--tls-cert", cert, "--tls-key", key)?;
        let identity = Identity::from_pem(keyed.cert_pem.clone(), keyed.key_pem.clone());
        let provider = Arc::new(provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("tls: {e}"))?;
        let mut http = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("tls: {e}"))?
            .with_no_client_auth()
            .with_single_cert(keyed.chain.clone(), keyed.key.clone_key())
            .map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?;
        http.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut client_roots = Vec::new();
        let (builder, mtls) = match &self.client_ca {
            Some(path) => {
                let (_, certs) = read_certs("--tls-client-ca", path)?;
                client_roots = certs.clone();
                let mut roots = rustls::RootCertStore::empty();
                for cert in certs {
                    roots
                        .add(cert)
                        .map_err(|e| format!("--tls-client-ca {}: {e}", path.display()))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .map_err(|e| format!("--tls-client-ca {}: {e}", path.display()))?;
                (builder.with_client_cert_verifier(verifier), true)
            }
            None => (builder.with_no_client_auth(), false),
        };
        let mut server = builder
            .with_single_cert(keyed.chain, keyed.key)
            .map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?;
        server.alpn_protocols = vec![b"h2".to_vec()];
        let server = Arc::new(server);
        let peers = match &self.ca {
            Some(path) => {
                let (pem, _) = read_certs("--tls-ca", path)?;
                Some(
                    ClientTlsConfig::new()
                        .ca_certificate(Certificate::from_pem(pem))
                        .identity(identity),
                )
            }
            None => None,
        };
        Ok(ServerTls {
            server: Some(server),
            mtls,
            client_roots,
            peers,
            http: Some(Arc::new(http)),
        })
    }
}

/// A coordinator's loaded security settings (default: none).
#[derive(Default)]
pub struct CoordinatorSecurity {
    /// TLS of the listener.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// TLS for dialing peers.
    pub peer_tls: Option<ClientTlsConfig>,
    /// TLS of the HTTP listener (HTTPS when the gRPC port has TLS).
    pub http_tls: Option<Arc<rustls::ServerConfig>>,
    /// Credentials checked on every call.
    pub auth: gantry_coordinator::auth::AuthConfig,
}

/// An agent's loaded security settings (default: none).
#[derive(Default)]
pub struct AgentSecurity {
    /// TLS of the coordinator link.
    pub tls: Option<ClientTlsConfig>,
    /// The join token.
    pub join_token: Option<String>,
    /// The user jobs run as.
    pub run_as: Option<gantry_agent::RunAs>,
}

/// Reads a secret from a file (trimmed; must not be empty or short).
pub fn read_secret(flag: &str, path: &Path) -> Result<String, String> {
    let bytes = read(flag, path)?;
    let text = String::from_utf8(bytes)
        .map_err(|_| format!("{flag} {}: not UTF-8 text", path.display()))?;
    check_secret(text.trim())
        .map(String::from)
        .map_err(|e| format!("{flag} {}: {e}", path.display()))
}

fn check_secret(secret: &str) -> Result<&str, String> {
    if secret.is_empty() {
        return Err("empty".into());
    }
    if secret.chars().count() < MIN_SECRET_CHARS {
        return Err(format!(
            "too short (at least {MIN_SECRET_CHARS} characters)"
        ));
    }
    if secret.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain spaces or control characters".into());
    }
    Ok(secret)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    token: String,
    role: String,
}

/// Reads `--tokens FILE`; errors name the file and the entry's field.
pub fn read_tokens(path: &Path) -> Result<Vec<BearerToken>, String> {
    let text = crate::yaml_limits::read_yaml_file(path, 1 << 20, "a token file")
        .map_err(|e| format!("--tokens {e}"))?;
    parse_tokens(&text).map_err(|e| format!("--tokens {}: {e}", path.display()))
}

fn parse_tokens(text: &str) -> Result<Vec<BearerToken>, String> {
    let deserializer = serde_yaml_ng::Deserializer::from_str(text);
    let entries: Vec<TokenEntry> = serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner().to_string();
        let bare = inner.strip_prefix('.').unwrap_or(&inner);
        if field == "." || bare.starts_with(&field) {
            bare.to_string()
        } else {
            format!("{field}: {inner}")
        }
    })?;
    if entries.is_empty() {
        return Err("no tokens (expected a list of {name, token, role})".into());
    }
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut secrets: HashMap<String, usize> = HashMap::new();
    let mut tokens = Vec::with_capacity(entries.len());
    for (i, entry) in entries.into_iter().enumerate() {
        let name = entry.name.trim();
        if name.is_empty() {
            return Err(format!("[{i}].name: must not be empty"));
        }
        // The name becomes the owner of every job the token submits.
        if name.len() > MAX_NAME_BYTES || name.chars().any(char::is_control) {
            return Err(format!(
                "[{i}].name: at most {MAX_NAME_BYTES} bytes, no control characters"
            ));
        }
        if let Some(first) = names.insert(name.to_string(), i) {
            return Err(format!(
                "[{i}].name: {name:?} is also the name of [{first}]"
            ));
        }
        let secret = check_secret(entry.token.trim()).map_err(|e| format!("[{i}].token: {e}"))?;
        if let Some(first) = secrets.insert(secret.to_string(), i) {
            return Err(format!("[{i}].token: the same token as [{first}]"));
        }
        let role = Role::parse(entry.role.trim()).ok_or_else(|| {
            format!(
                "[{i}].role: unknown role {:?} (expected user or admin)",
                entry.role
            )
        })?;
        tokens.push(BearerToken {
            name: name.to_string(),
            token: secret.to_string(),
            role,
        });
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expected: Result<&[(&str, Role)], &str>) {
        let got = parse_tokens(text);
        match expected {
            Ok(want) => {
                let got = got.unwrap_or_else(|e| panic!("{text:?}: {e}"));
                let got: Vec<(&str, Role)> =
                    got.iter().map(|t| (t.name.as_str(), t.role)).collect();
                assert_eq!(got, want, "{text:?}");
            }
            Err(want) => {
                let error = got.expect_err(text);
                assert!(error.contains(want), "{text:?}: {error}");
            }
        }
    }

    #[test]
    fn token_files() {
        let a = "aaaaaaaaaaaaaaaaaaaa";
        let b = "bbbbbbbbbbbbbbbbbbbb";
        check(
            &format!(
                "- {{name: alice, token: {a}, role: user}}\n- {{name: ops, token: {b}, role: admin}}\n"
            ),
            Ok(&[("alice", Role::User), ("ops", Role::Admin)]),
        );
        check("- {name: alice, token: \"unterminated\n", Err("line"));
        check(
            "- {name: alice, token: [1], role: user}",
            Err("[0].token: invalid type: sequence"),
        );
        check("[]", Err("no tokens"));
        check(
            &format!("- {{name: alice, token: {a}, role: root}}"),
            Err("[0].role: unknown role \"root\""),
        );
        check(
            &format!(
                "- {{name: alice, token: {a}, role: user}}\n- {{name: bob, token: {a}, role: admin}}"
            ),
            Err("[1].token: the same token as [0]"),
        );
        check(
            &format!(
                "- {{name: alice, token: {a}, role: user}}\n- {{name: alice, token: {b}, role: user}}"
            ),
            Err("[1].name: \"alice\" is also the name of [0]"),
        );
        check(
            &format!("- {{name: {}, token: {a}, role: user}}", "x".repeat(65)),
            Err("[0].name: at most 64 bytes"),
        );
        check(
            "- {name: alice, token: short, role: user}",
            Err("[0].token: too short"),
        );
        check(
            &format!("- {{name: alice, token: {a}}}"),
            Err("missing field `role`"),
        );
        check(
            &format!("- {{name: alice, token: {a}, role: user, extra: 1}}"),
            Err("unknown field `extra`"),
        );
    }

    #[test]
    fn schemes_must_agree_with_tls() {
        assert!(check_scheme("--addr", "http://a:1", false).is_ok());
        assert!(check_scheme("--addr", "https://a:1", true).is_ok());
        let error = check_scheme("--addr", "https://a:1", false).expect_err("no ca");
        assert!(error.contains("no --tls-ca"), "{error}");
        let error = check_scheme("--addr", "http://a:1", true).expect_err("plaintext");
        assert!(error.contains("use https://"), "{error}");
    }
}
