//! The command line as operators type it.

use std::{net::IpAddr, path::Path};

use clap::Parser as _;

use super::args::{Cli, Command, DecapCommand, LocateArgs, LogFormat, TargetArgs};
use crate::model::XdpMode;

fn parse(line: &str) -> Result<Cli, String> {
    Cli::try_parse_from(line.split_whitespace()).map_err(|e| e.to_string())
}

fn target(cli: &Cli) -> &TargetArgs {
    match &cli.command {
        Command::Status(a) => &a.target,
        Command::Stats(a) => &a.target,
        Command::Drain(a) | Command::Undrain(a) => &a.target,
        Command::Weight(a) => &a.backend.target,
        Command::Detach(a) => a,
        other => panic!("no target: {other:?}"),
    }
}

fn locate(cli: &Cli) -> (Option<&Path>, Option<&str>, Option<&Path>) {
    let LocateArgs { config, interface, pin_dir } = &target(cli).locate;
    (config.as_deref(), interface.as_deref(), pin_dir.as_deref())
}

#[test]
fn run_and_check_take_a_config() {
    let cli = parse("xlb run --config /etc/xlb/xlb.toml --detach-on-exit").unwrap();
    let Command::Run(run) = &cli.command else { panic!() };
    assert_eq!((run.config.as_path(), run.detach_on_exit), (Path::new("/etc/xlb/xlb.toml"), true));
    let cli = parse("xlb --log-format json -vv check -c xlb.toml").unwrap();
    assert!(matches!(cli.command, Command::Check(_)));
    assert_eq!((cli.log_format, cli.verbose), (LogFormat::Json, 2));
    assert!(parse("xlb run").unwrap_err().contains("--config"));
}

#[test]
fn a_data_plane_is_found_one_way_and_the_api_settings_combine_with_any() {
    let cli = parse("xlb status --config xlb.toml --token s3cret").unwrap();
    assert_eq!(locate(&cli), (Some(Path::new("xlb.toml")), None, None));
    assert_eq!(target(&cli).token.as_deref(), Some("s3cret"));
    let cli = parse("xlb status --interface eth0 --admin http://10.0.0.1:9300 --json").unwrap();
    assert_eq!(locate(&cli), (None, Some("eth0"), None));
    assert_eq!(target(&cli).admin.as_deref(), Some("http://10.0.0.1:9300"));
    let cli = parse("xlb stats -i eth0 --token t --interval 0.5 --watch").unwrap();
    let Command::Stats(stats) = &cli.command else { panic!() };
    assert_eq!((stats.interval, stats.watch), (0.5, true));
    let cli = parse("xlb detach --pin-dir /sys/fs/bpf/xlb/custom").unwrap();
    assert_eq!(locate(&cli), (None, None, Some(Path::new("/sys/fs/bpf/xlb/custom"))));
    assert_eq!(locate(&parse("xlb status").unwrap()), (None, None, None), "none: the only data plane");

    let err = parse("xlb status --config xlb.toml --interface eth0").unwrap_err();
    assert!(err.contains("cannot be used with"), "{err}");
    assert!(parse("xlb detach -i eth0 --pin-dir /x").is_err());
}

#[test]
fn backend_changes_name_the_vip_the_backend_and_the_weight() {
    let cli = parse("xlb drain web 10.0.0.12 -i eth0 --admin http://127.0.0.1:9400 --token t").unwrap();
    let Command::Drain(drain) = &cli.command else { panic!() };
    assert_eq!((drain.vip.as_str(), drain.backend), ("web", IpAddr::from([10, 0, 0, 12])));
    assert!(matches!(parse("xlb undrain web 2001:db8::12").unwrap().command, Command::Undrain(_)));
    let cli = parse("xlb weight web 10.0.0.11 3 --config xlb.toml").unwrap();
    let Command::Weight(w) = &cli.command else { panic!() };
    assert_eq!((w.backend.vip.as_str(), w.weight), ("web", 3));
    assert!(parse("xlb weight web 10.0.0.11").unwrap_err().contains("WEIGHT"));
    assert!(parse("xlb drain web not-an-ip").unwrap_err().contains("not-an-ip"));
    assert!(parse("xlb weight web 10.0.0.11 -1").is_err());
}

#[test]
fn announce_switches_on_or_off() {
    let cli = parse("xlb announce off --no-wait -i eth0").unwrap();
    let Command::Announce(a) = &cli.command else { panic!() };
    assert_eq!((a.switch, a.no_wait), (super::args::Switch::Off, true));
    assert!(matches!(parse("xlb announce on --config xlb.toml").unwrap().command, Command::Announce(_)));
    assert!(parse("xlb announce maybe").is_err());
    assert!(parse("xlb announce").is_err());
}

#[test]
fn decap_verbs() {
    let cli = parse(
        "xlb decap attach -i eth0 --vip 192.0.2.10 --vip 2001:db8::10 --from 10.8.0.0/24 --from fd08::11 \
         --xdp-mode generic",
    )
    .unwrap();
    let Command::Decap(DecapCommand::Attach(a)) = &cli.command else { panic!() };
    assert_eq!(a.vips.len(), 2);
    assert_eq!(
        a.sources.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["10.8.0.0/24", "fd08::11/128"]
    );
    assert_eq!((a.target.interface.as_str(), a.xdp_mode), ("eth0", XdpMode::Generic));
    let cli = parse("xlb decap status -i eth0 --json").unwrap();
    assert!(matches!(&cli.command, Command::Decap(DecapCommand::Status(s)) if s.json));
    assert!(matches!(
        parse("xlb decap detach -i eth0").unwrap().command,
        Command::Decap(DecapCommand::Detach(_))
    ));
    assert!(parse("xlb decap attach -i eth0 --from 10.8.0.1").unwrap_err().contains("--vip"));
    assert!(parse("xlb decap attach -i eth0 --vip 192.0.2.10").unwrap_err().contains("--from"));
    let bad = parse("xlb decap attach -i eth0 --vip 192.0.2.10 --from 10.8.0.1/16").unwrap_err();
    assert!(bad.contains("--from") && bad.contains("bits set past its length"), "{bad}");
    assert!(parse("xlb decap attach -i eth0 --vip 192.0.2.10 --from 10.8.0.1 --xdp-mode turbo").is_err());
}

#[test]
fn every_verb_explains_itself() {
    for verb in
        ["run", "check", "status", "stats", "drain", "undrain", "weight", "announce", "detach", "decap"]
    {
        let help = parse(&format!("xlb {verb} --help")).unwrap_err();
        assert!(help.contains("Usage: xlb"), "{verb}: {help}");
    }
}
