//! Frames as fast as one thread can hand them to the kernel: a raw packet
//! socket in a test's namespace. Blocking sends wait for room instead of
//! failing, so the count sent is exact and the rate is what the path takes.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::netns::Netns;

/// A flood never runs longer than this, whatever the count.
const LIMIT: Duration = Duration::from_secs(60);

/// What a flood sent.
#[derive(Clone, Copy, Debug)]
pub struct Sent {
    pub frames: u64,
    pub took: Duration,
}

impl Sent {
    /// Thousands of frames per second.
    pub fn kpps(&self) -> f64 {
        self.frames as f64 / self.took.as_secs_f64() / 1e3
    }
}

/// Sends `count` frames out of `dev` in `ns`; `frame(i, buf)` fills `buf`
/// with the i-th (Ethernet header included).
pub fn send(
    ns: &Netns,
    dev: &str,
    count: u64,
    mut frame: impl FnMut(u64, &mut Vec<u8>) + Send,
) -> anyhow::Result<Sent> {
    ns.run(|| {
        let socket = Socket::bound(dev)?;
        let mut buf = Vec::with_capacity(2048);
        let started = Instant::now();
        for i in 0..count {
            buf.clear();
            frame(i, &mut buf);
            socket.send(&buf).with_context(|| format!("sending frame {i} of {count}"))?;
            if i % 4096 == 0 && started.elapsed() > LIMIT {
                bail!("only {i} of {count} frames sent in {LIMIT:?}");
            }
        }
        Ok(Sent { frames: count, took: started.elapsed() })
    })
}

/// An AF_PACKET socket bound to one interface (protocol 0: it receives
/// nothing).
struct Socket(libc::c_int);

impl Socket {
    fn bound(dev: &str) -> anyhow::Result<Socket> {
        let name = std::ffi::CString::new(dev)?;
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            bail!("no interface {dev}: {}", std::io::Error::last_os_error());
        }
        // SAFETY: plain socket creation.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if fd < 0 {
            bail!("packet socket: {}", std::io::Error::last_os_error());
        }
        let socket = Socket(fd);
        // SAFETY: sockaddr_ll is plain data; all zero is a valid start.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: addr is a sockaddr_ll of the size given.
        let rc = unsafe {
            libc::bind(
                fd,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            bail!("bind to {dev}: {}", std::io::Error::last_os_error());
        }
        Ok(socket)
    }

    /// Blocks while the device queue is full; a moment's ENOBUFS (the
    /// queue momentarily out of buffers despite the blocking write) is
    /// waited out, so the count stays exact.
    fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        let mut tries = 0;
        loop {
            // SAFETY: the buffer outlives the call.
            let n = unsafe { libc::send(self.0, frame.as_ptr().cast(), frame.len(), 0) };
            if n >= 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOBUFS) || tries == 1000 {
                return Err(e);
            }
            tries += 1;
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: our own descriptor, closed once.
        unsafe { libc::close(self.0) };
    }
}
