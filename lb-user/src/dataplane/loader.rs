//! Loading program `xlb`, pinning its maps and its XDP link, adopting what
//! an earlier run pinned, and removing it all again.
//!
//! Everything lives under one pin directory per interface. A link pinned
//! there keeps the program attached after the daemon exits; a later
//! `xlb run` swaps its program in place through that link (no moment
//! without a program), and `xlb detach` removes the directory.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        ProgramError, Xdp,
        links::{FdLink, LinkError, PinnedLink},
        xdp::XdpLink,
    },
};
use lb_common::{LAYOUT_VERSION, Meta, conn_sets, globals, maps};

use super::{
    kernel::{KernelCounters, KernelStore},
    maps::{Maps, maglev_entries, table_chunks},
    store::DataplaneError,
};
use crate::{
    config::{Capacities, StartConfig},
    model::{Attachment, XdpMode},
    net::Interface,
};

/// The object file with program `xlb`, built by build.rs.
pub static XLB_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

pub const PROGRAM: &str = "xlb";
pub const LINK_PIN: &str = "link";
/// statfs magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where bpffs lives by convention.
const BPFFS_ROOT: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("cannot create pin directory {path}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not on a BPF filesystem; pin_dir must be on bpffs (see `mount -t bpf`)")]
    NotBpffs { path: PathBuf },
    #[error("cannot mount bpffs at {BPFFS_ROOT}")]
    Mount(#[source] std::io::Error),
    #[error("cannot draw the connection table's seed from the kernel's random source")]
    Seed(#[source] std::io::Error),
    #[error(
        "another `xlb run` holds {path}: two daemons on one data plane would undo each other's writes; \
         stop the other one first"
    )]
    Busy { path: PathBuf },
    #[error(
        "{path} holds maps from another xlb version or configuration ({found}; this run needs {wanted}); \
         restore the old settings, or run `xlb detach --pin-dir {path}` to start afresh (drops live flows' state)"
    )]
    Incompatible { path: PathBuf, found: String, wanted: String },
    #[error("cannot load the XDP object")]
    Load(#[source] aya::EbpfError),
    #[error("the kernel rejected program `xlb`")]
    Verify(#[source] ProgramError),
    #[error(
        "cannot attach to {interface} in {mode} mode (does it already have another XDP program? `ip link show {interface}` tells)"
    )]
    Attach {
        interface: String,
        mode: Attachment,
        #[source]
        source: ProgramError,
    },
    #[error("cannot replace the program behind the pinned link {path}")]
    Replace {
        path: PathBuf,
        #[source]
        source: ProgramError,
    },
    #[error("cannot pin the XDP link at {path}")]
    PinLink {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot use the pinned link {path}")]
    Link {
        path: PathBuf,
        #[source]
        source: LinkError,
    },
    #[error("cannot remove {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
}

/// A loaded, attached data plane.
pub struct Dataplane {
    pub maps: Maps<KernelStore>,
    pub counters: KernelCounters,
    pub attachment: Attachment,
    /// Whether an earlier run's pinned state was adopted.
    pub adopted: bool,
    pub program: Loaded,
}

/// The loaded program and the pin directory's lock: held while this
/// daemon writes the maps (the pinned link keeps the program attached
/// beyond it).
pub struct Loaded {
    _ebpf: Ebpf,
    _lock: fs::File,
}

/// What program `xlb` is loaded with; changing any of it needs a restart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    pub capacities: Capacities,
    /// Connection-table inserts per CPU per second; 0 for no limit.
    pub conn_insert_limit: u64,
    /// TUN mode's outer source addresses (unspecified when unused).
    pub tun_source_v4: Ipv4Addr,
    pub tun_source_v6: Ipv6Addr,
}

impl Params {
    /// Parameters for `start`, with TUN sources from the config or else
    /// the interface's addresses.
    pub fn new(start: &StartConfig, iface_v4: Option<Ipv4Addr>, iface_v6: Option<Ipv6Addr>) -> Self {
        Params {
            capacities: start.capacities,
            conn_insert_limit: start.conntrack_insert_limit,
            tun_source_v4: start.tun_source_v4.or(iface_v4).unwrap_or(Ipv4Addr::UNSPECIFIED),
            tun_source_v6: start.tun_source_v6.or(iface_v6).unwrap_or(Ipv6Addr::UNSPECIFIED),
        }
    }

