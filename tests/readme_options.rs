//! README.md's table of which command takes which option is what `--help` prints: a test
//! reads both, so neither can drift from the other.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;

/// The long options in a text: every `--name` token.
fn long_options(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("--") {
        let start = i + at + 2;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end] == b'-') {
            end += 1;
        }
        if end > start {
            found.insert(format!("--{}", &text[start..end]));
        }
        i = end.max(start);
    }
    found
}

/// Command -> options, as README.md's table marks them.
fn readme_table() -> BTreeMap<String, BTreeSet<String>> {
    let readme =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("README.md"))
            .unwrap();
    let mut lines = readme.lines().skip_while(|l| !l.starts_with("| option |"));
    let header: Vec<String> = lines
        .next()
        .expect("README.md has no `| option |` table")
        .split('|')
        .map(|c| c.trim().to_string())
        .collect();
    let commands = &header[2..header.len() - 1];
    let mut table: BTreeMap<String, BTreeSet<String>> = commands
        .iter()
        .map(|c| (c.clone(), BTreeSet::new()))
        .collect();
    for line in lines.skip(1).take_while(|l| l.starts_with('|')) {
        // `\|` inside a cell is a literal bar of the option's values.
        let line = line.replace("\\|", "/");
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let options: String = cells[1]
            .split('`')
            .skip(1)
            .step_by(2)
            .collect::<Vec<_>>()
            .join(" ");
        for (command, mark) in commands.iter().zip(&cells[2..]) {
            if *mark == "x" {
                table
                    .get_mut(command)
                    .unwrap()
                    .extend(long_options(&options));
            }
        }
    }
    table
}

/// The options `distillery COMMAND --help` defines (its option lines, not its prose).
fn help_options(command: &str) -> BTreeSet<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_distillery"))
        .args([command, "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    help.lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with("--") || (l.starts_with('-') && l.get(2..4) == Some(", ")))
        // The option a line defines is its first token starting with `--`.
        .filter_map(|l| l.split([' ', ',']).find(|t| t.starts_with("--")))
        .map(|t| {
            t.trim_end_matches(|c: char| !c.is_ascii_lowercase())
                .to_string()
        })
        .filter(|o| o != "--help" && o != "--version")
        .collect()
}

#[test]
fn the_readme_table_lists_exactly_the_options_of_every_command() {
    let table = readme_table();
    assert_eq!(
        table.keys().map(String::as_str).collect::<Vec<_>>(),
        ["embed", "eval", "generate", "label", "mine", "run", "score", "train"]
    );
    for (command, options) in &table {
        let help = help_options(command);
        assert_eq!(
            options, &help,
            "README.md's table against `distillery {command} --help`"
        );
        // The options every command takes.
        assert!(
            help.contains("--quiet") && help.contains("--on-bad-record"),
            "{command}"
        );
    }
}

#[test]
fn long_options_are_read_from_prose_and_option_lines() {
    assert_eq!(
        long_options("`--model DIR/HUB_ID` and `--max-seq-length N`, not -w"),
        BTreeSet::from(["--model".to_string(), "--max-seq-length".to_string()])
    );
}
