//! Security (issue 6): TLS and mutual TLS, the agent join token, client
//! bearer tokens with roles, `--run-as`, and the refusals: a wrong CA, a
//! missing token, a read-only token on an admin call, an expired or missing
//! client certificate, bad security files. Every refusal has a clear message
//! and exit code (4 = credentials refused, 3 = no trusted connection, 2 =
//! bad input), and the coordinator logs the refusals of agents.

use std::path::{Path, PathBuf};
use std::time::Duration;

use gantry_integration_tests::{CliOutput, Sandbox, find_tool, wait_until};

const WAIT: Duration = Duration::from_secs(30);

/// The paths of one `gantry certs init` directory.
struct Certs {
    dir: PathBuf,
}

impl Certs {
    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// A coordinator's TLS and credential flags: its certificate, mutual TLS
    /// against the CA, the client tokens, and `extra`.
    fn coordinator_args(&self, extra: &[(&str, &str)]) -> Vec<String> {
        let mut args = Vec::new();
        for (flag, file) in [
            ("--tls-cert", "coordinator.pem"),
            ("--tls-key", "coordinator-key.pem"),
            ("--tls-client-ca", "ca.pem"),
            ("--tokens", "tokens.yaml"),
        ]
        .iter()
        .chain(extra)
        {
            args.push(flag.to_string());
            args.push(self.path(file));
        }
        args
    }

    /// The token of role `role` from tokens.yaml.
    fn token(&self, role: &str) -> String {
        let text = std::fs::read_to_string(self.dir.join("tokens.yaml")).expect("tokens.yaml");
        text.lines()
            .find(|l| l.contains(&format!("role: {role}}}")))
            .and_then(|l| l.split("token: ").nth(1))
            .and_then(|rest| rest.split(',').next())
            .expect("token line")
            .to_string()
    }
}

