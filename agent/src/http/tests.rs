//! Loopback tests of the client: a real TLS server (and CONNECT proxy) on
//! threads, misbehaving on purpose.
use super::target::base64;
use super::*;
use std::sync::{Arc, Mutex};

use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};

struct Pki {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

fn pki() -> Pki {
    super::init_crypto();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert = ck.cert.der().clone();
    let key = rustls::pki_types::PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()).into();
    let server =
        rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(vec![cert.clone()], key).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let client = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    Pki { server: Arc::new(server), client: Arc::new(client) }
}

/// What the test server does with the n-th request of a connection.
#[derive(Clone, Copy)]
enum Act {
    /// Answer 200 with the request body, keep the connection.
    Echo,
    /// Answer, then close without telling.
    EchoThenDrop,
    /// Send half a status line, then close.
    Half,
    /// Answer, then a moment later a second, unasked-for answer in a
    /// TLS record of its own; keep the connection.
    EchoThenExtra,
    /// Answer the head at once, then the body one byte every 200 ms.
    TrickleBody,
    /// Send the head one byte every 200 ms.
    TrickleHead,
    /// Read the body at about 1.6 MB/s (a 4 KiB receive buffer), then
    /// answer 200 with an empty body.
    SlowRead,
}

struct Server {
    addr: std::net::SocketAddr,
    conns: Arc<AtomicUsize>,
    reqs: Arc<Mutex<Vec<String>>>,
}

