//! The checks of single spec fields: durations, label keys, addresses,
//! user names, flake attributes, and health checks. Pure; the caller adds
//! where in which file the field was written.

use std::net::IpAddr;
use std::time::Duration;

use super::{HealthCheck, Probe, RawHealthCheck};

pub(super) fn health_check(raw: &RawHealthCheck, index: usize) -> Result<HealthCheck, String> {
    let probe = match (&raw.command, &raw.http) {
        (Some(argv), None) => {
            if argv.is_empty() || argv[0].is_empty() {
                return Err("`command` needs a program".to_string());
            }
            Probe::Command(argv.clone())
        }
        (None, Some(http)) => {
            let rest = http
                .url
                .strip_prefix("http://")
                .ok_or_else(|| format!("url `{}` must start with http://", http.url))?;
            if rest.is_empty() || rest.starts_with('/') {
                return Err(format!("url `{}` has no host", http.url));
            }
            let expected_status = http.expected_status.unwrap_or(200);
            if !(100..=599).contains(&expected_status) {
                return Err(format!(
                    "expectedStatus {expected_status} is not an HTTP status"
                ));
            }
            Probe::Http {
                url: http.url.clone(),
                expected_status,
            }
        }
        _ => return Err("give exactly one of `command` and `http`".to_string()),
    };
    let duration = |field: &str, value: &Option<String>, default: Duration| match value {
        None => Ok(default),
        Some(v) => match parse_duration(v) {
            Ok(d) if d > Duration::ZERO && d <= Duration::from_secs(3600) => Ok(d),
            Ok(_) => Err(format!("`{field}` must be more than 0 and at most 1h")),
            Err(why) => Err(format!("`{field}`: {why}")),
        },
    };
    let retries = raw.retries.unwrap_or(3);
    if !(1..=100).contains(&retries) {
        return Err(format!("`retries` must be 1 to 100, not {retries}"));
    }
    Ok(HealthCheck {
        name: raw
            .name
            .clone()
            .unwrap_or_else(|| format!("check-{}", index + 1)),
        probe,
        timeout: duration("timeout", &raw.timeout, Duration::from_secs(5))?,
        interval: duration("interval", &raw.interval, Duration::from_secs(2))?,
        retries,
    })
}

/// `500ms`, `30s`, `5m`, `2h` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 30s or 5m"))?;
    let secs = |mult: u64| n.checked_mul(mult).map(Duration::from_secs);
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" | "" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86_400),
        _ => {
            return Err(format!(
                "`{s}`: unknown unit `{unit}` (use ms, s, m, h or d)"
            ))
        }
    }
    .ok_or_else(|| format!("`{s}` is too long"))
}

pub(super) fn check_label_key(key: &str) -> Result<(), &'static str> {
    if key.is_empty() || key.len() > 63 {
        return Err("must be 1 to 63 characters");
    }
    if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
    {
        return Err("must contain only letters, digits, '-', '_', '.' and '/'");
    }
    Ok(())
}

/// An IP address or a DNS host name. A leading '-' is refused so that the
/// value can never be read as an option by ssh.
pub fn check_address(address: &str) -> Result<(), &'static str> {
    if address.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    if address.is_empty() || address.len() > 253 {
        return Err("must be an IP address or a host name of 1 to 253 characters");
    }
    for label in address.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("each dot-separated part of a host name must be 1 to 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err("must be an IP address or a host name of letters, digits, '-' and '.'");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("host name parts must not start or end with '-'");
        }
    }
    Ok(())
}

/// A POSIX portable user name.
pub fn check_user(user: &str) -> Result<(), &'static str> {
    if user.is_empty() || user.len() > 32 {
        return Err("must be 1 to 32 characters");
    }
    let first = user.as_bytes()[0];
    if !(first.is_ascii_lowercase() || first == b'_') {
        return Err("must start with a lowercase letter or '_'");
    }
    if !user
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'))
    {
        return Err("must contain only lowercase letters, digits, '_' and '-'");
    }
    Ok(())
}

/// A name under `nixosConfigurations` that is written into a flake output
/// path; it is always quoted there, so only characters that need no escaping
/// inside a quoted Nix attribute name are allowed.
pub fn check_attribute(attr: &str) -> Result<(), &'static str> {
    if attr.is_empty() || attr.len() > 128 {
        return Err("must be 1 to 128 characters");
    }
    if !attr
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
    {
        return Err("must contain only letters, digits, '_' and '-'");
    }
    Ok(())
}
