//! Problems in spec files, each located by file, line and column and
//! carrying the file's source, so that `miette` can point at it.

use miette::{Diagnostic, NamedSource, SourceSpan};

use super::SpecLocation;

/// One problem in one spec file.
#[derive(Debug, Clone, thiserror::Error, Diagnostic)]
#[error("{file}:{line}:{column}: {message}")]
#[diagnostic(code(cim::spec::invalid))]
pub struct SpecError {
    pub file: String,
    pub line: u64,
    pub column: u64,
    pub message: String,
    #[source_code]
    src: NamedSource<String>,
    #[label("{message}")]
    span: Option<SourceSpan>,
}

/// Every problem found in a revision's specs; a revision with any is not
/// deployed.
#[derive(Debug, Clone, thiserror::Error, Diagnostic)]
#[error("{}", summarize(.errors))]
pub struct SpecErrors {
    #[related]
    pub errors: Vec<SpecError>,
}

fn summarize(errors: &[SpecError]) -> String {
    let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
    lines.join("; ")
}

impl SpecError {
    /// An error found after parsing (against the flake), without the source.
    pub fn located(at: &SpecLocation, message: String) -> Self {
        SpecError {
            file: at.file.clone(),
            line: at.line,
            column: at.column,
            message,
            src: NamedSource::new(&at.file, String::new()),
            span: None,
        }
    }

    pub(super) fn at(path: &str, source: &str, line: u64, column: u64, message: String) -> Self {
        let offset = offset_of(source, line, column);
        SpecError {
            file: path.to_string(),
            line,
            column,
            message,
            src: NamedSource::new(path, source.to_string()),
            span: offset.map(|o| SourceSpan::from((o, 1))),
        }
    }
}

/// Byte offset of a 1-based line and character column, if it is inside the
/// source.
pub(super) fn offset_of(source: &str, line: u64, column: u64) -> Option<usize> {
    let line_start = if line <= 1 {
        0
    } else {
        source
            .match_indices('\n')
            .nth(usize::try_from(line - 2).ok()?)
            .map(|(i, _)| i + 1)?
    };
    let rest = &source[line_start..];
    let col = usize::try_from(column.saturating_sub(1)).ok()?;
    let within = rest
        .char_indices()
        .nth(col)
        .map(|(i, _)| i)
        .unwrap_or(rest.len());
    let offset = line_start + within;
    (offset < source.len()).then_some(offset)
}

/// serde-saphyr appends location details (on later lines, and as a trailing
/// "at line N, column M"); the location is reported separately, in front.
pub(super) fn first_line(message: &str) -> String {
    let line = message.lines().next().unwrap_or(message).trim();
    match line.rfind(" at line ") {
        Some(i) if line[i..].contains(", column ") => line[..i].to_string(),
        _ => line.to_string(),
    }
}
