//! `gantry certs init`: a development CA and everything signed by it, plus
//! a join token and a token file, for trying TLS and tokens on one machine
//! or a small lab. Production deployments bring their own PKI.
//!
//! Files (keys and secrets mode 0600; nothing is overwritten):
//! `ca.pem`, `ca-key.pem`; `coordinator.pem`/`coordinator-key.pem` (server
//! and client use: replicas dial each other with it); `agent.pem`/
//! `agent-key.pem`; `client.pem`/`client-key.pem` (the CLI); `join-token`;
//! `tokens.yaml` (an `admin` and a `user` token).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rand::Rng;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// The development CA's common name (tests that sign with its key rebuild
/// the same subject).
pub const CA_NAME: &str = "Gantry development CA";

/// One file to write.
struct Output {
    name: &'static str,
    contents: String,
    secret: bool,
}

fn params(common_name: &str, sans: &[String], days: u32) -> Result<CertificateParams, String> {
    let mut params = CertificateParams::new(sans.to_vec()).map_err(|e| format!("--host: {e}"))?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    params.distinguished_name = name;
    let now = time::OffsetDateTime::now_utc();
    // A little slack for clocks that are behind.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
    Ok(params)
}

fn random_secret() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Makes everything in memory, then writes it; refuses to overwrite.
pub fn init(dir: &Path, hosts: &[String], days: u32) -> Result<Vec<PathBuf>, String> {
    if days == 0 {
        return Err("--days: must be at least 1".into());
    }
    let err = |what: &str, e: rcgen::Error| format!("cannot make {what}: {e}");

    let ca_key = KeyPair::generate().map_err(|e| err("the CA key", e))?;
    let mut ca_params = params(CA_NAME, &[], days)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(|e| err("the CA certificate", e))?;
    let issuer = Issuer::new(ca_params, &ca_key);

    let mut server_names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    for host in hosts {
        if !server_names.contains(host) {
            server_names.push(host.clone());
        }
    }
    let mut outputs = vec![
        Output {
            name: "ca.pem",
            contents: ca_cert.pem(),
            secret: false,
        },
        Output {
            name: "ca-key.pem",
            contents: ca_key.serialize_pem(),
            secret: true,
        },
    ];
    let leaves: [(&str, &str, Vec<String>, Vec<ExtendedKeyUsagePurpose>); 3] = [
        (
            "coordinator",
            "gantry coordinator",
            server_names,
            // Replicas also dial each other with it: client use too.
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        ),
        (
            "agent",
            "gantry agent",
            Vec::new(),
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        ),
        (
            "client",
            "gantry client",
            Vec::new(),
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        ),
    ];
    for (file, common_name, sans, usages) in leaves {
        let key = KeyPair::generate().map_err(|e| err(file, e))?;
        let mut leaf = params(common_name, &sans, days)?;
        leaf.extended_key_usages = usages;
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = leaf.signed_by(&key, &issuer).map_err(|e| err(file, e))?;
        outputs.push(Output {
            name: match file {
                "coordinator" => "coordinator.pem",
                "agent" => "agent.pem",
                _ => "client.pem",
            },
            contents: cert.pem(),
            secret: false,
        });
        outputs.push(Output {
            name: match file {
                "coordinator" => "coordinator-key.pem",
                "agent" => "agent-key.pem",
                _ => "client-key.pem",
            },
            contents: key.serialize_pem(),
            secret: true,
        });
    }
    outputs.push(Output {
        name: "join-token",
        contents: format!("{}\n", random_secret()),
        secret: true,
    });
    outputs.push(Output {
        name: "tokens.yaml",
        contents: format!(
            "# Client bearer tokens: role admin may do everything, role user may\n\
             # submit, cancel, retry and read. Give each person their own token.\n\
             - {{name: admin, token: {}, role: admin}}\n\
             - {{name: user, token: {}, role: user}}\n",
            random_secret(),
            random_secret()
        ),
        secret: true,
    });

    std::fs::create_dir_all(dir).map_err(|e| format!("--dir {}: {e}", dir.display()))?;
    // All or nothing: check every name before writing the first file.
    for output in &outputs {
        let path = dir.join(output.name);
        if path.exists() {
            return Err(format!(
                "{} already exists; refusing to overwrite it (use another --dir)",
                path.display()
            ));
        }
    }
    let mut written = Vec::new();
    for output in outputs {
        let path = dir.join(output.name);
        let mode = if output.secret { 0o600 } else { 0o644 };
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        file.write_all(output.contents.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_everything_once_with_private_keys_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let written = init(dir.path(), &["node-1.lab".into()], 30).expect("init");
        assert_eq!(written.len(), 10);
        for name in ["ca-key.pem", "agent-key.pem", "join-token", "tokens.yaml"] {
            let mode = std::fs::metadata(dir.path().join(name))
                .expect(name)
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}");
        }
        let tokens = crate::security::read_tokens(&dir.path().join("tokens.yaml")).expect("tokens");
        assert_eq!(tokens.len(), 2);
        // The files load as a coordinator's TLS settings (key matches cert).
        let files = crate::security::ServerTlsFiles {
            cert: Some(dir.path().join("coordinator.pem")),
            key: Some(dir.path().join("coordinator-key.pem")),
            client_ca: Some(dir.path().join("ca.pem")),
            ca: Some(dir.path().join("ca.pem")),
        };
        assert!(files.load().is_ok());
        let mismatched = crate::security::ServerTlsFiles {
            key: Some(dir.path().join("agent-key.pem")),
            ..files
        };
        let error = mismatched.load().err().expect("mismatch");
        assert!(error.contains("does not match"), "{error}");

        // Only the coordinator's certificate may call the Raft peer service.
        let tls = crate::security::ServerTlsFiles {
            cert: Some(dir.path().join("coordinator.pem")),
            key: Some(dir.path().join("coordinator-key.pem")),
            client_ca: Some(dir.path().join("ca.pem")),
            ca: None,
        }
        .load()
        .expect("load");
        let auth = gantry_coordinator::auth::AuthConfig {
            mtls: true,
            peer_roots: tls.client_roots,
            ..Default::default()
        };
        let chain = |name: &str| {
            let pem = std::fs::read(dir.path().join(name)).expect(name);
            rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .expect(name)
        };
        let step = "/gantry.raft.v1.RaftPeer/Step";
        let headers = Default::default();
        let replica = chain("coordinator.pem");
        assert!(auth.check(step, &headers, Some(&replica)).is_ok());
        for name in ["client.pem", "agent.pem"] {
            let other = chain(name);
            let error = auth
                .check(step, &headers, Some(&other))
                .expect_err(name)
                .to_string();
            assert!(
                error.contains("only replica certificates"),
                "{name}: {error}"
            );
        }

        let again = init(dir.path(), &[], 30).expect_err("overwrite");
        assert!(again.contains("already exists"), "{again}");
    }
}