/// Starts a coordinator with mTLS, tokens and a join token; returns its
/// gRPC URL and its HTTPS base URL.
fn start_secure_coordinator(
    sandbox: &mut Sandbox,
    certs: &Certs,
) -> anyhow::Result<(String, String)> {
    let args = certs.coordinator_args(&[("--join-token-file", "join-token")]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let coordinator = sandbox.start_coordinator_with("coordinator", &args)?;
    Ok((
        coordinator.url.replace("http://", "https://"),
        coordinator.http.replace("http://", "https://"),
    ))
}

/// Client environment: the CA and the client certificate of `certs`.
fn use_client_certs(sandbox: &mut Sandbox, certs: &Certs) {
    sandbox.set_client_env("GANTRY_TLS_CA", &certs.path("ca.pem"));
    sandbox.set_client_env("GANTRY_TLS_CERT", &certs.path("client.pem"));
    sandbox.set_client_env("GANTRY_TLS_KEY", &certs.path("client-key.pem"));
}

/// The command exited with `code` and said `text` on stderr.
fn expect_exit(out: &CliOutput, code: i32, text: &str, case: &str) {
    assert_eq!(out.code, code, "{case}: {out:?}");
    assert!(out.stderr.contains(text), "{case}: {}", out.stderr);
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn tls_tokens_and_join_token_end_to_end() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let certs = Certs {
        dir: sandbox.certs_init("certs", &[])?,
    };
    let (url, https) = start_secure_coordinator(&mut sandbox, &certs)?;
    let mut agent_args = vec![
        "--tls-ca".to_string(),
        certs.path("ca.pem"),
        "--tls-cert".into(),
        certs.path("agent.pem"),
        "--tls-key".into(),
        certs.path("agent-key.pem"),
        "--join-token-file".into(),
        certs.path("join-token"),
    ];
    if is_root() {
        agent_args.extend(["--run-as".to_string(), "nobody".to_string()]);
    }
    let agent_args: Vec<&str> = agent_args.iter().map(String::as_str).collect();
    sandbox.start_agent_with(
        "node-a",
        &url,
        "1xH100-80GiB",
        "127.0.0.1",
        &[],
        &agent_args,
    )?;
    use_client_certs(&mut sandbox, &certs);

    // (c) No bearer token: refused before anything happens.
    let out = sandbox.gantry(&url, &["submit", "--", "true"]);
    expect_exit(&out, 4, "bearer token required", "missing token");
    sandbox.set_client_env("GANTRY_TOKEN", "not-a-token-anybody-issued");
    let out = sandbox.gantry(&url, &["jobs"]);
    expect_exit(&out, 4, "bearer token not recognised", "unknown token");

    // (a) The user token submits; the job runs on the mTLS agent.
    sandbox.set_client_env("GANTRY_TOKEN", &certs.token("user"));
    sandbox.wait_nodes_ready(&url, 1, WAIT)?;
    let id = sandbox.submit(&url, &["--", "sh", "-c", "id -u; touch made-here"])?;
    sandbox.wait_job_state(&url, id, "succeeded", WAIT)?;
    let out = sandbox.gantry(&url, &["logs", &id.to_string()]);
    assert_eq!(out.code, 0, "{out:?}");
    // (g) As root with --run-as nobody, the job runs as nobody and may
    // write its work directory.
    if is_root() {
        assert_eq!(out.stdout.trim(), "65534", "job ran as: {out:?}");
    }

    // (d) A user token cannot drain; the node stays as it was.
    let out = sandbox.gantry(&url, &["drain", "node-a"]);
    expect_exit(
        &out,
        4,
        "drain needs the admin role; token 'user' has role user",
        "user drain",
    );
    let nodes = sandbox.gantry_json(&url, &["nodes"])?;
    assert_eq!(nodes[0]["draining"], false, "{nodes}");
    let out = sandbox.gantry(&url, &["reload-credentials"]);
    expect_exit(
        &out,
        4,
        "reload credentials needs the admin role",
        "user reload",
    );
    // The admin token can.
    sandbox.set_client_env("GANTRY_TOKEN", &certs.token("admin"));
    let out = sandbox.gantry(&url, &["drain", "node-a"]);
    assert_eq!(out.code, 0, "admin drain: {out:?}");
    let nodes = sandbox.gantry_json(&url, &["nodes"])?;
    assert_eq!(nodes[0]["draining"], true, "{nodes}");

    // HTTP is HTTPS with the coordinator's certificate; the JSON API needs a
    // token (either role), metrics and probes do not.
    if let Some(curl) = find_tool("curl")? {
        let get = |path: &str, token: Option<&str>| -> anyhow::Result<(u16, String)> {
            let mut command = std::process::Command::new(&curl);
            command
                .args(["--silent", "--show-error", "--cacert"])
                .arg(certs.path("ca.pem"))
                .args(["--write-out", "\n%{http_code}"])
                .arg(format!("{https}{path}"));
            if let Some(token) = token {
                command.args(["--header", &format!("Authorization: Bearer {token}")]);
            }
            let out = command.output()?;
            anyhow::ensure!(
                out.status.success(),
                "curl {path}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
            Ok((code.trim().parse()?, body.to_string()))
        };
        let (code, body) = get("/v1/jobs", None)?;
        assert_eq!(code, 401, "{body}");
        assert!(body.contains("bearer token required"), "{body}");
        let (code, body) = get("/v1/jobs", Some("not-a-token-anybody-issued"))?;
        assert_eq!(code, 401, "{body}");
        assert!(body.contains("bearer token not recognised"), "{body}");
        let (code, body) = get("/v1/jobs", Some(&certs.token("user")))?;
        assert_eq!(code, 200, "{body}");
        let jobs: serde_json::Value = serde_json::from_str(&body)?;
        assert_eq!(jobs[0]["id"], id, "{body}");
        let (code, body) = get("/metrics", None)?;
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("gantry_raft_is_leader 1"), "{body}");
        assert_eq!(get("/readyz", None)?.0, 200);
        // Plain HTTP to the HTTPS port gets no answer.
        let plain = gantry_integration_tests::http_get(
            &https.replace("https://", "http://"),
            "/metrics",
            None,
        );
        assert!(plain.is_err() || plain.is_ok_and(|r| r.status != 200));
    }

    // (e) Agents without the join token, with a wrong one, or without a
    // client certificate are refused, and the coordinator says so.
    let ca = certs.path("ca.pem");
    let cert = certs.path("agent.pem");
    let key = certs.path("agent-key.pem");
    let wrong_token = sandbox.path().join("wrong-token");
    std::fs::write(&wrong_token, "0123456789abcdef0123456789abcdef\n")?;
    let wrong_token = wrong_token.display().to_string();
    let with_cert = ["--tls-ca", &ca, "--tls-cert", &cert, "--tls-key", &key];
    sandbox.start_agent_with(
        "no-token",
        &url,
        "1xH100-80GiB",
        "127.0.0.1",
        &[],
        &with_cert,
    )?;
    let mut wrong = with_cert.to_vec();
    wrong.extend(["--join-token-file", &wrong_token]);
    sandbox.start_agent_with(
        "wrong-token",
        &url,
        "1xH100-80GiB",
        "127.0.0.1",
        &[],
        &wrong,
    )?;
    let join = certs.path("join-token");
    sandbox.start_agent_with(
        "no-cert",
        &url,
        "1xH100-80GiB",
        "127.0.0.1",
        &[],
        &["--tls-ca", &ca, "--join-token-file", &join],
    )?;
    wait_until("the coordinator to log every refusal", WAIT, || {
        let log = sandbox.log("coordinator");
        let refused = |what: &str| {
            log.lines()
                .any(|l| l.contains("refused") && l.contains("peer") && l.contains(what))
        };
        (refused("agent join token missing")
            && refused("agent join token invalid")
            && refused("peer sent no certificates"))
        .then_some(())
    })?;
    let agent_log = sandbox.log("wrong-token");
    assert!(
        agent_log.contains("agent join token invalid"),
        "{agent_log}"
    );
    let nodes = sandbox.gantry_json(&url, &["nodes"])?;
    assert_eq!(
        nodes.as_array().map(Vec::len),
        Some(1),
        "only the good agent registered: {nodes}"
    );
    Ok(())
}

/// Writes a client certificate that expired in 2020, signed by the CA of
/// `certs` (rebuilt from its key and subject, as `gantry certs init` makes it).
fn expired_client_cert(certs: &Certs, out: &Path) -> anyhow::Result<(String, String)> {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(certs.dir.join("ca-key.pem"))?)?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "Gantry development CA");
    ca.distinguished_name = name;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(Vec::<String>::new())?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "expired client");
    leaf.distinguished_name = name;
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    leaf.not_before = rcgen::date_time_ymd(2020, 1, 1);
    leaf.not_after = rcgen::date_time_ymd(2020, 1, 2);
    let cert = leaf.signed_by(&key, &issuer)?;
    let cert_path = out.join("expired.pem");
    let key_path = out.join("expired-key.pem");
    std::fs::write(&cert_path, cert.pem())?;
    std::fs::write(&key_path, key.serialize_pem())?;
    Ok((
        cert_path.display().to_string(),
        key_path.display().to_string(),
    ))
}

