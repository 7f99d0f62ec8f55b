//! Showing errors to people: an error and every cause behind it on one
//! line, so that an event message says both what failed and why. Used by
//! every layer, so it depends on nothing.

/// An error and its causes on one line each, so that an event message says
/// both what failed and why.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("copying to web-1 failed")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn causes_are_joined_once() {
        let e = Outer(std::io::Error::other("connection reset"));
        assert_eq!(error_chain(&e), "copying to web-1 failed: connection reset");
    }
}
