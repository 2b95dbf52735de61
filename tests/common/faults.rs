//! An HTTP proxy in front of the test S3 server that injects faults on a
//! seeded schedule: connection resets, 500 and 503 SlowDown answers,
//! latency, and response bodies cut short. One request per connection (it
//! answers `Connection: close`), so every fault hits exactly one request.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A small deterministic PRNG (xorshift64*), so a failing schedule can be replayed by its seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The seed tests use: `DR_TEST_SEED`, or a fixed default, printed so a run can be replayed.
pub fn seed() -> u64 {
    let s = std::env::var("DR_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261125);
    eprintln!("seed {s} (set DR_TEST_SEED to replay)");
    s
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    Reset,
    Status500,
    SlowDown,
    Latency,
    Truncate,
}

pub struct FaultProxy {
    pub port: u16,
    rate: Arc<AtomicU32>,
    /// When set, every response body over 1 MiB is cut at half its length.
    cut_large: Arc<AtomicBool>,
    /// When set, every response body over 1 MiB trickles (about 2.5 MiB/s),
    /// so a test can act while a download is under way.
    slow_large: Arc<AtomicBool>,
    /// When set, every delete (DeleteObject, DeleteObjects) is refused
    /// with 403 AccessDenied, as for credentials without s3:DeleteObject.
    deny_deletes: Arc<AtomicBool>,
    /// When set, every write (PUT, POST, DELETE) is refused with 403
    /// AccessDenied except under a `drills/` prefix: a drill host's
    /// credentials, read-only but for where it records its drills.
    read_only: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    injected: Arc<Mutex<BTreeMap<Fault, u64>>>,
    /// Every request line proxied ("GET /bucket/key?query HTTP/1.1").
    requests: Arc<Mutex<Vec<String>>>,
}

impl FaultProxy {
    /// Proxies 127.0.0.1:`port` to 127.0.0.1:`upstream`, faulting `rate_percent` of requests.
    pub fn start(upstream: u16, seed: u64, rate_percent: u32) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let rate = Arc::new(AtomicU32::new(rate_percent));
        let stop = Arc::new(AtomicBool::new(false));
        let injected = Arc::new(Mutex::new(BTreeMap::new()));
        let rng = Arc::new(Mutex::new(Rng::new(seed)));
        let cut_large = Arc::new(AtomicBool::new(false));
        let slow_large = Arc::new(AtomicBool::new(false));
        let deny_deletes = Arc::new(AtomicBool::new(false));
        let read_only = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        {
            let (rate, stop, injected) = (rate.clone(), stop.clone(), injected.clone());
            let requests = requests.clone();
            let (cut_large, slow_large) = (cut_large.clone(), slow_large.clone());
            let (deny_deletes, read_only) = (deny_deletes.clone(), read_only.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            let _ = client.set_nonblocking(false);
                            let pick = {
                                let mut r = rng.lock().expect("rng");
                                let pct = rate.load(Ordering::Relaxed);
                                if r.below(100) < u64::from(pct) {
                                    Some((
                                        match r.below(5) {
                                            0 => Fault::Reset,
                                            1 => Fault::Status500,
                                            2 => Fault::SlowDown,
                                            3 => Fault::Latency,
                                            _ => Fault::Truncate,
                                        },
                                        r.next(),
                                    ))
                                } else {
                                    None
                                }
                            };
                            let (injected, requests) = (injected.clone(), requests.clone());
                            let large = Large {
                                cut: cut_large.load(Ordering::Relaxed),
                                slow: slow_large.load(Ordering::Relaxed),
                                deny_deletes: deny_deletes.load(Ordering::Relaxed),
                                read_only: read_only.load(Ordering::Relaxed),
                            };
                            std::thread::spawn(move || {
                                let _ = serve(client, upstream, pick, large, &injected, &requests);
                            });
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            });
        }
        FaultProxy {
            port,
            rate,
            cut_large,
            slow_large,
            deny_deletes,
            read_only,
            stop,
            injected,
            requests,
        }
    }

    /// The request lines proxied so far.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().expect("requests").clone()
    }

    /// The request lines proxied during the next `d` (the caller waits).
    pub fn requests_during(&self, d: std::time::Duration) -> Vec<String> {
        let before = self.requests().len();
        std::thread::sleep(d);
        self.requests()[before..].to_vec()
    }

    /// Refuses every write but to `drills/` from now on, or no longer.
    pub fn read_only(&self, on: bool) {
        self.read_only.store(on, Ordering::Relaxed);
    }

    /// Refuses every delete from now on (AccessDenied), or no longer.
    pub fn deny_deletes(&self, on: bool) {
        self.deny_deletes.store(on, Ordering::Relaxed);
    }

    /// Makes every response body over 1 MiB trickle.
    pub fn slow_large_bodies(&self, on: bool) {
        self.slow_large.store(on, Ordering::Relaxed);
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Changes the share of faulted requests (0: a plain proxy).
    pub fn set_rate(&self, percent: u32) {
        self.rate.store(percent, Ordering::Relaxed);
    }

    /// Cuts every response body over 1 MiB short (object data, not
    /// listings or manifests), deterministically.
    pub fn cut_large_bodies(&self, on: bool) {
        self.cut_large.store(on, Ordering::Relaxed);
    }

    /// How many of each fault were injected so far.
    pub fn injected(&self) -> BTreeMap<Fault, u64> {
        self.injected.lock().expect("stats").clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Reads an HTTP head (up to the blank line) as lines.
fn read_head(r: &mut impl BufRead) -> std::io::Result<Vec<String>> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::Error::other("eof in head"));
        }
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        if line.is_empty() {
            return Ok(lines);
        }
        lines.push(line);
    }
}