#[test]
fn wrong_ca_and_expired_certificate_are_refused() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let certs = Certs {
        dir: sandbox.certs_init("certs", &[])?,
    };
    let other = Certs {
        dir: sandbox.certs_init("other-certs", &[])?,
    };
    let (url, _) = start_secure_coordinator(&mut sandbox, &certs)?;
    use_client_certs(&mut sandbox, &certs);
    sandbox.set_client_env("GANTRY_TOKEN", &certs.token("user"));
    assert_eq!(
        sandbox.gantry(&url, &["jobs"]).code,
        0,
        "the good client works"
    );

    // (b) The client trusts another CA: the coordinator's certificate is refused.
    sandbox.set_client_env("GANTRY_TLS_CA", &other.path("ca.pem"));
    let out = sandbox.gantry(&url, &["jobs"]);
    expect_exit(&out, 3, "invalid peer certificate", "wrong CA");

    // (f) An expired client certificate signed by the right CA.
    sandbox.set_client_env("GANTRY_TLS_CA", &certs.path("ca.pem"));
    let (cert, key) = expired_client_cert(&certs, sandbox.path())?;
    sandbox.set_client_env("GANTRY_TLS_CERT", &cert);
    sandbox.set_client_env("GANTRY_TLS_KEY", &key);
    let out = sandbox.gantry(&url, &["jobs"]);
    assert_ne!(out.code, 0, "expired certificate: {out:?}");
    assert!(
        out.stderr.to_lowercase().contains("certificate"),
        "{}",
        out.stderr
    );
    wait_until(
        "the coordinator to log the expired certificate",
        WAIT,
        || {
            let log = sandbox.log("coordinator");
            log.lines()
                .any(|l| {
                    l.contains("refused: TLS handshake failed") && l.contains("certificate expired")
                })
                .then_some(())
        },
    )?;

    // A client certificate from another CA is refused the same way.
    sandbox.set_client_env("GANTRY_TLS_CERT", &other.path("client.pem"));
    sandbox.set_client_env("GANTRY_TLS_KEY", &other.path("client-key.pem"));
    let out = sandbox.gantry(&url, &["jobs"]);
    assert_ne!(out.code, 0, "client certificate of another CA: {out:?}");
    Ok(())
}

