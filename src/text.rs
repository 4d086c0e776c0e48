//! Text from outside (servers, resources) cut to a size before it is kept or printed.

/// The longest run name kept (Prefect's own are two words); a name is logged with every
/// line about its run.
pub const MAX_RUN_NAME: usize = 256;
/// The longest state message kept.
pub const MAX_STATE_MESSAGE: usize = 1024;

/// FNV-1a over `bytes`: a hash stable across builds and platforms (std's is not), for
/// names and fingerprints that must come out the same in every process.
pub fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A version string's release numbers, in order, as far as they are numbers: each dotted
/// part's leading digits, before any local part (`3.4.25.dev3+g1` → `3`, `4`, `25`;
/// `3.0.0rc1` → `3`, `0`, `0`).
pub fn release_numbers(version: &str) -> Vec<&str> {
    let public = version
        .split_once('+')
        .map_or(version, |(public, _)| public);
    public
        .split('.')
        .map(|part| {
            let end = part
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(part.len());
            &part[..end]
        })
        .take_while(|n| !n.is_empty())
        .collect()
}

/// Percent-encodes a URL path segment (pool, queue and deployment names may hold
/// spaces or slashes).
pub fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `text` cut to at most `max` bytes at a character boundary, marked when cut.
pub fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    const MARK: &str = "…";
    let mut cut = max.saturating_sub(MARK.len());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{MARK}", &text[..cut])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_numbers_stop_at_the_first_part_without_a_number() {
        assert_eq!(release_numbers("3.4.25.dev3+g1234"), ["3", "4", "25"]);
        assert_eq!(release_numbers("3.0.0rc1"), ["3", "0", "0"]);
        assert_eq!(release_numbers("2.20+local"), ["2", "20"]);
        assert!(release_numbers("three").is_empty());
        assert!(release_numbers("").is_empty());
    }

    #[test]
    fn urlencodes_names() {
        assert_eq!(urlencode("my pool/x"), "my%20pool%2Fx");
        assert_eq!(urlencode("k8s-pool_1"), "k8s-pool_1");
    }

    #[test]
    fn fnv1a_is_the_published_function() {
        // Test vectors of the FNV reference (isthe.com/chongo/tech/comp/fnv).
        assert_eq!(fnv1a(*b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(*b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn cuts_at_a_character_boundary() {
        assert_eq!(clip("short", 10), "short");
        let cut = clip(&"é".repeat(10), 8);
        assert!(cut.len() <= 8 && cut.ends_with('…'), "{cut}");
    }
}
