//! Packet captures with tcpdump, read back from pcap files.

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{netns::Netns, unique_id};

/// tcpdump running on an interface of a namespace; frames on `stop`.
pub struct Capture {
    child: Option<Child>,
    file: PathBuf,
}

impl Capture {
    /// Starts capturing on `iface` in `ns` with a pcap `filter`; returns
    /// once tcpdump listens.
    pub fn start(ns: &Netns, iface: &str, filter: &str) -> anyhow::Result<Capture> {
        let file = std::env::temp_dir().join(format!("xlb-capture-{:06x}.pcap", unique_id()));
        // --immediate-mode: otherwise packets still in the kernel's current
        // ring block when tcpdump stops are never written.
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                "tcpdump",
                "-U",
                "--immediate-mode",
                "-n",
                "-B",
                "32768",
                "-i",
                iface,
                "-w",
            ])
            .arg(&file)
            .arg(filter)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start tcpdump")?;
        let stderr = child.stderr.take().expect("piped");
        let mut lines = BufReader::new(stderr).lines();
        let deadline = Instant::now() + Duration::from_secs(10);
        let capture = Capture { child: Some(child), file };
        loop {
            match lines.next() {
                Some(Ok(line)) if line.contains("listening on") => break,
                Some(Ok(_)) => {}
                _ => bail!("tcpdump did not start"),
            }
            if Instant::now() > deadline {
                bail!("tcpdump did not start in time");
            }
        }
        // Keep draining stderr so tcpdump never blocks on it.
        std::thread::spawn(move || lines.for_each(drop));
        Ok(capture)
    }

    /// Stops tcpdump and returns the captured frames (link-layer included).
    pub fn stop(mut self) -> anyhow::Result<Vec<Vec<u8>>> {
        self.terminate();
        read_pcap(&std::fs::read(&self.file)?)
    }

    fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill on our own child; SIGINT lets tcpdump flush.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            let _ = child.wait();
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.terminate();
        let _ = std::fs::remove_file(&self.file);
    }
}

/// Frames of a pcap file (classic format, either byte order).
pub fn read_pcap(bytes: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
    if bytes.len() < 24 {
        bail!("pcap file too short");
    }
    let swapped = match bytes[..4] {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => false,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => true,
        _ => bail!("not a pcap file"),
    };
    let u32_at = |b: &[u8]| {
        let a = [b[0], b[1], b[2], b[3]];
        if swapped { u32::from_be_bytes(a) } else { u32::from_le_bytes(a) }
    };
    let mut frames = Vec::new();
    let mut off = 24;
    while off + 16 <= bytes.len() {
        let len = u32_at(&bytes[off + 8..]) as usize;
        let start = off + 16;
        let Some(frame) = bytes.get(start..start + len) else { bail!("truncated pcap record") };
        frames.push(frame.to_vec());
        off = start + len;
    }
    Ok(frames)
}