fn server(pki: &Pki, act: Act) -> Server {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    if let Act::SlowRead = act {
        nix::sys::socket::setsockopt(&l, nix::sys::socket::sockopt::RcvBuf, &4096).unwrap();
    }
    let addr = l.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let reqs = Arc::new(Mutex::new(Vec::new()));
    let (cfg, c2, r2) = (pki.server.clone(), conns.clone(), reqs.clone());
    std::thread::spawn(move || {
        for tcp in l.incoming().flatten() {
            c2.fetch_add(1, Ordering::SeqCst);
            let (cfg, reqs) = (cfg.clone(), r2.clone());
            std::thread::spawn(move || {
                let conn = rustls::ServerConnection::new(cfg).unwrap();
                let mut s = BufReader::new(rustls::StreamOwned::new(conn, tcp));
                loop {
                    let mut head = String::new();
                    loop {
                        let mut line = String::new();
                        if s.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        head.push_str(&line);
                    }
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .map(|v| v.parse().unwrap())
                        .unwrap_or(0);
                    let mut body = vec![0; len];
                    if let Act::SlowRead = act {
                        for chunk in body.chunks_mut(16 << 10) {
                            std::thread::sleep(Duration::from_millis(10));
                            if s.read_exact(chunk).is_err() {
                                return;
                            }
                        }
                        let _ = s.get_mut().write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
                        let _ = s.get_mut().flush();
                        continue;
                    }
                    s.read_exact(&mut body).unwrap();
                    reqs.lock().unwrap().push(head);
                    let w = s.get_mut();
                    match act {
                        Act::Half => {
                            let _ = w.write_all(b"HTTP/1.1 2");
                            let _ = w.flush();
                            return;
                        }
                        Act::SlowRead => {}
                        Act::Echo | Act::EchoThenDrop | Act::EchoThenExtra => {
                            let _ = write!(w, "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n");
                            let _ = w.write_all(&body);
                            let _ = w.flush();
                        }
                        Act::TrickleBody | Act::TrickleHead => {
                            let head = "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n";
                            if let Act::TrickleBody = act {
                                let _ = w.write_all(head.as_bytes());
                            }
                            let bytes = if let Act::TrickleHead = act { head.as_bytes() } else { &[b' '; 1000] };
                            for b in bytes {
                                std::thread::sleep(Duration::from_millis(200));
                                if w.write_all(&[*b]).and_then(|_| w.flush()).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    if let Act::EchoThenExtra = act {
                        std::thread::sleep(Duration::from_millis(50));
                        let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nSTALE");
                        let _ = w.flush();
                    }
                    if let Act::EchoThenDrop = act {
                        w.conn.send_close_notify();
                        let _ = w.flush();
                        return;
                    }
                }
            });
        }
    });
    Server { addr, conns, reqs }
}

fn timeouts() -> Timeouts {
    let s = Duration::from_secs(5);
    Timeouts { connect: s, send: s, head: s, body: s }
}

/// Found in review: an answer followed by extra bytes left the kept-alive
/// connection one answer behind (the next request read "STALE"). A
/// connection with anything unread is now dropped, not reused.
#[test]
fn extra_bytes_after_an_answer_are_never_read_as_the_next_one() {
    let p = pki();
    let s = server(&p, Act::EchoThenExtra);
    let c = client(&p, &format!("https://127.0.0.1:{}", s.addr.port()), None);
    for i in 0..3 {
        let body = format!("{{\"n\":{i}}}");
        assert_eq!(post(&c, &body).unwrap(), (200, body.into_bytes()), "request {i}");
        std::thread::sleep(Duration::from_millis(150));
    }
    assert_eq!(s.conns.load(Ordering::SeqCst), 3, "each connection with extra bytes was dropped");
}

/// Found in review: the timeouts applied to each read, so a server
/// sending a byte every 200 ms held the exchange for as long as it
/// liked. Each phase now has a deadline as a whole.
#[test]
fn a_trickling_peer_cannot_stretch_an_exchange_past_its_deadlines() {
    let p = pki();
    let one = Duration::from_secs(1);
    for (act, phase) in [(Act::TrickleHead, "waiting for the answer"), (Act::TrickleBody, "reading the body")] {
        let s = server(&p, act);
        let c = Https::new(
            Target::parse(&format!("https://127.0.0.1:{}", s.addr.port())).unwrap(),
            None,
            p.client.clone(),
            "t".into(),
            Timeouts { connect: one, send: one, head: one, body: one },
        )
        .unwrap();
        let t0 = Instant::now();
        let e = match post(&c, "{}") {
            Err(Failure::Reach(e)) | Err(Failure::Body(e)) => format!("{e:#}"),
            Ok(_) => panic!("a trickled answer cannot complete in time"),
        };
        let took = t0.elapsed();
        assert!(took < Duration::from_millis(2500), "{phase}: took {took:?}");
        assert!(e.contains("timed out after 1 s") && e.contains(phase), "{e}");
    }
    // The TLS handshake too: a peer that accepts and says nothing.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let conns: Vec<_> = l.incoming().take(1).collect();
        std::thread::sleep(Duration::from_secs(5));
        drop(conns);
    });
    let c = Https::new(
        Target::parse(&format!("https://127.0.0.1:{port}")).unwrap(),
        None,
        p.client.clone(),
        "t".into(),
        Timeouts { connect: one, send: one, head: one, body: one },
    )
    .unwrap();
    let t0 = Instant::now();
    let Err(Failure::Reach(e)) = post(&c, "{}") else { panic!("a silent peer cannot complete a handshake") };
    assert!(t0.elapsed() < Duration::from_millis(2500), "{:?}", t0.elapsed());
    assert!(format!("{e:#}").contains("TLS handshake"), "{e:#}");
}

/// Found in review: the whole request had `send` (30 s) whatever its
/// size, so a 1 MiB results request failed for ever below about 280
/// kbit/s of upload. The deadline now grows by a second per 16 KiB.
#[test]
fn a_large_request_on_a_slow_link_gets_time_in_proportion() {
    let p = pki();
    let s = server(&p, Act::SlowRead);
    let one = Duration::from_secs(1);
    let c = Https::new(
        Target::parse(&format!("https://127.0.0.1:{}", s.addr.port())).unwrap(),
        None,
        p.client.clone(),
        "t".into(),
        // The head's deadline covers what the peer still has to read.
        Timeouts { connect: one, send: one, head: Duration::from_secs(10), body: one },
    )
    .unwrap();
    let body = vec![b' '; 4 << 20];
    let t0 = Instant::now();
    let r = c.post("/api", "application/json", &body, 1 << 20);
    assert!(t0.elapsed() > Duration::from_millis(1500), "the peer read too fast to test: {:?}", t0.elapsed());
    assert_eq!(r.map_err(|e| format!("{e:?}")).map(|a| a.0), Ok(200), "after {:?}", t0.elapsed());
}

fn client(pki: &Pki, url: &str, proxy: Option<Proxy>) -> Https {
    Https::new(Target::parse(url).unwrap(), proxy, pki.client.clone(), "test/1".into(), timeouts()).unwrap()
}

fn post(c: &Https, body: &str) -> Result<(u16, Vec<u8>), Failure> {
    c.post("/api", "application/json", body.as_bytes(), 1 << 20)
}

#[test]
fn one_connection_is_kept_alive() {
    let p = pki();
    let s = server(&p, Act::Echo);
    let c = client(&p, &format!("https://127.0.0.1:{}/pre", s.addr.port()), None);
    for i in 0..3 {
        assert_eq!(post(&c, &format!("{{\"n\":{i}}}")).unwrap(), (200, format!("{{\"n\":{i}}}").into_bytes()));
    }
    assert_eq!(s.conns.load(Ordering::SeqCst), 1, "one TLS handshake for three requests");
    let reqs = s.reqs.lock().unwrap();
    assert!(reqs[0].starts_with("POST /pre/api HTTP/1.1\r\n"), "{}", reqs[0]);
    assert!(reqs[0].contains(&format!("Host: 127.0.0.1:{}\r\n", s.addr.port())), "{}", reqs[0]);
    assert!(reqs[0].contains("User-Agent: test/1\r\n"), "{}", reqs[0]);
}

#[test]
fn a_connection_closed_while_idle_is_replaced_once() {
    let p = pki();
    let s = server(&p, Act::EchoThenDrop);
    let c = client(&p, &format!("https://localhost:{}", s.addr.port()), None);
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(post(&c, "{}").unwrap().0, 200);
    }
    assert_eq!(s.conns.load(Ordering::SeqCst), 3);
    assert_eq!(s.reqs.lock().unwrap().len(), 3, "each request sent once on a fresh connection");
}

