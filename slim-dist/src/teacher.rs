//! Online teachers: a teacher model served from its own processes, on its own machines, to
//! students that ask for its outputs over Redis.
//!
//! - A teacher named `T` announces itself under `slim:teacher:T:info` (its model's and its
//!   data's fingerprints, its output node, the per-sample shapes of the nodes it serves),
//!   with an expiry that every serving process renews: a student finds out whether anyone
//!   serves `T`, and with what, before it trains.
//! - Requests go to the stream `slim:teacher:T:requests`, read through the consumer group
//!   `servers`: any number of processes serve the same teacher, and each request goes to one
//!   of them. A request names its answer key, the sample indices and the nodes, and a
//!   deadline after which nobody needs the answer.
//! - The answer (the nodes' outputs for those samples as safetensors bytes, with the sample
//!   indices and the teacher's fingerprint) is pushed to the request's answer key, which
//!   expires unless read.
//! - The student asks for the coming batches ahead of use (a bounded window), takes each
//!   answer by its key (so answers are merged by batch and sample index, never by arrival
//!   order), and asks again for a batch whose answer is late: a teacher process that dies is
//!   replaced by another one serving the same teacher, at the cost of that delay. When no
//!   process answers for `timeout`, the student stops with an error naming the teacher.
//!
//! Nothing received is executed: requests are typed JSON with a format tag, answers are
//! safetensors with a format tag in their metadata; a malformed or oversized message is
//! reported and dropped.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use redis::Connection;
use serde::{Deserialize, Serialize};
use slim_core::data::{Dataset, ImageSet, Loader, LoaderConfig, Normalize};
use slim_core::{ForwardOptions, Mode, Model};

use crate::{check_name, DistError, RedisUrl, Result};

/// The consumer group of a teacher's request stream.
const GROUP: &str = "servers";
/// The most samples one request may ask for.
pub const MAX_SAMPLES: usize = 4096;
/// The largest request accepted, in bytes.
const MAX_REQUEST: usize = 1 << 20;
/// The format tags.
const INFO_FORMAT: &str = "slim-teacher/1";
const REQUEST_FORMAT: &str = "slim-teacher-request/1";
const ANSWER_FORMAT: &str = "slim-teacher-answer/1";
/// How long an announcement lives unless renewed, and how often it is renewed.
const INFO_TTL: Duration = Duration::from_secs(15);
const INFO_RENEW: Duration = Duration::from_secs(3);
/// How long an answer waits for its student.
const ANSWER_TTL_MS: u64 = 120_000;
/// Requests kept in a stream (older ones are trimmed).
const STREAM_LEN: usize = 10_000;

fn keys(name: &str) -> (String, String) {
    (
        format!("slim:teacher:{name}:info"),
        format!("slim:teacher:{name}:requests"),
    )
}

fn redis_err(url: &RedisUrl, name: &str, e: redis::RedisError) -> DistError {
    DistError::Redis(format!("teacher `{name}` at {url}: {e}"))
}

/// What a served teacher announces.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TeacherInfo {
    pub format: String,
    /// The model file (or other label) it was started with.
    pub label: String,
    pub fingerprint: String,
    pub data: String,
    pub data_fingerprint: String,
    pub samples: usize,
    pub output: String,
    /// Node -> per-sample shape, for the nodes it serves.
    pub nodes: BTreeMap<String, Vec<usize>>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Request {
    format: String,
    /// The answer key's last part: `STUDENT.SEQ`.
    id: String,
    indices: Vec<usize>,
    nodes: Vec<String>,
    /// After this (the server's clock, ms), nobody waits for the answer.
    deadline_ms: u64,
}

/// What a serving process has done.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ServeReport {
    pub answered: usize,
    pub dropped: usize,
    pub samples: usize,
}

/// What a serving process reports as it goes.
pub enum ServeEvent<'a> {
    Ready(&'a TeacherInfo),
    Answered {
        samples: usize,
        seconds: f64,
    },
    /// A request that was malformed, oversized, asked for what is not served, or expired.
    Dropped(String),
}

