//! The command line: parsed into a `Command`, with no I/O.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

pub const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  the command could not be carried out (mount failed, side in use, ...)
  2  usage error: bad arguments, options or PRIMARY|MIRROR spec";

#[derive(Debug, Parser)]
#[command(name = "mirrorfs", version, about = "Mirror every change to a PRIMARY|MIRROR pair of directories", after_help = EXIT_CODES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand, PartialEq, Eq)]
pub enum Command {
    /// Mount 'PRIMARY|MIRROR' on MOUNTPOINT; returns once the mount is live.
    #[command(after_help = "Options (-o, comma-separated): create, ro, allow_other, fsname=NAME")]
    Mount {
        /// Stay in the foreground (the form for systemd).
        #[arg(short, long)]
        foreground: bool,
        /// Mount options, comma-separated; may be repeated.
        #[arg(short = 'o', value_name = "OPT[,OPT...]")]
        options: Vec<String>,
        /// The pair, as one argument: 'PRIMARY|MIRROR'.
        spec: String,
        mountpoint: PathBuf,
    },
    /// Unmount a mirrorfs mount and wait for its daemon to finish.
    Unmount { mountpoint: PathBuf },
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
    }
}