fn header<'a>(head: &'a [String], name: &str) -> Option<&'a str> {
    head.iter().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Reads a chunked body, returning it re-encoded as received.
fn read_chunked(r: &mut impl BufRead) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let mut size_line = String::new();
        r.read_line(&mut size_line)?;
        out.extend_from_slice(size_line.as_bytes());
        let size = usize::from_str_radix(size_line.trim().split(';').next().unwrap_or("0"), 16)
            .map_err(std::io::Error::other)?;
        if size == 0 {
            // Trailers, then the blank line.
            loop {
                let mut t = String::new();
                r.read_line(&mut t)?;
                out.extend_from_slice(t.as_bytes());
                if t == "\r\n" || t.is_empty() {
                    return Ok(out);
                }
            }
        }
        let mut chunk = vec![0u8; size + 2];
        r.read_exact(&mut chunk)?;
        out.extend_from_slice(&chunk);
    }
}

fn without_connection(head: &[String]) -> String {
    let mut out = String::new();
    for l in head {
        let name = l.split(':').next().unwrap_or("").trim();
        if name.eq_ignore_ascii_case("connection") || name.eq_ignore_ascii_case("expect") {
            continue;
        }
        out.push_str(l);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    out
}

fn error_reply(status: &str, code: &str) -> Vec<u8> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>injected by the test proxy</Message></Error>"
    );
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// What happens to response bodies over 1 MiB, and to deletes.
#[derive(Clone, Copy)]
struct Large {
    cut: bool,
    slow: bool,
    deny_deletes: bool,
    read_only: bool,
}

fn serve(
    client: TcpStream,
    upstream: u16,
    fault: Option<(Fault, u64)>,
    large: Large,
    injected: &Mutex<BTreeMap<Fault, u64>>,
    requests: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut out = client.try_clone()?;
    let mut r = BufReader::new(client);
    let head = read_head(&mut r)?;
    if header(&head, "expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
        out.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    let body = if header(&head, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        read_chunked(&mut r)?
    } else {
        let n: usize = header(&head, "content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut b = vec![0u8; n];
        r.read_exact(&mut b)?;
        b
    };
    let request = head.first().map(String::as_str).unwrap_or("");
    requests.lock().expect("requests").push(request.to_string());
    if large.deny_deletes
        && (request.starts_with("DELETE ")
            || (request.starts_with("POST ") && request.contains("?delete")))
    {
        return out.write_all(&error_reply("403 Forbidden", "AccessDenied"));
    }
    if large.read_only
        && !request.starts_with("GET ")
        && !request.starts_with("HEAD ")
        && !request.contains("/drills/")
    {
        return out.write_all(&error_reply("403 Forbidden", "AccessDenied"));
    }
    let count = |f: Fault| *injected.lock().expect("stats").entry(f).or_insert(0) += 1;
    let mut truncate = None;
    match fault {
        Some((Fault::Reset, _)) => {
            count(Fault::Reset);
            return Ok(()); // dropped: the client sees the connection close with no answer
        }
        Some((Fault::Status500, _)) => {
            count(Fault::Status500);
            return out.write_all(&error_reply("500 Internal Server Error", "InternalError"));
        }
        Some((Fault::SlowDown, _)) => {
            count(Fault::SlowDown);
            return out.write_all(&error_reply("503 Slow Down", "SlowDown"));
        }
        Some((Fault::Latency, x)) => {
            count(Fault::Latency);
            std::thread::sleep(Duration::from_millis(200 + x % 1500));
        }
        Some((Fault::Truncate, x)) => truncate = Some(x),
        None => {}
    }
    let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
    up.write_all(without_connection(&head).as_bytes())?;
    up.write_all(&body)?;
    let mut ur = BufReader::new(up);
    let rhead = read_head(&mut ur)?;
    out.write_all(without_connection(&rhead).as_bytes())?;
    let len: Option<u64> = header(&rhead, "content-length").and_then(|v| v.parse().ok());
    let is_large = len.is_some_and(|l| l > 1 << 20);
    if large.cut && is_large {
        truncate = len.map(|l| l / 2); // kept: (l / 2) % l, half the body
    }
    match (truncate, len) {
        (Some(x), Some(len)) if len > 1 => {
            count(Fault::Truncate);
            let keep = x % len;
            std::io::copy(&mut ur.take(keep), &mut out)?;
            // Closing here leaves the client short of the length it was promised.
        }
        _ if large.slow && is_large => {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = ur.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                out.write_all(&buf[..n])?;
                std::thread::sleep(Duration::from_millis(25));
            }
        }
        _ => {
            std::io::copy(&mut ur, &mut out)?;
        }
    }
    out.flush()
}
