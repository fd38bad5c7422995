//! The one settings parser: command line and `PRIVSTACK_RELAY_*` variables, from the
//! process environment (the relay) or from an environment file (`check-config`).
//!
//! clap reads an argument's variable when the command is built, with no way to give it
//! another source, and it takes an empty value as a value. So the variables are taken
//! out of clap's hands: the command line is parsed first (to learn which flags it
//! sets), then every variable of a flag the command line leaves unset is handed to
//! clap as that flag (`--port=4101`), so the same value parsers and the same checks run
//! on both. On the way:
//! - an empty (or blank) variable is unset, as is an empty item of a list (`a,,b`);
//! - boolean variables take 1/0, true/false, yes/no, on/off (any case);
//! - an error in a variable's value names the variable and its value.

use std::collections::HashSet;
use std::ffi::OsString;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, CommandFactory, FromArgMatches};

use crate::config::Cli;

/// Exit codes (README, "Exit codes"; `--help`).
pub mod exit {
    /// A settings error (EX_CONFIG from sysexits.h): the unit does not restart.
    pub const CONFIG: u8 = 78;
    /// Anything else that stops the relay (a port in use, a listener that died).
    pub const FAILURE: u8 = 1;
}

/// The prefix of every setting's variable.
pub const PREFIX: &str = "PRIVSTACK_RELAY_";

/// A flag that has a variable.
#[derive(Debug, Clone)]
pub struct Setting {
    /// The subcommand it belongs to (`None`: the relay itself).
    pub subcommand: Option<String>,
    pub id: String,
    pub var: String,
    pub long: String,
    /// A switch (`--verbose`): the variable is a boolean.
    pub switch: bool,
    pub delimiter: Option<char>,
}

/// Every flag with a variable, the relay's own first.
pub fn settings() -> Vec<Setting> {
    let cmd = command();
    let mut out = Vec::new();
    let mut add = |sub: Option<&str>, c: &clap::Command| {
        for a in c.get_arguments() {
            let (Some(var), Some(long)) = (a.get_env(), a.get_long()) else {
                continue;
            };
            out.push(Setting {
                subcommand: sub.map(str::to_string),
                id: a.get_id().to_string(),
                var: var.to_string_lossy().into_owned(),
                long: long.to_string(),
                switch: matches!(a.get_action(), ArgAction::SetTrue),
                delimiter: a.get_value_delimiter(),
            });
        }
    };
    add(None, &cmd);
    for sub in cmd.get_subcommands() {
        add(Some(sub.get_name()), sub);
    }
    out
}

/// Names of the relay's own settings (what `check-config` prints).
pub fn relay_variables() -> Vec<String> {
    let mut vars: Vec<String> = settings()
        .into_iter()
        .filter(|s| s.subcommand.is_none())
        .map(|s| s.var)
        .collect();
    vars.dedup();
    vars
}

/// A variable that is set, with its value (as given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FromEnv {
    pub var: String,
    pub value: String,
}

#[derive(Debug)]
pub enum SettingsError {
    /// From clap: a bad flag or value on the command line, or `--help`/`--version`
    /// (whose exit code is 0).
    Clap(clap::Error),
    /// A variable's value clap refused, or a boolean that is not one.
    Variable {
        var: String,
        value: String,
        message: String,
    },
}

impl SettingsError {
    /// The process exit code: 0 for `--help`/`--version`, else [`exit::CONFIG`].
    pub fn exit_code(&self) -> u8 {
        match self {
            SettingsError::Clap(e) if e.exit_code() == 0 => 0,
            _ => exit::CONFIG,
        }
    }

    /// Print it as clap would (help and version on stdout, errors on stderr).
    pub fn print(&self) {
        match self {
            SettingsError::Clap(e) => {
                let _ = e.print();
            }
            other => eprintln!("error: {other}"),
        }
    }

    /// The variable the error is about, if it came from one.
    pub fn variable(&self) -> Option<&str> {
        match self {
            SettingsError::Variable { var, .. } => Some(var),
            SettingsError::Clap(_) => None,
        }
    }
}

impl std::fmt::Display for SettingsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SettingsError::Clap(e) => {
                let text = e.to_string();
                let first = text.lines().next().unwrap_or_default();
                f.write_str(first.strip_prefix("error: ").unwrap_or(first))
            }
            SettingsError::Variable {
                var,
                value,
                message,
            } => write!(f, "{var}={value:?}: {message}"),
        }
    }
}

