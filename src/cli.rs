//! The command line: parsed into a `Command`, with no I/O.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::manual;

#[derive(Debug, Parser)]
#[command(
    name = "mirrorfs",
    version,
    about = "Mirror every change to a PRIMARY|MIRROR pair of directories",
    long_about = "Mirror every change to a PRIMARY|MIRROR pair of directories.\n\n\
        mirrorfs presents a pair of backing directories as one FUSE mount and applies every \
        change to both. When one side fails it marks that side DOWN, carries on with the \
        survivor and reports the event; when the side answers again, only what it missed \
        is copied back. Each side stays a plain directory tree that a database can be \
        started on.",
    after_help = manual::exit_codes_help()
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand, PartialEq, Eq)]
pub enum Command {
    /// Mount 'PRIMARY|MIRROR' on MOUNTPOINT; returns once the mount is live.
    #[command(after_help = manual::help_table("Options (-o, comma-separated)", manual::MOUNT_OPTIONS))]
    Mount {
        /// Stay in the foreground (the form for systemd).
        #[arg(short, long)]
        foreground: bool,
        /// Mount options, comma-separated; may be repeated.
        #[arg(short = 'o', value_name = "OPT[,OPT...]")]
        options: Vec<String>,
        /// The pair, as one argument: 'PRIMARY|MIRROR'.
        spec: String,
        /// The directory to mount on.
        mountpoint: PathBuf,
    },
    /// Unmount a mirrorfs mount and wait for its daemon to finish.
    Unmount {
        /// A mirrorfs mountpoint.
        mountpoint: PathBuf,
    },
    /// Show the state of a mount's sides, or of every mirrorfs mount.
    #[command(after_help = manual::exit_codes_help())]
    Status {
        /// One JSON object (an array without MOUNTPOINT).
        #[arg(long)]
        json: bool,
        /// A mirrorfs mountpoint; without it, every mirrorfs mount.
        mountpoint: Option<PathBuf>,
    },
    /// Print a mount's event log.
    #[command(after_help = manual::help_table("Events", manual::EVENTS))]
    Events {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Keep printing new events as they happen.
        #[arg(long)]
        follow: bool,
        /// A mirrorfs mountpoint.
        mountpoint: PathBuf,
    },
    /// Compare the two sides entry by entry; exit 1 if they differ.
    Verify {
        /// Copy the good side over the bad one where they differ (online:
        /// from the primary; offline: from the side that is not stale).
        #[arg(long)]
        repair: bool,
        /// One JSON object.
        #[arg(long)]
        json: bool,
        /// A mirrorfs mountpoint (online), or 'PRIMARY|MIRROR' (offline).
        target: String,
    },
    /// Take a side out of service by hand (needs root or the user who mounted).
    Fail {
        /// A mirrorfs mountpoint.
        mountpoint: PathBuf,
        /// The side to take out.
        side: SideArg,
    },
    /// Print the state of the mounts in the Prometheus text format, for
    /// node_exporter's textfile collector.
    Metrics {
        /// Write to FILE, replacing it atomically, instead of printing.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// One mount; without it, every mirrorfs mount.
        mountpoint: Option<PathBuf>,
    },
    /// Bring a down, stale or off side back now (needs root or the user who mounted).
    Resync {
        /// Compare the whole tree, not only what the journal records.
        #[arg(long)]
        full: bool,
        /// Wait until the resync has ended; exit 1 if it failed.
        #[arg(long)]
        wait: bool,
        /// The side that wins a split brain: the other is made equal to it.
        #[arg(long, value_name = "primary|mirror")]
        from: Option<SideArg>,
        /// A mirrorfs mountpoint.
        mountpoint: PathBuf,
    },
}

/// A side, as named on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SideArg {
    Primary,
    Mirror,
}

/// Translates the argument list of a mount helper (`mount.fuse.mirrorfs SPEC
/// MOUNTPOINT [-o OPTS] [-f] [-n] [-s] [-v]`, as mount(8) calls it) into the
/// `mirrorfs mount` form.
pub fn from_mount_helper(args: &[String]) -> Vec<String> {
    let mut out = vec!["mirrorfs".to_string(), "mount".to_string()];
    let mut positional = Vec::new();
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "-o" => {
                if let Some(v) = it.next() {
                    out.push("-o".into());
                    out.push(v.clone());
                }
            }
            o if o.starts_with("-o") && o.len() > 2 => {
                out.push("-o".into());
                out.push(o[2..].to_string());
            }
            "-f" => out.push("-f".into()),
            "-n" | "-s" | "-v" => {}
            _ => positional.push(a.clone()),
        }
    }
    out.extend(positional);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mount() {
        let c = Cli::try_parse_from(["mirrorfs", "mount", "-f", "-o", "ro,create", "a|b", "/mnt"]).unwrap();
        assert_eq!(
            c.command,
            Command::Mount {
                foreground: true,
                options: vec!["ro,create".into()],
                spec: "a|b".into(),
                mountpoint: "/mnt".into()
            }
        );
    }

    #[test]
    fn parses_status_events_and_fail() {
        let c = Cli::try_parse_from(["mirrorfs", "status", "--json"]).unwrap();
        assert_eq!(
            c.command,
            Command::Status {
                json: true,
                mountpoint: None
            }
        );
        let c = Cli::try_parse_from(["mirrorfs", "events", "--follow", "/mnt"]).unwrap();
        assert_eq!(
            c.command,
            Command::Events {
                json: false,
                follow: true,
                mountpoint: "/mnt".into()
            }
        );
        let c = Cli::try_parse_from(["mirrorfs", "fail", "/mnt", "mirror"]).unwrap();
        assert_eq!(
            c.command,
            Command::Fail {
                mountpoint: "/mnt".into(),
                side: SideArg::Mirror
            }
        );
        assert!(Cli::try_parse_from(["mirrorfs", "fail", "/mnt", "both"]).is_err());
    }

    #[test]
    fn usage_errors_exit_2() {
        let e = Cli::try_parse_from(["mirrorfs", "mount", "only-one-arg"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn translates_mount_helper_arguments() {
        let args: Vec<String> = ["mount.fuse.mirrorfs", "/p|/m", "/mnt", "-o", "rw,allow_other", "-n"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            from_mount_helper(&args),
            vec!["mirrorfs", "mount", "-o", "rw,allow_other", "/p|/m", "/mnt"]
        );
        let args: Vec<String> = ["mirrorfs", "/p|/m", "/mnt", "-ohook=/bin/true", "-s"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            from_mount_helper(&args),
            vec!["mirrorfs", "mount", "-o", "hook=/bin/true", "/p|/m", "/mnt"]
        );
    }
}
