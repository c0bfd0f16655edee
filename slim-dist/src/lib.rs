//! Slim beyond one machine, through Redis.
//!
//! A search (automatic pruning, SA architecture search) becomes a **study** that any number of
//! workers on any machines share: [`RedisStudy`] keeps a `slim-core` study
//! ([`slim_core::study`]) in Redis. Its state (the controller, the candidates being evaluated
//! with their workers and deadlines) is one JSON value changed only by optimistic
//! transactions (`WATCH`, `MULTI`, `EXEC`: a change made from a state that another worker
//! changed meanwhile is thrown away and made again), and its history is a list that those
//! transactions append to. The clock that deadlines are measured on is the server's (`TIME`),
//! so the workers' clocks need not agree.
//!
//! Nothing read from Redis is executed: the state and the trials are typed JSON with a format
//! tag. A state that does not parse stops the worker with an error naming the key (it is the
//! study itself); a trial that does not parse, or one over [`MAX_VALUE`], is reported and
//! left out.
//!
//! Keys: `slim:study:NAME:state` and `slim:study:NAME:trials`. Online teachers (the
//! [`teacher`] module) use `slim:teacher:NAME:*`.
//!
//! URLs take a password and a database (`redis://:PASSWORD@HOST:PORT/DB`) and TLS
//! (`rediss://`, through rustls; a private certificate authority with
//! [`RedisUrl::parse_with_ca`]). Passwords never appear in messages.
//!
//! One worker of an automatic pruning search shared through Redis; the same program started
//! on other machines adds workers to the same study:
//!
//! ```no_run
//! use slim_core::{data, study::WorkerOptions, Model};
//! use slim_dist::{RedisStudy, RedisUrl};
//! use slim_prune::run::{run, Choice, Inputs, PruneOptions};
//!
//! let study = RedisStudy::open(&RedisUrl::parse("redis://127.0.0.1:6379")?, "prune-lenet")?;
//! let data = data::load_spec(data::DEFAULT_SPEC)?;
//! let model = Model::load("lenet.safetensors", &candle_core::Device::Cpu)?;
//! let options = PruneOptions { flops_reduction: Some(0.5), ..Default::default() };
//! let worker = WorkerOptions::new("worker-1");
//! let inputs = Inputs { data: Some(&data), study: Some((&study, worker)), ..Default::default() };
//! let (pruned, report) = run(&model, Choice::Auto, &options, inputs, &mut |_| {})?;
//! pruned.save("lenet-pruned.safetensors")?;
//! println!("{:.1}% fewer multiply-adds", report.flops_reduction * 100.0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]

use std::sync::Mutex;
use std::time::Duration;

use redis::{Connection, RedisError};
use serde::{Deserialize, Serialize};
use slim_core::search::Trial;
use slim_core::study::{Change, StudyState, StudyStore};
use slim_core::CoreError;

pub mod teacher;
#[doc(hidden)]
pub mod testing;

/// The largest value read from or written to Redis, in bytes.
pub const MAX_VALUE: usize = 64 << 20;

/// How long a connection waits for the server before the command fails.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of `slim-dist`.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// A URL, a study name or a setting that cannot be used.
    #[error("{0}")]
    Invalid(String),
    /// The server could not be reached or refused what was asked.
    #[error("{0}")]
    Redis(String),
    #[error(transparent)]
    Core(#[from] CoreError),
}

impl DistError {
    /// Whether the error is about what the user supplied (exit status 2 on the command
    /// line), as [`slim_core::CoreError::is_input`] says for the core's errors.
    pub fn is_input(&self) -> bool {
        match self {
            DistError::Core(c) => c.is_input(),
            DistError::Invalid(_) => true,
            DistError::Redis(_) => false,
        }
    }
}

pub type Result<T, E = DistError> = std::result::Result<T, E>;

/// A Redis server's address, checked, with its password hidden for messages.
#[derive(Clone)]
pub struct RedisUrl {
    client: redis::Client,
    shown: String,
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl std::fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

/// `url` with the password (between `:` and `@` after the scheme) replaced by `***`.
fn hide_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.rfind('@') {
        Some(at) => {
            let (user_info, host) = rest.split_at(at);
            match user_info.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:***{host}"),
                None => format!("{scheme}://***{host}"),
            }
        }
        None => url.to_string(),
    }
}

impl RedisUrl {
    /// Parses `redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]`, `rediss://...` (TLS, the server's
    /// certificate checked against the system's roots) or `redis+unix:///PATH`.
    pub fn parse(url: &str) -> Result<RedisUrl> {
        Self::parse_with_ca(url, None)
    }