    /// Parameters with no flood guard and no TUN sources (tests, benchmarks).
    pub fn plain(capacities: Capacities) -> Self {
        Params {
            capacities,
            conn_insert_limit: 0,
            tun_source_v4: Ipv4Addr::UNSPECIFIED,
            tun_source_v6: Ipv6Addr::UNSPECIFIED,
        }
    }

    /// The source address TUN packets of `ip`'s family carry, if any.
    pub fn tun_source_for(&self, ip: IpAddr) -> Option<IpAddr> {
        let source: IpAddr = if ip.is_ipv4() { self.tun_source_v4.into() } else { self.tun_source_v6.into() };
        (!source.is_unspecified()).then_some(source)
    }
}

/// `META`'s stamp for maps of `caps` made by this build, whose connection
/// table has seed `conntrack_seed`.
pub fn meta(caps: &Capacities, conntrack_seed: u32) -> Meta {
    Meta {
        layout: LAYOUT_VERSION,
        table_size: caps.table_size,
        max_vips: caps.max_vips,
        max_backends: caps.max_backends,
        conntrack_size: caps.conntrack_size,
        conntrack_seed,
    }
}

/// A new connection table's seed: a random odd number, from the kernel's
/// random source (which may block early in boot until it is ready).
fn new_seed() -> Result<u32, LoaderError> {
    let mut seed = [0u8; 4];
    let mut filled = 0;
    while filled < seed.len() {
        let rest = &mut seed[filled..];
        // SAFETY: writes at most `rest.len()` bytes into `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        let error = std::io::Error::last_os_error();
        match n {
            n if n > 0 => filled += n as usize,
            n if n < 0 && error.kind() == std::io::ErrorKind::Interrupted => {}
            _ => return Err(LoaderError::Seed(error)),
        }
    }
    Ok(u32::from_ne_bytes(seed) | 1)
}

/// The capacities `META` records.
pub fn capacities(meta: &Meta) -> Capacities {
    Capacities {
        table_size: meta.table_size,
        max_vips: meta.max_vips,
        max_backends: meta.max_backends,
        conntrack_size: meta.conntrack_size,
    }
}

/// Loads and attaches program `xlb` to `iface`, adopting maps and link
/// pinned under `pin_dir` when they are compatible.
pub fn load(
    iface: &Interface,
    pin_dir: &Path,
    params: Params,
    mode: XdpMode,
) -> Result<Dataplane, LoaderError> {
    let caps = params.capacities;
    prepare_pin_dir(pin_dir)?;
    let lock = lock_pin_dir(pin_dir)?;
    let pinned = check_pinned(pin_dir, caps)?;
    let adopted = pinned.is_some();
    // An adopted table keeps its seed: its records are where it put them.
    let seed = match pinned {
        Some(meta) => meta.conntrack_seed,
        None => new_seed()?,
    };

    let mut ebpf = load_program(Some(pin_dir), params, iface.mac, seed)?;
    // Stamped at once: pins left by a start that fails later are still
    // recognised as ours.
    let (mut store, counters) = KernelStore::take(&mut ebpf, seed)?;
    store.set_meta(&meta(&caps, seed))?;

    let program: &mut Xdp = ebpf.program_mut(PROGRAM).expect("loaded").try_into().expect("XDP");
    let attachment = attach(program, iface, &pin_dir.join(LINK_PIN), mode)?;
    let program = Loaded { _ebpf: ebpf, _lock: lock };
    Ok(Dataplane { maps: Maps::new(store, caps), counters, attachment, adopted, program })
}

/// Takes `pin_dir`'s exclusive lock (flock on the directory: released when
/// the process ends, however it ends).
fn lock_pin_dir(pin_dir: &Path) -> Result<fs::File, LoaderError> {
    use std::os::fd::AsRawFd as _;
    let dir =
        fs::File::open(pin_dir).map_err(|source| LoaderError::PinDir { path: pin_dir.to_owned(), source })?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(LoaderError::Busy { path: pin_dir.to_owned() });
    }
    Ok(dir)
}

/// Loads program `xlb` with unpinned maps and attaches it nowhere: for
/// BPF_PROG_TEST_RUN in tests and benchmarks. The program is
/// `ebpf.program_mut(PROGRAM)`.
pub fn load_detached(
    params: Params,
    iface_mac: [u8; 6],
) -> Result<(Ebpf, Maps<KernelStore>, KernelCounters), LoaderError> {
    let seed = new_seed()?;
    let mut ebpf = load_program(None, params, iface_mac, seed)?;
    let (mut store, counters) = KernelStore::take(&mut ebpf, seed)?;
    store.set_meta(&meta(&params.capacities, seed))?;
    Ok((ebpf, Maps::new(store, params.capacities), counters))
}