#[test]
fn bad_security_input_exits_2_and_starts_nothing() -> anyhow::Result<()> {
    let sandbox = Sandbox::new()?;
    let certs = Certs {
        dir: sandbox.certs_init("certs", &[])?,
    };
    let malformed = sandbox.path().join("malformed.pem");
    std::fs::write(&malformed, "-----BEGIN CERTIFICATE-----\nnot base64 !!\n")?;
    let malformed = malformed.display().to_string();
    let bad_tokens = sandbox.path().join("bad-tokens.yaml");
    std::fs::write(
        &bad_tokens,
        "- {name: a, token: 0123456789abcdef0123, role: root}\n",
    )?;
    let bad_tokens = bad_tokens.display().to_string();
    let data = sandbox.path().join("never").display().to_string();
    let coordinator = |extra: &[&str]| {
        let mut args = vec![
            "coordinator",
            "--grpc-addr",
            "127.0.0.1:0",
            "--data-dir",
            &data,
        ];
        args.extend_from_slice(extra);
        args.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let cert = certs.path("coordinator.pem");
    let key = certs.path("coordinator-key.pem");
    let agent_key = certs.path("agent-key.pem");
    let malformed_named = format!("--tls-cert {malformed}");
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "missing certificate file",
            coordinator(&["--tls-cert", "/nonexistent/c.pem", "--tls-key", &key]),
            "--tls-cert /nonexistent/c.pem: No such file",
        ),
        (
            "key of another certificate",
            coordinator(&["--tls-cert", &cert, "--tls-key", &agent_key]),
            "the key does not match the certificate",
        ),
        (
            "malformed PEM",
            coordinator(&["--tls-cert", &malformed, "--tls-key", &key]),
            &malformed_named,
        ),
        (
            "certificate without key",
            coordinator(&["--tls-cert", &cert]),
            "--tls-cert needs --tls-key",
        ),
        (
            "unknown role",
            coordinator(&["--tokens", &bad_tokens]),
            "[0].role: unknown role \"root\"",
        ),
        (
            "tokens without mutual TLS on a replica set",
            coordinator(&[
                "--tokens",
                &certs.path("tokens.yaml"),
                "--id",
                "1",
                "--peers",
                "1=http://127.0.0.1:1,2=http://127.0.0.1:2,3=http://127.0.0.1:3",
            ]),
            "needs --tls-client-ca",
        ),
    ];
    let ca = certs.path("ca.pem");
    let mut cases = cases;
    cases.push((
        "agent: https without a CA",
        vec![
            "agent".into(),
            "--coordinators".into(),
            "https://127.0.0.1:1".into(),
            "--data-dir".into(),
            data.clone(),
        ],
        "no --tls-ca",
    ));
    cases.push((
        "agent: plaintext URL with TLS",
        vec![
            "agent".into(),
            "--coordinators".into(),
            "http://127.0.0.1:1".into(),
            "--tls-ca".into(),
            ca.clone(),
            "--data-dir".into(),
            data.clone(),
        ],
        "use https://",
    ));
    let run_as_case = if is_root() {
        ("no-such-gantry-user", "no such user")
    } else {
        ("root", "not root")
    };
    cases.push((
        "agent: --run-as it cannot use",
        vec![
            "agent".into(),
            "--coordinators".into(),
            "http://127.0.0.1:1".into(),
            "--run-as".into(),
            run_as_case.0.into(),
            "--data-dir".into(),
            data.clone(),
        ],
        run_as_case.1,
    ));
    cases.push((
        "client: https without a CA",
        vec!["jobs".into(), "--addr".into(), "https://127.0.0.1:1".into()],
        "no --tls-ca",
    ));
    for (what, args, expected) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = sandbox.gantry_bounded(&args, Duration::from_secs(20));
        expect_exit(&out, 2, expected, what);
        assert!(
            !out.stdout.contains("listening"),
            "{what}: started: {out:?}"
        );
    }
    assert!(!Path::new(&data).exists(), "nothing was started or created");
    // certs init refuses to overwrite.
    let dir = certs.dir.display().to_string();
    let out = sandbox.gantry_bounded(&["certs", "init", "--dir", &dir], Duration::from_secs(20));
    expect_exit(&out, 2, "already exists", "certs init over existing files");
    Ok(())
}

