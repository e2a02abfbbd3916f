//! `tunnelfleet config set FILE KEY=VALUE…`: a daemon's config file edited in place with its
//! comments and layout kept (toml_edit), checked whole as the daemon reads it, and written only
//! when it passes: atomically, with the file's owner and mode. A bad setting changes nothing.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context, anyhow, bail};
use toml_edit::{DocumentMut, Item, Table, Value};

/// Whose config a file is, told by its tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Agent,
    Coordinator,
}

impl Kind {
    fn of(doc: &DocumentMut) -> Kind {
        if ["agent", "coordinator", "profile"]
            .iter()
            .any(|t| doc.contains_key(t))
        {
            Kind::Agent
        } else {
            Kind::Coordinator
        }
    }
}

/// Applies `settings` (`a.b.key=value`) to `file` and writes it back when the result loads.
pub fn set(file: &Path, settings: &[String]) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("{}: cannot read", file.display()))?;
    let new = apply(&text, settings).with_context(|| file.display().to_string())?;
    check(&new, file)?;
    write_like(file, new.as_bytes())?;
    for s in settings {
        if let Some((key, _)) = s.split_once('=') {
            println!("{}: {} set", file.display(), key.trim());
        }
    }
    Ok(())
}

/// The document after every setting, as text; the first bad setting is the error.
fn apply(text: &str, settings: &[String]) -> anyhow::Result<String> {
    let mut doc: DocumentMut = text
        .parse()
        .map_err(|e: toml_edit::TomlError| anyhow!("{}", e.to_string().trim_end()))?;
    for setting in settings {
        let (key, value) = setting
            .split_once('=')
            .ok_or_else(|| anyhow!("{setting:?}: expected KEY=VALUE"))?;
        let path: Vec<&str> = key.trim().split('.').collect();
        if path.iter().any(|p| p.is_empty()) {
            bail!("{key:?}: a key is names joined by '.', none of them empty");
        }
        let (last, tables) = path.split_last().expect("split yields one part at least");
        let mut table: &mut Table = doc.as_table_mut();
        for (i, name) in tables.iter().enumerate() {
            let entry = table.entry(name).or_insert_with(|| {
                let mut t = Table::new();
                t.set_implicit(false);
                Item::Table(t)
            });
            table = entry
                .as_table_mut()
                .ok_or_else(|| anyhow!("{}: not a table", tables[..=i].join(".")))?;
        }
        if table.get(last).is_some_and(|i| i.is_table_like()) {
            bail!("{key}: is a table, not a value");
        }
        let decor = table
            .get(last)
            .and_then(Item::as_value)
            .map(|v| v.decor().clone());
        let mut value = parse_value(value);
        if let Some(decor) = decor {
            *value.decor_mut() = decor;
        }
        table[*last] = Item::Value(value);
    }
    Ok(doc.to_string())
}

/// A TOML value when the text is one (`true`, `3`, `"x"`, `["a"]`), else the text as a string.
fn parse_value(text: &str) -> Value {
    match text.trim().parse::<Value>() {
        Ok(v) => v,
        Err(_) => Value::from(text),
    }
}

/// Loads `text` as the daemon that owns `file` would: the error names the file and the key.
fn check(text: &str, file: &Path) -> anyhow::Result<()> {
    let doc: DocumentMut = text.parse().context("the edited file is not TOML")?;
    match Kind::of(&doc) {
        Kind::Agent => {
            tunnelfleet_agent::config::AgentConfig::parse(text, file)
                .map_err(|e| anyhow!("{e}; nothing was changed"))?;
        }
        Kind::Coordinator => {
            tunnelfleet_coordinator::server::CoordinatorConfig::parse(text, file)
                .map_err(|e| anyhow!("{e:#}; nothing was changed"))?;
        }
    }
    Ok(())
}

