//! containerd's filter language, parsed and evaluated here (pure code, no I/O).
//!
//! A filter string is a comma-separated list of selectors that must all match (AND); a list of
//! filter strings matches when any one does (OR), and an empty list matches everything.
//! A selector is `fieldpath`, `fieldpath==value`, `fieldpath!=value` or `fieldpath~=regexp`.
//! Field path elements are identifiers or double-quoted strings joined by `.`; values are
//! quoted strings or runs of characters without spaces and commas; after `~=` a value may
//! also be delimited by `/…/` or `|…|`. `!=` matches an absent field too.

use crate::error::{Error, Result};

/// What a filter is evaluated against: a field path resolves to a value when present.
pub trait Adaptor {
    fn field(&self, path: &[String]) -> Option<String>;
}

#[derive(Debug, Clone)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(regex::Regex),
}

#[derive(Debug, Clone)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

/// The most memory one `~=` pattern may compile to.
const REGEX_SIZE_LIMIT: usize = 256 << 10;

/// Any of several conjunctions of selectors.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    any: Vec<Vec<Selector>>,
}

impl Filter {
    /// Parses the repeated `filters` field of a request. Empty strings match everything.
    pub fn parse_all<S: AsRef<str>>(filters: &[S]) -> Result<Filter> {
        let mut any = Vec::new();
        for f in filters {
            let f = f.as_ref();
            if f.trim().is_empty() {
                return Ok(Filter::default());
            }
            any.push(Parser::new(f).selectors()?);
        }
        Ok(Filter { any })
    }

    pub fn matches(&self, a: &dyn Adaptor) -> bool {
        self.any.is_empty() || self.any.iter().any(|all| all.iter().all(|s| s.matches(a)))
    }
}

impl Selector {
    fn matches(&self, a: &dyn Adaptor) -> bool {
        let value = a.field(&self.path);
        match &self.op {
            Op::Present => value.is_some(),
            Op::Equal(v) => value.as_deref() == Some(v.as_str()),
            Op::NotEqual(v) => value.as_deref() != Some(v.as_str()),
            Op::Matches(re) => re.is_match(value.as_deref().unwrap_or("")),
        }
    }
}

#[derive(Debug, PartialEq)]
enum Tok {
    Eof,
    Field(String),
    Quoted(char, String),
    Value(String),
    Sep(char),
    Op(String),
}

struct Parser<'a> {
    input: &'a str,
    chars: Vec<(usize, char)>,
    i: usize,
    after_op: bool,
    peeked: Option<(usize, Tok)>,
}

impl<'a> Parser<'a> {
    fn new(input: &'a str) -> Self {
        Parser {
            input,
            chars: input.char_indices().collect(),
            i: 0,
            after_op: false,
            peeked: None,
        }
    }

    fn err(&self, pos: usize, msg: impl std::fmt::Display) -> Error {
        Error::invalid(format!(
            "filters: parse error: {msg} at position {pos} in {:?}",
            self.input
        ))
    }

    fn pos(&self) -> usize {
        self.chars
            .get(self.i)
            .map(|c| c.0)
            .unwrap_or(self.input.len())
    }

    fn peek(&mut self) -> Result<&Tok> {
        if self.peeked.is_none() {
            let t = self.lex()?;
            self.peeked = Some(t);
        }
        Ok(&self.peeked.as_ref().expect("peeked").1)
    }

    fn next(&mut self) -> Result<(usize, Tok)> {
        match self.peeked.take() {
            Some(t) => Ok(t),
            None => self.lex(),
        }
    }

