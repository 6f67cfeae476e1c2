use clap::Parser as _;
use tracing_subscriber::EnvFilter;
use xlb::cli::{
    self,
    args::{Cli, Command, LogFormat},
};
use xlb::observe::admin::Change;

fn main() -> std::process::ExitCode {
    let args = Cli::parse();
    init_logging(args.log_format, args.verbose);
    let result = match args.command {
        Command::Run(a) => runtime().and_then(|rt| rt.block_on(cli::run::run(a))),
        Command::Check(a) => cli::check(a),
        Command::Status(a) => cli::status(a),
        Command::Stats(a) => cli::stats(a),
        Command::Drain(a) => cli::change(&a, Change::Drain),
        Command::Undrain(a) => cli::change(&a, Change::Undrain),
        Command::Weight(a) => cli::change(&a.backend, Change::Weight(a.weight)),
        Command::Announce(a) => cli::announce(a),
        Command::Detach(a) => cli::detach(a),
        Command::Decap(c) => runtime().and_then(|rt| rt.block_on(cli::decap(c))),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xlb: error: {}", xlb::errors::error_chain(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

fn init_logging(format: LogFormat, verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
