//! Security: TLS on every port, mutual TLS, bearer tokens (intake and read
//! separately, reloadable), fixed refusal messages, CORS allow-list.
//! Certificates are generated here with rcgen.

mod common;

use bizsignal::config::TlsConfig;
use common::{logs_json, n, s, Server};
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use std::path::Path;
use std::time::{Duration, Instant};

const INTAKE: &str = "intake-token-0123456789";
const READ: &str = "read-token-abcdefghij";

struct Pki {
    ca_pem: String,
    server: (String, String),
    client: (String, String),
    rogue_client: (String, String),
}

fn pki() -> Pki {
    let ca = |name: &str| {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
    };
    let leaf = |issuer: &CertifiedIssuer<'_, KeyPair>, sans: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(sans).unwrap().signed_by(&key, issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (good, rogue) = (ca("bizsignal test CA"), ca("rogue CA"));
    Pki {
        ca_pem: good.pem(),
        server: leaf(&good, vec!["localhost".into(), "127.0.0.1".into()]),
        client: leaf(&good, vec!["client.test".into()]),
        rogue_client: leaf(&rogue, vec!["client.test".into()]),
    }
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn client(pki: &Pki, identity: Option<&(String, String)>) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap())
        .timeout(Duration::from_secs(10));
    if let Some((c, k)) = identity {
        b = b.identity(reqwest::Identity::from_pem(format!("{c}{k}").as_bytes()).unwrap());
    }
    b.build().unwrap()
}

fn event(run: &str) -> String {
    logs_json(
        "svc",
        &[(
            common::now(),
            "batch",
            vec![
                ("business.process.name", s("secure")),
                ("business.run.id", s(run)),
                ("business.records.imported", n(3)),
            ],
        )],
    )
}

async fn post(c: &reqwest::Client, url: String, token: Option<&str>, body: String) -> (u16, String, Option<String>) {
    let mut r = c.post(url).header("content-type", "application/json").body(body);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let resp = r.send().await.unwrap();
    let www = resp.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_string());
    (resp.status().as_u16(), resp.text().await.unwrap(), www)
}

async fn get(c: &reqwest::Client, url: String, token: Option<&str>) -> u16 {
    let mut r = c.get(url);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    r.send().await.unwrap().status().as_u16()
}