    fn lex(&mut self) -> Result<(usize, Tok)> {
        while let Some(&(_, c)) = self.chars.get(self.i) {
            if !c.is_whitespace() {
                break;
            }
            self.i += 1;
        }
        let pos = self.pos();
        let Some(&(_, c)) = self.chars.get(self.i) else {
            return Ok((pos, Tok::Eof));
        };
        if matches!(c, '"' | '/' | '|') {
            self.i += 1;
            let mut out = String::new();
            loop {
                let Some(&(_, ch)) = self.chars.get(self.i) else {
                    return Err(self.err(pos, "quoted literal not terminated"));
                };
                self.i += 1;
                if ch == c {
                    break;
                }
                if ch == '\n' {
                    return Err(self.err(pos, "quoted literal not terminated"));
                }
                if ch == '\\' {
                    let Some(&(_, e)) = self.chars.get(self.i) else {
                        return Err(self.err(pos, "quoted literal not terminated"));
                    };
                    self.i += 1;
                    if c == '"' {
                        match e {
                            'n' => out.push('\n'),
                            't' => out.push('\t'),
                            'r' => out.push('\r'),
                            '\\' => out.push('\\'),
                            '"' => out.push('"'),
                            'a' => out.push('\x07'),
                            'b' => out.push('\x08'),
                            'f' => out.push('\x0c'),
                            'v' => out.push('\x0b'),
                            other => return Err(self.err(pos, format!("invalid escape \\{other}"))),
                        }
                    } else if e == c {
                        out.push(c);
                    } else {
                        // Regexp delimiters keep other escapes for the regexp engine.
                        out.push('\\');
                        out.push(e);
                    }
                } else {
                    out.push(ch);
                }
            }
            self.after_op = false;
            return Ok((pos, Tok::Quoted(c, out)));
        }
        if c == ',' || c == '.' {
            self.i += 1;
            self.after_op = false;
            return Ok((pos, Tok::Sep(c)));
        }
        if matches!(c, '=' | '!' | '~') {
            let start = self.i;
            while matches!(self.chars.get(self.i), Some(&(_, '=' | '!' | '~'))) {
                self.i += 1;
            }
            self.after_op = true;
            return Ok((
                pos,
                Tok::Op(self.chars[start..self.i].iter().map(|c| c.1).collect()),
            ));
        }
        if self.after_op {
            let start = self.i;
            while let Some(&(_, ch)) = self.chars.get(self.i) {
                if ch == ',' || ch.is_whitespace() || ch.is_control() {
                    break;
                }
                self.i += 1;
            }
            self.after_op = false;
            if start == self.i {
                return Err(self.err(pos, format!("unexpected character {c:?}")));
            }
            return Ok((
                pos,
                Tok::Value(self.chars[start..self.i].iter().map(|c| c.1).collect()),
            ));
        }
        if c.is_ascii_alphanumeric() || c == '_' {
            let start = self.i;
            while matches!(self.chars.get(self.i), Some(&(_, ch)) if ch.is_ascii_alphanumeric() || ch == '_')
            {
                self.i += 1;
            }
            return Ok((
                pos,
                Tok::Field(self.chars[start..self.i].iter().map(|c| c.1).collect()),
            ));
        }
        Err(self.err(pos, format!("unexpected character {c:?}")))
    }

    fn selectors(&mut self) -> Result<Vec<Selector>> {
        let mut all = vec![self.selector()?];
        loop {
            match self.next()? {
                (_, Tok::Sep(',')) => all.push(self.selector()?),
                (_, Tok::Eof) => return Ok(all),
                (pos, t) => return Err(self.err(pos, format!("unexpected input {t:?}"))),
            }
        }
    }

    fn field(&mut self) -> Result<String> {
        match self.next()? {
            (_, Tok::Field(f)) => Ok(f),
            (_, Tok::Quoted('"', f)) => Ok(f),
            (pos, Tok::Quoted(..)) => Err(self.err(pos, "invalid quote encountered")),
            (pos, _) => Err(self.err(pos, "expected field or quoted")),
        }
    }

    fn selector(&mut self) -> Result<Selector> {
        let mut path = vec![self.field()?];
        while self.peek()? == &Tok::Sep('.') {
            self.next()?;
            path.push(self.field()?);
        }
        if matches!(self.peek()?, Tok::Sep(',') | Tok::Eof) {
            return Ok(Selector {
                path,
                op: Op::Present,
            });
        }
        let (pos, op) = self.next()?;
        let Tok::Op(op) = op else {
            return Err(self.err(pos, "expected an operator (\"==\"|\"!=\"|\"~=\")"));
        };
        let (vpos, value) = self.next()?;
        let value = match value {
            Tok::Value(v) | Tok::Field(v) => v,
            Tok::Quoted('"', v) => v,
            Tok::Quoted(_, v) if op == "~=" => v,
            Tok::Quoted(..) => return Err(self.err(vpos, "invalid quote encountered")),
            Tok::Eof => return Err(self.err(vpos, "unexpected end of filter, expected a value")),
            _ => return Err(self.err(vpos, "expected value or quoted")),
        };
        let op = match op.as_str() {
            "==" => Op::Equal(value),
            "!=" => Op::NotEqual(value),
            // Patterns come from clients: their compiled size is bounded (the regex crate's
            // default allows 10 MiB per pattern, per request).
            "~=" => Op::Matches(
                regex::RegexBuilder::new(&value)
                    .size_limit(REGEX_SIZE_LIMIT)
                    .dfa_size_limit(REGEX_SIZE_LIMIT)
                    .build()
                    .map_err(|e| self.err(vpos, format!("invalid regexp {value:?}: {e}")))?,
            ),
            other => return Err(self.err(pos, format!("unsupported operator {other:?}"))),
        };
        Ok(Selector { path, op })
    }
}

