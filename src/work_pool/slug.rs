//! Label keys and values made valid for Kubernetes the way Prefect's Kubernetes worker
//! makes them (`prefect_kubernetes.utilities._slugify_label_key/_value`, which use
//! python-slugify's legacy pipeline): `{"Team Name": "Data Team"}` becomes
//! `{"Team-Name": "Data-Team"}` instead of a Job the API server refuses.
//!
//! Non-ASCII text is transliterated by `deunicode` where Python uses Unidecode; the two
//! agree on Latin letters with accents and the common ligatures.

/// A label value: `[A-Za-z0-9._-]`, at most 63, alphanumeric at both ends; the original
/// when nothing is left (the API server then names the problem).
pub fn label_value(value: &str) -> String {
    let slug = slugify(value, 63, |c| {
        c.is_ascii_alphanumeric() || "-_.".contains(c)
    });
    let slug = slug.trim_matches(['_', '-', '.']);
    if slug.is_empty() {
        value.to_string()
    } else {
        slug.to_string()
    }
}

/// A label (or annotation) key: an optional DNS-subdomain prefix (at most 253 of
/// `[A-Za-z0-9.-]`) and a name (as a value), split at the first `/`.
pub fn label_key(key: &str) -> String {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let name = label_value(name);
    match prefix.filter(|p| !p.is_empty()) {
        Some(prefix) => {
            let slug = slugify(prefix, 253, |c| {
                c.is_ascii_alphanumeric() || "-.".contains(c)
            });
            let slug = slug.trim_matches(['_', '-', '.']);
            let prefix = if slug.is_empty() { prefix } else { slug };
            format!("{prefix}/{name}")
        }
        None => name,
    }
}

/// python-slugify's legacy `slugify(text, lowercase=False, max_length, regex_pattern)`
/// where `allowed` is the complement of the pattern.
fn slugify(text: &str, max_length: usize, allowed: impl Fn(char) -> bool) -> String {
    let text = text.replace('\'', "-");
    let text = deunicode::deunicode(&text);
    let text = deunicode::deunicode(&decode_entities(&text));
    let text = drop_commas_between_digits(&text);
    // Runs of disallowed characters become one dash; dashes collapse and are trimmed.
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let c = if allowed(c) { c } else { '-' };
        if !(c == '-' && out.ends_with('-')) {
            out.push(c);
        }
    }
    let out = out.trim_matches('-');
    if out.chars().count() < max_length {
        return out.to_string();
    }
    let cut: String = out.chars().take(max_length).collect();
    cut.trim_matches('-').to_string()
}

/// `&amp;`, `&#38;` and `&#x26;` as python-slugify decodes them (the named entities a
/// label plausibly holds).
fn decode_entities(text: &str) -> String {
    const NAMED: [(&str, char); 6] = [
        ("amp", '&'),
        ("lt", '<'),
        ("gt", '>'),
        ("quot", '"'),
        ("apos", '\''),
        ("nbsp", '\u{a0}'),
    ];
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('&') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let decoded = after.find(';').and_then(|end| {
            let body = &after[..end];
            let c = if let Some(hex) = body.strip_prefix("#x") {
                u32::from_str_radix(hex, 16).ok().and_then(char::from_u32)
            } else if let Some(dec) = body.strip_prefix('#') {
                dec.parse().ok().and_then(char::from_u32)
            } else {
                NAMED.iter().find(|(n, _)| *n == body).map(|(_, c)| *c)
            };
            c.map(|c| (c, end))
        });
        match decoded {
            Some((c, end)) => {
                out.push(c);
                rest = &after[end + 1..];
            }
            None => {
                out.push('&');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// `1,000` → `1000`.
fn drop_commas_between_digits(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    chars
        .iter()
        .enumerate()
        .filter(|&(i, &c)| {
            !(c == ','
                && i > 0
                && chars[i - 1].is_ascii_digit()
                && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        })
        .map(|(_, c)| *c)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// Cases slugified by prefect-kubernetes 0.8.0 itself (render_jobs.py).
    #[test]
    fn slugifies_as_prefect_kubernetes_does() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/prefect-kubernetes/slug-golden.json"
        );
        let cases: Vec<Value> =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert!(cases.len() > 10);
        for case in cases {
            let text = case["text"].as_str().unwrap();
            assert_eq!(label_key(text), case["key"], "key of {text:?}");
            assert_eq!(label_value(text), case["value"], "value of {text:?}");
        }
    }
}