    /// [`RedisUrl::parse`], with TLS servers' certificates checked against the PEM
    /// certificate authority in `ca` instead of the system's roots (a private CA).
    pub fn parse_with_ca(url: &str, ca: Option<&std::path::Path>) -> Result<RedisUrl> {
        let shown = hide_password(url);
        let tls = url.starts_with("rediss://");
        if !(tls || url.starts_with("redis://") || url.starts_with("redis+unix://")) {
            return Err(DistError::Invalid(format!(
                "`{shown}` is not a Redis URL (redis://HOST:PORT, redis://:PASSWORD@HOST:PORT/DB, \
                 rediss://... for TLS)"
            )));
        }
        let bad = |e: RedisError| DistError::Invalid(format!("`{shown}` is not a Redis URL: {e}"));
        let client = match ca {
            Some(path) => {
                if !tls {
                    return Err(DistError::Invalid(format!(
                        "a certificate authority ({}) is for TLS: use rediss:// instead of `{shown}`",
                        path.display()
                    )));
                }
                let pem = std::fs::read(path)
                    .map_err(|e| DistError::Invalid(format!("{}: {e}", path.display())))?;
                if !pem.starts_with(b"-----BEGIN") {
                    return Err(DistError::Invalid(format!(
                        "{}: not a PEM certificate",
                        path.display()
                    )));
                }
                redis::Client::build_with_tls(
                    url,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem),
                    },
                )
                .map_err(|e| DistError::Invalid(format!("{}: {e}", path.display())))?
            }
            None => redis::Client::open(url).map_err(bad)?,
        };
        if tls {
            // rustls needs a process-wide crypto provider; another part may have installed one.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        Ok(RedisUrl { client, shown })
    }

    /// A connection, checked with `PING`, whose commands time out after 30 s.
    pub fn connect(&self) -> Result<Connection> {
        let mut con = self
            .client
            .get_connection_with_timeout(Duration::from_secs(5))
            .map_err(|e| DistError::Redis(format!("cannot reach Redis at {}: {e}", self.shown)))?;
        let timeouts = con
            .set_read_timeout(Some(TIMEOUT))
            .and_then(|_| con.set_write_timeout(Some(TIMEOUT)));
        timeouts.map_err(|e| DistError::Redis(format!("{}: {e}", self.shown)))?;
        redis::cmd("PING")
            .query::<String>(&mut con)
            .map_err(|e| DistError::Redis(format!("Redis at {} refused PING: {e}", self.shown)))?;
        Ok(con)
    }
}

/// `HOST-PID`, this process's default name among a study's workers or a teacher's servers
/// (`fallback` when the host has no name).
pub fn host_pid(fallback: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| fallback.into());
    format!("{host}-{}", std::process::id())
}

/// Checks a study's (or a teacher's) name: 1 to 100 letters, digits, `-`, `_` or `.`.
pub fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(DistError::Invalid(format!(
            "{what} name `{name}`: use 1 to 100 letters, digits, `-`, `_` or `.`"
        )))
    }
}

/// A trial as kept in the history list.
#[derive(Serialize, Deserialize)]
struct TrialRecord {
    format: String,
    #[serde(flatten)]
    trial: Trial,
}

const TRIAL_FORMAT: &str = "slim-trial/1";

/// A study kept in Redis.
pub struct RedisStudy {
    con: Mutex<Connection>,
    url: RedisUrl,
    name: String,
    state_key: String,
    trials_key: String,
}

impl RedisStudy {
    /// The study `name` on the server at `url` (created by its first worker).
    pub fn open(url: &RedisUrl, name: &str) -> Result<RedisStudy> {
        check_name("study", name)?;
        Ok(RedisStudy {
            con: Mutex::new(url.connect()?),
            url: url.clone(),
            name: name.to_string(),
            state_key: format!("slim:study:{name}:state"),
            trials_key: format!("slim:study:{name}:trials"),
        })
    }

