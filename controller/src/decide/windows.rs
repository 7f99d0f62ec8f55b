//! Deployment windows at dispatch: whether hosts may be handed to
//! workers now, and `WindowClosed`/`WindowOpened` when that changes (said
//! once each, whatever the number of hosts waiting).

use super::{append, Effect, Now, State, Then};
use crate::event::{NewEvent, Reason};

impl State {
    /// Whether the deployment windows let hosts be worked on now; says
    /// `WindowClosed` or `WindowOpened` when that changed.
    pub(super) fn windows_at(&mut self, now: Now, out: &mut Vec<Effect>) -> crate::window::Verdict {
        use crate::window::Verdict;
        let windows = self
            .specs
            .as_ref()
            .map(|(_, f)| f.policy.windows.as_slice())
            .unwrap_or_default();
        let verdict = crate::window::verdict(windows, now.wall);
        let revision = self.current_revision().map(str::to_string);
        match &verdict {
            Verdict::Closed { because, until } if !self.window_closed => {
                self.window_closed = true;
                let until = match until {
                    Some(t) => format!(
                        "until {}",
                        t.format(&time::format_description::well_known::Rfc3339)
                            .unwrap_or_default()
                    ),
                    None => "with no opening within a year".to_string(),
                };
                let ev = NewEvent::repo(
                    Reason::WindowClosed,
                    revision.as_deref(),
                    format!("{because}: no host is worked on {until} (`cim reconcile --force-window` in an emergency)"),
                );
                append(out, vec![ev], Then::Nothing);
            }
            Verdict::Open if self.window_closed => {
                self.window_closed = false;
                let ev = NewEvent::repo(
                    Reason::WindowOpened,
                    revision.as_deref(),
                    "the deployment windows are open: hosts are worked on again",
                );
                append(out, vec![ev], Then::Nothing);
            }
            _ => {}
        }
        verdict
    }

    /// When the deployment windows, open now, close (`None`: there are no
    /// windows, or they stay open for at least a year).
    pub(super) fn windows_close(&self, now: Now) -> Option<std::time::Instant> {
        let windows = self
            .specs
            .as_ref()
            .map(|(_, f)| f.policy.windows.as_slice())
            .unwrap_or_default();
        let at = crate::window::closes_at(windows, now.wall)?;
        let wait = std::time::Duration::try_from(at - now.wall).unwrap_or_default();
        Some(now.at + wait)
    }
}