/// Sizes the maps (pinned under `pin_dir` if given), sets the globals, and
/// loads program `xlb` into the kernel.
fn load_program(
    pin_dir: Option<&Path>,
    params: Params,
    iface_mac: [u8; 6],
    conntrack_seed: u32,
) -> Result<Ebpf, LoaderError> {
    let Params { capacities: caps, conn_insert_limit, tun_source_v4, tun_source_v6 } = params;
    let (tun_v4, tun_v6) = (tun_source_v4.octets(), tun_source_v6.octets());
    let pins: Vec<(&str, PathBuf)> = match pin_dir {
        Some(dir) => maps::ALL.iter().map(|m| (*m, dir.join(m))).collect(),
        None => Vec::new(),
    };
    let chunks = table_chunks(&caps);
    let conntrack_sets = conn_sets(caps.conntrack_size);
    let mut loader = EbpfLoader::new();
    for (name, path) in &pins {
        loader.map_pin_path(name, path.as_path());
    }
    loader
        .map_max_entries(maps::VIPS, caps.max_vips)
        .map_max_entries(maps::VIP_STATS, caps.max_vips)
        .map_max_entries(maps::BACKENDS, caps.max_backends)
        .map_max_entries(maps::BACKEND_STATS, caps.max_backends)
        .map_max_entries(maps::MAGLEV, maglev_entries(&caps))
        .map_max_entries(maps::CONNTRACK, conntrack_sets)
        .override_global(globals::CONNTRACK_SETS, &conntrack_sets, true)
        .override_global(globals::CONNTRACK_SEED, &conntrack_seed, true)
        .override_global(globals::TABLE_SIZE, &caps.table_size, true)
        .override_global(globals::TABLE_CHUNKS, &chunks, true)
        .override_global(globals::IFACE_MAC, &iface_mac, true)
        .override_global(globals::CONN_INSERT_LIMIT, &conn_insert_limit, true)
        .override_global(globals::TUN_SRC_V4, &tun_v4, true)
        .override_global(globals::TUN_SRC_V6, &tun_v6, true);
    let mut ebpf = loader.load(XLB_OBJECT).map_err(LoaderError::Load)?;
    let program: &mut Xdp = ebpf
        .program_mut(PROGRAM)
        .expect("the object defines program xlb")
        .try_into()
        .expect("program xlb is an XDP program");
    program.load().map_err(LoaderError::Verify)?;
    Ok(ebpf)
}

/// Swaps the program in through a pinned link on the same interface, or
/// attaches afresh and pins the new link.
pub(crate) fn attach(
    program: &mut Xdp,
    iface: &Interface,
    link_pin: &Path,
    mode: XdpMode,
) -> Result<Attachment, LoaderError> {
    if link_pin.exists() {
        let pinned = PinnedLink::from_pin(link_pin)
            .map_err(|source| LoaderError::Link { path: link_pin.to_owned(), source })?;
        let fd_link = FdLink::from(pinned);
        // The link still carries the program attached to this interface;
        // otherwise the interface it was attached to is gone.
        let program_id = fd_link.info().map(|i| i.program_id()).ok();
        if program_id.is_some() && program_id == iface.xdp_prog_id {
            let link = XdpLink::try_from(fd_link)
                .map_err(|source| LoaderError::Link { path: link_pin.to_owned(), source })?;
            program
                .attach_to_link(link)
                .map_err(|source| LoaderError::Replace { path: link_pin.to_owned(), source })?;
            return Ok(Attachment::ExistingLink);
        }
        fs::remove_file(link_pin)
            .map_err(|source| LoaderError::Remove { path: link_pin.to_owned(), source })?;
    }
    use aya::programs::XdpMode as Flags;
    let attempts: &[(Flags, Attachment)] = match mode {
        XdpMode::Auto => &[(Flags::Driver, Attachment::Native), (Flags::Skb, Attachment::Generic)],
        XdpMode::Native => &[(Flags::Driver, Attachment::Native)],
        XdpMode::Generic => &[(Flags::Skb, Attachment::Generic)],
    };
    let mut result = Err(None);
    for &(flags, name) in attempts {
        match program.attach_to_if_index(iface.index, flags) {
            Ok(id) => {
                result = Ok((id, name));
                break;
            }
            Err(source) => {
                tracing::debug!(interface = %iface.name, mode = %name, error = %source, "attach failed");
                result = Err(Some(LoaderError::Attach { interface: iface.name.clone(), mode: name, source }));
            }
        }
    }
    let (id, name) = result.map_err(|e| e.expect("at least one attach mode is tried"))?;
    let pin_err = |source: Box<dyn std::error::Error + Send + Sync>| LoaderError::PinLink {
        path: link_pin.to_owned(),
        source,
    };
    let link = program.take_link(id).map_err(|e| pin_err(e.into()))?;
    let fd_link = FdLink::try_from(link).map_err(|e| pin_err(e.into()))?;
    fd_link.pin(link_pin).map_err(|e| pin_err(e.into()))?;
    Ok(name)
}

