//! A private Redis server for tests: `redis-server` on a free loopback port, with nothing
//! saved to disk, stopped when dropped; optionally with a password, and TLS only (with a
//! certificate authority and a server certificate made by `openssl` for the test).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `redis-server`.
pub struct RedisServer {
    child: Child,
    pub port: u16,
    /// The certificate authority of a TLS server.
    pub ca: Option<PathBuf>,
    password: Option<String>,
    dir: tempfile::TempDir,
}

/// How a test server is set up.
#[derive(Clone, Debug, Default)]
pub struct Setup {
    pub password: Option<String>,
    /// TLS only (no plain port).
    pub tls: bool,
}

fn installed(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `None` (the test says it skipped) when a program is missing, unless `SLIM_REQUIRE_REDIS`
/// is set (CI), where that is a failure.
fn require(program: &str, arg: &str, package: &str) -> Option<()> {
    if installed(program, arg) {
        return Some(());
    }
    assert!(
        std::env::var("SLIM_REQUIRE_REDIS").is_err(),
        "SLIM_REQUIRE_REDIS is set but {program} is not installed"
    );
    slim_core::note_skipped(&format!(
        "{program} is not installed (apt-get install {package})"
    ));
    None
}

fn openssl(dir: &Path, args: &[&str]) {
    let o = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A certificate authority and a certificate for `localhost` and 127.0.0.1 signed by it.
fn certificates(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=slim-test-ca",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .expect("writes");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
}

impl RedisServer {
    /// A plain server on loopback, or `None` when `redis-server` is not installed.
    pub fn start() -> Option<RedisServer> {
        Self::start_with(Setup::default())
    }

    pub fn start_with(setup: Setup) -> Option<RedisServer> {
        require("redis-server", "--version", "redis-server")?;
        if setup.tls {
            require("openssl", "version", "openssl")?;
        }
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("a temporary folder");
            let port = free_port();
            let mut cmd = Command::new("redis-server");
            cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(dir.path());
            let ca = if setup.tls {
                certificates(dir.path());
                let p = |f: &str| dir.path().join(f).display().to_string();
                cmd.args(["--port", "0", "--tls-port", &port.to_string()])
                    .args(["--tls-cert-file", &p("server.crt")])
                    .args(["--tls-key-file", &p("server.key")])
                    .args(["--tls-ca-cert-file", &p("ca.crt")])
                    .args(["--tls-auth-clients", "no"]);
                Some(dir.path().join("ca.crt"))
            } else {
                cmd.args(["--port", &port.to_string()]);
                None
            };
            if let Some(pw) = &setup.password {
                cmd.args(["--requirepass", pw]);
            }
            let child = cmd
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server starts");
            let mut server = RedisServer {
                child,
                port,
                ca,
                password: setup.password.clone(),
                dir,
            };
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = server.child.try_wait() {
                    break; // the port was taken meanwhile: try another
                }
                if server.redis_url().connect().is_ok() {
                    return Some(server);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = server.child.kill();
        }
        panic!("redis-server did not start");
    }

    /// The server's URL, with its password.
    pub fn url(&self) -> String {
        let auth = self
            .password
            .as_ref()
            .map(|p| format!(":{p}@"))
            .unwrap_or_default();
        match self.ca {
            Some(_) => format!("rediss://{auth}localhost:{}", self.port),
            None => format!("redis://{auth}127.0.0.1:{}", self.port),
        }
    }

    /// The server's URL, parsed (with its certificate authority).
    pub fn redis_url(&self) -> crate::RedisUrl {
        crate::RedisUrl::parse_with_ca(&self.url(), self.ca.as_deref()).expect("a URL")
    }

    /// The server's folder.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
