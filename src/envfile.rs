//! systemd's `EnvironmentFile=` format, read the way systemd reads it, so that
//! `privstack-relay check-config --env-file` sees exactly what the unit will see.
//!
//! The rules (systemd.exec(5), and `load_env_file` in systemd's `env-file.c`):
//! - lines whose first non-blank character is `#` or `;` are comments;
//! - `KEY=VALUE`; blanks around the key and before the value are dropped;
//! - an unquoted value ends at the line end (CR or LF), trailing blanks are dropped,
//!   and a backslash takes the next character literally (a backslash before the line
//!   end continues the value on the next line);
//! - `'...'` is taken literally; in `"..."` a backslash escapes `"`, `\`, `` ` ``, `$`
//!   and the line end, and stays in place before any other character; quoted and
//!   unquoted parts next to each other are joined;
//! - a line without `=` or whose key is not a valid variable name is ignored by
//!   systemd; here it is reported, since in a relay's settings file it is a mistake.

/// One `KEY=VALUE` assignment and the line it starts on (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub line: usize,
    pub key: String,
    pub value: String,
}

/// A line systemd would skip: no `=`, or a key that is not a variable name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ignored {
    pub line: usize,
    pub text: String,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EnvFile {
    pub assignments: Vec<Assignment>,
    pub ignored: Vec<Ignored>,
}

