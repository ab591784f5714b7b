//! Makes the man pages (`mirrorfs(8)` and one page per subcommand) and the
//! shell completions (bash, zsh, fish) from the clap definitions in
//! `src/cli.rs` and the tables in `src/manual.rs`. They go to
//! `target/<profile>/assets/`, where `cargo deb` finds them (see
//! `[package.metadata.deb]` in Cargo.toml): cargo-deb takes assets by a
//! `target/release/` path and has no way to name a build script's OUT_DIR.

#[path = "src/cli.rs"]
#[allow(dead_code)]
mod cli;
#[path = "src/manual.rs"]
#[allow(dead_code)]
mod manual;

use std::fs;
use std::io;
use std::path::PathBuf;

use clap::CommandFactory;
use clap_complete::Shell;
use clap_mangen::Man;
use roff::{Roff, bold, italic, roman};

const SECTION: &str = "8";

fn main() -> io::Result<()> {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/cli.rs");
    println!("cargo:rerun-if-changed=src/manual.rs");
    let out = std::env::var_os("OUT_DIR")
        .map(PathBuf::from)
        .expect("cargo sets OUT_DIR");
    // OUT_DIR is target/<profile>/build/mirrorfs-<hash>/out.
    let profile_dir = out.ancestors().nth(3).expect("OUT_DIR below target/<profile>");
    let assets = profile_dir.join("assets");

    let mut cmd = cli::Cli::command().disable_help_subcommand(true);
    cmd.build();
    let man_dir = assets.join("man");
    fs::create_dir_all(&man_dir)?;
    fs::write(man_dir.join(format!("mirrorfs.{SECTION}")), main_page(&cmd)?)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("mirrorfs-{}.{SECTION}", sub.get_name());
        fs::write(man_dir.join(name), sub_page(sub)?)?;
    }

    let completions = assets.join("completions");
    fs::create_dir_all(&completions)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, "mirrorfs", &completions)?;
    }
    Ok(())
}

fn man(cmd: &clap::Command) -> Man {
    Man::new(cmd.clone())
        .section(SECTION)
        .manual("System Administration")
        .source(format!("mirrorfs {}", env!("CARGO_PKG_VERSION")))
}

/// The sections clap knows: title, name, synopsis, description, options.
fn clap_sections(man: &Man, cmd: &clap::Command, out: &mut Vec<u8>) -> io::Result<()> {
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(out)?;
    }
    Ok(())
}

fn table(roff: &mut Roff, heading: &str, rows: &[manual::Entry]) {
    if !heading.is_empty() {
        roff.control("SH", [heading]);
    }
    for (term, meaning) in rows {
        roff.control("TP", []);
        roff.text([bold(*term)]);
        roff.text([roman(*meaning)]);
    }
}

/// The states of a mount and of a side, under `heading`.
fn states(roff: &mut Roff, heading: &str) {
    roff.control("SH", [heading]);
    roff.text([roman("The state of a mount:")]);
    table(roff, "", manual::MOUNT_STATES);
    roff.control("PP", []);
    roff.text([roman("The state of each side:")]);
    table(roff, "", manual::SIDE_STATES);
}

fn see_also(roff: &mut Roff, cmd: &clap::Command, me: &str) {
    roff.control("SH", ["SEE ALSO"]);
    let mut refs: Vec<String> = std::iter::once("mirrorfs".to_string())
        .chain(cmd.get_subcommands().map(|s| format!("mirrorfs-{}", s.get_name())))
        .filter(|name| name != me)
        .map(|name| format!("{name}({SECTION})"))
        .collect();
    refs.extend(["fstab(5)", "mount(8)", "systemd.service(5)"].map(String::from));
    roff.text([roman(refs.join(", "))]);
}

fn main_page(cmd: &clap::Command) -> io::Result<Vec<u8>> {
    let man = man(cmd);
    let mut out = Vec::new();
    clap_sections(&man, cmd, &mut out)?;
    man.render_subcommands_section(&mut out)?;

    let mut roff = Roff::new();
    table(&mut roff, "MOUNT OPTIONS", manual::MOUNT_OPTIONS);
    roff.text([roman(
        "Options mount(8) passes along (rw, defaults, nofail, _netdev, ...) are accepted and change nothing.",
    )]);
    states(&mut roff, "STATUS");
    roff.control("SH", ["EXIT STATUS"]);
    table(&mut roff, "", manual::EXIT_CODES);
    roff.control("PP", []);
    roff.text([
        bold("mirrorfs status"),
        roman(" follows the monitoring-plugin convention:"),
    ]);
    table(&mut roff, "", manual::STATUS_EXIT_CODES);
    roff.control("SH", ["EVENTS"]);
    roff.text([
        roman("Each event is one JSON line in "),
        italic(".mirrorfs/events.log"),
        roman(" on every side that is up; "),
        bold("mirrorfs events"),
        roman(" prints them and "),
        bold("--follow"),
        roman(" streams new ones."),
    ]);
    table(&mut roff, "", manual::EVENTS);
    table(&mut roff, "FILES", manual::FILES);
    examples(&mut roff);
    see_also(&mut roff, cmd, "mirrorfs");
    roff.to_writer(&mut out)?;
    man.render_version_section(&mut out)?;
    Ok(out)
}

fn examples(roff: &mut Roff) {
    roff.control("SH", ["EXAMPLES"]);
    for (what, code) in manual::EXAMPLES {
        roff.control("PP", []);
        roff.text([roman(*what)]);
        roff.control("PP", []);
        roff.control("nf", []);
        roff.control("RS", ["4"]);
        roff.text([roman(*code)]);
        roff.control("RE", []);
        roff.control("fi", []);
    }
}

fn sub_page(sub: &clap::Command) -> io::Result<Vec<u8>> {
    let man = man(sub);
    let mut out = Vec::new();
    clap_sections(&man, sub, &mut out)?;
    let mut roff = Roff::new();
    match sub.get_name() {
        "mount" => table(&mut roff, "MOUNT OPTIONS", manual::MOUNT_OPTIONS),
        "status" => {
            states(&mut roff, "STATES");
            table(&mut roff, "EXIT STATUS", manual::STATUS_EXIT_CODES);
        }
        "events" => table(&mut roff, "EVENTS", manual::EVENTS),
        _ => {}
    }
    if sub.get_name() != "status" {
        table(&mut roff, "EXIT STATUS", manual::EXIT_CODES);
    }
    let root = cli::Cli::command().disable_help_subcommand(true);
    see_also(&mut roff, &root, &format!("mirrorfs-{}", sub.get_name()));
    roff.to_writer(&mut out)?;
    Ok(out)
}
