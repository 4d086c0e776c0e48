//! Text from outside (servers, resources) cut to a size before it is kept or printed.

/// The longest run name kept (Prefect's own are two words); a name is logged with every
/// line about its run.
pub const MAX_RUN_NAME: usize = 256;
/// The longest state message kept.
pub const MAX_STATE_MESSAGE: usize = 1024;

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
    fn cuts_at_a_character_boundary() {
        assert_eq!(clip("short", 10), "short");
        let cut = clip(&"é".repeat(10), 8);
        assert!(cut.len() <= 8 && cut.ends_with('…'), "{cut}");
    }
}
