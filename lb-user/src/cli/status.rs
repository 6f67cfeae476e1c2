//! `xlb status`.

use serde::Serialize;

use crate::{
    cli::{args::StatusArgs, client, target::Target},
    observe::{render::render, status::Status},
};

pub fn status(args: StatusArgs) -> anyhow::Result<()> {
    let target = Target::resolve(&args.target)?;
    let (status, source) = client::status(&target)?;
    if args.json {
        #[derive(Serialize)]
        struct WithSource<'a> {
            source: &'a str,
            #[serde(flatten)]
            status: &'a Status,
        }
        println!("{}", serde_json::to_string_pretty(&WithSource { source: &source, status: &status })?);
    } else {
        println!("({source})");
        print!("{}", render(&status));
    }
    Ok(())
}
