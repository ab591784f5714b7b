//! mirrorfs: a FUSE filesystem that presents a `PRIMARY|MIRROR` pair of
//! directories as one mount and applies every change to both.
//!
//! `main.rs` stays thin; everything here is testable as a library.

pub mod changelog;
pub mod cli;
pub mod control;
pub mod daemon;
pub mod engine;
pub mod events;
pub mod fs;
pub mod health;
pub mod journal;
pub mod manual;
pub mod meta;
pub mod metrics;
pub mod nodes;
pub mod recovery;
pub mod reply;
pub mod ring;
pub mod runtime;
pub mod spec;
pub mod volume;

use std::process::ExitCode;

use clap::Parser;

fn side_of(arg: cli::SideArg) -> spec::Side {
    match arg {
        cli::SideArg::Primary => spec::Side::Primary,
        cli::SideArg::Mirror => spec::Side::Mirror,
    }
}

/// Runs the command line and returns the process exit code.
pub fn run(args: Vec<String>) -> ExitCode {
    let prog = args
        .first()
        .map(|a| a.rsplit('/').next().unwrap_or(a).to_string())
        .unwrap_or_default();
    // mount(8) runs `mount.fuse.mirrorfs SPEC MOUNTPOINT -o OPTS`; fuse3's
    // `mount.fuse3` runs `mirrorfs SPEC MOUNTPOINT -o OPTS`, known by the
    // `|` of the spec where a subcommand would be.
    let helper_form = args.get(1).is_some_and(|a| a.contains('|'));
    let args = if prog.starts_with("mount.") || helper_form {
        cli::from_mount_helper(&args)
    } else {
        args
    };
    let cli = match cli::Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(e.exit_code() as u8);
        }
    };
    let r = match cli.command {
        cli::Command::Mount {
            foreground,
            options,
            spec,
            mountpoint,
        } => match spec::Options::parse(&options) {
            Ok(opts) => daemon::mount(&spec, &mountpoint, opts, foreground).map(|_| 0),
            Err(e) => Err(runtime::Failure::Usage(e)),
        },
        cli::Command::Unmount { mountpoint } => daemon::unmount(&mountpoint).map(|_| 0),
        cli::Command::Status { json, mountpoint } => control::status(mountpoint.as_deref(), json),
        cli::Command::Events {
            json,
            follow,
            mountpoint,
        } => control::events(&mountpoint, json, follow),
        cli::Command::Fail { mountpoint, side } => control::fail(&mountpoint, side_of(side)),
        cli::Command::Metrics { output, mountpoint } => metrics::run(mountpoint.as_deref(), output.as_deref()),
        cli::Command::Verify { repair, json, target } => recovery::verify::run(&target, json, repair),
        cli::Command::Resync {
            full,
            wait,
            from,
            mountpoint,
        } => control::resync(
            &mountpoint,
            recovery::catchup::Manual {
                full,
                from: from.map(side_of),
                paths: Vec::new(),
            },
            wait,
        ),
    };
    match r {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("mirrorfs: {}", f.message());
            ExitCode::from(f.exit_code())
        }
    }
}