/// Resolves `labels.<key>` (the rest of the path joined back with `.`) against a label map.
pub fn label_field<'a>(
    path: &[String],
    labels: impl Fn(&str) -> Option<&'a String>,
) -> Option<String> {
    if path.len() < 2 || path[0] != "labels" {
        return None;
    }
    labels(&path[1..].join(".")).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Obj(HashMap<&'static str, &'static str>);
    impl Adaptor for Obj {
        fn field(&self, path: &[String]) -> Option<String> {
            self.0.get(path.join(".").as_str()).map(|s| s.to_string())
        }
    }

    fn obj() -> Obj {
        Obj(HashMap::from([
            ("digest", "sha256:abc"),
            ("labels.containerd.io/gc.root", "yes"),
            ("labels.foo", "bar"),
            ("ref", "tar-blobs/sha256/00"),
        ]))
    }

    fn m(filters: &[&str]) -> bool {
        Filter::parse_all(filters).unwrap().matches(&obj())
    }

    #[test]
    fn operators() {
        assert!(m(&[]));
        assert!(m(&["digest==sha256:abc"]));
        assert!(!m(&["digest==sha256:abd"]));
        assert!(m(&["digest!=sha256:abd"]));
        assert!(m(&["labels.missing!=x"]));
        assert!(m(&["labels.foo"]));
        assert!(!m(&["labels.missing"]));
        assert!(m(&["labels.foo~=^b.r$"]));
        assert!(m(&["ref~=/^tar-.*$/"]));
        assert!(m(&["ref~=|tar-blobs/sha256|"]));
        assert!(m(&[r#"labels."containerd.io/gc.root"==yes"#]));
    }

    #[test]
    fn and_or() {
        assert!(m(&["labels.foo==bar,digest==sha256:abc"]));
        assert!(!m(&["labels.foo==bar,digest==sha256:nope"]));
        assert!(m(&["labels.foo==nope", "digest==sha256:abc"]));
        assert!(m(&[" labels.foo == bar , digest == sha256:abc "]));
        assert!(m(&[r#"labels.foo=="bar""#]));
    }

    #[test]
    fn parse_errors_name_the_problem() {
        for bad in [
            "==x",
            "labels.foo==",
            "labels.foo=x",
            "a,",
            "a b",
            "a==\"unterminated",
            "a~=(",
            "a==/x/",
            ".",
        ] {
            let err = Filter::parse_all(&[bad]).unwrap_err();
            assert!(
                err.message().starts_with("filters: parse error"),
                "{bad}: {}",
                err.message()
            );
        }
    }

    /// Replays the fuzz corpus on stable, so the fuzz target's inputs stay covered in CI.
    #[test]
    fn fuzz_corpus_replays() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/filter_parse");
        let obj = Obj(HashMap::from([("labels.a", "b"), ("digest", "sha256:abc")]));
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            let Ok(s) = std::str::from_utf8(&bytes) else {
                continue;
            };
            let parts: Vec<&str> = s.split('\n').collect();
            if let Ok(f) = Filter::parse_all(&parts) {
                let _ = f.matches(&obj);
            }
            n += 1;
        }
        assert!(n >= 5, "corpus missing at {}", dir.display());
    }

    #[test]
    fn huge_regexps_are_refused() {
        // The regex crate alone compiles this (its default limit is 10 MiB); a filter may not.
        let pattern = "[a-z]{20000}";
        assert!(regex::Regex::new(pattern).is_ok());
        let e = Filter::parse_all(&[format!("labels.a~=\"{pattern}\"")]).unwrap_err();
        assert!(e.message().contains("regexp"), "{e}");
        assert!(Filter::parse_all(&["labels.a~=\"^x[0-9]+$\""]).is_ok());
    }
}
