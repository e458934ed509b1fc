//! A TCP fault proxy for tests: sits between two nodes and can delay, drop, blackhole and
//! cut their connections, including in the middle of a frame.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the proxy does to traffic right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything.
    Pass,
    /// Forward everything, each chunk after this delay.
    Delay(Duration),
    /// Accept and keep connections but forward nothing (a partition that TCP does not see).
    Blackhole,
    /// Close new connections at once; existing ones are cut.
    Drop,
    /// Forward only the first `n` bytes of the next chunk from upstream, then cut the
    /// connection: a frame torn in the middle.
    CutAfter(usize),
}

struct State {
    fault: Fault,
    conns: Vec<TcpStream>,
}

/// A running proxy. Dropping it stops accepting (open connections are cut).
pub struct FaultProxy {
    /// Where to connect instead of the upstream.
    pub addr: SocketAddr,
    upstream: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` on `127.0.0.1:port` (0 picks one).
    pub fn start(upstream: SocketAddr, port: u16) -> FaultProxy {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let state = Arc::new(Mutex::new(State {
            fault: Fault::Pass,
            conns: Vec::new(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        std::thread::spawn(move || {
            while !sp.load(Ordering::Relaxed) {
                let (down, _) = match listener.accept() {
                    Ok(c) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                let _ = down.set_nonblocking(false);
                if st.lock().unwrap().fault == Fault::Drop {
                    let _ = down.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(up) = TcpStream::connect(upstream) else {
                    let _ = down.shutdown(Shutdown::Both);
                    continue;
                };
                let _ = up.set_nodelay(true);
                let _ = down.set_nodelay(true);
                {
                    let mut s = st.lock().unwrap();
                    s.conns.push(down.try_clone().unwrap());
                    s.conns.push(up.try_clone().unwrap());
                }
                pipe(
                    up.try_clone().unwrap(),
                    down.try_clone().unwrap(),
                    st.clone(),
                    true,
                );
                pipe(down, up, st.clone(), false);
            }
        });
        FaultProxy {
            addr,
            upstream,
            state,
            stop,
        }
    }

    /// Changes the fault; `Drop` also cuts every open connection.
    pub fn set(&self, fault: Fault) {
        let mut s = self.state.lock().unwrap();
        s.fault = fault;
        if fault == Fault::Drop {
            for c in s.conns.drain(..) {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
    }

    /// Cuts every open connection now (new ones are accepted per the current fault).
    pub fn cut_all(&self) {
        let mut s = self.state.lock().unwrap();
        for c in s.conns.drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.cut_all();
    }
}

/// Copies `from` → `to` on its own thread, applying the fault to each chunk.
/// `from_upstream` says which direction this is (`CutAfter` tears upstream's frames).
fn pipe(mut from: TcpStream, mut to: TcpStream, state: Arc<Mutex<State>>, from_upstream: bool) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            loop {
                let fault = state.lock().unwrap().fault;
                match fault {
                    Fault::Pass => break,
                    Fault::Delay(d) => {
                        std::thread::sleep(d);
                        break;
                    }
                    Fault::Blackhole => std::thread::sleep(Duration::from_millis(10)),
                    Fault::Drop => {
                        let _ = to.shutdown(Shutdown::Both);
                        let _ = from.shutdown(Shutdown::Both);
                        return;
                    }
                    Fault::CutAfter(k) if from_upstream => {
                        let _ = to.write_all(&buf[..k.min(n)]);
                        state.lock().unwrap().fault = Fault::Pass;
                        let _ = to.shutdown(Shutdown::Both);
                        let _ = from.shutdown(Shutdown::Both);
                        return;
                    }
                    Fault::CutAfter(_) => break,
                }
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}
