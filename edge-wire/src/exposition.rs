//! The `/metrics` endpoint of the agent and the bridge, one for both:
//! `GET /metrics` (a query string is ignored) answers the registry in the
//! OpenMetrics text format; anything else is 404. A request head is at most
//! [`MAX_REQUEST`] bytes and each connection has [`TIMEOUT`] to send it and
//! take the answer; at most [`MAX_CONNECTIONS`] are served at once (one
//! thread each), others are closed at once: a slow or hostile client cannot
//! stop the scrapes or pile up threads.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;

pub const MAX_REQUEST: usize = 8192;
pub const TIMEOUT: Duration = Duration::from_secs(5);
pub const MAX_CONNECTIONS: usize = 4;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The whole response to a request head (pure).
pub fn respond(head: &[u8], registry: &Registry) -> Vec<u8> {
    let line = head.split(|b| *b == b'\r' || *b == b'\n').next().unwrap_or_default();
    let mut parts = line.split(|b| *b == b' ');
    let (method, target) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let path = target.split(|b| *b == b'?').next().unwrap_or_default();
    if method == b"GET" && path == b"/metrics" {
        let mut text = String::new();
        match prometheus_client::encoding::text::encode(&mut text, registry) {
            Ok(()) => response("200 OK", OPENMETRICS, &text),
            Err(_) => response("500 Internal Server Error", "text/plain", "encoding failed\n"),
        }
    } else {
        response("404 Not Found", "text/plain", "only GET /metrics is served here\n")
    }
}

fn response(status: &str, content_type: &str, body: &str) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// Serves until the listener fails for good. Run it on a thread of its own.
pub fn serve(listener: TcpListener, registry: Arc<Registry>) {
    let active = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "metrics accept failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::AcqRel);
            continue; // closed: busy
        }
        let mut stream = stream;
        let (registry, done) = (registry.clone(), active.clone());
        let spawned = std::thread::Builder::new().name("metrics-conn".into()).stack_size(128 * 1024).spawn(move || {
            if let Err(e) = answer(&mut stream, &registry) {
                tracing::debug!(error = %e, "metrics request failed");
            }
            done.fetch_sub(1, Ordering::AcqRel);
        });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

fn answer(stream: &mut TcpStream, registry: &Registry) -> std::io::Result<()> {
    let deadline = Instant::now() + TIMEOUT;
    let left = || deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero());
    let timed_out = || std::io::Error::from(std::io::ErrorKind::TimedOut);
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        stream.set_read_timeout(Some(left().ok_or_else(timed_out)?))?;
        let n = stream.read(&mut chunk)?;
        if n == 0 || head.len() + n > MAX_REQUEST {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let out = respond(&head, registry);
    stream.set_write_timeout(Some(left().ok_or_else(timed_out)?))?;
    stream.write_all(&out)?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    fn registry() -> Arc<Registry> {
        let mut r = Registry::default();
        let c: Counter = Counter::default();
        c.inc_by(7);
        r.register("things", "things seen", c);
        Arc::new(r)
    }

    #[test]
    fn get_metrics_answers_the_registry_and_nothing_else_is_served() {
        let r = registry();
        let ok = String::from_utf8(respond(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n", &r)).unwrap();
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains(OPENMETRICS) && ok.contains("things_total 7") && ok.ends_with("# EOF\n"), "{ok}");
        let body_len = ok.len() - ok.find("\r\n\r\n").unwrap() - 4;
        assert!(ok.contains(&format!("Content-Length: {body_len}\r\n")));
        for head in
            [&b"POST /metrics HTTP/1.1\r\n\r\n"[..], b"GET / HTTP/1.1\r\n\r\n", b"GET /metricsx HTTP/1.1\r\n\r\n", b""]
        {
            let no = String::from_utf8(respond(head, &r)).unwrap();
            assert!(no.starts_with("HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\n"), "{no}");
        }
    }

    /// A scrape's answer ("" when the connection was closed or reset).
    fn get(port: u16) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut out = String::new();
        if s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").is_ok() && s.read_to_string(&mut out).is_err() {
            out.clear();
        }
        out
    }

    #[test]
    fn silent_clients_neither_stop_scrapes_nor_pile_up() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || serve(listener, registry()));
        // Clients that connect and send nothing, up to the cap: a scrape
        // beside them is answered at once.
        let silent: Vec<TcpStream> =
            (0..MAX_CONNECTIONS - 1).map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
        assert!(get(port).starts_with("HTTP/1.1 200 OK"));
        // One more silent one takes the last place; the next is closed.
        let last = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(3);
        while !get(port).is_empty() {
            assert!(Instant::now() < deadline, "never busy");
        }
        // Gone silent clients free their places.
        drop(silent);
        drop(last);
        let deadline = Instant::now() + Duration::from_secs(3);
        while !get(port).starts_with("HTTP/1.1 200 OK") {
            assert!(Instant::now() < deadline, "places never freed");
        }
        // An over-long head is dropped without an answer.
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _ = s.write_all(&vec![b'a'; MAX_REQUEST + 10]);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        assert!(out.is_empty());
    }
}
