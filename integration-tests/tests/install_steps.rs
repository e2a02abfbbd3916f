//! The install steps say the same thing everywhere: the one line the README gives for what the
//! tests need is exactly the packages `.ci/run` installs (which `.ci/fresh-machine` proves on a
//! bare Debian), and the README's two commands are the ones DEVELOPERS.md and CI run.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use std::collections::BTreeSet;
use std::path::Path;

fn read(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The packages of `.ci/run`'s `PACKAGES` table (`"package /file …"` entries).
fn ci_packages() -> BTreeSet<String> {
    let run = read(".ci/run");
    let table = run
        .split_once("PACKAGES=(")
        .and_then(|(_, rest)| rest.split_once("\n)"))
        .map(|(table, _)| table)
        .expect(".ci/run has a PACKAGES=( … ) table");
    table
        .lines()
        .filter_map(|l| l.trim().strip_prefix('"'))
        .map(|entry| entry.split_whitespace().next().unwrap().to_string())
        .collect()
}

/// The packages of the README's one `apt-get install` line for the tests.
fn readme_packages() -> BTreeSet<String> {
    let readme = read("README.md");
    let lines: Vec<&str> = readme
        .lines()
        .filter(|l| l.contains("apt-get install") && l.contains("--no-install-recommends"))
        .collect();
    assert_eq!(lines.len(), 1, "one install line in the README: {lines:?}");
    lines[0]
        .split("--no-install-recommends")
        .nth(1)
        .unwrap()
        .split('#')
        .next()
        .unwrap()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

#[test]
fn the_readme_installs_exactly_what_ci_installs() {
    let ci = ci_packages();
    assert!(ci.len() > 10, "{ci:?}");
    assert_eq!(
        readme_packages(),
        ci,
        "README.md's install line and .ci/run's PACKAGES"
    );
}

#[test]
fn the_readme_test_command_is_what_ci_runs() {
    let readme = read("README.md");
    assert!(
        readme.contains("\ncargo test --workspace "),
        "README's second command"
    );
    let run = read(".ci/run");
    assert!(
        run.trim_end().ends_with("cargo test --workspace"),
        ".ci/run ends with it"
    );
    assert!(
        !run.contains("--features"),
        "CI builds what the README builds"
    );
}