#[test]
fn replicas_replicate_over_mutual_tls() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let ips = ["127.0.0.11", "127.0.0.12", "127.0.0.13"];
    let certs = Certs {
        dir: sandbox.certs_init("certs", &ips)?,
    };
    let args = certs.coordinator_args(&[("--tls-ca", "ca.pem")]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let set = sandbox.start_replicas_on("https", &args)?;
    use_client_certs(&mut sandbox, &certs);
    sandbox.set_client_env("GANTRY_TOKEN", &certs.token("user"));
    let leader = wait_until("a leader elected over mutual TLS", WAIT, || {
        sandbox.leader_of(&set)
    })?;
    // A write is acknowledged only once a majority has it: Raft messages
    // flow between replicas with their certificates.
    let id = sandbox.submit(&set.addrs(), &["--", "true"])?;
    for url in &set.urls {
        wait_until("every replica to apply the submit", WAIT, || {
            let status = sandbox.gantry_json(url, &["status"]).ok()?;
            (status["applied_index"].as_u64()? >= 2).then_some(())
        })?;
    }
    let job = sandbox.job(&set.urls[leader - 1], id)?;
    assert_eq!(job["id"], id, "{job}");
    Ok(())
}

/// Sends SIGHUP to every replica of `set` and waits until each logged
/// one more "credentials reloaded" than before.
fn reload_all(
    sandbox: &mut Sandbox,
    set: &gantry_integration_tests::ReplicaSet,
) -> anyhow::Result<()> {
    use nix::sys::signal::{Signal, kill};
    for (id, index) in set.procs.iter().enumerate() {
        let index = index.ok_or_else(|| anyhow::anyhow!("replica {} stopped", id + 1))?;
        let name = format!("replica-{}-{index}", id + 1);
        let before = sandbox.log(&name).matches("credentials reloaded").count();
        let pid = sandbox.proc(index).pid().expect("replica pid");
        kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGHUP)?;
        wait_until("the replica to reload its credentials", WAIT, || {
            let log = sandbox.log(&name);
            assert!(!log.contains("credentials not reloaded"), "{log}");
            (log.matches("credentials reloaded").count() > before).then_some(())
        })?;
    }
    Ok(())
}

/// A raw `RaftPeer.Step` to `url` presenting `cert`/`key` and trusting
/// `ca`: the refusal's text (an empty batch of cluster 0 never passes).
fn peer_call_refusal(url: &str, ca: &Path, cert: &Path, key: &Path) -> anyhow::Result<String> {
    use gantry_proto::raft as pb;
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca)?))
        .identity(Identity::from_pem(
            std::fs::read(cert)?,
            std::fs::read(key)?,
        ));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let call = async {
            let channel = Endpoint::from_shared(url.to_string())?
                .tls_config(tls)?
                .connect()
                .await?;
            let batch = pb::RaftBatch {
                messages: Vec::new(),
                from: 1,
                cluster_id: 0,
                to: 2,
                from_http: String::new(),
                members: None,
            };
            pb::raft_peer_client::RaftPeerClient::new(channel)
                .step(batch)
                .await
                .map_err(anyhow::Error::from)
        };
        match tokio::time::timeout(WAIT, call).await? {
            Ok(_) => anyhow::bail!("an empty batch of cluster 0 was accepted"),
            Err(error) => Ok(format!("{error:#}")),
        }
    })
}