/// The teacher `name`'s model, data and nodes, checked, as it will be announced.
pub fn teacher_info(
    model: &Model,
    label: &str,
    set: &ImageSet,
    data_spec: &str,
    nodes: &[String],
) -> Result<TeacherInfo> {
    if model.input_shape() != set.shape.to_vec() {
        return Err(DistError::Invalid(format!(
            "the teacher takes inputs of shape {:?}, the data `{data_spec}` has {:?}",
            model.input_shape(),
            set.shape
        )));
    }
    let g = &model.graph;
    let output = g.node(g.outputs()[0]).name.clone();
    let mut shapes = BTreeMap::new();
    let all: Vec<String> = if nodes.is_empty() {
        g.nodes().iter().map(|n| n.name.clone()).collect()
    } else {
        nodes.to_vec()
    };
    for n in &all {
        let node = g.find(n).ok_or_else(|| {
            DistError::Invalid(format!(
                "the teacher `{label}` has no node `{n}` (`slim info` lists the nodes)"
            ))
        })?;
        if node.shape.is_empty() {
            continue;
        }
        shapes.insert(n.clone(), node.shape.clone());
    }
    if set.is_empty() {
        return Err(DistError::Invalid(format!(
            "the data `{data_spec}` is empty"
        )));
    }
    Ok(TeacherInfo {
        format: INFO_FORMAT.into(),
        label: label.to_string(),
        fingerprint: model.fingerprint()?,
        data: data_spec.to_string(),
        data_fingerprint: set.fingerprint(),
        samples: set.len(),
        output,
        nodes: shapes,
    })
}

/// The outputs of `nodes` for the samples `indices` of `set` (stored images, normalized), as
/// the answer's safetensors bytes.
fn answer(
    model: &Model,
    info: &TeacherInfo,
    set: &ImageSet,
    normalize: &Normalize,
    id: &str,
    indices: &[usize],
    nodes: &[String],
) -> Result<Vec<u8>> {
    let part = set.select(indices);
    let cfg = LoaderConfig {
        batch_size: indices.len(),
        shuffle: None,
        augment: Default::default(),
        normalize: normalize.clone(),
        drop_last: false,
    };
    let data: std::sync::Arc<dyn Dataset> = std::sync::Arc::new(part);
    let batch = Loader::new(data, &cfg, 0, &model.device())?
        .next()
        .ok_or_else(|| DistError::Invalid("an empty request".into()))??;
    let out = model.forward_with(
        std::slice::from_ref(&batch.images),
        Mode::Eval,
        ForwardOptions::default().with_taps(nodes),
    )?;
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for n in nodes {
        let t = out
            .taps
            .get(n)
            .ok_or_else(|| DistError::Invalid(format!("no output of node `{n}`")))?;
        let t = t
            .to_dtype(DType::F32)
            .and_then(|t| t.to_device(&Device::Cpu))
            .map_err(slim_core::CoreError::from)?;
        tensors.push((format!("node/{n}"), t));
    }
    let index: Vec<u32> = indices.iter().map(|&i| i as u32).collect();
    let index = Tensor::new(index, &Device::Cpu).map_err(slim_core::CoreError::from)?;
    tensors.push(("index".into(), index));
    let mut md = HashMap::new();
    md.insert("format".to_string(), ANSWER_FORMAT.to_string());
    md.insert("id".to_string(), id.to_string());
    md.insert("teacher".to_string(), info.fingerprint.clone());
    safetensors::tensor::serialize(tensors, Some(md))
        .map_err(|e| DistError::Invalid(format!("cannot encode an answer: {e}")))
}