impl std::error::Error for SettingsError {}

/// The parsed command line and where each setting came from.
#[derive(Debug)]
pub struct Parsed {
    pub cli: Cli,
    matches: ArgMatches,
    /// Variables that set a flag (the command line did not).
    pub from_env: Vec<FromEnv>,
}

impl Parsed {
    /// The variable that set `--long`, if one did.
    pub fn variable_of(&self, long: &str) -> Option<&FromEnv> {
        let var = settings()
            .into_iter()
            .find(|s| s.long == long && s.subcommand.as_deref() == self.matches.subcommand_name())?
            .var;
        self.from_env.iter().find(|e| e.var == var)
    }

    /// Every relay setting as `PRIVSTACK_RELAY_X=value` (defaults included), in
    /// `--help` order; the values are those the relay runs with.
    pub fn resolved(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        for s in settings().into_iter().filter(|s| s.subcommand.is_none()) {
            if out.iter().any(|(v, _)| *v == s.var) {
                continue;
            }
            let value = if s.switch {
                self.matches.get_flag(&s.id).to_string()
            } else {
                self.matches
                    .get_raw(&s.id)
                    .map(|vals| {
                        vals.map(|v| v.to_string_lossy().into_owned())
                            .collect::<Vec<_>>()
                            .join(&s.delimiter.unwrap_or(',').to_string())
                    })
                    .unwrap_or_default()
            };
            out.push((s.var, value));
        }
        out
    }
}

/// A boolean variable's value: 1/0, true/false, yes/no, on/off, any case.
pub fn parse_bool(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// The command line, with `--version`'s long output (which names what the CPU chose
/// at run time, so it cannot be a constant).
fn command() -> clap::Command {
    Cli::command().long_version(crate::build_info::long_version())
}

fn stripped() -> clap::Command {
    fn strip(a: clap::Arg) -> clap::Arg {
        if a.get_env().is_some() {
            a.env(None::<&'static str>)
        } else {
            a
        }
    }
    command()
        .mut_args(strip)
        .mut_subcommands(|s| s.mut_args(strip))
}

/// Parse `argv` (program name first) with the variables `env` gives.
pub fn parse<I, T>(argv: I, env: &dyn Fn(&str) -> Option<String>) -> Result<Parsed, SettingsError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
    let first = match stripped().try_get_matches_from(&argv) {
        Ok(m) => m,
        Err(e) => {
            // Help shows each flag's variable: render it from the full command.
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) && let Err(full) = command().try_get_matches_from(&argv)
            {
                return Err(SettingsError::Clap(full));
            }
            return Err(SettingsError::Clap(e));
        }
    };
    let sub = first.subcommand_name().map(str::to_string);
    let given = match first.subcommand() {
        Some((_, m)) => m,
        None => &first,
    };

    let mut extra: Vec<OsString> = Vec::new();
    let mut from_env = Vec::new();
    // Which variable each injected flag came from, for error messages.
    let mut injected: Vec<(String, FromEnv)> = Vec::new();
    let mut seen = HashSet::new();
    for s in settings().into_iter().filter(|s| s.subcommand == sub) {
        if given.value_source(&s.id) == Some(ValueSource::CommandLine) || !seen.insert(s.id.clone())
        {
            continue;
        }
        let Some(raw) = env(&s.var) else { continue };
        let value = raw.trim();
        if value.is_empty() {
            continue;
        }
        let origin = FromEnv {
            var: s.var.clone(),
            value: raw.clone(),
        };
        if s.switch {
            match parse_bool(value) {
                Some(true) => extra.push(format!("--{}", s.long).into()),
                Some(false) => {}
                None => {
                    return Err(SettingsError::Variable {
                        var: s.var,
                        value: raw,
                        message: "expected a boolean: 1/0, true/false, yes/no or on/off".into(),
                    });
                }
            }
        } else if let Some(d) = s.delimiter {
            let items: Vec<&str> = value
                .split(d)
                .map(str::trim)
                .filter(|i| !i.is_empty())
                .collect();
            if items.is_empty() {
                continue;
            }
            for item in items {
                extra.push(format!("--{}={item}", s.long).into());
            }
        } else {
            extra.push(format!("--{}={value}", s.long).into());
        }
        injected.push((s.long.clone(), origin.clone()));
        from_env.push(origin);
    }

    let mut full = argv.clone();
    full.extend(extra);
    let matches = stripped().try_get_matches_from(&full).map_err(|e| {
        let arg = match e.get(ContextKind::InvalidArg) {
            Some(ContextValue::String(a)) => a.clone(),
            _ => String::new(),
        };
        let from = injected.iter().find(|(long, _)| {
            arg.strip_prefix("--")
                .and_then(|rest| rest.strip_prefix(long.as_str()))
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '=', '<']))
        });
        match from {
            Some((_, origin)) => SettingsError::Variable {
                var: origin.var.clone(),
                value: origin.value.clone(),
                message: SettingsError::Clap(e).to_string(),
            },
            None => SettingsError::Clap(e),
        }
    })?;
    let cli = Cli::from_arg_matches(&matches).map_err(SettingsError::Clap)?;
    Ok(Parsed {
        cli,
        matches,
        from_env,
    })
}