#[test]
fn no_retry_once_the_answer_has_started() {
    let p = pki();
    let s = server(&p, Act::Half);
    let c = client(&p, &format!("https://127.0.0.1:{}", s.addr.port()), None);
    let Err(Failure::Reach(e)) = post(&c, "{}") else { panic!("half an answer must fail") };
    assert!(format!("{e:#}").contains("connection ended in the middle of the response headers"), "{e:#}");
    assert_eq!(s.reqs.lock().unwrap().len(), 1);
}

#[test]
fn a_fresh_connection_closed_at_once_is_an_error() {
    let p = pki();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let cfg = p.server.clone();
    std::thread::spawn(move || {
        for tcp in l.incoming().flatten() {
            let conn = rustls::ServerConnection::new(cfg.clone()).unwrap();
            let mut s = rustls::StreamOwned::new(conn, tcp);
            let _ = s.read(&mut [0; 100]); // handshake, then the request
            s.conn.send_close_notify();
            let _ = s.flush();
        }
    });
    let c = client(&p, &format!("https://127.0.0.1:{port}"), None);
    let Err(Failure::Reach(e)) = post(&c, "{}") else { panic!("must fail") };
    assert!(format!("{e:#}").contains(CLOSED_WITHOUT_ANSWER), "{e:#}");
}