/// Rotating the replicas' CA and certificates by SIGHUP, as an operator
/// would (trust both CAs, switch certificates, drop the old CA): the
/// certificate each replica presents when it dials its peers follows the
/// reload, so replication goes on once only the new CA is trusted, and the
/// old certificate no longer reaches the peer service.
#[test]
fn replicas_rotate_their_peer_certificates_by_sighup() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let ips = ["127.0.0.11", "127.0.0.12", "127.0.0.13"];
    let old = sandbox.certs_init("old", &ips)?;
    let new = sandbox.certs_init("new", &ips)?;
    let live = sandbox.path().join("live");
    std::fs::create_dir_all(&live)?;
    let install = |from: &Path, names: &[&str]| -> anyhow::Result<()> {
        for name in names {
            std::fs::copy(from.join(name), live.join(name))?;
        }
        Ok(())
    };
    let identity = [
        "coordinator.pem",
        "coordinator-key.pem",
        "client.pem",
        "client-key.pem",
    ];
    install(&old, &identity)?;
    install(&old, &["ca.pem", "tokens.yaml"])?;
    let certs = Certs { dir: live.clone() };
    let args = certs.coordinator_args(&[("--tls-ca", "ca.pem")]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let set = sandbox.start_replicas_on("https", &args)?;
    use_client_certs(&mut sandbox, &certs);
    sandbox.set_client_env("GANTRY_TOKEN", &certs.token("user"));
    wait_until("a leader elected over mutual TLS", WAIT, || {
        sandbox.leader_of(&set)
    })?;
    sandbox.submit(&set.addrs(), &["--", "true"])?;

    // 1. Trust both CAs (served, verified and dialed with).
    let both = [
        std::fs::read(old.join("ca.pem"))?,
        std::fs::read(new.join("ca.pem"))?,
    ]
    .concat();
    std::fs::write(live.join("ca.pem"), both)?;
    reload_all(&mut sandbox, &set)?;
    // 2. Every replica switches to its new certificate.
    install(&new, &identity)?;
    reload_all(&mut sandbox, &set)?;
    // 3. The old CA is no longer trusted anywhere.
    install(&new, &["ca.pem"])?;
    reload_all(&mut sandbox, &set)?;

    // A write commits only through Raft messages the replicas send with
    // their new certificates; every replica applies it.
    wait_until("a leader after the rotation", WAIT, || {
        sandbox.leader_of(&set)
    })?;
    sandbox.submit(&set.addrs(), &["--", "true"])?;
    let leader = wait_until("a leader after the submit", WAIT, || {
        sandbox.leader_of(&set)
    })?;
    let committed = sandbox.gantry_json(&set.urls[leader - 1], &["status"])?["applied_index"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no applied_index"))?;
    for url in &set.urls {
        wait_until("every replica to apply the submit", WAIT, || {
            let status = sandbox.gantry_json(url, &["status"]).ok()?;
            (status["applied_index"].as_u64()? >= committed).then_some(())
        })?;
    }
    let peer = &set.urls[0];
    let refused = peer_call_refusal(
        peer,
        &new.join("ca.pem"),
        &old.join("coordinator.pem"),
        &old.join("coordinator-key.pem"),
    )?;
    assert!(
        !refused.contains("raft batch refused"),
        "the old certificate reached the peer service: {refused}"
    );
    let reached = peer_call_refusal(
        peer,
        &new.join("ca.pem"),
        &new.join("coordinator.pem"),
        &new.join("coordinator-key.pem"),
    )?;
    assert!(
        reached.contains("raft batch refused"),
        "the new certificate did not reach the peer service: {reached}"
    );
    Ok(())
}