/// Checks a request against what is served; `Err` says why it is dropped.
fn check_request(info: &TeacherInfo, raw: &[u8]) -> std::result::Result<Request, String> {
    if raw.len() > MAX_REQUEST {
        return Err(format!("a request of {} bytes", raw.len()));
    }
    let r: Request = serde_json::from_slice(raw).map_err(|e| format!("not a request: {e}"))?;
    if r.format != REQUEST_FORMAT {
        return Err(format!("a request in format `{}`", r.format));
    }
    let id_ok = !r.id.is_empty()
        && r.id.len() <= 200
        && r.id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !id_ok {
        return Err("a request with a malformed id".into());
    }
    if r.indices.is_empty() || r.indices.len() > MAX_SAMPLES {
        return Err(format!(
            "a request for {} samples (1 to {MAX_SAMPLES})",
            r.indices.len()
        ));
    }
    if let Some(i) = r.indices.iter().find(|&&i| i >= info.samples) {
        return Err(format!("a request for sample {i} of {}", info.samples));
    }
    if r.nodes.is_empty() {
        return Err("a request for no node".into());
    }
    if let Some(n) = r.nodes.iter().find(|n| !info.nodes.contains_key(*n)) {
        return Err(format!("a request for node `{n}`, which is not served"));
    }
    Ok(r)
}

fn now_ms(con: &mut Connection) -> redis::RedisResult<u64> {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query(con)?;
    Ok(secs.saturating_mul(1000).saturating_add(micros / 1000))
}

/// Takes the name `name` for `info`'s teacher (refused when another model, data or node list
/// is served under it) and makes its request stream and group; the announcement to renew.
fn claim(url: &RedisUrl, name: &str, info: &TeacherInfo, con: &mut Connection) -> Result<Vec<u8>> {
    let (info_key, stream) = keys(name);
    let err = |e| redis_err(url, name, e);
    let announce = serde_json::to_vec(info)
        .map_err(|e| DistError::Invalid(format!("cannot encode the announcement: {e}")))?;
    let existing: Option<Vec<u8>> = redis::cmd("GET").arg(&info_key).query(con).map_err(err)?;
    if let Some(raw) = existing {
        if let Ok(other) = serde_json::from_slice::<TeacherInfo>(&raw) {
            if other.fingerprint != info.fingerprint
                || other.data_fingerprint != info.data_fingerprint
                || other.nodes != info.nodes
            {
                return Err(DistError::Invalid(format!(
                    "the teacher `{name}` at {url} is already served with another model, data \
                     or node list (`{}` on `{}`); use another name",
                    other.label, other.data
                )));
            }
        }
    }
    let created: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query(con);
    if let Err(e) = created {
        if e.code() != Some("BUSYGROUP") {
            return Err(err(e));
        }
    }
    Ok(announce)
}

/// Puts an answer where its requester waits for it (kept for a while) and acknowledges its
/// request's stream entry, at once.
fn deliver(
    con: &mut Connection,
    key: &str,
    bytes: Vec<u8>,
    stream: &str,
    entry: &str,
) -> redis::RedisResult<()> {
    redis::pipe()
        .atomic()
        .cmd("RPUSH")
        .arg(key)
        .arg(bytes)
        .ignore()
        .cmd("PEXPIRE")
        .arg(key)
        .arg(ANSWER_TTL_MS)
        .ignore()
        .cmd("XACK")
        .arg(stream)
        .arg(GROUP)
        .arg(entry)
        .ignore()
        .query::<()>(con)
}

