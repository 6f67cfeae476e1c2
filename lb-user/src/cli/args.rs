//! The whole command line. Doc comments here are the `--help` text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::model::XdpMode;

/// xlb: an XDP layer-4 load balancer.
///
/// xlb balances TCP and UDP flows addressed to virtual IPs (VIPs) across
/// backends with Maglev consistent hashing, in an XDP program on the
/// interface that receives them. In DR (direct routing) mode it rewrites
/// the destination MAC to the chosen backend's and sends the frame back
/// out; each backend holds the VIP on a loopback and answers clients
/// directly.
///
/// Start with `xlb check --config xlb.toml`, then `xlb run --config xlb.toml`
/// (as root), and watch it with `xlb status` from another shell.
#[derive(Debug, Parser)]
#[command(name = "xlb", version, propagate_version = true, max_term_width = 100)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,

    /// More log detail (-v debug, -vv trace). RUST_LOG, when set, wins.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach to the configured interface and keep the data plane in step
    /// with the config file.
    ///
    /// Loads program `xlb`, pins it and its maps under the pin directory
    /// (default /sys/fs/bpf/xlb/<interface>), resolves every backend's MAC
    /// through the kernel's neighbour table, and writes the Maglev tables.
    /// Edits to the file (or SIGHUP) apply live; a file that fails
    /// validation is reported and the running config stays in force.
    ///
    /// On exit (SIGINT, SIGTERM) the program stays attached and keeps
    /// forwarding with the last tables; a later `xlb run` adopts them
    /// without interrupting traffic. Use --detach-on-exit or `xlb detach`
    /// to remove it.
    #[command(after_long_help = CONFIG_EXAMPLE)]
    Run(RunArgs),
    /// Validate a config file without touching the data plane.
    #[command(after_long_help = CONFIG_EXAMPLE)]
    Check(CheckArgs),
    /// Show VIPs, backends, health, table shares and counters: from the
    /// daemon's admin API, or from the pinned maps while it is down (the
    /// output says which).
    Status(StatusArgs),
    /// Packets and bits per second per VIP and backend, sampled over an
    /// interval; --watch refreshes in place.
    Stats(StatsArgs),
    /// Stop new flows to a backend of a VIP; established flows continue.
    /// Needs the running daemon (admin API). Survives restarts.
    Drain(BackendArgs),
    /// Undo `xlb drain`.
    Undrain(BackendArgs),
    /// Change the weight of a statically configured backend until the
    /// config says otherwise (an override, like drain).
    Weight(WeightArgs),
    /// Withdraw every VIP of this node from BGP for maintenance, or
    /// announce them again.
    ///
    /// `off` removes the node's VIP routes from the announce table (BIRD
    /// withdraws them, routers move flows to the other nodes), then waits
    /// `announce.withdraw_wait` before returning, so the node is idle when
    /// the command ends; forwarding goes on meanwhile. `on` announces again
    /// every VIP that can serve. Survives restarts. Needs the running daemon
    /// and an `[announce]` section.
    Announce(AnnounceArgs),
    /// Detach program `xlb` and remove its pinned maps and link.
    Detach(TargetArgs),
    /// The backend side of TUN mode: program `xlb_decap` strips the outer
    /// header of tunnelled packets for this host's VIPs and passes the inner
    /// packet to the kernel. Run on every backend of a `forward = "tun"`
    /// VIP (which also holds the VIP on a loopback, as in DR mode).
    #[command(subcommand)]
    Decap(DecapCommand),
}

#[derive(Debug, Subcommand)]
pub enum DecapCommand {
    /// Attach xlb_decap to an interface (or update its VIP list). It stays
    /// attached after the command exits.
    Attach(DecapAttachArgs),
    /// Show xlb_decap's VIPs and counters.
    Status(DecapTargetArgs),
    /// Detach xlb_decap and remove its pins.
    Detach(DecapTargetArgs),
}

#[derive(Debug, Args)]
pub struct DecapTargetArgs {
    /// Interface xlb_decap is attached to.
    #[arg(short, long, value_name = "IF")]
    pub interface: String,

    /// Pin directory (default /sys/fs/bpf/xlb-decap/<IF>).
    #[arg(long, value_name = "DIR")]
    pub pin_dir: Option<PathBuf>,