    /// Removes the study from the server.
    pub fn delete(&self) -> Result<()> {
        let mut con = self.lock();
        redis::cmd("DEL")
            .arg(&self.state_key)
            .arg(&self.trials_key)
            .query::<()>(&mut *con)
            .map_err(|e| DistError::Redis(self.failed(e)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.con.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn failed(&self, e: RedisError) -> String {
        format!("study `{}` at {}: {e}", self.name, self.url)
    }

    fn store_error(&self, e: RedisError) -> CoreError {
        CoreError::Store(self.failed(e))
    }

    fn parse_state(&self, raw: &[u8]) -> slim_core::Result<StudyState> {
        if raw.len() > MAX_VALUE {
            return Err(CoreError::Store(format!(
                "{}: {} holds {} bytes, more than the {MAX_VALUE} a study may have",
                self.describe(),
                self.state_key,
                raw.len()
            )));
        }
        serde_json::from_slice(raw).map_err(|e| {
            CoreError::Store(format!(
                "{}: {} is not a Slim study's state: {e}",
                self.describe(),
                self.state_key
            ))
        })
    }
}

impl StudyStore for RedisStudy {
    fn describe(&self) -> String {
        format!("study `{}` at {}", self.name, self.url)
    }

    fn now_ms(&self) -> slim_core::Result<u64> {
        let mut con = self.lock();
        let (secs, micros): (u64, u64) = redis::cmd("TIME")
            .query(&mut *con)
            .map_err(|e| self.store_error(e))?;
        Ok(secs.saturating_mul(1000).saturating_add(micros / 1000))
    }

    fn transact(
        &self,
        f: &mut dyn FnMut(Option<StudyState>) -> slim_core::Result<Option<Change>>,
    ) -> slim_core::Result<()> {
        let mut con = self.lock();
        let con = &mut *con;
        loop {
            redis::cmd("WATCH")
                .arg(&self.state_key)
                .query::<()>(con)
                .map_err(|e| self.store_error(e))?;
            let raw: Option<Vec<u8>> = redis::cmd("GET")
                .arg(&self.state_key)
                .query(con)
                .map_err(|e| self.store_error(e))?;
            let state = raw.map(|raw| self.parse_state(&raw));
            let change = match state.transpose().and_then(&mut *f) {
                Ok(Some(c)) => c,
                other => {
                    // Nothing to write (or an error): release the watch.
                    let _ = redis::cmd("UNWATCH").query::<()>(con);
                    return other.map(|_| ());
                }
            };
            let state = serde_json::to_vec(&change.state)
                .map_err(|e| CoreError::Store(format!("cannot encode the study: {e}")))?;
            let mut pipe = redis::pipe();
            pipe.atomic()
                .cmd("SET")
                .arg(&self.state_key)
                .arg(state)
                .ignore();
            if let Some(trial) = change.append {
                let record = TrialRecord {
                    format: TRIAL_FORMAT.into(),
                    trial,
                };
                let bytes = serde_json::to_vec(&record)
                    .map_err(|e| CoreError::Store(format!("cannot encode a trial: {e}")))?;
                pipe.cmd("RPUSH").arg(&self.trials_key).arg(bytes).ignore();
            }
            // EXEC answers nil when the state changed after WATCH: decide again.
            let done: Option<()> = pipe.query(con).map_err(|e| self.store_error(e))?;
            if done.is_some() {
                return Ok(());
            }
        }
    }

    fn trials(&self) -> slim_core::Result<Vec<Trial>> {
        let raw: Vec<Vec<u8>> = {
            let mut con = self.lock();
            redis::cmd("LRANGE")
                .arg(&self.trials_key)
                .arg(0)
                .arg(-1)
                .query(&mut *con)
                .map_err(|e| self.store_error(e))?
        };
        let mut out = Vec::with_capacity(raw.len());
        for (i, r) in raw.iter().enumerate() {
            let record = if r.len() > MAX_VALUE {
                Err(format!("{} bytes", r.len()))
            } else {
                serde_json::from_slice::<TrialRecord>(r)
                    .map_err(|e| e.to_string())
                    .and_then(|t| {
                        if t.format == TRIAL_FORMAT {
                            Ok(t)
                        } else {
                            Err(format!("format `{}`", t.format))
                        }
                    })
            };
            match record {
                Ok(t) => out.push(t.trial),
                Err(e) => eprintln!(
                    "warning: {}: entry {i} of {} is not a trial ({e}); left out",
                    self.describe(),
                    self.trials_key
                ),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn passwords_are_hidden_and_bad_urls_refused() {
        assert_eq!(
            hide_password("redis://:s3cret@db:6380/2"),
            "redis://:***@db:6380/2"
        );
        assert_eq!(
            hide_password("redis://alice:s3cret@db"),
            "redis://alice:***@db"
        );
        assert_eq!(hide_password("redis://db:1"), "redis://db:1");
        let e = RedisUrl::parse("http://db:6379").unwrap_err();
        assert!(e.to_string().contains("not a Redis URL"), "{e}");
        let u = RedisUrl::parse("rediss://:pw@db:6379").unwrap();
        assert_eq!(u.to_string(), "rediss://:***@db:6379");
        let e =
            RedisUrl::parse_with_ca("redis://:pw@db:6379", Some(Path::new("ca.pem"))).unwrap_err();
        assert!(
            e.to_string().contains("rediss://") && !e.to_string().contains("pw"),
            "{e}"
        );
        let e = RedisUrl::parse_with_ca("rediss://db:6379", Some(Path::new("/no/such.pem")))
            .unwrap_err();
        assert!(e.to_string().contains("/no/such.pem"), "{e}");
        let u = RedisUrl::parse("redis://:hunter2@127.0.0.1:1/0").unwrap();
        assert!(!format!("{u} {u:?}").contains("hunter2"));
        assert!(check_name("study", "nas-mnv2_0.5").is_ok());
        assert!(check_name("study", "a b").is_err());
        assert!(check_name("study", "").is_err());
        assert!(check_name("study", "x:y").is_err());
    }

    #[test]
    fn an_unreachable_server_is_an_error_naming_it() {
        // Port 1 on loopback: nothing listens there.
        let u = RedisUrl::parse("redis://:pw@127.0.0.1:1").unwrap();
        let e = RedisStudy::open(&u, "s").err().unwrap();
        let msg = e.to_string();
        assert!(
            msg.contains("cannot reach Redis at redis://:***@127.0.0.1:1"),
            "{msg}"
        );
    }
}