/// Whether `pin_dir` already holds maps, after checking they are ones this
/// build can use with `geometry`.
fn check_pinned(pin_dir: &Path, caps: Capacities) -> Result<Option<Meta>, LoaderError> {
    let any_pinned = maps::ALL.iter().any(|m| pin_dir.join(m).exists());
    if !any_pinned {
        return Ok(None);
    }
    let wanted = describe_layout(LAYOUT_VERSION, caps);
    let incompatible =
        |found: String| LoaderError::Incompatible { path: pin_dir.to_owned(), found, wanted: wanted.clone() };
    let meta = KernelStore::open(pin_dir)
        .and_then(|m| m.meta())
        .map_err(|e| incompatible(format!("unreadable: {e}")))?;
    let found = capacities(&meta);
    if meta.layout != LAYOUT_VERSION || found != caps {
        return Err(incompatible(describe_layout(meta.layout, found)));
    }
    Ok(Some(meta))
}

fn describe_layout(layout: u32, g: Capacities) -> String {
    format!(
        "layout {layout}, table_size {}, max_vips {}, max_backends {}, conntrack_size {}",
        g.table_size, g.max_vips, g.max_backends, g.conntrack_size
    )
}

/// Mounts bpffs at /sys/fs/bpf when nothing has (systemd usually does).
fn ensure_bpffs() -> Result<(), LoaderError> {
    let root = Path::new(BPFFS_ROOT);
    if on_bpffs(root) {
        return Ok(());
    }
    // SAFETY: constant NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(c"bpf".as_ptr(), c"/sys/fs/bpf".as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null())
    };
    if rc != 0 {
        return Err(LoaderError::Mount(std::io::Error::last_os_error()));
    }
    tracing::info!("mounted bpffs at {BPFFS_ROOT}");
    Ok(())
}

fn on_bpffs(path: &Path) -> bool {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we pass; the path is NUL-terminated.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c_path.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Creates `pin_dir` on bpffs (mounting bpffs at /sys/fs/bpf if needed).
pub(crate) fn prepare_pin_dir(pin_dir: &Path) -> Result<(), LoaderError> {
    if pin_dir.starts_with(BPFFS_ROOT) {
        ensure_bpffs()?;
    }
    fs::create_dir_all(pin_dir).map_err(|source| LoaderError::PinDir { path: pin_dir.to_owned(), source })?;
    if !on_bpffs(pin_dir) {
        return Err(LoaderError::NotBpffs { path: pin_dir.to_owned() });
    }
    Ok(())
}

/// Detaches and forgets program `xlb`: see `remove_pins`.
pub fn detach(pin_dir: &Path) -> Result<bool, LoaderError> {
    remove_pins(pin_dir, &maps::ALL)
}

/// Removes one pin, if it is there.
pub(crate) fn remove_pin(path: PathBuf) -> Result<(), LoaderError> {
    match fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(LoaderError::Remove { path, source: e }),
        _ => Ok(()),
    }
}

/// Removes the link pin (which detaches the program) and the pinned `maps`
/// under `pin_dir`. Returns whether there was anything to remove.
pub(crate) fn remove_pins(pin_dir: &Path, maps: &[&str]) -> Result<bool, LoaderError> {
    if !pin_dir.exists() {
        return Ok(false);
    }
    // The link first: once it goes, packets stop reaching the program.
    remove_pin(pin_dir.join(LINK_PIN))?;
    for m in maps {
        remove_pin(pin_dir.join(m))?;
    }
    fs::remove_dir(pin_dir).map_err(|source| LoaderError::Remove { path: pin_dir.to_owned(), source })?;
    // Leave no empty /sys/fs/bpf/xlb* behind; it fails harmlessly if others remain.
    let ours = |p: &&Path| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("xlb"));
    if let Some(parent) = pin_dir.parent().filter(ours) {
        let _ = fs::remove_dir(parent);
    }
    Ok(true)
}