    /// Print JSON (status only).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DecapAttachArgs {
    #[command(flatten)]
    pub target: DecapTargetArgs,

    /// A VIP served by this host; repeat for several. The list replaces
    /// the previous one.
    #[arg(long = "vip", value_name = "ADDR", required = true)]
    pub vips: Vec<std::net::IpAddr>,

    /// The balancers that may tunnel to these VIPs: each node's outer
    /// source address (`tun_source_v4`/`_v6`, else its interface's), or a
    /// prefix holding them all (`10.8.0.0/24`); repeat for several, both
    /// families as the VIPs need. Tunnelled packets for the VIPs from any
    /// other source are dropped and counted as untrusted: they would reach
    /// the service past the balancer with a client address of anyone's
    /// choosing. The list replaces the previous one.
    #[arg(long = "from", value_name = "ADDR[/LEN]", required = true)]
    pub sources: Vec<crate::model::Prefix>,

    /// XDP attach mode.
    #[arg(long, value_enum, default_value_t = XdpMode::Auto)]
    pub xdp_mode: XdpMode,
}

const CONFIG_EXAMPLE: &str = r#"A minimal config file:

    interface = "eth0"            # where VIP traffic arrives

    [[vip]]
    name = "web"
    address = "192.0.2.10"        # IPv4 or IPv6
    port = 80
    protocol = "tcp"              # tcp | udp
    forward = "dr"                # backends share this L2 segment and hold the VIP on lo
    backends = [ { address = "10.0.0.11" }, { address = "10.0.0.12", weight = 2 } ]

Optional top-level fields: xdp_mode ("auto" | "native" | "generic"), pin_dir,
table_size (prime, default 65537), max_vips (64), max_backends (4096)."#;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Config file (TOML; see the README for every field).
    #[arg(short, long, value_name = "FILE")]
    pub config: PathBuf,

    /// Detach the program and remove its pins when the daemon exits.
    #[arg(long)]
    pub detach_on_exit: bool,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Config file to validate.
    #[arg(short, long, value_name = "FILE")]
    pub config: PathBuf,
}

/// Which data plane a command is about, and how to reach its daemon.
#[derive(Debug, Args)]
pub struct TargetArgs {
    #[command(flatten)]
    pub locate: LocateArgs,

    /// The daemon's admin API (default: from --config, else
    /// http://127.0.0.1:9300).
    #[arg(long, value_name = "URL")]
    pub admin: Option<String>,

    /// Bearer token for the admin API (default: from --config).
    #[arg(long, env = "XLB_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// One way to find the data plane; with none, the only one there is.
#[derive(Debug, Args)]
#[group(multiple = false)]
pub struct LocateArgs {
    /// The config file the daemon runs with (its interface, pin_dir and
    /// admin settings).
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Interface name; uses the default pin directory /sys/fs/bpf/xlb/<IF>.
    #[arg(short, long, value_name = "IF")]
    pub interface: Option<String>,

    /// Pin directory, when the config sets a non-default `pin_dir`.
    #[arg(long, value_name = "DIR")]
    pub pin_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct StatsArgs {
    #[command(flatten)]
    pub target: TargetArgs,

    /// Seconds between the two samples a rate is computed from.
    #[arg(long, default_value_t = 1.0)]
    pub interval: f64,

    /// Keep refreshing (Ctrl-C to stop).
    #[arg(short, long)]
    pub watch: bool,
}

#[derive(Debug, Args)]
pub struct BackendArgs {
    #[command(flatten)]
    pub target: TargetArgs,

    /// VIP name (as in the config).
    pub vip: String,

    /// Backend address.
    pub backend: std::net::IpAddr,
}

#[derive(Debug, Args)]
pub struct WeightArgs {
    #[command(flatten)]
    pub backend: BackendArgs,

    /// New weight, 0 to 10000.
    pub weight: u32,
}

#[derive(Debug, Args)]
pub struct AnnounceArgs {
    /// `off` for maintenance, `on` to serve again.
    #[arg(value_enum)]
    pub switch: Switch,

    /// Return once the routes are withdrawn, without waiting for routers.
    #[arg(long)]
    pub no_wait: bool,

    #[command(flatten)]
    pub target: TargetArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    On,
    Off,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub target: TargetArgs,

    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}