async fn grpc_export(
    pki: &Pki,
    addr: std::net::SocketAddr,
    identity: Option<&(String, String)>,
    token: Option<&str>,
) -> Result<(), tonic::Status> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&pki.ca_pem)).domain_name("localhost");
    if let Some((c, k)) = identity {
        tls = tls.identity(Identity::from_pem(c, k));
    }
    let ch = Endpoint::from_shared(format!("https://localhost:{}", addr.port()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connect: {e}")))?;
    let req: ExportLogsServiceRequest = bizsignal::receivers::http::decode_json(event("grpc").as_bytes()).unwrap();
    let mut req = tonic::Request::new(req);
    if let Some(t) = token {
        req.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    LogsServiceClient::new(ch).export(req).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_mtls_and_tokens_on_every_endpoint() {
    let pki = pki();
    let keys = tempfile::tempdir().unwrap();
    let cert_file = write(keys.path(), "server.pem", &pki.server.0);
    let key_file = write(keys.path(), "server.key", &pki.server.1);
    let ca_file = write(keys.path(), "ca.pem", &pki.ca_pem);
    let intake_file = write(keys.path(), "intake.tokens", &format!("# intake\n{INTAKE}\n"));
    let read_file = write(keys.path(), "read.tokens", &format!("{READ}\n"));
    let srv = Server::start_with(|c| {
        c.server.tls = Some(TlsConfig { cert_file, key_file, client_ca_file: Some(ca_file) });
        c.server.auth.intake_tokens_file = Some(intake_file.clone());
        c.server.auth.read_tokens_file = Some(read_file);
        c.server.auth.reload_interval = Duration::from_millis(100);
    })
    .await;
    let app = srv.app();
    let otlp = |p: &str| format!("https://localhost:{}{p}", app.otlp_http.port());
    let api = |p: &str| format!("https://localhost:{}{p}", app.http.port());
    let good = client(&pki, Some(&pki.client));

    // Intake over OTLP/HTTP: valid token accepted, missing or wrong refused with no detail.
    assert_eq!(post(&good, otlp("/v1/logs"), Some(INTAKE), event("r1")).await.0, 200);
    for token in [None, Some("wrong"), Some(READ), Some(&INTAKE[..INTAKE.len() - 1])] {
        let (status, body, www) = post(&good, otlp("/v1/logs"), token, event("r2")).await;
        assert_eq!(status, 401, "{token:?}");
        assert_eq!(www.as_deref(), Some("Bearer"));
        assert!(body.contains("unauthenticated") && !body.contains("wrong") && !body.contains("read-token"), "{body}");
        assert_eq!(post(&good, otlp("/v1/traces"), token, "{}".into()).await.0, 401);
    }
    // POST /api/v1/events is intake too.
    let ev = r#"{"process":"secure","run_id":"r3","records":{"imported":1}}"#.to_string();
    assert_eq!(post(&good, api("/api/v1/events"), Some(READ), ev.clone()).await.0, 401);
    assert_eq!(post(&good, api("/api/v1/events"), None, ev.clone()).await.0, 401);
    let (st, body, _) = post(&good, api("/api/v1/events"), Some(INTAKE), ev).await;
    assert!(st == 200 || st == 202, "{st} {body}");

    // Reads need the read token; the intake token does not read.
    for path in [
        "/api/v1/processes",
        "/api/v1/runs",
        "/api/v1/runs/secure/r1",
        "/api/v1/runs/secure/r1/events",
        "/metrics",
        "/api/v1/stream",
    ] {
        assert_eq!(get(&good, api(path), None).await, 401, "{path}");
        assert_eq!(get(&good, api(path), Some(INTAKE)).await, 401, "{path}");
        assert_eq!(get(&good, api(path), Some("Basic x")).await, 401, "{path}");
    }
    for path in ["/api/v1/processes", "/api/v1/runs", "/api/v1/runs/secure/r1", "/metrics"] {
        assert_eq!(get(&good, api(path), Some(READ)).await, 200, "{path}");
    }
    // Health and the static page stay open (no data in them).
    assert_eq!(get(&good, api("/healthz"), None).await, 200);
    assert_eq!(get(&good, api("/readyz"), None).await, 200);

    // gRPC: token in metadata, over mTLS.
    grpc_export(&pki, app.otlp_grpc, Some(&pki.client), Some(INTAKE)).await.expect("valid token accepted over gRPC");
    for token in [None, Some("wrong"), Some(READ)] {
        let e = grpc_export(&pki, app.otlp_grpc, Some(&pki.client), token).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{token:?}: {e}");
        assert_eq!(e.message(), "unauthenticated");
    }

    // mTLS: without a client certificate, or with one from another CA, no request gets through.
    for identity in [None, Some(&pki.rogue_client)] {
        let c = client(&pki, identity);
        let r = c
            .post(otlp("/v1/logs"))
            .bearer_auth(INTAKE)
            .header("content-type", "application/json")
            .body(event("r4"))
            .send()
            .await;
        assert!(
            r.is_err() || r.unwrap().status().is_server_error(),
            "TLS without a valid client certificate must fail"
        );
        assert!(c.get(api("/healthz")).send().await.is_err());
        assert!(grpc_export(&pki, app.otlp_grpc, identity, Some(INTAKE)).await.is_err());
    }
    // Plain HTTP to a TLS port is refused too.
    let plain = reqwest::Client::new();
    assert!(plain.get(format!("http://127.0.0.1:{}/healthz", app.http.port())).send().await.is_err());

    // Token rotation without restart: the file changes, the new token works, the old one stops.
    std::fs::write(&intake_file, "rotated-intake-token\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if post(&good, otlp("/v1/logs"), Some("rotated-intake-token"), event("r5")).await.0 == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "rotated token never accepted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(post(&good, otlp("/v1/logs"), Some(INTAKE), event("r6")).await.0, 401);

    // Everything accepted is there, and only that.
    let c = good.get(api("/api/v1/runs?process=secure")).bearer_auth(READ).send().await.unwrap();
    let v: serde_json::Value = c.json().await.unwrap();
    let mut runs: Vec<String> =
        v["runs"].as_array().unwrap().iter().map(|r| r["run_id"].as_str().unwrap().to_string()).collect();
    runs.sort();
    assert_eq!(runs, ["grpc", "r1", "r3", "r5"]);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_without_client_ca_and_env_tokens() {
    let pki = pki();
    let keys = tempfile::tempdir().unwrap();
    let cert_file = write(keys.path(), "server.pem", &pki.server.0);
    let key_file = write(keys.path(), "server.key", &pki.server.1);
    std::env::set_var("BIZSIGNAL_TEST_INTAKE_TOKENS", "env-a, env-b");
    let srv = Server::start_with(|c| {
        c.server.tls = Some(TlsConfig { cert_file, key_file, client_ca_file: None });
        c.server.auth.intake_tokens_env = Some("BIZSIGNAL_TEST_INTAKE_TOKENS".into());
    })
    .await;
    let app = srv.app();
    let c = client(&pki, None);
    let otlp = format!("https://localhost:{}/v1/logs", app.otlp_http.port());
    assert_eq!(post(&c, otlp.clone(), Some("env-b"), event("e1")).await.0, 200);
    assert_eq!(post(&c, otlp.clone(), Some("env-c"), event("e2")).await.0, 401);
    assert_eq!(post(&c, otlp, None, event("e2")).await.0, 401);
    // No read tokens configured: reads are open.
    assert_eq!(get(&c, format!("https://localhost:{}/api/v1/runs", app.http.port()), None).await, 200);
    grpc_export(&pki, app.otlp_grpc, None, Some("env-a")).await.unwrap();
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_is_off_by_default_and_follows_the_allow_list() {
    let preflight = |srv: &Server, origin: &str| {
        srv.http
            .request(reqwest::Method::OPTIONS, srv.api("/api/v1/runs"))
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .send()
    };
    let srv = Server::start().await;
    let r = srv.http.get(srv.api("/api/v1/runs")).header("origin", "https://evil.example").send().await.unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
    let r = preflight(&srv, "https://evil.example").await.unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
    srv.stop().await;

    let srv = Server::start_with(|c| c.server.cors_allowed_origins = vec!["https://ops.example".into()]).await;
    let r = preflight(&srv, "https://ops.example").await.unwrap();
    assert_eq!(r.status().as_u16(), 204);
    assert_eq!(r.headers()["access-control-allow-origin"], "https://ops.example");
    let r = srv.http.get(srv.api("/api/v1/runs")).header("origin", "https://ops.example").send().await.unwrap();
    assert_eq!(r.headers()["access-control-allow-origin"], "https://ops.example");
    let r = srv.http.get(srv.api("/api/v1/runs")).header("origin", "https://evil.example").send().await.unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
    let r = srv
        .http
        .post(srv.otlp_http("/v1/logs"))
        .header("origin", "https://evil.example")
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
    srv.stop().await;
}

#[test]
fn bad_tls_and_auth_config_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.yaml");
    let cases = [
        ("server:\n  tls: { cert_file: /nonexistent.pem, key_file: /nonexistent.key }\n", "server.tls.cert_file"),
        ("server:\n  auth: { intake_tokens_file: /nonexistent.tokens }\n", "server.auth.intake_tokens_file"),
        ("server:\n  auth: { read_tokens_env: BIZSIGNAL_NOT_SET_TOKENS }\n", "server.auth.read_tokens_env"),
        ("server:\n  cors_allowed_origins: ['*']\n", "server.cors_allowed_origins[0]"),
        ("server:\n  max_connections: 0\n", "server.max_connections"),
    ];
    for (yaml, key) in cases {
        std::fs::write(&f, yaml).unwrap();
        let e = bizsignal::config::Config::load(&f).unwrap_err().to_string();
        assert!(e.contains(key), "{yaml}: {e}");
    }
}