/// Serves the teacher `name` until `stop` is set: announces it, then answers requests.
/// Another process may serve the same name only with the same model and data.
#[allow(clippy::too_many_arguments)]
pub fn serve(
    url: &RedisUrl,
    name: &str,
    consumer: &str,
    model: &Model,
    info: &TeacherInfo,
    set: &ImageSet,
    normalize: &Normalize,
    stop: &AtomicBool,
    events: &mut dyn FnMut(ServeEvent<'_>),
) -> Result<ServeReport> {
    check_name("teacher", name)?;
    check_name("server", consumer)?;
    let (info_key, stream) = keys(name);
    let err = |e| redis_err(url, name, e);
    let mut con = url.connect()?;
    let announce = claim(url, name, info, &mut con)?;
    let mut report = ServeReport::default();
    let mut announced: Option<Instant> = None;
    while !stop.load(Ordering::SeqCst) {
        if announced.is_none_or(|t| t.elapsed() >= INFO_RENEW) {
            redis::cmd("SET")
                .arg(&info_key)
                .arg(&announce)
                .arg("PX")
                .arg(INFO_TTL.as_millis() as u64)
                .query::<()>(&mut con)
                .map_err(err)?;
            if announced.is_none() {
                events(ServeEvent::Ready(info));
            }
            announced = Some(Instant::now());
        }
        // One request at a time: a process computes one answer at once, and the others
        // that serve the same teacher take the rest.
        let reply: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(consumer)
            .arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(500)
            .arg("STREAMS")
            .arg(&stream)
            .arg(">")
            .query(&mut con)
            .map_err(err)?;
        for (entry, raw) in stream_entries(reply) {
            let started = Instant::now();
            let now = now_ms(&mut con).map_err(err)?;
            let request = raw
                .ok_or_else(|| "an entry without a `msg` field".to_string())
                .and_then(|raw| check_request(info, &raw))
                .and_then(|r| {
                    if r.deadline_ms < now {
                        Err(format!("request {} expired", r.id))
                    } else {
                        Ok(r)
                    }
                });
            match request {
                Ok(r) => {
                    let bytes = answer(model, info, set, normalize, &r.id, &r.indices, &r.nodes)?;
                    let key = format!("slim:teacher:{name}:answer:{}", r.id);
                    deliver(&mut con, &key, bytes, &stream, &entry).map_err(err)?;
                    report.answered += 1;
                    report.samples += r.indices.len();
                    events(ServeEvent::Answered {
                        samples: r.indices.len(),
                        seconds: started.elapsed().as_secs_f64(),
                    });
                }
                Err(why) => {
                    redis::cmd("XACK")
                        .arg(&stream)
                        .arg(GROUP)
                        .arg(&entry)
                        .query::<()>(&mut con)
                        .map_err(err)?;
                    report.dropped += 1;
                    events(ServeEvent::Dropped(format!("entry {entry}: {why}")));
                }
            }
        }
    }
    Ok(report)
}

/// The entries of an `XREADGROUP` reply: each entry's id and its `msg` field.
fn stream_entries(v: redis::Value) -> Vec<(String, Option<Vec<u8>>)> {
    use redis::Value;
    let text = |v: &Value| match v {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.clone().into_bytes()),
        _ => None,
    };
    let mut out = Vec::new();
    // [[stream, [[id, [field, value, ...]], ...]]] (RESP2) or a map stream -> entries (RESP3).
    let streams: Vec<Value> = match v {
        Value::Array(a) => a,
        Value::Map(m) => m
            .into_iter()
            .map(|(k, v)| Value::Array(vec![k, v]))
            .collect(),
        _ => return out,
    };
    for s in streams {
        let Value::Array(mut pair) = s else { continue };
        if pair.len() != 2 {
            continue;
        }
        let Value::Array(entries) = pair.remove(1) else {
            continue;
        };
        for e in entries {
            let Value::Array(e) = e else { continue };
            let Some(id) = e.first().and_then(text) else {
                continue;
            };
            let id = String::from_utf8_lossy(&id).into_owned();
            let mut msg = None;
            if let Some(Value::Array(fields)) = e.get(1) {
                for kv in fields.chunks(2) {
                    if kv.len() == 2 && text(&kv[0]).as_deref() == Some(b"msg".as_slice()) {
                        msg = text(&kv[1]);
                    }
                }
            }
            out.push((id, msg));
        }
    }
    out
}

/// How a student waits for a teacher.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Batches asked ahead of use.
    pub prefetch: usize,
    /// A batch whose answer has not come after this long is asked again.
    pub retry: Duration,
    /// When no answer (and, at the start, no announcement) comes for this long, the student
    /// stops with an error.
    pub timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            prefetch: 4,
            retry: Duration::from_secs(5),
            timeout: Duration::from_secs(60),
        }
    }
}

/// A request in flight.
struct Sent {
    seq: u64,
    indices: Vec<usize>,
    nodes: Vec<String>,
    first: Instant,
    last: Instant,
}