#[test]
fn nobody_listening_and_wrong_names() {
    let p = pki();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let Err(Failure::Reach(e)) = post(&client(&p, &format!("https://127.0.0.1:{port}"), None), "{}") else { panic!() };
    let m = format!("{e:#}").to_lowercase();
    assert!(m.contains("cannot connect") && m.contains("refused"), "{m}");
    // The certificate is for localhost and 127.0.0.1, not ::1's name.
    let s = server(&p, Act::Echo);
    let c = client(&p, &format!("https://127.0.0.1:{}", s.addr.port()), None);
    assert!(post(&c, "{}").is_ok());
    let c = Https::new(
        Target { host: "other.invalid".into(), port: s.addr.port(), prefix: String::new() },
        Some(Proxy { host: "127.0.0.1".into(), port: s.addr.port(), auth: None }),
        p.client.clone(),
        "t".into(),
        timeouts(),
    )
    .unwrap();
    // A TLS server is no HTTP proxy: the CONNECT answer is garbage.
    let Err(Failure::Reach(e)) = post(&c, "{}") else { panic!() };
    assert!(format!("{e:#}").contains("answered CONNECT"), "{e:#}");
    // A name the certificate does not carry: the tunnel reaches the
    // right server, and the handshake must refuse it.
    let (pport, seen) = proxy("HTTP/1.1 200 Connection established\r\n\r\n");
    let c = Https::new(
        Target { host: "other.invalid".into(), port: s.addr.port(), prefix: String::new() },
        Some(Proxy { host: "127.0.0.1".into(), port: pport, auth: None }),
        p.client.clone(),
        "t".into(),
        timeouts(),
    )
    .unwrap();
    let Err(Failure::Reach(e)) = post(&c, "{}") else { panic!("a wrong name must not be reached") };
    let m = format!("{e:#}");
    assert!(m.contains("certificate") && m.contains("other.invalid"), "{m}");
    assert!(seen.lock().unwrap()[0].starts_with("CONNECT other.invalid:"), "the tunnel was not opened");
}

/// A CONNECT proxy: checks the request, then relays both ways.
fn proxy(answer: &'static str) -> (u16, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    std::thread::spawn(move || {
        for tcp in l.incoming().flatten() {
            let mut rd = BufReader::new(tcp.try_clone().unwrap());
            let mut head = String::new();
            while rd.read_line(&mut head).unwrap_or(0) > 2 {}
            s2.lock().unwrap().push(head.clone());
            (&tcp).write_all(answer.as_bytes()).unwrap();
            if !answer.starts_with("HTTP/1.1 200") {
                continue;
            }
            // Every name is this machine's loopback: the port decides.
            let to = head.split(' ').nth(1).unwrap().to_string();
            let up = TcpStream::connect(("127.0.0.1", to.rsplit(':').next().unwrap().parse::<u16>().unwrap())).unwrap();
            let (mut a, mut b) = (up.try_clone().unwrap(), tcp.try_clone().unwrap());
            std::thread::spawn(move || io::copy(&mut b, &mut a));
            let (mut a, mut b) = (up, tcp);
            std::thread::spawn(move || io::copy(&mut a, &mut b));
        }
    });
    (port, seen)
}

#[test]
fn through_a_connect_proxy() {
    let p = pki();
    let s = server(&p, Act::Echo);
    let (pport, seen) = proxy("HTTP/1.1 200 Connection established\r\n\r\n");
    let px = Proxy::parse(&format!("http://user:pa%3Ass@127.0.0.1:{pport}")).unwrap();
    let c = client(&p, &format!("https://localhost:{}", s.addr.port()), Some(px));
    for _ in 0..2 {
        assert_eq!(post(&c, "{\"via\":\"proxy\"}").unwrap(), (200, b"{\"via\":\"proxy\"}".to_vec()));
    }
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1, "the tunnel is kept alive");
    let to = format!("localhost:{}", s.addr.port());
    assert!(seen[0].starts_with(&format!("CONNECT {to} HTTP/1.1\r\nHost: {to}\r\n")), "{}", seen[0]);
    assert!(seen[0].contains(&format!("Proxy-Authorization: Basic {}\r\n", base64(b"user:pa:ss"))), "{}", seen[0]);
    assert_eq!(s.conns.load(Ordering::SeqCst), 1);

    let (pport, seen) = proxy("HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n");
    let px = Proxy { host: "127.0.0.1".into(), port: pport, auth: None };
    let c = client(&p, &format!("https://localhost:{}", s.addr.port()), Some(px));
    let Err(Failure::Reach(e)) = post(&c, "{}") else { panic!() };
    let m = format!("{e:#}");
    assert!(m.contains("refused to open a tunnel") && m.contains("407"), "{m}");
    // The target's port goes into CONNECT even when it is 443.
    let c = client(&p, "https://[::1]", Some(Proxy { host: "127.0.0.1".into(), port: pport, auth: None }));
    assert!(post(&c, "{}").is_err());
    assert!(seen.lock().unwrap()[1].starts_with("CONNECT [::1]:443 HTTP/1.1\r\nHost: [::1]:443\r\n"));
}