impl EnvFile {
    /// The value each key ends up with (the last assignment wins), in file order of
    /// each key's last assignment.
    pub fn resolved(&self) -> Vec<&Assignment> {
        let mut out: Vec<&Assignment> = Vec::new();
        for a in &self.assignments {
            out.retain(|b| b.key != a.key);
            out.push(a);
        }
        out
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    PreKey,
    Key,
    PreValue,
    Value,
    ValueEscape,
    SingleQuote,
    DoubleQuote,
    DoubleQuoteEscape,
    Comment,
    CommentEscape,
}

fn is_newline(c: char) -> bool {
    c == '\n' || c == '\r'
}

fn is_blank(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

/// systemd's `env_name_is_valid`: letters, digits and `_`, not starting with a digit.
pub fn is_valid_name(key: &str) -> bool {
    let mut chars = key.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

struct Parser {
    out: EnvFile,
    key: String,
    value: String,
    /// Where trailing blanks of the key / an unquoted value start, if they do.
    key_blank: Option<usize>,
    value_blank: Option<usize>,
    /// Line of the current character, and the line the current entry started on.
    line: usize,
    start: usize,
    raw: String,
}

impl Parser {
    fn push(&mut self, trim_value: bool) {
        let mut key = std::mem::take(&mut self.key);
        if let Some(at) = self.key_blank.take() {
            key.truncate(at);
        }
        let mut value = std::mem::take(&mut self.value);
        if trim_value && let Some(at) = self.value_blank.take() {
            value.truncate(at);
        }
        self.value_blank = None;
        if is_valid_name(&key) {
            self.raw.clear();
            self.out.assignments.push(Assignment {
                line: self.start,
                key,
                value,
            });
        } else {
            self.ignore();
        }
    }

    /// A key without `=` before the line end: systemd skips the line.
    fn drop_key(&mut self) {
        self.key.clear();
        self.key_blank = None;
        self.ignore();
    }

    /// Report the current entry as a line systemd skips.
    fn ignore(&mut self) {
        let raw = std::mem::take(&mut self.raw);
        self.out.ignored.push(Ignored {
            line: self.start,
            text: raw.trim().to_string(),
        });
    }
}

/// Parse an environment file's text.
pub fn parse(text: &str) -> EnvFile {
    use State::*;
    let mut p = Parser {
        out: EnvFile::default(),
        key: String::new(),
        value: String::new(),
        key_blank: None,
        value_blank: None,
        line: 1,
        start: 1,
        raw: String::new(),
    };
    let mut state = PreKey;
    // A CR LF pair is one line end (systemd counts either character as one).
    let mut prev_cr = false;
    for c in text.chars() {
        let crlf = prev_cr && c == '\n';
        prev_cr = c == '\r';
        if state != PreKey && state != Comment {
            p.raw.push(c);
        }
        match state {
            PreKey => {
                if c == '#' || c == ';' {
                    state = Comment;
                } else if !is_blank(c) {
                    state = Key;
                    p.start = p.line;
                    p.raw.clear();
                    p.raw.push(c);
                    p.key.push(c);
                    p.key_blank = None;
                }
            }
            Key => {
                if is_newline(c) {
                    state = PreKey;
                    p.drop_key();
                } else if c == '=' {
                    state = PreValue;
                    p.value_blank = None;
                } else {
                    if !is_blank(c) {
                        p.key_blank = None;
                    } else if p.key_blank.is_none() {
                        p.key_blank = Some(p.key.len());
                    }
                    p.key.push(c);
                }
            }
            PreValue => {
                if is_newline(c) {
                    state = PreKey;
                    p.push(false);
                } else if c == '\'' {
                    state = SingleQuote;
                } else if c == '"' {
                    state = DoubleQuote;
                } else if c == '\\' {
                    state = ValueEscape;
                } else if !is_blank(c) {
                    state = Value;
                    p.value.push(c);
                }
            }
            Value => {
                if is_newline(c) {
                    state = PreKey;
                    p.push(true);
                } else if c == '\\' {
                    state = ValueEscape;
                    p.value_blank = None;
                } else {
                    if !is_blank(c) {
                        p.value_blank = None;
                    } else if p.value_blank.is_none() {
                        p.value_blank = Some(p.value.len());
                    }
                    p.value.push(c);
                }
            }
            ValueEscape => {
                // An escaped line end is dropped (only one character of it: as in
                // systemd, the LF of `\` CR LF then ends the value).
                state = Value;
                if !is_newline(c) {
                    p.value.push(c);
                }
            }
            SingleQuote => {
                if c == '\'' {
                    state = PreValue;
                } else {
                    p.value.push(c);
                }
            }
            DoubleQuote => {
                if c == '"' {
                    state = PreValue;
                } else if c == '\\' {
                    state = DoubleQuoteEscape;
                } else {
                    p.value.push(c);
                }
            }
            DoubleQuoteEscape => {
                state = DoubleQuote;
                if matches!(c, '"' | '\\' | '`' | '$') {
                    p.value.push(c);
                } else if c != '\n' {
                    p.value.push('\\');
                    p.value.push(c);
                }
            }
            Comment => {
                if c == '\\' {
                    state = CommentEscape;
                } else if is_newline(c) {
                    state = PreKey;
                }
            }
            CommentEscape => {
                // Since systemd 254 a comment does not continue on the next line.
                state = if is_newline(c) { PreKey } else { Comment };
            }
        }
        if c == '\n' && !crlf || c == '\r' {
            p.line += 1;
        }
    }
    match state {
        PreValue | SingleQuote | DoubleQuote | DoubleQuoteEscape | ValueEscape => p.push(false),
        Value => p.push(true),
        Key => p.drop_key(),
        PreKey | Comment | CommentEscape => {}
    }
    p.out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(text: &str) -> Vec<(usize, String, String)> {
        parse(text)
            .assignments
            .into_iter()
            .map(|a| (a.line, a.key, a.value))
            .collect()
    }

    fn one(text: &str) -> String {
        let v = values(text);
        assert_eq!(v.len(), 1, "{text:?} gave {v:?}");
        v[0].2.clone()
    }

    #[test]
    fn values_as_systemd_reads_them() {
        // (file text, the value systemd's EnvironmentFile= gives A)
        let table = [
            ("A=4101", "4101"),
            ("A=\"4101\"", "4101"),
            ("A='4101'", "4101"),
            ("A=4101   \t", "4101"),
            ("  A  =   4101", "4101"),
            ("A=\"4101 \"", "4101 "),
            ("A=a b  c  ", "a b  c"),
            ("A=\"a\" 'b'c", "abc"),
            ("A=x\"y\"", "x\"y\""),
            ("A=\"a\\\"b\\\\c\\$d\\`e\\nf\"", "a\"b\\c$d`e\\nf"),
            ("A='a\\b\"c'", "a\\b\"c"),
            ("A=a\\ b\\\\c", "a b\\c"),
            ("A=one,\\\ntwo", "one,two"),
            ("A=\"one,\\\ntwo\"", "one,two"),
            ("A=\"one\ntwo\"", "one\ntwo"),
            ("A=", ""),
            ("A=  ", ""),
            ("A=\"unterminated", "unterminated"),
            ("A=4101\r\n", "4101"),
            ("A=x#not-a-comment", "x#not-a-comment"),
        ];
        for (text, want) in table {
            assert_eq!(one(text), want, "{text:?}");
        }
    }

    #[test]
    fn comments_blank_lines_and_line_numbers() {
        let text = "# comment\n\n; also a comment\r\n  # indented\nA=1\r\nB = two\n\nC=3\\\n4\nD=5";
        assert_eq!(
            values(text),
            vec![
                (5, "A".into(), "1".into()),
                (6, "B".into(), "two".into()),
                (8, "C".into(), "34".into()),
                (10, "D".into(), "5".into()),
            ]
        );
    }

    #[test]
    fn comments_do_not_continue() {
        assert_eq!(values("# a \\\nA=1"), vec![(2, "A".into(), "1".into())]);
    }

    #[test]
    fn lines_systemd_skips_are_reported() {
        let f = parse("A=1\n--port 4101\nexport B=2\n9X=3\nC=4\nD");
        assert_eq!(
            f.assignments.iter().map(|a| &a.key[..]).collect::<Vec<_>>(),
            ["A", "C"]
        );
        assert_eq!(
            f.ignored,
            vec![
                Ignored {
                    line: 2,
                    text: "--port 4101".into()
                },
                Ignored {
                    line: 3,
                    text: "export B=2".into()
                },
                Ignored {
                    line: 4,
                    text: "9X=3".into()
                },
                Ignored {
                    line: 6,
                    text: "D".into()
                },
            ]
        );
    }

    #[test]
    fn the_last_assignment_wins() {
        let f = parse("A=1\nB=2\nA=3\n");
        let r: Vec<_> = f
            .resolved()
            .into_iter()
            .map(|a| (a.line, &a.key[..], &a.value[..]))
            .collect();
        assert_eq!(r, [(2, "B", "2"), (3, "A", "3")]);
    }
}