/// Replaces `file` with `bytes` atomically, keeping its owner, group and mode.
fn write_like(file: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let meta =
        std::fs::metadata(file).with_context(|| format!("{}: cannot stat", file.display()))?;
    let dir = file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("{}: cannot write beside it", file.display()))?;
    tmp.write_all(bytes)
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("{}: cannot write", tmp.path().display()))?;
    std::fs::set_permissions(
        tmp.path(),
        std::fs::Permissions::from_mode(meta.permissions().mode()),
    )
    .with_context(|| format!("{}: cannot set its mode", tmp.path().display()))?;
    std::os::unix::fs::chown(tmp.path(), Some(meta.uid()), Some(meta.gid()))
        .with_context(|| format!("{}: cannot keep its owner", file.display()))?;
    tmp.persist(file)
        .map_err(|e| anyhow!("{}: cannot replace: {}", file.display(), e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

    use super::*;

    const AGENT: &str = "# the appliance\n[agent]\ncontrol_socket = \"/run/x.sock\"\n\n[coordinator]\naddress = \"old:4433\"  # where\n";

    #[test]
    fn a_value_is_replaced_with_its_comment_kept_and_the_rest_untouched() {
        let out = apply(AGENT, &["coordinator.address=coord.example:4433".into()]).unwrap();
        assert_eq!(out, AGENT.replace("\"old:4433\"", "\"coord.example:4433\""));
    }

    #[test]
    fn values_are_toml_when_they_parse_and_strings_otherwise() {
        let out = apply(
            "",
            &[
                "a=3".into(),
                "b=true".into(),
                "c=[\"x\", \"y\"]".into(),
                "d=10.0.0.1:4433".into(),
                "e=\"7\"".into(),
                "t.f=5s".into(),
            ],
        )
        .unwrap();
        let doc: toml::Table = toml::from_str(&out).unwrap();
        assert_eq!(doc["a"].as_integer(), Some(3));
        assert_eq!(doc["b"].as_bool(), Some(true));
        assert_eq!(doc["c"].as_array().map(Vec::len), Some(2));
        assert_eq!(doc["d"].as_str(), Some("10.0.0.1:4433"));
        assert_eq!(doc["e"].as_str(), Some("7"));
        assert_eq!(doc["t"]["f"].as_str(), Some("5s"));
    }

    #[test]
    fn malformed_settings_are_refused() {
        for bad in [
            "novalue",
            ".a=1",
            "a..b=1",
            "agent=1",
            "agent.control_socket.x=1",
        ] {
            assert!(apply(AGENT, &[bad.into()]).is_err(), "{bad}");
        }
    }

    /// The configs the Debian packages install.
    const PACKAGED_AGENT: &str = include_str!("../../deploy/debian/agent.toml");
    const PACKAGED_COORDINATOR: &str = include_str!("../../deploy/debian/coordinator.toml");

    #[test]
    fn a_setting_the_daemon_refuses_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(&file, PACKAGED_AGENT).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = set(&file, &["agent.no_such_key=1".into()]).unwrap_err();
        assert!(format!("{err:#}").contains("agent.toml"), "{err:#}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), PACKAGED_AGENT);
        // A good one is written, mode kept, nothing left beside it.
        set(&file, &["coordinator.address=c:4433".into()]).unwrap();
        assert!(
            std::fs::read_to_string(&file)
                .unwrap()
                .contains("\"c:4433\"")
        );
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_coordinator_file_is_checked_as_a_coordinator_config() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("coordinator.toml");
        let text = PACKAGED_COORDINATOR;
        std::fs::write(&file, text).unwrap();
        let err = set(&file, &["listen=not-an-address".into()]).unwrap_err();
        assert!(format!("{err:#}").contains("coordinator.toml"), "{err:#}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), text);
        set(&file, &["listen=127.0.0.1:0".into()]).unwrap();
        assert!(
            std::fs::read_to_string(&file)
                .unwrap()
                .contains("127.0.0.1:0")
        );
    }
}