/// A student's connection to a served teacher.
pub struct TeacherClient {
    con: Connection,
    url: RedisUrl,
    name: String,
    student: String,
    info: TeacherInfo,
    opts: ClientOptions,
    stream: String,
    seq: u64,
    /// Batches planned and not yet asked.
    planned: VecDeque<(Vec<usize>, Vec<String>)>,
    /// Batches asked, in the order they will be used.
    sent: VecDeque<Sent>,
    shapes: HashMap<String, Vec<usize>>,
    label: String,
    /// Requests asked again because their answer was late.
    pub retried: usize,
}

impl TeacherClient {
    /// Connects to each of the teachers `names` as one student, named by this process and the
    /// time (unique among the teachers' students).
    pub fn connect_all(
        url: &RedisUrl,
        names: &[String],
        opts: &ClientOptions,
    ) -> Result<Vec<TeacherClient>> {
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let student = format!("{}-{since_epoch}", std::process::id());
        names
            .iter()
            .map(|name| TeacherClient::connect(url, name, &student, opts.clone()))
            .collect()
    }

    /// Connects to the teacher `name`, waiting up to `opts.timeout` for a process to announce
    /// it. `student` names this student in answer keys (unique among the teacher's students).
    pub fn connect(
        url: &RedisUrl,
        name: &str,
        student: &str,
        opts: ClientOptions,
    ) -> Result<TeacherClient> {
        check_name("teacher", name)?;
        check_name("student", student)?;
        if opts.prefetch == 0 || opts.retry.is_zero() || opts.timeout.is_zero() {
            return Err(DistError::Invalid(
                "prefetch, retry and timeout must be positive".into(),
            ));
        }
        let (info_key, stream) = keys(name);
        let mut con = url.connect()?;
        let started = Instant::now();
        let info = loop {
            let raw: Option<Vec<u8>> = redis::cmd("GET")
                .arg(&info_key)
                .query(&mut con)
                .map_err(|e| redis_err(url, name, e))?;
            if let Some(raw) = raw {
                let info: TeacherInfo = serde_json::from_slice(&raw).map_err(|e| {
                    DistError::Redis(format!(
                        "teacher `{name}` at {url}: {info_key} is not a teacher's announcement: {e}"
                    ))
                })?;
                if info.format != INFO_FORMAT {
                    return Err(DistError::Redis(format!(
                        "teacher `{name}` at {url}: announcement in format `{}`, expected `{INFO_FORMAT}`",
                        info.format
                    )));
                }
                for (node, shape) in &info.nodes {
                    slim_core::graph::check_shape(shape).map_err(|e| {
                        DistError::Redis(format!(
                            "teacher `{name}` at {url}: its announcement has a damaged shape for \
                             node `{node}`: {e}"
                        ))
                    })?;
                }
                break info;
            }
            if started.elapsed() >= opts.timeout {
                return Err(DistError::Redis(format!(
                    "no process serves the teacher `{name}` at {url} (waited {:.0} s); start one \
                     with `slim distill teacher --redis URL --name {name} ...`",
                    opts.timeout.as_secs_f64()
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let shapes = info
            .nodes
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok(TeacherClient {
            con,
            url: url.clone(),
            name: name.to_string(),
            student: student.to_string(),
            label: format!("`{name}` ({} at {url})", info.label),
            info,
            opts,
            stream,
            seq: 0,
            planned: VecDeque::new(),
            sent: VecDeque::new(),
            shapes,
            retried: 0,
        })
    }

    pub fn info(&self) -> &TeacherInfo {
        &self.info
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn shapes(&self) -> &HashMap<String, Vec<usize>> {
        &self.shapes
    }

    fn err(&self, e: redis::RedisError) -> DistError {
        redis_err(&self.url, &self.name, e)
    }

    fn answer_key(&self, seq: u64) -> String {
        format!("slim:teacher:{}:answer:{}", self.name, self.request_id(seq))
    }

    fn request_id(&self, seq: u64) -> String {
        format!("{}.{seq}", self.student)
    }

    /// Adds (or adds again) the request for `s` to the stream.
    fn send(&mut self, seq: u64, indices: &[usize], nodes: &[String]) -> Result<()> {
        let now = now_ms(&mut self.con).map_err(|e| self.err(e))?;
        let r = Request {
            format: REQUEST_FORMAT.into(),
            id: self.request_id(seq),
            indices: indices.to_vec(),
            nodes: nodes.to_vec(),
            deadline_ms: now + self.opts.timeout.as_millis() as u64,
        };
        let msg = serde_json::to_vec(&r)
            .map_err(|e| DistError::Invalid(format!("cannot encode a request: {e}")))?;
        redis::cmd("XADD")
            .arg(&self.stream)
            .arg("MAXLEN")
            .arg("~")
            .arg(STREAM_LEN)
            .arg("*")
            .arg("msg")
            .arg(msg)
            .query::<String>(&mut self.con)
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Asks for planned batches until `prefetch` are in flight.
    fn top_up(&mut self) -> Result<()> {
        while self.sent.len() < self.opts.prefetch {
            let Some((indices, nodes)) = self.planned.pop_front() else {
                break;
            };
            let seq = self.seq;
            self.seq += 1;
            self.send(seq, &indices, &nodes)?;
            let now = Instant::now();
            self.sent.push_back(Sent {
                seq,
                indices,
                nodes,
                first: now,
                last: now,
            });
        }
        Ok(())
    }

    /// The coming batches, in order: they are asked for ahead of use.
    pub fn plan(&mut self, batches: &[Vec<usize>], nodes: &[String]) -> Result<()> {
        self.check_nodes(nodes)?;
        // What was asked for an earlier plan and not used is dropped (answers expire).
        self.sent.clear();
        self.planned = batches
            .iter()
            .map(|b| (b.clone(), nodes.to_vec()))
            .collect();
        self.top_up()
    }

    fn check_nodes(&self, nodes: &[String]) -> Result<()> {
        match nodes.iter().find(|n| !self.shapes.contains_key(*n)) {
            Some(n) => Err(DistError::Invalid(format!(
                "the teacher {} does not serve node `{n}`",
                self.label
            ))),
            None => Ok(()),
        }
    }

    /// The outputs of `nodes` for `indices`, rows in that order: the planned batch if this is
    /// the next one, else asked for now.
    pub fn fetch(
        &mut self,
        indices: &[usize],
        nodes: &[String],
    ) -> Result<HashMap<String, Tensor>> {
        self.check_nodes(nodes)?;
        if indices.is_empty() || indices.len() > MAX_SAMPLES {
            return Err(DistError::Invalid(format!(
                "a batch of {} samples (1 to {MAX_SAMPLES})",
                indices.len()
            )));
        }
        if let Some(&i) = indices.iter().find(|&&i| i >= self.info.samples) {
            return Err(DistError::Invalid(format!(
                "sample {i}: the teacher {} serves {} samples",
                self.label, self.info.samples
            )));
        }
        self.top_up()?;
        let planned = self
            .sent
            .front()
            .is_some_and(|s| s.indices == indices && s.nodes == nodes);
        if !planned {
            // Off the plan: everything asked ahead is out of step; ask for this one alone.
            self.sent.clear();
            self.planned.clear();
            let seq = self.seq;
            self.seq += 1;
            self.send(seq, indices, nodes)?;
            let now = Instant::now();
            self.sent.push_back(Sent {
                seq,
                indices: indices.to_vec(),
                nodes: nodes.to_vec(),
                first: now,
                last: now,
            });
        }
        let mut s = self
            .sent
            .pop_front()
            .ok_or_else(|| DistError::Invalid("no request in flight".into()))?;
        let key = self.answer_key(s.seq);
        loop {
            let wait = self
                .opts
                .retry
                .saturating_sub(s.last.elapsed())
                .clamp(Duration::from_millis(10), Duration::from_secs(1));
            let got: Option<(String, Vec<u8>)> = redis::cmd("BLPOP")
                .arg(&key)
                .arg(wait.as_secs_f64())
                .query(&mut self.con)
                .map_err(|e| self.err(e))?;
            if let Some((_, bytes)) = got {
                match decode(&self.info, &self.request_id(s.seq), &bytes, &s) {
                    Ok(taps) => {
                        let _ = redis::cmd("DEL").arg(&key).query::<()>(&mut self.con);
                        self.top_up()?;
                        return Ok(taps);
                    }
                    Err(why) => eprintln!(
                        "warning: teacher {}: a malformed answer to request {} dropped ({why})",
                        self.label,
                        self.request_id(s.seq)
                    ),
                }
            }
            if s.first.elapsed() >= self.opts.timeout {
                return Err(DistError::Redis(format!(
                    "no process serving the teacher {} answered for {:.0} s (a batch of {} \
                     samples); is `slim distill teacher --name {}` running?",
                    self.label,
                    self.opts.timeout.as_secs_f64(),
                    s.indices.len(),
                    self.name
                )));
            }
            if s.last.elapsed() >= self.opts.retry {
                eprintln!(
                    "teacher {}: no answer to request {} after {:.1} s; asking again",
                    self.label,
                    self.request_id(s.seq),
                    s.last.elapsed().as_secs_f64()
                );
                self.send(s.seq, &s.indices, &s.nodes)?;
                s.last = Instant::now();
                self.retried += 1;
            }
        }
    }
}

/// The taps in an answer to request `id`, rows in the order of `s.indices`; `Err` says why
/// the answer is not taken.
fn decode(
    info: &TeacherInfo,
    id: &str,
    bytes: &[u8],
    s: &Sent,
) -> std::result::Result<HashMap<String, Tensor>, String> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
    let md = header.metadata().clone().unwrap_or_default();
    if md.get("format").map(String::as_str) != Some(ANSWER_FORMAT) {
        return Err("not an answer".into());
    }
    if md.get("id").map(String::as_str) != Some(id) {
        return Err("the answer to another request".into());
    }
    if md.get("teacher") != Some(&info.fingerprint) {
        return Err("an answer from another model".into());
    }
    let load = |name: &str| -> std::result::Result<Tensor, String> {
        let view = st.tensor(name).map_err(|e| format!("`{name}`: {e}"))?;
        candle_core::safetensors::Load::load(&view, &Device::Cpu)
            .map_err(|e| format!("`{name}`: {e}"))
    };
    let index: Vec<u32> = load("index")?
        .to_vec1::<u32>()
        .map_err(|e| format!("`index`: {e}"))?;
    // Rows by sample index: the answer's order need not be the request's.
    let row_of: HashMap<usize, usize> = index
        .iter()
        .enumerate()
        .map(|(r, &i)| (i as usize, r))
        .collect();
    let rows: Vec<u32> = s
        .indices
        .iter()
        .map(|i| row_of.get(i).map(|&r| r as u32))
        .collect::<Option<Vec<_>>>()
        .ok_or("samples missing from the answer")?;
    let rows = Tensor::new(rows, &Device::Cpu).map_err(|e| e.to_string())?;
    let mut out = HashMap::new();
    for n in &s.nodes {
        let t = load(&format!("node/{n}"))?;
        let per = info
            .nodes
            .get(n)
            .ok_or_else(|| format!("node `{n}` is not served"))?;
        let mut want = vec![index.len()];
        want.extend(per);
        if t.dims() != want.as_slice() {
            return Err(format!(
                "node `{n}` has shape {:?}, expected {want:?}",
                t.dims()
            ));
        }
        let in_order = index.len() == s.indices.len()
            && index.iter().zip(&s.indices).all(|(&a, &b)| a as usize == b);
        let t = if in_order {
            t
        } else {
            t.index_select(&rows, 0).map_err(|e| e.to_string())?
        };
        out.insert(n.clone(), t);
    }
    Ok(out)
}

/// The message parsers, for the fuzz targets: a request as a serving process checks it, and
/// an answer as a student decodes it (against a one-node teacher serving 100 samples).
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    #[cfg(test)]
    pub(super) fn info_for_tests() -> TeacherInfo {
        info()
    }

    fn info() -> TeacherInfo {
        TeacherInfo {
            format: INFO_FORMAT.into(),
            label: "fuzz".into(),
            fingerprint: "f".into(),
            data: "d".into(),
            data_fingerprint: "d".into(),
            samples: 100,
            output: "fc".into(),
            nodes: [("fc".to_string(), vec![10])].into_iter().collect(),
        }
    }

    /// Whether a serving process would answer the request.
    pub fn request(bytes: &[u8]) -> bool {
        check_request(&info(), bytes).is_ok()
    }

    /// Whether a student would take the answer to request `s.0` for samples 0..4 of `fc`.
    pub fn answer(bytes: &[u8]) -> bool {
        let info = info();
        let s = Sent {
            seq: 0,
            indices: vec![0, 1, 2, 3],
            nodes: vec!["fc".into()],
            first: Instant::now(),
            last: Instant::now(),
        };
        decode(&info, "s.0", bytes, &s).is_ok()
    }

    /// An answer the student takes, for a seed.
    pub fn good_answer() -> Vec<u8> {
        // Rows for samples 3, 2, 1, 0, each filled with its sample's number.
        let rows: Vec<f32> = [3f32, 2., 1., 0.].iter().flat_map(|&v| [v; 10]).collect();
        let t = Tensor::from_vec(rows, (4, 10), &Device::Cpu).expect("a tensor");
        let index = Tensor::new(&[3u32, 2, 1, 0], &Device::Cpu).expect("a tensor");
        let md: HashMap<String, String> = [
            ("format".to_string(), ANSWER_FORMAT.to_string()),
            ("id".to_string(), "s.0".to_string()),
            ("teacher".to_string(), "f".to_string()),
        ]
        .into_iter()
        .collect();
        safetensors::tensor::serialize([("node/fc", t), ("index", index)], Some(md))
            .expect("serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_taken_by_sample_index_and_checked() {
        let info = fuzzing::info_for_tests();
        let s = Sent {
            seq: 0,
            indices: vec![0, 1, 2, 3],
            nodes: vec!["fc".into()],
            first: Instant::now(),
            last: Instant::now(),
        };
        let taps = decode(&info, "s.0", &fuzzing::good_answer(), &s).unwrap();
        let fc = taps["fc"].to_vec2::<f32>().unwrap();
        for (r, row) in fc.iter().enumerate() {
            assert!(row.iter().all(|&v| v == r as f32), "row {r}: {row:?}");
        }
        assert!(decode(&info, "s.1", &fuzzing::good_answer(), &s).is_err());
        assert!(!fuzzing::answer(b"garbage"));
        let mut other = info.clone();
        other.fingerprint = "g".into();
        assert!(decode(&other, "s.0", &fuzzing::good_answer(), &s).is_err());
    }

    #[test]
    fn requests_are_checked() {
        let good = |indices: &str, nodes: &str, id: &str| {
            format!(
                r#"{{"format":"{REQUEST_FORMAT}","id":"{id}","indices":{indices},"nodes":{nodes},"deadline_ms":1}}"#
            )
        };
        assert!(fuzzing::request(
            good("[0,99]", r#"["fc"]"#, "a.1").as_bytes()
        ));
        assert!(!fuzzing::request(
            good("[100]", r#"["fc"]"#, "a.1").as_bytes()
        ));
        assert!(!fuzzing::request(good("[]", r#"["fc"]"#, "a.1").as_bytes()));
        assert!(!fuzzing::request(
            good("[1]", r#"["conv"]"#, "a.1").as_bytes()
        ));
        assert!(!fuzzing::request(
            good("[1]", r#"["fc"]"#, "a:1").as_bytes()
        ));
        assert!(!fuzzing::request(b"{"));
        let big = format!("[{}]", vec!["1"; MAX_SAMPLES + 1].join(","));
        assert!(!fuzzing::request(good(&big, r#"["fc"]"#, "a.1").as_bytes()));
    }
}