/// The process environment, as [`parse`] wants it.
pub fn process_env(var: &str) -> Option<String> {
    std::env::var_os(var).map(|v| v.to_string_lossy().into_owned())
}

/// `PRIVSTACK_RELAY_*` variables in the process environment that are no setting.
pub fn unknown_process_variables() -> Vec<String> {
    let known: HashSet<String> = settings().into_iter().map(|s| s.var).collect();
    let mut out: Vec<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| k.starts_with(PREFIX) && !known.contains(k))
        .collect();
    out.sort();
    out
}

/// What `check-config` found: the resolved settings (stdout) and warnings (stderr).
#[derive(Debug)]
pub struct CheckReport {
    pub lines: Vec<String>,
    pub warnings: Vec<String>,
}

/// `privstack-relay check-config [--env-file FILE]`: the settings the relay would run
/// with, or the first problem (with its line where it is in a file).
///
/// With a file only the file counts (the unit sets nothing else); without one, this
/// process's environment. Lines systemd would skip and unknown `PRIVSTACK_RELAY_*`
/// names in a file are errors (in a settings file they are typos); other variables
/// are allowed with a warning (`RUST_LOG` silently).
pub fn check_config(file: Option<&std::path::Path>) -> Result<CheckReport, String> {
    let mut warnings = Vec::new();
    let known: HashSet<String> = relay_variables().into_iter().collect();
    let (parsed, lines) = match file {
        None => {
            for v in unknown_process_variables() {
                warnings.push(format!("{v} is not a privstack-relay setting; ignored"));
            }
            (
                parse(["privstack-relay"], &process_env).map_err(|e| e.to_string())?,
                None,
            )
        }
        Some(path) => {
            let shown = path.display().to_string();
            let bytes = std::fs::read(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
            let text = String::from_utf8(bytes).map_err(|e| {
                format!(
                    "{shown} is not UTF-8 text (at byte {})",
                    e.utf8_error().valid_up_to()
                )
            })?;
            let env = crate::envfile::parse(&text);
            let mut problems = Vec::new();
            for i in &env.ignored {
                problems.push(format!(
                    "line {} of {shown}: {:?} is not a NAME=value assignment (systemd would skip it)",
                    i.line, i.text
                ));
            }
            for a in &env.assignments {
                if a.key.starts_with(PREFIX) && !known.contains(&a.key) {
                    problems.push(format!(
                        "line {} of {shown}: {} is not a privstack-relay setting (see --help)",
                        a.line, a.key
                    ));
                } else if !a.key.starts_with(PREFIX) && a.key != "RUST_LOG" {
                    warnings.push(format!(
                        "line {} of {shown}: {} is not a privstack-relay setting; ignored",
                        a.line, a.key
                    ));
                }
            }
            if !problems.is_empty() {
                return Err(problems.join("\n"));
            }
            let values: std::collections::HashMap<String, (usize, String)> = env
                .resolved()
                .into_iter()
                .map(|a| (a.key.clone(), (a.line, a.value.clone())))
                .collect();
            let line_of: std::collections::HashMap<String, usize> = values
                .iter()
                .map(|(k, (line, _))| (k.clone(), *line))
                .collect();
            let at = move |var: &str| {
                line_of
                    .get(var)
                    .map(|line| format!("line {line} of {shown}: "))
                    .unwrap_or_default()
            };
            let parsed = parse(["privstack-relay"], &|k| {
                values.get(k).map(|(_, v)| v.clone())
            })
            .map_err(|e| format!("{}{e}", e.variable().map(&at).unwrap_or_default()))?;
            (parsed, Some(at))
        }
    };
    if let Err(e) = crate::Config::try_from(&parsed.cli.run) {
        return Err(match parsed.variable_of(e.flag()) {
            Some(from) => {
                let at = lines.as_ref().map(|at| at(&from.var)).unwrap_or_default();
                format!("{at}{}: {e}", from.var)
            }
            None => e.to_string(),
        });
    }
    let lines = parsed
        .resolved()
        .into_iter()
        .map(|(k, v)| format!("{k}={}", quote(&v)))
        .collect();
    Ok(CheckReport { lines, warnings })
}

/// A value as an environment file line's right-hand side: bare where that reads back
/// the same (systemd and a shell's `sed` alike), else double-quoted.
pub fn quote(value: &str) -> String {
    let bare = value.chars().all(|c| {
        c.is_ascii_alphanumeric()
            || matches!(c, '/' | '.' | '_' | ':' | ',' | '@' | '+' | '-' | '%')
    });
    if bare {
        return value.to_string();
    }
    let mut out = String::from("\"");
    for c in value.chars() {
        if matches!(c, '"' | '\\' | '`' | '$') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn with_env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        let map: HashMap<&str, &str> = vars.iter().copied().collect();
        move |k| map.get(k).map(|v| v.to_string())
    }

    fn run(args: &[&str], vars: &[(&str, &str)]) -> Result<Parsed, SettingsError> {
        let mut argv = vec!["privstack-relay"];
        argv.extend_from_slice(args);
        parse(argv, &with_env(vars))
    }

    #[test]
    fn boolean_variables() {
        for (v, want) in [
            ("1", true),
            ("true", true),
            ("YES", true),
            ("on", true),
            (" On ", true),
            ("0", false),
            ("false", false),
            ("no", false),
            ("OFF", false),
            ("", false),
        ] {
            let p = run(&[], &[("PRIVSTACK_RELAY_VERBOSE", v)]).unwrap();
            assert_eq!(p.cli.run.verbose, want, "PRIVSTACK_RELAY_VERBOSE={v:?}");
        }
        let e = run(&[], &[("PRIVSTACK_RELAY_VERBOSE", "maybe")]).unwrap_err();
        assert_eq!(e.exit_code(), exit::CONFIG);
        assert_eq!(e.variable(), Some("PRIVSTACK_RELAY_VERBOSE"));
        assert!(e.to_string().contains("\"maybe\""), "{e}");
        // The command line's -v wins over a variable saying no.
        let p = run(&["-v"], &[("PRIVSTACK_RELAY_VERBOSE", "0")]).unwrap();
        assert!(p.cli.run.verbose);
    }

    #[test]
    fn command_line_wins_and_variables_fill_in() {
        let p = run(
            &["--port", "4200"],
            &[
                ("PRIVSTACK_RELAY_PORT", "4101"),
                ("PRIVSTACK_RELAY_HTTP_PORT", "4102"),
            ],
        )
        .unwrap();
        assert_eq!(p.cli.run.port, 4200);
        assert_eq!(p.cli.run.http_port, 4102);
        assert_eq!(
            p.from_env,
            vec![FromEnv {
                var: "PRIVSTACK_RELAY_HTTP_PORT".into(),
                value: "4102".into()
            }]
        );
        assert_eq!(
            p.variable_of("http-port").map(|e| &e.var[..]),
            Some("PRIVSTACK_RELAY_HTTP_PORT")
        );
        assert!(p.variable_of("port").is_none());
    }

    #[test]
    fn empty_variables_and_list_items_are_unset() {
        let p = run(
            &[],
            &[
                ("PRIVSTACK_RELAY_EXTERNAL_ADDRESS", ""),
                ("PRIVSTACK_RELAY_PORT", "  "),
                (
                    "PRIVSTACK_RELAY_BOOTSTRAP",
                    ",/ip4/192.0.2.1/udp/4001/quic-v1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN,, ",
                ),
            ],
        )
        .unwrap();
        assert!(p.cli.run.external_addresses.is_empty());
        assert_eq!(p.cli.run.port, 4001);
        assert_eq!(p.cli.run.bootstrap.len(), 1);
    }

    #[test]
    fn a_bad_variable_is_named_with_its_value() {
        let e = run(&[], &[("PRIVSTACK_RELAY_PORT", "70000")]).unwrap_err();
        assert_eq!(e.variable(), Some("PRIVSTACK_RELAY_PORT"));
        let msg = e.to_string();
        assert!(msg.starts_with("PRIVSTACK_RELAY_PORT=\"70000\": "), "{msg}");
        assert!(msg.contains("--port"), "{msg}");
        let e = run(
            &[],
            &[(
                "PRIVSTACK_RELAY_EXTERNAL_ADDRESS",
                "/ip4/1.2.3.4/udp/1/quic-v1,nonsense",
            )],
        )
        .unwrap_err();
        assert_eq!(e.variable(), Some("PRIVSTACK_RELAY_EXTERNAL_ADDRESS"));
        assert_eq!(e.exit_code(), exit::CONFIG);
    }

    #[test]
    fn command_line_errors_exit_78_and_help_exits_0() {
        let e = run(&["--no-such-flag"], &[]).unwrap_err();
        assert_eq!(e.exit_code(), exit::CONFIG);
        assert!(e.variable().is_none());
        let e = run(&["--port", "x"], &[]).unwrap_err();
        assert_eq!(e.exit_code(), exit::CONFIG);
        for flag in ["--help", "--version", "-V", "-h"] {
            let e = run(&[flag], &[]).unwrap_err();
            assert_eq!(e.exit_code(), 0, "{flag}");
        }
        // Help names each flag's variable.
        let SettingsError::Clap(e) = run(&["--help"], &[]).unwrap_err() else {
            panic!("help is clap's")
        };
        assert!(e.to_string().contains("PRIVSTACK_RELAY_PORT"));
    }

    #[test]
    fn subcommands_take_their_own_variables() {
        let p = parse(
            ["privstack-relay", "keygen"],
            &with_env(&[("PRIVSTACK_RELAY_IDENTITY", "/tmp/other.key")]),
        )
        .unwrap();
        match p.cli.command {
            Some(crate::config::Command::Keygen(k)) => {
                assert_eq!(k.identity, std::path::PathBuf::from("/tmp/other.key"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn resolved_lists_every_setting() {
        let p = run(&[], &[("PRIVSTACK_RELAY_HTTP_PORT", "\"4102\"")]);
        // A quoted value in the process environment is not unquoted: only the file
        // reader does that, as systemd does.
        assert!(p.is_err());
        let p = run(
            &["--external-address", "/ip4/203.0.113.7/udp/4001/quic-v1"],
            &[
                ("PRIVSTACK_RELAY_HTTP_PORT", "4102"),
                ("PRIVSTACK_RELAY_VERBOSE", "yes"),
            ],
        )
        .unwrap();
        let r: HashMap<String, String> = p.resolved().into_iter().collect();
        assert_eq!(r["PRIVSTACK_RELAY_PORT"], "4001");
        assert_eq!(r["PRIVSTACK_RELAY_HTTP_PORT"], "4102");
        assert_eq!(r["PRIVSTACK_RELAY_VERBOSE"], "true");
        assert_eq!(
            r["PRIVSTACK_RELAY_EXTERNAL_ADDRESS"],
            "/ip4/203.0.113.7/udp/4001/quic-v1"
        );
        assert_eq!(r["PRIVSTACK_RELAY_BOOTSTRAP"], "");
        assert_eq!(r.len(), relay_variables().len());
        assert!(r.len() > 20);
    }

    #[test]
    fn quoting_reads_back() {
        for v in [
            "4001",
            "/ip4/1.2.3.4/udp/1/quic-v1,/dns4/a.example/udp/2/quic-v1",
            "",
        ] {
            assert_eq!(quote(v), v);
        }
        assert_eq!(quote("a b"), "\"a b\"");
        assert_eq!(quote("x\"$y"), "\"x\\\"\\$y\"");
        let text = format!("A={}\n", quote("we\"ird $x `y` \\z "));
        assert_eq!(
            crate::envfile::parse(&text).assignments[0].value,
            "we\"ird $x `y` \\z "
        );
    }
}
