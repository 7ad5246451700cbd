//! Text cleanup of transformers' slow `CLIPTokenizer` when ftfy is not installed: its
//! `BasicTokenizer(strip_accents=False, do_split_on_punc=False)` path.

use regex::Regex;
use std::sync::OnceLock;

/// Characters `BasicTokenizer._clean_text` drops: NUL, U+FFFD and every "C*" category
/// character except tab, newline and carriage return.
fn dropped_chars() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"[\p{C}\x{FFFD}&&[^\t\n\r]]").expect("static regex is valid"))
}

/// Characters `BasicTokenizer._clean_text` turns into a plain space (`_is_whitespace`).
fn space_chars() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"[\t\n\r\p{Zs}]").expect("static regex is valid"))
}

/// True for the CJK ideograph blocks `BasicTokenizer._is_chinese_char` lists.
fn is_cjk(c: char) -> bool {
    let cp = c as u32;
    (0x4E00..=0x9FFF).contains(&cp)
        || (0x3400..=0x4DBF).contains(&cp)
        || (0x20000..=0x2A6DF).contains(&cp)
        || (0x2A700..=0x2B73F).contains(&cp)
        || (0x2B740..=0x2B81F).contains(&cp)
        || (0x2B820..=0x2CEAF).contains(&cp)
        || (0xF900..=0xFAFF).contains(&cp)
        || (0x2F800..=0x2FA1F).contains(&cp)
}

/// Unicode NFC normalisation (through the `tokenizers` crate's normaliser).
fn nfc(text: &str) -> String {
    let mut normalized = tokenizers::NormalizedString::from(text);
    normalized.nfc();
    normalized.get().to_string()
}

/// Cleans `text` exactly as `" ".join(BasicTokenizer(strip_accents=False,
/// do_split_on_punc=False).tokenize(text))` does: drop control characters, map whitespace
/// to spaces, put spaces around CJK ideographs, NFC-normalise, split on whitespace,
/// lower-case each word (no accent stripping) and join the words with single spaces.
pub fn basic_clean(text: &str) -> String {
    let text = dropped_chars().replace_all(text, "");
    let text = space_chars().replace_all(&text, " ");
    let mut spaced = String::with_capacity(text.len());
    for c in text.chars() {
        if is_cjk(c) {
            spaced.push(' ');
            spaced.push(c);
            spaced.push(' ');
        } else {
            spaced.push(c);
        }
    }
    let normalized = nfc(&spaced);
    let words: Vec<String> = normalized
        .split(char::is_whitespace)
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase())
        .collect();
    words.join(" ")
}

#[cfg(test)]
mod tests {
    use super::basic_clean;

    #[test]
    fn cleans_like_basic_tokenizer() {
        assert_eq!(basic_clean("  A  PHOTO\tof\n"), "a photo of");
        assert_eq!(basic_clean("a\u{0}b\u{7}c\u{FFFD}d\u{200B}e"), "abcde");
        assert_eq!(basic_clean("東京"), "東 京");
        assert_eq!(basic_clean("e\u{301}"), "\u{e9}");
        assert_eq!(basic_clean("ΣΑΣ"), "σας");
        assert_eq!(basic_clean("x\u{a0}y\u{3000}z"), "x y z");
        assert_eq!(basic_clean(""), "");
    }
}
