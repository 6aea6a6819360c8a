//! A TCP proxy in front of a test's redis-server that can stall the
//! subscriptions passing through it, as a congested or half-broken path
//! would: while stalled, nothing the server sends to a connection that
//! subscribed reaches the client (the bytes wait, nothing is lost), and
//! every other connection flows. It can also lose the reply to one
//! request (the request reaches the server, its reply never comes back and
//! the connection drops), as a connection lost at the worst moment would,
//! or hang it (the reply never comes, the connection stays open), as a
//! server that stopped answering one client would.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct StallingProxy {
    pub port: u16,
    stalled: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    /// The next request containing these bytes loses its reply.
    lose_reply: Arc<Mutex<Option<Armed>>>,
}

/// A request to be caught: the bytes it contains, and whether its
/// connection then drops (else it stays open, answering nothing more).
struct Armed {
    needle: Vec<u8>,
    drop_connection: bool,
}

impl StallingProxy {
    /// Listens on a free port, forwarding to 127.0.0.1:`upstream`.
    pub fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a port for the proxy");
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stalled = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let lose_reply = Arc::new(Mutex::new(None));
        let (s, st, lose) = (stalled.clone(), stop.clone(), lose_reply.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        if let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) {
                            forward(client, server, s.clone(), st.clone(), lose.clone());
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self {
            port,
            stalled,
            stop,
            lose_reply,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stalls (or lets flow again) what the server sends to subscriptions.
    pub fn stall_subscriptions(&self, stalled: bool) {
        self.stalled.store(stalled, Ordering::SeqCst);
    }

    /// The next request whose bytes contain `needle` reaches the server,
    /// but its reply (and whatever else that connection was owed) is lost:
    /// the proxy drops the connection instead of answering.
    pub fn lose_the_reply_to(&self, needle: &[u8]) {
        self.arm(needle, true);
    }

    /// The next request whose bytes contain `needle` reaches the server, and
    /// so does everything its connection sends after it, but no reply
    /// reaches the client any more: the connection stays open and hangs.
    pub fn hang_the_reply_to(&self, needle: &[u8]) {
        self.arm(needle, false);
    }

    fn arm(&self, needle: &[u8], drop_connection: bool) {
        *self.lose_reply.lock().unwrap() = Some(Armed {
            needle: needle.to_vec(),
            drop_connection,
        });
    }

    /// Whether that request has come (and lost its reply).
    pub fn reply_lost(&self) -> bool {
        self.lose_reply.lock().unwrap().is_none()
    }
}

impl Drop for StallingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.stalled.store(false, Ordering::SeqCst);
    }
}

/// Copies both ways; the server-to-client direction of a connection that
/// sent a SUBSCRIBE (or PSUBSCRIBE, SSUBSCRIBE) waits while `stalled`.
fn forward(
    client: TcpStream,
    server: TcpStream,
    stalled: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    lose_reply: Arc<Mutex<Option<Armed>>>,
) {
    let subscribed = Arc::new(AtomicBool::new(false));
    let losing = Arc::new(AtomicBool::new(false));
    let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let (to_close, from_close) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let flag = subscribed.clone();
    let lose = losing.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match c_in.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if buf[..n]
                .windows(9)
                .any(|w| w.eq_ignore_ascii_case(b"subscribe"))
            {
                flag.store(true, Ordering::SeqCst);
            }
            let mut armed = lose_reply.lock().unwrap();
            let hit = armed
                .as_ref()
                .is_some_and(|a| buf[..n].windows(a.needle.len()).any(|w| w == &a.needle[..]));
            let mut drop_connection = false;
            if hit {
                drop_connection = armed.take().is_some_and(|a| a.drop_connection);
                // Nothing more reaches the client from here on.
                lose.store(true, Ordering::SeqCst);
            }
            drop(armed);
            if s_out.write_all(&buf[..n]).is_err() {
                break;
            }
            if drop_connection {
                // Time for the server to act on it; then the connection drops.
                std::thread::sleep(Duration::from_millis(300));
                let _ = to_close.shutdown(Shutdown::Both);
                let _ = from_close.shutdown(Shutdown::Both);
                break;
            }
        }
        let _ = s_out.shutdown(Shutdown::Write);
    });
    let (mut s_in, mut c_out) = (server, client);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            while stalled.load(Ordering::SeqCst)
                && subscribed.load(Ordering::SeqCst)
                && !stop.load(Ordering::SeqCst)
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            let n = match s_in.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if losing.load(Ordering::SeqCst) {
                continue;
            }
            if c_out.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = c_out.shutdown(Shutdown::Both);
    });
}
