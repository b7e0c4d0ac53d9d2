//! How the command line ends: a user error is one clear message (its chain, `{:#}`) and an exit
//! code, never a backtrace, with or without `RUST_BACKTRACE`; only a real panic shows one.
//!
//! Exit codes: 0 success, 1 a failure while working (loading, generating, writing), 2 bad
//! arguments (clap's own code for a malformed command line, and ours for a value or file the
//! arguments name that cannot be used).

use std::process::ExitCode;

use engine::EngineError;

/// An error in what the command line asked for, found before any work started.
#[derive(Debug)]
pub struct BadArgument(pub anyhow::Error);

impl std::fmt::Display for BadArgument {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

// No `source()`: the message above already holds the whole chain, once.
impl std::error::Error for BadArgument {}

impl BadArgument {
    /// Marks `error` as the user's argument error, unless it is a download failure (the hub or
    /// the network, not the arguments, went wrong).
    pub fn unless_download(error: anyhow::Error) -> anyhow::Error {
        let download = error
            .chain()
            .any(|c| matches!(c.downcast_ref::<EngineError>(), Some(EngineError::Hub(_))));
        if download { error } else { Self(error).into() }
    }
}

/// The exit code for `error`: 2 for bad arguments (ours, or an invalid request field the engine
/// names), 1 for everything else.
pub fn exit_code(error: &anyhow::Error) -> u8 {
    let bad_argument = error.chain().any(|c| {
        c.is::<BadArgument>()
            || matches!(
                c.downcast_ref::<EngineError>(),
                Some(EngineError::InvalidInput { .. })
            )
    });
    if bad_argument { 2 } else { 1 }
}

/// Prints `error` as one message (no backtrace) and gives its exit code.
pub fn report(error: &anyhow::Error) -> ExitCode {
    eprintln!("error: {error:#}");
    ExitCode::from(exit_code(error))
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn bad_arguments_exit_2_and_failures_1() {
        let bad: anyhow::Error =
            BadArgument(anyhow::anyhow!("--width 513 is not a multiple of 8")).into();
        assert_eq!(exit_code(&bad), 2);
        assert_eq!(format!("{bad:#}"), "--width 513 is not a multiple of 8");
        let field = anyhow::Error::from(EngineError::invalid("width", "513")).context("generating");
        assert_eq!(exit_code(&field), 2);
        let io: anyhow::Error = Err::<(), _>(std::io::Error::other("disk full"))
            .context("writing out.png")
            .unwrap_err();
        assert_eq!(exit_code(&io), 1);
        // A download failure found while preparing stays a failure.
        let hub = BadArgument::unless_download(EngineError::Hub("offline".into()).into());
        assert_eq!(exit_code(&hub), 1);
        let missing = BadArgument::unless_download(anyhow::anyhow!("/nonexistent: not a model"));
        assert_eq!(exit_code(&missing), 2);
        // The chain is printed once, in order.
        let chained = BadArgument::unless_download(
            anyhow::anyhow!("No such file").context("reading mask.png"),
        );
        assert_eq!(format!("{chained:#}"), "reading mask.png: No such file");
    }
}
