//! `*` wildcard matching for metric-name patterns in config.

/// True if `text` matches `pattern`, where `*` matches any run of characters (also none)
/// and everything else matches itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, rest) = (parts[0], &parts[1..]);
    let Some(mut remaining) = text.strip_prefix(first) else {
        return false;
    };
    let last = rest[rest.len() - 1];
    for middle in &rest[..rest.len() - 1] {
        match remaining.find(middle) {
            Some(at) => remaining = &remaining[at + middle.len()..],
            None => return false,
        }
    }
    remaining.len() >= last.len() && remaining.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn matches_wildcards_anywhere() {
        assert!(glob_match("*", "anything"));
        assert!(glob_match("cpu", "cpu"));
        assert!(!glob_match("cpu", "cpu2"));
        assert!(glob_match("cpu*", "cpu_user"));
        assert!(glob_match("*error*", "http_errors_5xx"));
        assert!(glob_match("*_total", "requests_total"));
        assert!(!glob_match("*_total", "total"));
        assert!(glob_match("a*b*c", "a__b__c"));
        assert!(!glob_match("a*b*c", "a__c__b"));
        assert!(!glob_match("ab*ba", "aba"));
    }
}
