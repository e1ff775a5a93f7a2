//! Username rules: the form a name is stored in, which names are refused, the key names are unique and
//! looked up by, and the confusable skeleton that keeps look-alikes (`аlice` in Cyrillic, `ａｄｍｉｎ`) from
//! registering beside the real names.
//!
//! The Unicode tables come from maintained crates: `unicode-normalization` (NFC, NFKC) and
//! `unicode-security` (Unicode TS #39 confusables and default-ignorable code points), never from lists kept
//! here.

use replichat_shared::MAX_USERNAME_CHARS;
use unicode_normalization::char::is_combining_mark;
use unicode_normalization::UnicodeNormalization;

use crate::{Error, Result};

/// A username that passed every rule, in its stored form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Username {
    /// The name as stored and shown: the client's input in NFC.
    pub name: String,
    /// Its TS #39 confusable skeleton (of the [`key`]): two live accounts never share one.
    pub skeleton: String,
}

/// Check `input` against the rules and return its stored form. Names are NFC-normalised first (a
/// decomposed `é` is the same name as a precomposed one), then must have 1-32 characters, and hold no
/// whitespace, control, invisible or default-ignorable character (zero-width and bidirectional
/// controls, variation selectors, the combining grapheme joiner, Hangul fillers), no `*` (the search
/// wildcard), and must not start with a combining mark.
pub fn parse(input: &str) -> Result<Username> {
    let name: String = input.nfc().collect();
    let chars = name.chars().count();
    if chars == 0 {
        return Err(Error::InvalidUsername("it is empty"));
    }
    if chars > MAX_USERNAME_CHARS {
        return Err(Error::InvalidUsername("it is longer than 32 characters"));
    }
    // Also in the key: NFKC turns some marks into a space and the mark (U+00A8 `¨` is `" \u{308}"`).
    if name.chars().chain(key(&name).chars()).any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Error::InvalidUsername("it contains whitespace or a control character"));
    }
    if name.chars().any(|c| is_invisible(c) || is_default_ignorable(c)) {
        return Err(Error::InvalidUsername("it contains an invisible or default-ignorable character"));
    }
    // Also a compatibility form of it (full-width `＊`), which the key would turn into one.
    if name.contains('*') || key(&name).contains('*') {
        return Err(Error::InvalidUsername("it contains '*', the search wildcard"));
    }
    if name.chars().next().is_some_and(is_combining_mark) {
        return Err(Error::InvalidUsername("it starts with a combining mark"));
    }
    let skeleton = skeleton(&name);
    Ok(Username { name, skeleton })
}

/// [`parse`] without the result: whether a name is acceptable.
pub fn validate(input: &str) -> Result<()> {
    parse(input).map(drop)
}

/// The key usernames are unique by and looked up by: NFKC, then lower case. Compatibility forms (full-width
/// letters, ligatures such as `ﬁ`) and case differences give the same key, so `ａｄｍｉｎ` and `Admin` are
/// `admin`; an input in any normal form finds the account.
pub fn key(username: &str) -> String {
    username.nfkc().collect::<String>().to_lowercase()
}

/// The TS #39 skeleton of a name's [`key`]: equal for names a reader could not tell apart (`аlice` with a
/// Cyrillic `а` and `alice`, `ﬁle` and `file`).
pub fn skeleton(username: &str) -> String {
    unicode_security::skeleton(&key(username)).collect()
}

/// Whether `c` is a Default_Ignorable_Code_Point (rendered as nothing). `unicode-security` keeps the table
/// private but drops exactly these from a skeleton, and a character's canonical decomposition and
/// confusable prototype are never empty: a character is default-ignorable iff its skeleton is empty.
fn is_default_ignorable(c: char) -> bool {
    let mut buf = [0; 4];
    let empty = unicode_security::skeleton(c.encode_utf8(&mut buf)).next().is_none();
    empty
}

/// Format characters that are not default-ignorable yet render as nothing or reorder text (the
/// interlinear annotation controls) and the ones the earlier rule named; in a name they let
/// `alice\u{200B}` pass for `alice`.
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{061C}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
            | '\u{E0000}'..='\u{E007F}'
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted() {
        assert!(validate("alice").is_ok());
        assert!(validate("a").is_ok());
        assert!(validate(&"x".repeat(32)).is_ok());
        assert!(validate("émile_100%").is_ok());
        assert!(validate("e\u{301}mile").is_ok(), "a decomposed é is fine: it is stored composed");
        assert_eq!(parse("e\u{301}mile").unwrap().name, "émile");
    }

    #[test]
    fn refused() {
        for name in [
            "",
            "a b",
            "a\u{7}b",
            "a*",
            "alice\u{200B}",
            "\u{3164}\u{3164}\u{3164}",
            "\u{34F}",
            "alice\u{34F}",
            "alice\u{FE0F}",
            "\u{301}",
            "\u{301}alice",
            "a\u{FFF9}",
            "a\u{FF0A}",
            "a\u{A8}",
        ] {
            assert!(matches!(validate(name), Err(Error::InvalidUsername(_))), "{name:?} refused");
        }
        assert!(validate(&"x".repeat(33)).is_err());
    }

    #[test]
    fn look_alikes_share_a_key_or_a_skeleton() {
        assert_eq!(key("ａｄｍｉｎ"), "admin");
        assert_eq!(key("ﬁle"), "file");
        assert_eq!(key("e\u{301}mile"), key("émile"));
        for (fake, real) in [
            ("аlice", "alice"),
            ("ａｄｍｉｎ", "admin"),
            ("ﬁle", "file"),
            ("ALICE", "alice"),
            ("a1ice", "alice"),
            ("rnodern", "modern"),
        ] {
            assert_eq!(skeleton(fake), skeleton(real), "{fake:?} vs {real:?}");
        }
        assert_ne!(skeleton("alice"), skeleton("bob"));
    }

    #[test]
    fn default_ignorables_from_the_table() {
        for c in ['\u{AD}', '\u{34F}', '\u{3164}', '\u{FE0F}', '\u{200B}', '\u{E0001}'] {
            assert!(is_default_ignorable(c), "{c:?}");
        }
        for c in ['a', 'é', '\u{301}', '1', '_', 'ж'] {
            assert!(!is_default_ignorable(c), "{c:?}");
        }
    }
}
