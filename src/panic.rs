//! Panics caught on background threads (the trainer's steps, generation builds, index
//! compaction), which report them as failures and carry on instead of dying silently.

/// The text of a caught panic's payload.
pub fn message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

#[cfg(test)]
mod tests {
    #[test]
    fn messages_of_both_payload_kinds_are_read() {
        let literal = std::panic::catch_unwind(|| panic!("plain")).unwrap_err();
        assert_eq!(super::message(literal.as_ref()), "plain");
        let formatted = std::panic::catch_unwind(|| panic!("{} {}", "formatted", 2)).unwrap_err();
        assert_eq!(super::message(formatted.as_ref()), "formatted 2");
        let other = std::panic::catch_unwind(|| std::panic::panic_any(7u8)).unwrap_err();
        assert_eq!(super::message(other.as_ref()), "a panic without a message");
    }
}
