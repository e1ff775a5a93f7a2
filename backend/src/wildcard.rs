//! The seed's account-search wildcard, translated to a SQL `LIKE` pattern.
//!
//! `*` stands for any run of characters (possibly empty); an empty pattern or `*` alone lists everyone; a
//! pattern without `*` is an exact match. Matching ignores case: patterns are lower-cased the same way
//! usernames are keyed ([`name_key`]). Every other character, including SQL's own `%`, `_` and the escape
//! character `\`, matches only itself.

/// How a `list` pattern selects usernames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    /// Every account.
    All,
    /// The one account whose key equals this.
    Exact(String),
    /// Keys matching this SQL `LIKE` pattern, written for `ESCAPE '\'`.
    Like(String),
}

/// The key of a username: what uniqueness and matching compare (NFKC, lower case; see
/// [`crate::username::key`]).
pub fn name_key(username: &str) -> String {
    crate::username::key(username)
}

impl Pattern {
    /// Parse a client's pattern.
    pub fn parse(pattern: &str) -> Pattern {
        let key = name_key(pattern.trim());
        if key.chars().all(|c| c == '*') {
            return Pattern::All;
        }
        if !key.contains('*') {
            return Pattern::Exact(key);
        }
        let mut like = String::with_capacity(key.len() + 4);
        let mut previous_star = false;
        for c in key.chars() {
            match c {
                // Runs of `*` mean the same as one.
                '*' if previous_star => continue,
                '*' => like.push('%'),
                '%' | '_' | '\\' => {
                    like.push('\\');
                    like.push(c);
                }
                _ => like.push(c),
            }
            previous_star = c == '*';
        }
        Pattern::Like(like)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn like(s: &str) -> Pattern {
        Pattern::Like(s.to_owned())
    }

    #[test]
    fn empty_and_star_list_everyone() {
        assert_eq!(Pattern::parse(""), Pattern::All);
        assert_eq!(Pattern::parse("*"), Pattern::All);
        assert_eq!(Pattern::parse("**"), Pattern::All);
        assert_eq!(Pattern::parse("  "), Pattern::All);
    }

    #[test]
    fn without_star_is_exact_and_case_insensitive() {
        assert_eq!(Pattern::parse("Alice"), Pattern::Exact("alice".into()));
    }

    #[test]
    fn seed_cases() {
        assert_eq!(Pattern::parse("a*"), like("a%"));
        assert_eq!(Pattern::parse("*z"), like("%z"));
        assert_eq!(Pattern::parse("a*z"), like("a%z"));
        assert_eq!(Pattern::parse("A**Z"), like("a%z"));
        assert_eq!(Pattern::parse("*li*"), like("%li%"));
    }

    #[test]
    fn sql_metacharacters_match_only_themselves() {
        assert_eq!(Pattern::parse("100%*"), like("100\\%%"));
        assert_eq!(Pattern::parse("a_b*"), like("a\\_b%"));
        assert_eq!(Pattern::parse("back\\slash*"), like("back\\\\slash%"));
        assert_eq!(Pattern::parse("dot.name*"), like("dot.name%"));
        // Without a star, metacharacters are just part of the exact name.
        assert_eq!(Pattern::parse("a_b"), Pattern::Exact("a_b".into()));
    }
}
