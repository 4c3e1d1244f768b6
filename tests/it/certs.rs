//! Test certificates made with openssl: a private CA, a server certificate for 127.0.0.1 and
//! localhost, and a client certificate, both signed by the CA (webpki refuses a CA certificate
//! used as an end entity).

use std::path::Path;

pub struct Certs {
    pub ca: String,
    pub server_cert: String,
    pub server_key: String,
    pub client_cert: String,
    pub client_key: String,
}

/// Writes the CA and certificates into `dir`; None when openssl is missing (and not required).
pub fn make(dir: &Path) -> Option<Certs> {
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var_os("CONTENTD_REQUIRE_TOOLS").is_none(),
            "openssl is not installed"
        );
        return None;
    }
    let p = |f: &str| dir.join(f).to_str().unwrap().to_string();
    std::fs::write(
        p("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    std::fs::write(
        p("client.ext"),
        "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    let leaf = |name: &str, cn: &str| {
        format!(
            "openssl req -newkey rsa:2048 -nodes -keyout {k} -out {r} -subj /CN={cn} 2>/dev/null && \
             openssl x509 -req -in {r} -CA {ca} -CAkey {ck} -CAcreateserial -out {c} -days 1 -extfile {e} 2>/dev/null",
            k = p(&format!("{name}.key")),
            r = p(&format!("{name}.csr")),
            c = p(&format!("{name}.pem")),
            e = p(&format!("{name}.ext")),
            ca = p("ca.pem"),
            ck = p("ca.key"),
        )
    };
    let cmd = format!(
        "openssl req -x509 -newkey rsa:2048 -nodes -keyout {ck} -out {ca} -days 1 -subj /CN=contentd-test-ca \
           -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign 2>/dev/null && {} && {}",
        leaf("server", "localhost"),
        leaf("client", "client"),
        ck = p("ca.key"),
        ca = p("ca.pem"),
    );
    let o = std::process::Command::new("sh")
        .args(["-c", &cmd])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    Some(Certs {
        ca: p("ca.pem"),
        server_cert: p("server.pem"),
        server_key: p("server.key"),
        client_cert: p("client.pem"),
        client_key: p("client.key"),
    })
}
